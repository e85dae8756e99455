"""The real Kopf operator (`payguard operator`, its own process) against the Kubernetes emulator,
with the test's PostgreSQL and a real SMTP server: what people see and do with kubectl."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.config import Settings
from app.failures.engine import Policy, delay_bounds
from app.failures.models import FailureStatus
from app.main import create_app
from app.notifications.models import EmailStatus
from tests.fixtures.app import Client, close_client
from tests.fixtures.emails import buy_lead, smtp_settings
from tests.fixtures.kube import KubeAPI
from tests.fixtures.operator import NAMESPACE, OperatorProcess, history, kubectl, operator_env, phase
from tests.fixtures.rbac import access_of, granted, role_rules
from tests.fixtures.smtp import SmtpServer
from tests.fixtures.worker import running_worker, until

pytestmark = pytest.mark.timeout(120)

FO = "failedoperations"
REFUSAL = "451 4.3.0 try again later"
EMAIL_ATTEMPTS = 4  # the first try and 3 retries


class Run:
    """The operators of one test, and waiting on what they do (their logs shown when a wait fails)."""

    def __init__(self, db_url: str, kube: KubeAPI, smtp: SmtpServer, logs: Path) -> None:
        self.db_url, self.kube, self.smtp, self.logs = db_url, kube, smtp, logs
        self.started: list[OperatorProcess] = []
        self.backoff = (3600.0, 3600.0)  # (base, cap) seconds: by default no retry comes by itself

    @asynccontextmanager
    async def operating(self, op_id: int) -> AsyncIterator[OperatorProcess]:
        """An operator, once the operation's resource shows it pending; stopped by SIGTERM (exit 0) after."""
        proc = self.start()
        async with stopped(proc):
            await self.until(lambda: phase(self.resource(op_id)) == "Pending", "its resource shows it")
            yield proc

    def start(self, **env: str) -> OperatorProcess:
        log = self.logs / f"operator-{len(self.started)}.log"
        base, cap = self.backoff
        env = {"PAYGUARD_RETRY_BASE_DELAY_S": str(base), "PAYGUARD_RETRY_MAX_DELAY_S": str(cap), **env}
        proc = OperatorProcess(
            self.db_url, log, operator_env(self.db_url, self.kube.kubeconfig, self.smtp, **env)
        )
        self.started.append(proc)
        return proc

    async def until(
        self, condition: Callable[[], Awaitable[object] | object], what: str, timeout_s: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.log.name}\n{p.stderr()}" for p in self.started)
                raise AssertionError(f"timed out after {timeout_s} s waiting until {what}\n{logs}")
            await asyncio.sleep(0.05)

    def resource(self, op_id: int) -> dict[str, Any] | None:
        return self.kube.get(FO, NAMESPACE, f"email-{op_id}")

    def reasons(self, op_id: int) -> list[str]:
        events = [e for e in self.kube.events() if e["involvedObject"]["name"] == f"email-{op_id}"]
        return [e["reason"] for e in sorted(events, key=lambda e: e["metadata"]["resourceVersion"].zfill(12))]


@pytest.fixture
async def run(db_url: str, kube: KubeAPI, smtp: SmtpServer, tmp_path: Path) -> AsyncIterator[Run]:
    await kube.create(
        "kopfpeerings", {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "payguard"}}
    )
    r = Run(db_url, kube, smtp, tmp_path)
    try:
        yield r
    finally:
        for proc in r.started:
            proc.close()
    # least privilege holds: the Role of k8s/ grants every request the operators made
    rules = role_rules()
    made = {access_of(q.method, q.url.path, dict(q.params)) for q in kube.emulator if _by_operator(q)}
    assert made, "no request of the operator was seen"
    assert [a for a in made if a is not None and not granted(rules, a)] == []


def _by_operator(request: Any) -> bool:
    agent = request.headers.get("User-Agent", "")
    return not agent.startswith(("kubectl", "kmock"))


@pytest.fixture
def failed_email(
    settings_for: Callable[..., Settings], db_url: str, db: asyncpg.Connection, smtp: SmtpServer, run: Run
) -> Callable[..., Awaitable[int]]:
    """Make a lead's email whose first attempt (the worker's) failed: a failed operation for the operator."""

    async def make(user: str = "u1") -> int:
        # the operators' backoff: the first retry is scheduled by the worker that failed the first attempt
        backoff = {"retry_base_delay_s": run.backoff[0], "retry_max_delay_s": run.backoff[1]}
        merged = {**smtp_settings(smtp), "retry_driver": "kubernetes", **backoff}
        client = Client(create_app(settings_for(**merged), db_url))
        try:
            smtp.refuse(REFUSAL)
            before = await db.fetchval("SELECT count(*) FROM failed_operations")
            await buy_lead(client, user=user, email=f"{user}@example.com")
            async with running_worker(client):
                await until(db, "SELECT count(*) = $1 FROM failed_operations", before + 1)
        finally:
            await close_client(client)
        op_id: int = await db.fetchval("SELECT max(id) FROM failed_operations")
        return op_id

    return make


