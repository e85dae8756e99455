"""`payguard operator`: Kopf over FailedOperation resources, the retry driver and the resync, one process.

- Kopf runs the handlers of handlers.py (suspend, retry now, discard on delete, status on resume),
  with Kopf peering: of several replicas the newest handles resources, the others wait.
- The driver is the worker's retry loop (app.worker.runner), the same engine as the local driver:
  it claims due failed operations under a lease with a fencing token, so no two drivers (replicas,
  or one restarted over a stalled one) ever attempt one operation at once, and nothing is forgotten:
  the row, not the resource, says what is due.
- The resync brings resources and rows together every PAYGUARD_OPERATOR_RESYNC_S and whenever a
  failure is recorded (its NOTIFY).
If any of the three ends, the others are stopped and the process exits: the pod restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime

import kopf
from prometheus_client import start_http_server

from app.config import ConfigError, Settings
from app.db.engine import create_engine
from app.main import build_services
from app.observability.metrics import Queue
from app.services import Services
from app.worker.leases import Claimed
from app.worker.runner import Worker
from payguard_operator import resources as fo
from payguard_operator.handlers import REGISTRY
from payguard_operator.kube import Kube, kube_config
from payguard_operator.sync import after_attempt, resync

__all__ = ["kube_config", "operate", "serve_metrics"]
log = logging.getLogger("payguard.operator")
FIRST = asyncio.FIRST_COMPLETED
KOPF_PREFIX = "kopf.payguard.dev"


class Driver(Worker):
    """The worker's retry loop; a recorded failure's NOTIFY also asks for a resync (its new resource)."""

    def __init__(self, services: Services) -> None:
        super().__init__(services, services.engine)
        self.resync_due = asyncio.Event()

    def wake(self, queue: Queue) -> None:
        super().wake(queue)
        if queue == Queue.RETRIES:
            self.resync_due.set()


def serve_metrics(settings: Settings) -> None:
    """The operator's /metrics (its retry attempts; its `up` is what PayguardOperatorDown watches)."""
    if not settings.operator_metrics_port:
        return
    try:
        start_http_server(settings.operator_metrics_port, addr=settings.operator_metrics_host)
    except OSError as exc:  # not a database problem, which is what main() would call an OSError
        port = settings.operator_metrics_port
        raise ConfigError(f"PAYGUARD_OPERATOR_METRICS_PORT {port}: cannot listen ({exc.strerror})") from None


def kopf_settings(settings: Settings) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    # Kopf's bookkeeping in annotations, not in the status (which is the row's). Not under payguard.dev/:
    # Kopf ignores every annotation under its storage prefix, and would not see payguard.dev/retry-now.
    s.persistence.finalizer = fo.FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    s.scanning.disabled = True  # no cluster-wide watch of CRDs and namespaces: a Role is enough (k8s/)
    s.posting.level = logging.WARNING  # our own Events say what happened; Kopf's only when a handler fails
    s.peering.name = settings.operator_peering
    s.peering.mandatory = False  # no KopfPeering object (a dev cluster): one replica, standalone
    # the newest replica leads (a restarted pod at once, not after the dead one's peering lifetime);
    # the random part keeps two replicas started in the same millisecond from tying, which pauses both
    s.peering.priority = int(time.time() * 1000) * 1000 + random.randrange(1000)
    return s


async def operate(settings: Settings, url: str) -> None:
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # lightkube's client logs every request at INFO
    engine = create_engine(settings, url)
    services = build_services(settings, engine)
    kube = Kube.connect(settings.kube_namespace)
    memo = kopf.Memo(services=services, kube=kube, resynced_at=None)
    driver = Driver(services)
    stopping = asyncio.Event()

    async def after(item: Claimed, outcome: str) -> None:
        try:
            await after_attempt(services, kube, item, outcome)
        except Exception as exc:  # committed already; the resync shows it on the resource
            log.warning("mirroring an attempt failed", extra={"id": item.id, "error": repr(exc)})

    async def resyncing() -> None:
        while not stopping.is_set():
            driver.resync_due.clear()
            try:
                await resync(services, kube)
                memo.resynced_at = datetime.now(UTC).isoformat()
            except Exception as exc:  # Kubernetes or the database away: the next pass tries again
                log.warning("resync failed", extra={"error": repr(exc)})
            wake = asyncio.ensure_future(driver.resync_due.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait(
                {wake, stop}, timeout=settings.operator_resync_s, return_when="FIRST_COMPLETED"
            )
            wake.cancel()
            stop.cancel()

    tasks = [
        asyncio.create_task(
            kopf.operator(
                registry=REGISTRY,
                settings=kopf_settings(settings),
                namespaces=[kube.namespace],
                clusterwide=False,
                memo=memo,
                liveness_endpoint=settings.operator_liveness,
                stop_flag=stopping,
            ),
            name="kopf",
        ),
        asyncio.create_task(driver.drive_retries(after), name="driver"),
        asyncio.create_task(resyncing(), name="resync"),
    ]
    log.info("operator running", extra={"namespace": kube.namespace, "peering": settings.operator_peering})
    try:
        done, _ = await asyncio.wait(tasks, return_when=FIRST)
        ended = next(iter(done))
        log.info("operator stopping", extra={"ended": ended.get_name()})
        stopping.set()
        driver.stop()  # attempts in hand finish and are mirrored
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise RuntimeError(f"the operator's {task.get_name()} failed") from result
    finally:
        await kube.close()
        await engine.dispose()
