"""`payguard worker` processes killed, frozen and stopped mid-batch: every stored event's effect lands once.

The worker's claims are leases with a fencing token (app/worker/leases.py): a SIGKILLed worker's
claims are taken over once the lease expires, a frozen worker's late commit is refused, and
SIGTERM gives back what was claimed but not started. Each test asserts on the ledger and the
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


@pytest.mark.timeout(90)
async def test_sigterm_finishes_what_it_started_and_gives_back_the_rest(
    db_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    intents = intent_ids(600)
    await seed_purchases(db, intents)
    await store_paid_events(db, intents)
    # a lease far longer than the test: an event not given back would stay out of reach
    long_lease = {"PAYGUARD_WORKER_LEASE_S": "600", "PAYGUARD_WORKER_POLL_INTERVAL_S": "0.1"}
    first = WorkerProcess(db_url, tmp_path / "first.log", {**long_lease, "PAYGUARD_WORKER_BATCH_SIZE": "600"})
    second: WorkerProcess | None = None
    try:
        await until(lambda: _between(db, 0, len(intents)), 60, "the worker handled part of its batch")
        first.signal(signal.SIGTERM)
        assert await first.wait(30) == 0, first.stderr()
        rows = await db.fetch("SELECT status, lease_token FROM webhook_events")
        assert [r for r in rows if r["lease_token"] is not None] == []  # nothing left claimed
        statuses = Counter(r["status"] for r in rows)
        assert set(statuses) == {EventStatus.HANDLED, EventStatus.PENDING}, statuses  # stopped mid-batch
        done = [
            r["payment_intent_id"]
            for r in await db.fetch(
                "SELECT payment_intent_id FROM credit_purchases WHERE status = 'succeeded'"
            )
        ]
        assert len(done) == statuses[EventStatus.HANDLED]
        await assert_granted_once(db, done)  # what it started, it finished; nothing else moved

        # given back, not left to expire: another worker takes them at once
        second = WorkerProcess(db_url, tmp_path / "second.log", long_lease)
        await until(lambda: _all_handled(db, len(intents)), 60, "the second worker handled the rest")
        await assert_granted_once(db, intents)
        second.signal(signal.SIGTERM)
        assert await second.wait(30) == 0, second.stderr()
    finally:
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
    # The freeze must land between A's claim and its fences. The test holds every purchase's row lock,
    # so the attempt that gets A's one free connection (the other is LISTEN's) blocks inside its fenced
    # transaction, and A's other attempts, started, wait for that connection: not fenced yet.
    locker = await connect(db_url)
    locked = locker.transaction()
    await locked.start()
    await locker.execute("SELECT id FROM credit_purchases FOR UPDATE")
    patient = {  # nothing in A gives up while it is frozen: its clock runs on, the test's waits are long
        "PAYGUARD_DB_POOL_SIZE": "2",
        "PAYGUARD_DB_MAX_OVERFLOW": "0",
        "PAYGUARD_DB_POOL_TIMEOUT_S": "120",
        "PAYGUARD_DB_LOCK_TIMEOUT_MS": "120000",
        "PAYGUARD_DB_STATEMENT_TIMEOUT_MS": "120000",
    }
    a = WorkerProcess(db_url, tmp_path / "a.log", {**FAST, **patient}, metrics_port=free_port())
    b: WorkerProcess | None = None
    try:
        held_by_a = await _freeze_with_attempts_blocked(a, db)
        assert await db.fetchval("SELECT count(*) FROM webhook_events WHERE lease_token IS NULL") == 0
        # A's backends, frozen client or not, carry on: those blocked take the locks; A holds them
        await locked.rollback()

        b = WorkerProcess(db_url, tmp_path / "b.log", FAST, metrics_port=free_port())
        await until(
            lambda: _all_handled(db, len(intents) - held_by_a), 60, "B handled every event A does not hold"
        )
        assert await b.metric(WORK_ITEMS, outcome="done", **EVENTS) == len(intents) - held_by_a
        assert await b.metric(TAKEOVERS, **EVENTS) == len(intents) - held_by_a

        a.signal(signal.SIGCONT)
        await until(lambda: _all_handled(db, len(intents)), 30, "A committed the events it holds")
        refused = len(intents) - held_by_a
        await until(
            lambda: _metric_is(a, refused, WORK_ITEMS, outcome="fenced", **EVENTS),
            30,
            f"A counted {refused} refused commits",
        )
        assert await a.metric(WORK_ITEMS, outcome="done", **EVENTS) == held_by_a
        await assert_granted_once(db, intents)
    finally:
        await locker.close()
        a.close()
        if b is not None:
            b.close()


async def _freeze_with_attempts_blocked(worker: WorkerProcess, db: asyncpg.Connection) -> int:
    """SIGSTOP `worker` once its fenced transactions all wait for a purchase's lock; how many do."""
    for _ in range(50):
        await until(lambda: _settled(db), 60, "the worker's attempts wait for the purchases' locks")
        worker.signal(signal.SIGSTOP)
        await until(lambda: _stopped(worker.pid), 10, "the worker is frozen")
        if await _settled(db):  # still: no attempt of its is between its fence and that lock
            return await _blocked_on_purchases(db)
        worker.signal(signal.SIGCONT)
        await asyncio.sleep(0.05)
    raise AssertionError("the worker never froze with its attempts blocked")


async def _settled(db: asyncpg.Connection) -> bool:
    blocked = await _blocked_on_purchases(db)
    return 0 < blocked == await _in_transaction(db)


async def _blocked_on_purchases(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'payguard' AND wait_event_type = 'Lock'"
            " AND query LIKE '%FROM credit_purchases%FOR UPDATE%'"
        )
    )


async def _in_transaction(db: asyncpg.Connection) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'payguard' AND xact_start IS NOT NULL"
        )
    )


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