@asynccontextmanager
async def stopped(proc: OperatorProcess) -> AsyncIterator[None]:
    yield
    proc.signal(signal.SIGTERM)
    try:
        code = await proc.wait(30)
    except Exception:
        proc.signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        await asyncio.sleep(1)
        raise AssertionError(proc.stderr()) from None
    assert code == 0, proc.stderr()


def _at(entry: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(entry["at"])


async def test_a_failing_email_is_retried_on_schedule_until_smtp_accepts_then_succeeded(
    failed_email: Callable[..., Awaitable[int]], db: asyncpg.Connection, smtp: SmtpServer, run: Run
) -> None:
    run.backoff = (0.6, 1.2)
    op_id = await failed_email()
    proc = run.start()
    async with stopped(proc):
        await run.until(
            lambda: phase(run.resource(op_id)) in ("Pending", "Retrying"), "its resource shows it"
        )
        await until(db, "SELECT attempts >= 3 FROM failed_operations")  # two retries refused
        run.smtp.reset()  # accepting from now on
        await run.until(lambda: phase(run.resource(op_id)) == "Succeeded", "the resource says Succeeded")
    row = await db.fetchrow("SELECT status, attempts, history FROM failed_operations WHERE id = $1", op_id)
    assert row["status"] == FailureStatus.SUCCEEDED
    assert await history(db, op_id) == list(range(1, row["attempts"] + 1))
    assert len(smtp.received) == 1  # delivered once
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.SENT
    # on the backoff schedule: retry n waited at least half of base * 2^(n-1) (capped)
    entries = json.loads(row["history"])
    policy = Policy(3, 0.6, 1.2)
    for retry, (before, after) in enumerate(itertools.pairwise(entries), start=1):
        assert (_at(after) - _at(before)).total_seconds() >= delay_bounds(policy, retry)[0] - 0.05
    body = run.resource(op_id)
    assert body is not None
    assert body["status"]["attempts"] == row["attempts"] and body["status"]["maxAttempts"] == EMAIL_ATTEMPTS
    assert {c["type"]: c["status"] for c in body["status"]["conditions"]}["Succeeded"] == "True"
    assert body["metadata"]["labels"]["payguard.dev/status"] == "succeeded"
    assert "example.com" not in json.dumps(body)  # no address, no payload in the resource
    reasons = run.reasons(op_id)
    assert reasons.count("Succeeded") == 1 and reasons.count("RetryFailed") == row["attempts"] - 2


async def test_an_email_that_never_goes_is_dead_after_exactly_its_budget(
    failed_email: Callable[..., Awaitable[int]], db: asyncpg.Connection, smtp: SmtpServer, run: Run
) -> None:
    run.backoff = (0.2, 0.4)
    op_id = await failed_email()
    proc = run.start()
    async with stopped(proc):
        await run.until(lambda: phase(run.resource(op_id)) == "Dead", "the resource says Dead")
        await run.until(lambda: "Dead" in run.reasons(op_id), "the Dead event is posted")
        # the operator's own /metrics counts its attempts (and its `up` is PayguardOperatorDown's)
        retries = {"queue": "retries", "kind": "email"}
        assert await proc.metric("payguard_work_items_total", **retries, outcome="failed") == 2
        assert await proc.metric("payguard_work_items_total", **retries, outcome="dead") == 1
    assert await history(db, op_id) == [1, 2, 3, 4]
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.DEAD
    assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.DEAD
    assert smtp.received == []
    assert run.reasons(op_id) == ["RetryFailed", "RetryFailed", "RetryFailed", "Dead"]
    body = run.resource(op_id)
    assert body is not None and "451 4.3.0 try again later" in body["status"]["lastError"]


async def test_retry_now_and_suspend_with_kubectl(
    failed_email: Callable[..., Awaitable[int]],
    db: asyncpg.Connection,
    smtp: SmtpServer,
    run: Run,
    kube: KubeAPI,
) -> None:
    op_id = await failed_email()
    name = f"email-{op_id}"
    async with run.operating(op_id):  # no retry would come by itself
        smtp.reset()
        await kubectl(kube.kubeconfig, "patch", "fo", name, "--type=merge", "-p", '{"spec":{"suspend":true}}')
        await until(db, "SELECT suspended FROM failed_operations")
        await kubectl(kube.kubeconfig, "annotate", "fo", name, "payguard.dev/retry-now=1")
        await run.until(lambda: "RetryRequested" in run.reasons(op_id), "the retry is asked for")
        await asyncio.sleep(2)  # suspended: the due retry does not start
        assert await history(db, op_id) == [1] and smtp.received == []
        body = run.resource(op_id)
        assert body is not None and "payguard.dev/retry-now" not in body["metadata"].get("annotations", {})
        assert {c["type"]: c["status"] for c in body["status"]["conditions"]}["Suspended"] == "True"

        await kubectl(
            kube.kubeconfig, "patch", "fo", name, "--type=merge", "-p", '{"spec":{"suspend":false}}'
        )
        await run.until(lambda: phase(run.resource(op_id)) == "Succeeded", "resumed, it succeeds at once")
    assert await history(db, op_id) == [1, 2]
    assert len(smtp.received) == 1
    assert run.reasons(op_id) == ["Suspended", "RetryRequested", "Resumed", "Succeeded"]


async def test_deleting_a_resource_discards_its_operation_but_not_a_succeeded_one(
    failed_email: Callable[..., Awaitable[int]],
    db: asyncpg.Connection,
    smtp: SmtpServer,
    run: Run,
    kube: KubeAPI,
) -> None:
    first = await failed_email()
    async with run.operating(first):
        await kubectl(kube.kubeconfig, "delete", "fo", f"email-{first}")
        assert run.resource(first) is None
        row = await db.fetchrow("SELECT status, attempts FROM failed_operations WHERE id = $1", first)
        assert (row["status"], row["attempts"]) == (FailureStatus.DISCARDED, 1)
        assert await db.fetchval("SELECT status FROM outbox_emails") == EmailStatus.DEAD
        await asyncio.sleep(1.5)  # three resyncs: a discarded row gets no resource back
        assert run.resource(first) is None

        # a second email, retried by hand until it succeeds, then deleted: it stays succeeded
        second = await failed_email(user="u2")
        await run.until(lambda: phase(run.resource(second)) == "Pending", "the second one's resource")
        smtp.reset()
        await kubectl(kube.kubeconfig, "annotate", "fo", f"email-{second}", "payguard.dev/retry-now=yes")
        await run.until(lambda: phase(run.resource(second)) == "Succeeded", "it succeeds")
        await kubectl(kube.kubeconfig, "delete", "fo", f"email-{second}")
    assert (
        await db.fetchval("SELECT status FROM failed_operations WHERE id = $1", second)
        == FailureStatus.SUCCEEDED
    )
    assert len(smtp.received) == 1


async def test_succeeded_resources_go_after_their_ttl_and_rows_stay(
    failed_email: Callable[..., Awaitable[int]], db: asyncpg.Connection, smtp: SmtpServer, run: Run
) -> None:
    run.backoff = (0.2, 0.4)
    op_id = await failed_email()
    smtp.reset()
    proc = run.start(PAYGUARD_OPERATOR_FINISHED_TTL_S="2")
    async with stopped(proc):
        await run.until(lambda: phase(run.resource(op_id)) == "Succeeded", "it succeeds")
        await run.until(lambda: run.resource(op_id) is None, "the TTL deletes its resource", timeout_s=20)
        await asyncio.sleep(1.5)
        assert run.resource(op_id) is None  # not recreated
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.SUCCEEDED


async def test_an_operator_killed_mid_backoff_and_restarted_neither_loses_nor_doubles_an_attempt(
    failed_email: Callable[..., Awaitable[int]], db: asyncpg.Connection, smtp: SmtpServer, run: Run
) -> None:
    run.backoff = (1.5, 1.5)
    op_id = await failed_email()
    first = run.start()
    await until(db, "SELECT attempts = 2 FROM failed_operations")
    await first.kill()  # between attempt 2 and its retry
    second = run.start()
    async with stopped(second):
        await until(db, "SELECT attempts = 3 FROM failed_operations")
        smtp.reset()
        await run.until(lambda: phase(run.resource(op_id)) == "Succeeded", "the last attempt succeeds")
    assert await history(db, op_id) == [1, 2, 3, 4]
    assert len(smtp.received) == 1


async def test_two_operators_at_once_never_double_an_attempt(
    failed_email: Callable[..., Awaitable[int]],
    db: asyncpg.Connection,
    smtp: SmtpServer,
    run: Run,
    kube: KubeAPI,
) -> None:
    run.backoff = (0.3, 0.6)
    op_id = await failed_email()
    older, newer = run.start(), run.start()
    async with stopped(older), stopped(newer):
        await until(db, "SELECT attempts = 3 FROM failed_operations")
        smtp.reset()
        await run.until(lambda: phase(run.resource(op_id)) == "Succeeded", "it succeeds")
        # Kopf peering: one of the two (the one that started its Kopf last leads) pauses its handlers
        paused = [p for p in (older, newer) if "Pausing operations in favour of" in p.stderr()]
        assert len(paused) == 1
    assert await history(db, op_id) == [1, 2, 3, 4]
    assert len(smtp.received) == 1
    assert run.reasons(op_id).count("Succeeded") == 1


async def test_a_resource_deleted_behind_the_operators_back_comes_back(
    failed_email: Callable[..., Awaitable[int]],
    db: asyncpg.Connection,
    smtp: SmtpServer,
    run: Run,
    kube: KubeAPI,
) -> None:
    op_id = await failed_email()
    async with run.operating(op_id):
        key = (kube.resource(FO), NAMESPACE, f"email-{op_id}")
        first_uid = kube.emulator.objects[key]["metadata"]["uid"]
        kube.emulator.objects[key].delete()  # gone from storage: no finalizer, no handler ran
        await run.until(
            lambda: (run.resource(op_id) or {}).get("metadata", {}).get("uid") not in (None, first_uid),
            "the resync makes it again",
        )
        await run.until(lambda: phase(run.resource(op_id)) == "Pending", "with its status")
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.PENDING
    assert await history(db, op_id) == [1]


async def test_liveness_answers_and_sigterm_exits_zero(db_url: str, run: Run) -> None:
    proc = run.start()
    async with stopped(proc):

        async def alive() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    r = await http.get(f"http://127.0.0.1:{proc.liveness_port}/healthz", timeout=2)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json().get("resynced_at") is not None

        await run.until(alive, "/healthz answers with the last resync")


async def test_a_hand_made_resource_naming_another_row_acts_on_nothing(
    failed_email: Callable[..., Awaitable[int]],
    db: asyncpg.Connection,
    run: Run,
    kube: KubeAPI,
) -> None:
    op_id = await failed_email()
    async with run.operating(op_id):
        forged = {
            "apiVersion": "payguard.dev/v1",
            "kind": "FailedOperation",
            "metadata": {"name": "forged", "annotations": {"payguard.dev/retry-now": "1"}},
            "spec": {"kind": "email", "reference": "not-its-reference", "rowId": op_id, "maxAttempts": 4},
        }
        await kube.create(FO, forged)
        await run.until(
            lambda: any(
                c["reason"] == "RowMissing"
                for c in ((kube.get(FO, NAMESPACE, "forged") or {}).get("status") or {}).get("conditions", [])
            ),
            "it is marked as mirroring no row",
        )
        await kubectl(
            kube.kubeconfig, "patch", "fo", "forged", "--type=merge", "-p", '{"spec":{"suspend":true}}'
        )
        await kubectl(kube.kubeconfig, "delete", "fo", "forged")
        await asyncio.sleep(1)
    row = await db.fetchrow(
        "SELECT status, suspended, next_attempt_at > now() + interval '10 minutes' AS later FROM failed_operations"
    )
    assert (row["status"], row["suspended"], row["later"]) == (FailureStatus.PENDING, False, True)
    assert phase(run.resource(op_id)) == "Pending"


async def test_kubectl_describe_shows_the_events(
    failed_email: Callable[..., Awaitable[int]], smtp: SmtpServer, run: Run, kube: KubeAPI
) -> None:
    op_id = await failed_email()
    async with run.operating(op_id):
        smtp.reset()
        await kubectl(kube.kubeconfig, "annotate", "fo", f"email-{op_id}", "payguard.dev/retry-now=1")
        await run.until(lambda: "Succeeded" in run.reasons(op_id), "it succeeds")
        described = (await kubectl(kube.kubeconfig, "describe", "fo", f"email-{op_id}")).stdout
        listed = (await kubectl(kube.kubeconfig, "get", "fo")).stdout
    assert "Phase:" in described and "Succeeded" in described
    events = described[described.index("Events:") :]
    assert "RetryRequested" in events and "Succeeded" in events and "attempt 2 of 4 succeeded" in events
    header, row = listed.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "KIND", "PHASE", "ATTEMPTS"]
    assert row.split()[:5] == [f"email-{op_id}", "email", "Succeeded", "2", "4"]
