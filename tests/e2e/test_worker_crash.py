"""`payguard worker` processes killed, frozen and stopped mid-batch: every stored event's effect lands once.

The worker's claims are leases with a fencing token (app/worker/leases.py): a SIGKILLed worker's
claims are taken over once the lease expires, a frozen worker's late commit is refused, and
SIGTERM finishes what the worker holds and claims nothing more. Each test asserts on the ledger and the
purchases, the outcomes a user sees, with real processes on one database.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from functools import partial
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from app.webhooks.models import EventStatus
from tests.fixtures.app import connect
from tests.fixtures.serve import free_port, start, stop, wait_ready
from tests.fixtures.webhooks import signed
from tests.fixtures.worker import wait_until as until
from tests.fixtures.worker_process import (
    CREDITS,
    WorkerProcess,
    assert_granted_once,
    count_handled,
    intent_ids,
    paid_event,
    process_env,
    seed_purchases,
    store_paid_events,
)

LEASE_S = "2"  # a killed worker's claims are taken over after this
FAST = {"PAYGUARD_WORKER_LEASE_S": LEASE_S, "PAYGUARD_WORKER_POLL_INTERVAL_S": "0.1"}
TAKEOVERS = "payguard_worker_lease_takeovers_total"
WORK_ITEMS = "payguard_work_items_total"
EVENTS = {"queue": "webhook_events"}


@pytest.mark.timeout(90)
async def test_worker_killed_mid_batch_is_taken_over_and_each_effect_applied_once(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    intents = intent_ids(1500)
    await seed_purchases(db, intents)
    await store_paid_events(db, intents)
    first = WorkerProcess(db_url, tmp_path / "first.log", {**FAST, "PAYGUARD_WORKER_BATCH_SIZE": "1000"})
    second: WorkerProcess | None = None
    try:
        await until(lambda: _between(db, 0, len(intents)), 60, "the first worker handled part of its batch")
        await first.kill()
        handled_by_first = await count_handled(db)
        # its open transactions die with its connections; until then a commit may still land
        await until(lambda: _no_backends(db), 15, "the killed worker's connections are gone")
        orphaned = {
            r["id"]
            for r in await db.fetch(
                "SELECT id FROM webhook_events WHERE status = $1 AND lease_token IS NOT NULL",
                EventStatus.PENDING,
            )
        }
        assert 0 < handled_by_first < len(intents), handled_by_first
        assert orphaned, "the kill did not land while the worker held claims"

        second = WorkerProcess(db_url, tmp_path / "second.log", FAST, metrics_port=free_port())
        await until(lambda: _all_handled(db, len(intents)), 60, "the second worker handled every event")
        assert await second.metric(TAKEOVERS, **EVENTS) >= len(orphaned)
        # the killed worker's leases held until they expired; then another worker finished their events
        assert await db.fetchval(
            "SELECT bool_and(status = $2) FROM webhook_events WHERE id = ANY($1::bigint[])",
            list(orphaned),
            EventStatus.HANDLED,
        )
        await assert_granted_once(db, intents)
    finally:
        first.close()
        if second is not None:
            second.close()


PATIENT = {  # nothing in the worker gives up while the test holds a lock it waits for
    "PAYGUARD_DB_LOCK_TIMEOUT_MS": "120000",
    "PAYGUARD_DB_STATEMENT_TIMEOUT_MS": "120000",
}
BLOCKED = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'payguard'"
    " AND wait_event_type = 'Lock' AND query LIKE '%FROM credit_purchases%FOR UPDATE%'"
)


@pytest.mark.timeout(90)
async def test_sigterm_finishes_what_it_holds_and_claims_nothing_more(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    intents = intent_ids(600)
    await seed_purchases(db, intents)
    await store_paid_events(db, intents)
    # one batch of 10 at a time; the test holds the 300th purchase, so the worker stops in its batch
    locker = await connect(db_url)
    locked = locker.transaction()
    await locked.start()
    await locker.execute(
        "SELECT 1 FROM credit_purchases WHERE payment_intent_id = $1 FOR UPDATE", intents[299]
    )
    # a lease far longer than the test: an event left leased would stay out of reach
    env = {
        "PAYGUARD_WORKER_LEASE_S": "600",
        "PAYGUARD_WORKER_POLL_INTERVAL_S": "0.1",
        "PAYGUARD_WORKER_BATCH_SIZE": "10",
        "PAYGUARD_WORKER_CONCURRENCY": "1",
        **PATIENT,
    }
    first = WorkerProcess(db_url, tmp_path / "first.log", env)
    second: WorkerProcess | None = None
    try:
        await until(lambda: _fetch_is(db, BLOCKED, 1), 60, "the worker's batch waits for the held purchase")
        assert await count_handled(db) == 290
        first.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # it has stopped claiming; its batch still waits
        assert first.proc.poll() is None, "the worker exited before finishing its batch"
        await locked.rollback()
        assert await first.wait(30) == 0, first.stderr()

        rows = await db.fetch("SELECT status, lease_token FROM webhook_events")
        assert [r for r in rows if r["lease_token"] is not None] == []  # nothing left claimed
        assert Counter(r["status"] for r in rows) == {EventStatus.HANDLED: 300, EventStatus.PENDING: 300}
        await assert_granted_once(db, intents[:300])  # the batch it held, it finished; nothing else moved
        succeeded = await db.fetchval("SELECT count(*) FROM credit_purchases WHERE status = 'succeeded'")
        assert succeeded == 300

        second = WorkerProcess(db_url, tmp_path / "second.log", env)
        await until(lambda: _all_handled(db, len(intents)), 60, "the second worker handled the rest")
        await assert_granted_once(db, intents)
        second.signal(signal.SIGTERM)
        assert await second.wait(30) == 0, second.stderr()
    finally:
        await locker.close()
        first.close()
        if second is not None:
            second.close()


KILLS = 5
DELIVERIES = 2000


@pytest.mark.timeout(150)
async def test_events_acknowledged_while_workers_are_killed_are_each_applied_once(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    intents = intent_ids(DELIVERIES)
    await seed_purchases(db, intents)
    port = free_port()
    serve_dir = tmp_path / "serve"
    serve = start(serve_dir, port, **process_env(db_url, PAYGUARD_RUN_WORKER="false"))
    workers: list[WorkerProcess] = []
    acknowledged: set[str] = set()
    try:
        await asyncio.to_thread(wait_ready, port, serve)
        limits = httpx.Limits(max_connections=25)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as http:
            # each worker gets a share of the deliveries to race with, and is killed mid-batch but the last
            parts = [intents[k :: KILLS + 1] for k in range(KILLS + 1)]
            deliveries = []
            for k, part in enumerate(parts):
                before = await count_handled(db)
                tokens = await db.fetchval("SELECT last_value FROM work_lease_tokens")
                workers.append(WorkerProcess(db_url, tmp_path / f"worker-{k}.log", FAST))
                deliveries.append(asyncio.create_task(_deliver(http, part, acknowledged)))
                if k == KILLS:
                    break
                working = partial(_working, db, before + 20, tokens)
                await until(working, 60, f"worker {k} handled events and holds claims")
                await workers[-1].kill()
            await asyncio.gather(*deliveries)
        stored = await db.fetchval("SELECT count(*) FROM webhook_events")
        await until(lambda: _all_handled(db, stored), 90, "the last worker handled every stored event")
    finally:
        for worker in workers:
            worker.close()
        if serve.poll() is None:
            stop(serve, serve_dir)

    assert acknowledged, "no delivery was acknowledged"
    grants = await db.fetch(
        "SELECT reference, count(*) AS n FROM credit_ledger WHERE reference LIKE 'payment_intent:%'"
        " GROUP BY reference"
    )
    per_intent = {r["reference"].removeprefix("payment_intent:"): r["n"] for r in grants}
    assert {intent: per_intent.get(intent) for intent in acknowledged} == dict.fromkeys(acknowledged, 1)
    assert set(per_intent.values()) == {1}  # no intent, acknowledged or not, is granted twice
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == len(per_intent)
    assert await db.fetchval("SELECT sum(delta) FROM credit_ledger") == CREDITS * len(per_intent)
    assert await db.fetchval("SELECT sum(balance) FROM credit_accounts") == CREDITS * len(per_intent)
    succeeded = await db.fetchval("SELECT count(*) FROM credit_purchases WHERE status = 'succeeded'")
    assert succeeded == len(per_intent)


async def _deliver(http: httpx.AsyncClient, intents: list[str], acknowledged: set[str]) -> None:
    """Stripe's succeeded event for each intent, 25 at a time; the intents of those answered 200 are added."""

    async def one(intent: str) -> None:
        raw, headers = signed(paid_event(intent))
        try:
            r = await http.post("/webhooks/stripe", content=raw, headers=headers)
        except httpx.TransportError:
            return  # unacknowledged: Stripe would deliver it again
        if r.status_code == 200:
            acknowledged.add(intent)

    await asyncio.gather(*(one(intent) for intent in intents))


