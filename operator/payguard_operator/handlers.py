"""Kopf handlers for FailedOperation resources: each a few lines over app.failures and sync.

What people do with kubectl lands here: suspend or resume (spec.suspend), retry now (an
annotation), discard (delete: the finalizer keeps the resource until the row is discarded).
Attempts themselves are made by the driver (app.worker's retry loop), never by a handler.
"""

from __future__ import annotations

from typing import Any

import kopf

from app.failures.models import FailureStatus
from app.failures.service import (
    OperationSucceeded,
    discard_failed_operation,
    retry_failed_operation,
    suspend_failed_operation,
)
from app.problems import NotFound
from payguard_operator import resources as fo
from payguard_operator.sync import NORMAL, mirror_of, show

REGISTRY = kopf.OperatorRegistry()
FO = (fo.GROUP, fo.VERSION, fo.PLURAL)


@kopf.on.login(registry=REGISTRY)
async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod its service account, elsewhere KUBECONFIG (Kopf's own readers: no client library)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


async def _ours(memo: kopf.Memo, body: kopf.Body) -> Any:
    """The row this resource mirrors, or None (a hand-made resource naming another row acts on nothing)."""
    mirror = await mirror_of(memo.services, (body.get("spec") or {}).get("rowId"))
    return mirror if mirror is not None and fo.mirrors_row(dict(body), mirror) else None


@kopf.on.resume(*FO, registry=REGISTRY)
@kopf.on.create(*FO, registry=REGISTRY)
async def show_row(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A resource seen for the first time (or again after a restart) shows its row's status."""
    await show(memo.kube, dict(body), await mirror_of(memo.services, (body.get("spec") or {}).get("rowId")))


@kopf.on.field(*FO, field="spec.suspend", registry=REGISTRY)
async def suspend(body: kopf.Body, old: Any, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """spec.suspend pauses or resumes the row's attempts (on creation, the row's own value is there)."""
    if bool(old) == bool(new) or await _ours(memo, body) is None:
        return
    await suspend_failed_operation(memo.services, body["spec"]["rowId"], bool(new))
    await show(memo.kube, dict(body), await _ours(memo, body))
    reason, says = ("Suspended", "no attempt starts") if new else ("Resumed", "attempts resume on schedule")
    await memo.kube.post_event(dict(body), NORMAL, reason, says)


@kopf.on.field(*FO, field=("metadata", "annotations", fo.RETRY_NOW), registry=REGISTRY)
async def retry_now(body: kopf.Body, new: Any, memo: kopf.Memo, **_: Any) -> None:
    """The annotation asks for an attempt at once (a dead one gets one more); it is then removed."""
    if new is None:  # its removal
        return
    mirror = await _ours(memo, body)
    if mirror is not None:
        try:
            await retry_failed_operation(memo.services, mirror.id)
            await memo.kube.post_event(dict(body), NORMAL, "RetryRequested", "an attempt starts now")
        except OperationSucceeded:
            await memo.kube.post_event(dict(body), NORMAL, "AlreadySucceeded", "nothing to retry")
    await memo.kube.remove_annotation(body["metadata"]["name"], fo.RETRY_NOW)


@kopf.on.delete(*FO, registry=REGISTRY)
async def discard(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Deleting the resource discards the operation, unless it already succeeded (or is not ours)."""
    mirror = await _ours(memo, body)
    if mirror is None or mirror.status in (FailureStatus.SUCCEEDED, FailureStatus.DISCARDED):
        return
    try:
        await discard_failed_operation(memo.services, mirror.id)
    except (OperationSucceeded, NotFound):  # it succeeded meanwhile, or the row is gone
        return
    await memo.kube.post_event(
        dict(body), NORMAL, "Discarded", "the resource was deleted: never attempted again"
    )


@kopf.on.probe(id="resynced_at", registry=REGISTRY)
async def last_resync(memo: kopf.Memo, **_: Any) -> str | None:
    """Shown by the liveness endpoint (which answers while the event loop runs; if the driver
    or the resync loop ends, the process exits and the pod restarts)."""
    resynced_at: str | None = memo.resynced_at
    return resynced_at