async def _working(db: asyncpg.Connection, handled: int, tokens: int) -> bool:
    """At least `handled` events are handled, and some claimed since token `tokens` are not yet: mid-batch."""
    return await count_handled(db) >= handled and bool(
        await db.fetchval(
            "SELECT count(*) FROM webhook_events WHERE status = $1 AND lease_token > $2",
            EventStatus.PENDING,
            tokens,
        )
    )


@pytest.mark.timeout(90)
async def test_worker_frozen_past_its_lease_has_its_late_commits_refused(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    intents = intent_ids(6)
    await seed_purchases(db, intents)
    await store_paid_events(db, intents)
    # A claims the six events in one batch; its transaction fences them, then waits for the purchases,
    # which the test holds. Frozen there, A's transaction is cancelled, as PostgreSQL's idle-in-transaction
    # timeout would end it, so its locks go and its leases run out while A cannot move.
    locker = await connect(db_url)
    locked = locker.transaction()
    await locked.start()
    await locker.execute("SELECT id FROM credit_purchases FOR UPDATE")
    a = WorkerProcess(db_url, tmp_path / "a.log", {**FAST, **PATIENT}, metrics_port=free_port())
    b: WorkerProcess | None = None
    try:
        await until(lambda: _fetch_is(db, BLOCKED, 1), 60, "A's batch waits for the purchases")
        blocked = await db.fetchval(BLOCKED)
        a.signal(signal.SIGSTOP)
        await until(lambda: _stopped(a.pid), 10, "A is frozen")
        assert await db.fetchval("SELECT pg_cancel_backend($1)", blocked)
        await locked.rollback()

        b = WorkerProcess(db_url, tmp_path / "b.log", FAST, metrics_port=free_port())
        await until(lambda: _all_handled(db, len(intents)), 60, "B handled A's events")
        assert await b.metric(WORK_ITEMS, outcome="done", **EVENTS) == len(intents)
        assert await b.metric(TAKEOVERS, **EVENTS) == len(intents)

        a.signal(signal.SIGCONT)  # A hears its batch failed and tries each event alone: every fence refuses
        await until(
            lambda: _metric_is(a, len(intents), WORK_ITEMS, outcome="fenced", **EVENTS),
            30,
            f"A counted {len(intents)} refused commits",
        )
        assert await a.metric(WORK_ITEMS, outcome="done", **EVENTS) == 0
        await assert_granted_once(db, intents)
    finally:
        await locker.close()
        a.close()
        if b is not None:
            b.close()


async def _fetch_is(db: asyncpg.Connection, query: str, rows: int) -> bool:
    return len(await db.fetch(query)) == rows


async def _stopped(pid: int) -> bool:
    return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)


async def _metric_is(worker: WorkerProcess, value: float, name: str, **labels: str) -> bool:
    return await worker.metric(name, **labels) == value


async def _between(db: asyncpg.Connection, low: int, high: int) -> bool:
    return low < await count_handled(db) < high


async def _all_handled(db: asyncpg.Connection, total: int) -> bool:
    return await count_handled(db) == total


async def _no_backends(db: asyncpg.Connection) -> bool:
    """No payguard process holds a connection to the test's database any more."""
    backends = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'payguard'"
    )
    return bool(backends == 0)
