"""The jobs (cleanup, health, reconcile) on real PostgreSQL, in the app and as `payguard jobs` processes.

Each test seeds rows with the ages it needs (times moved back in SQL, or the health job's clock
injected), runs the job, and asserts on the rows, the run records, the API and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.credits.models import PurchaseStatus
from app.idempotency.models import RecoveryPoint
from app.jobs.models import JobName, RunOutcome
from app.main import create_app
from app.observability.metrics import JOB_LAST_SUCCESS
from app.payments.gateway import PaymentGateway, PaymentIntent
from app.reservations.models import ReservationStatus
from app.webhooks.models import EventStatus
from tests.fixtures.app import ADMIN, AppFactory, Client, auth, create_ticket_type, hold
from tests.fixtures.jobs import (
    finish_cli,
    hold_lock,
    lock_holder_pids,
    release_lock,
    run,
    start_cli,
)
from tests.fixtures.stripe import FakeStripe
from tests.fixtures.webhooks import deliver
from tests.fixtures.worker import running_worker, until_settled, wait_until

ADMIN_AUTH = auth(ADMIN, admin=True)
PURCHASE = "/v1/credits/purchases"


async def buy(client: Client, user: str, key: str) -> Any:
    return await client.post(PURCHASE, json={"package_id": "starter"}, headers=auth(user, key=key))


async def runs(db: asyncpg.Connection, job: JobName) -> list[tuple[str, Any, str | None]]:
    rows = await db.fetch("SELECT outcome, counts, error FROM job_runs WHERE job = $1 ORDER BY id", job)
    return [(r["outcome"], json.loads(r["counts"]), r["error"]) for r in rows]


# --- locking and run records --------------------------------------------------------------


async def test_a_run_while_another_holds_the_lock_does_nothing_and_is_recorded_skipped(
    client: Client, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO rate_limits (key, tat) VALUES ('credit_purchase:u1', now() - interval '1 minute')"
    )
    await hold_lock(db, JobName.CLEANUP)
    skipped = await run(client, JobName.CLEANUP)
    assert (skipped.outcome, skipped.counts, skipped.error) == (RunOutcome.SKIPPED, {}, None)
    assert await db.fetchval("SELECT count(*) FROM rate_limits") == 1  # nothing was done
    await release_lock(db, JobName.CLEANUP)
    done = await run(client, JobName.CLEANUP)
    assert done.outcome == RunOutcome.SUCCEEDED and done.counts["rate_limit_buckets"] == 1
    assert await db.fetchval("SELECT count(*) FROM rate_limits") == 0
    # the lock is given back after each run: nothing holds it now
    assert await lock_holder_pids(db, JobName.CLEANUP) == []


async def test_two_concurrent_cleanup_processes_one_works_the_other_exits_0_doing_nothing(
    db_url: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO rate_limits (key, tat) SELECT 'lead_purchase:u' || g, now() - interval '1 minute'"
        " FROM generate_series(1, 5) g"
    )
    # the first run's first step waits on this table lock, holding the job's lock meanwhile
    blocker = db.transaction()
    await blocker.start()
    await db.execute("LOCK TABLE credit_purchases IN ACCESS EXCLUSIVE MODE")
    first = start_cli(db_url, JobName.CLEANUP)
    try:
        await wait_until(
            lambda: lock_holder_pids(db, JobName.CLEANUP), 60, "the first run holds the job's lock"
        )
        second = start_cli(db_url, JobName.CLEANUP)
        code, record, log = await asyncio.to_thread(finish_cli, second)
        assert code == 0, log
        assert record["outcome"] == RunOutcome.SKIPPED and record["counts"] == {}
        assert "another run holds its lock" in log
        assert first.poll() is None  # still running: the two overlapped
        assert await db.fetchval("SELECT count(*) FROM rate_limits") == 5
    finally:
        await blocker.rollback()
    code, record, log = await asyncio.to_thread(finish_cli, first)
    assert code == 0, log
    assert record["outcome"] == RunOutcome.SUCCEEDED and record["counts"]["rate_limit_buckets"] == 5
    assert await db.fetchval("SELECT count(*) FROM rate_limits") == 0
    assert [outcome for outcome, _, _ in await runs(db, JobName.CLEANUP)] == [
        RunOutcome.SUCCEEDED,
        RunOutcome.SKIPPED,
    ]


async def test_a_run_whose_process_died_is_closed_as_abandoned_by_the_next(
    db_url: str, db: asyncpg.Connection, client: Client
) -> None:
    blocker = db.transaction()
    await blocker.start()
    await db.execute("LOCK TABLE credit_purchases IN ACCESS EXCLUSIVE MODE")
    proc = start_cli(db_url, JobName.CLEANUP)
    try:
        await wait_until(lambda: _waits_or_exited(db, proc), 60, "the run waits in its first step")
        assert proc.poll() is None, finish_cli(proc)
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)
    finally:
        await blocker.rollback()
    assert [outcome for outcome, _, _ in await runs(db, JobName.CLEANUP)] == [RunOutcome.RUNNING]
    # its connection died with it, and with the connection its lock: the next run takes it
    await wait_until(lambda: _no_lock_holder(db), 30, "the dead run's lock is released")
    assert (await run(client, JobName.CLEANUP)).outcome == RunOutcome.SUCCEEDED
    closed, finished = await runs(db, JobName.CLEANUP)
    assert closed[0] == RunOutcome.ABANDONED and "died" in (closed[2] or "")
    assert finished[0] == RunOutcome.SUCCEEDED


async def _waits_or_exited(db: asyncpg.Connection, proc: Any) -> bool:
    # pg_locks, not pg_stat_activity: the test's transaction would see a snapshot of the latter
    waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'credit_purchases'::regclass"
    return proc.poll() is not None or await db.fetchval(waiting) > 0


async def _no_lock_holder(db: asyncpg.Connection) -> bool:
    return not await lock_holder_pids(db, JobName.CLEANUP)


# --- cleanup ---------------------------------------------------------------------------------


async def test_cleanup_prunes_what_is_past_retention_and_keeps_the_rest(
    client: Client, db: asyncpg.Connection
) -> None:
    # idempotency keys: 24 h by default
    assert (await buy(client, "u1", "old-key")).status_code == 201
    assert (await buy(client, "u1", "new-key")).status_code == 201
    await db.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old-key'"
    )
    # rate-limit buckets: idle once their TAT has passed (the two purchases left one, in the future)
    await db.execute(
        "INSERT INTO rate_limits (key, tat) VALUES ('lead_purchase:idle', now() - interval '1 second')"
    )
    # webhook events: 30 days for handled and ignored ones; unfinished and dead ones stay
    await db.execute(
        "INSERT INTO webhook_events (event_id, type, object_id, stripe_created, payload, status, attempts,"
        " received_at) SELECT 'evt_' || s || '_' || age, 'payment_intent.succeeded', 'pi_' || s, now(), '{}',"
        " s, 1, now() - make_interval(days => age)"
        " FROM unnest(ARRAY['pending', 'handled', 'ignored', 'failed', 'dead']) AS s,"
        " unnest(ARRAY[31, 29]) AS age"
    )
    # job runs: 30 days
    await db.execute(
        "INSERT INTO job_runs (job, started_at, finished_at, outcome) VALUES"
        " ('health', now() - interval '31 days', now() - interval '31 days', 'succeeded'),"
        " ('health', now() - interval '29 days', now() - interval '29 days', 'failed')"
    )
    # the health job's history: 90 days for metrics and resolved alerts; an open alert stays
    await db.execute(
        "INSERT INTO platform_metrics (metric, window_start, window_end, total, failed, failure_rate, threshold)"
        " SELECT 'emails', now() - make_interval(days => d, hours => 1), now() - make_interval(days => d),"
        " 10, 1, 0.1, 0.1 FROM unnest(ARRAY[91, 89]) AS d"
    )
    await db.execute(
        "INSERT INTO platform_alerts (metric, failure_rate, threshold, total, failed, message, opened_at,"
        " last_seen_at, resolved_at) VALUES"
        " ('emails', 1, 0.1, 10, 10, 'old', now() - interval '92 days', now() - interval '92 days',"
        "  now() - interval '91 days'),"
        " ('webhooks', 1, 0.1, 10, 10, 'open', now() - interval '92 days', now(), NULL)"
    )
    # error logs: 90 days
    await db.execute(
        "INSERT INTO error_logs (severity, source, message, created_at) VALUES"
        " ('error', 'web', 'old', now() - interval '91 days'), ('error', 'web', 'new', now() - interval '89 days')"
    )
    # holds: one past its expiry (already free; the job writes it down), one live
    ticket_type = await create_ticket_type(client, capacity=5)
    past, live = [(await hold(client, "holder", ticket_type, 1)).json()["id"] for _ in range(2)]
    await db.execute("UPDATE reservations SET expires_at = now() - interval '1 second' WHERE id = $1", past)

    result = await run(client, JobName.CLEANUP)

    assert result.outcome == RunOutcome.SUCCEEDED, result.error
    assert result.counts == {
        "expired_holds": 1,
        "abandoned_purchases": 0,
        "idempotency_keys": 1,
        "rate_limit_buckets": 1,
        "webhook_events": 2,
        "job_runs": 1,
        "error_logs": 1,
        "health_history": 2,
    }
    assert await db.fetchval("SELECT array_agg(key) FROM idempotency_keys") == ["new-key"]
    assert await db.fetchval("SELECT array_agg(key ORDER BY key) FROM rate_limits") == [
        "credit_purchase:u1",
        "reservation:holder",
    ]
    kept = await db.fetch(
        "SELECT status, received_at < now() - interval '30 days' AS old FROM webhook_events"
    )
    unfinished_or_dead = (EventStatus.PENDING, EventStatus.FAILED, EventStatus.DEAD)
    assert sorted((r["status"], r["old"]) for r in kept) == sorted(
        [(status, False) for status in EventStatus] + [(status, True) for status in unfinished_or_dead]
    )
    assert (
        await db.fetchval("SELECT count(*) FROM job_runs WHERE started_at < now() - interval '30 days'") == 0
    )
    assert await db.fetchval("SELECT count(*) FROM platform_metrics") == 1
    assert await db.fetchval("SELECT array_agg(message) FROM platform_alerts") == ["open"]
    assert await db.fetchval("SELECT array_agg(message) FROM error_logs") == ["new"]
    holds = dict(await db.fetch("SELECT id, status FROM reservations"))
    assert holds == {past: ReservationStatus.EXPIRED, live: ReservationStatus.ACTIVE}
    # a second run finds nothing more to do
    again = await run(client, JobName.CLEANUP)
    assert again.outcome == RunOutcome.SUCCEEDED and set(again.counts.values()) == {0}


async def test_cleanup_works_in_batches_of_the_configured_size(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(jobs_batch_size=7)
    await db.execute(
        "INSERT INTO rate_limits (key, tat) SELECT 'lead_purchase:u' || g, now() - interval '1 minute'"
        " FROM generate_series(1, 30) g"
    )
    result = await run(client, JobName.CLEANUP)
    assert result.counts["rate_limit_buckets"] == 30
    assert await db.fetchval("SELECT count(*) FROM rate_limits") == 0


class CrashAfterStripe(PaymentGateway):
    """Stripe makes the intent, then the request dies before our commit (once)."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.__dict__.update(inner.__dict__)

    async def create_payment_intent(self, **kwargs: Any) -> PaymentIntent:
        await super().create_payment_intent(**kwargs)
        raise RuntimeError("process died after Stripe answered")


class SlowStripe(PaymentGateway):
    """Stripe answers only once the test lets it: the request stays in flight meanwhile."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.__dict__.update(inner.__dict__)
        self.calling = asyncio.Event()
        self.answer = asyncio.Event()

    async def create_payment_intent(self, **kwargs: Any) -> PaymentIntent:
        self.calling.set()
        await self.answer.wait()
        return await super().create_payment_intent(**kwargs)


async def _age(db: asyncpg.Connection, key: str, interval: str) -> None:
    """Make a key's request and its purchase look `interval` old (its lock too, if it holds one)."""
    await db.execute(
        "UPDATE idempotency_keys SET last_run_at = now() - CAST($2::text AS interval),"
        " locked_at = locked_at - CAST($2::text AS interval), created_at = now() - CAST($2::text AS interval)"
        " WHERE key = $1",
        key,
        interval,
    )
    await db.execute(
        "UPDATE credit_purchases p SET created_at = now() - CAST($2::text AS interval) FROM idempotency_keys k"
        " WHERE k.id = p.idempotency_key_id AND k.key = $1",
        key,
        interval,
    )


async def test_a_purchase_whose_request_died_before_its_intent_was_recorded_is_abandoned(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    services = client.app.state.services
    stripe_gateway = services.payments
    object.__setattr__(services, "payments", CrashAfterStripe(stripe_gateway))
    assert (await buy(client, "u1", "died")).status_code == 500
    await _age(db, "died", "10 minutes")  # the lock timeout is 90 s

    result = await run(client, JobName.CLEANUP)

    assert result.counts["abandoned_purchases"] == 1
    assert await db.fetchval("SELECT status FROM credit_purchases") == PurchaseStatus.ABANDONED
    key = await db.fetchrow("SELECT recovery_point, response_status, fencing_token FROM idempotency_keys")
    assert (key["recovery_point"], key["response_status"], key["fencing_token"]) == (
        RecoveryPoint.FINISHED,
        409,
        2,  # taken over, as a retry would take it
    )
    object.__setattr__(services, "payments", stripe_gateway)
    retried = await buy(client, "u1", "died")  # the client comes back: told, not charged
    assert retried.status_code == 409 and retried.json()["type"] == "purchase-abandoned"
    assert retried.headers["idempotent-replayed"] == "true"
    assert len(stripe.intents) == 1  # only the one nobody can pay: no client secret ever left
    user = await client.get(f"{PURCHASE}/1", headers=auth("u1"))
    assert user.json()["status"] == "abandoned" and user.json()["payment_intent_id"] is None


async def test_purchases_that_may_still_complete_are_not_abandoned(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    # recorded intent: pending at Stripe, reconciliation's business
    assert (await buy(client, "u1", "paid-later")).status_code == 201
    await _age(db, "paid-later", "2 hours")
    # its request failed at Stripe a moment ago (released, not stored): the client may retry now
    stripe.failures_to_inject.append(500)
    assert (await buy(client, "u1", "just-failed")).status_code == 502
    await db.execute(
        "UPDATE credit_purchases p SET created_at = now() - interval '2 hours' FROM idempotency_keys k"
        " WHERE k.id = p.idempotency_key_id AND k.key = 'just-failed'"
    )
    # in flight right now, inside the Stripe call (its lock is live)
    services = client.app.state.services
    slow = SlowStripe(services.payments)
    object.__setattr__(services, "payments", slow)
    in_flight = asyncio.create_task(buy(client, "u1", "in-flight"))
    await asyncio.wait_for(slow.calling.wait(), 30)
    await db.execute(
        "UPDATE credit_purchases p SET created_at = now() - interval '2 hours' FROM idempotency_keys k"
        " WHERE k.id = p.idempotency_key_id AND k.key = 'in-flight'"
    )

    result = await run(client, JobName.CLEANUP)

    assert result.counts["abandoned_purchases"] == 0
    slow.answer.set()
    assert (await in_flight).status_code == 201
    statuses = await db.fetch(
        "SELECT status, payment_intent_id IS NOT NULL AS has_intent FROM credit_purchases"
    )
    assert [r["status"] for r in statuses] == [PurchaseStatus.PENDING] * 3
    assert (await buy(client, "u1", "just-failed")).status_code == 201  # the retry resumes


async def test_a_request_stalled_past_its_lock_timeout_loses_to_the_cleanup_and_commits_nothing(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    services = client.app.state.services
    slow = SlowStripe(services.payments)
    object.__setattr__(services, "payments", slow)
    stalled = asyncio.create_task(buy(client, "u1", "stalled"))
    await asyncio.wait_for(slow.calling.wait(), 30)
    await _age(db, "stalled", "10 minutes")  # it has held its key past the lock timeout

    result = await run(client, JobName.CLEANUP)
    assert result.counts["abandoned_purchases"] == 1

    slow.answer.set()  # Stripe answers the stalled request at last: its commit is fenced out
    late = await stalled
    assert late.status_code == 409 and late.json()["type"] == "idempotency-key-in-use"
    row = await db.fetchrow("SELECT status, payment_intent_id FROM credit_purchases")
    assert (row["status"], row["payment_intent_id"]) == (PurchaseStatus.ABANDONED, None)
    replay = await buy(client, "u1", "stalled")
    assert replay.status_code == 409 and replay.json()["type"] == "purchase-abandoned"


# --- health ----------------------------------------------------------------------------------


async def _seed_window(
    db: asyncpg.Connection, at: datetime, purchases: list[str], events: list[str], emails: list[str]
) -> None:
    """Purchases, events and emails with these statuses, all made at `at`."""
    await db.execute(
        "INSERT INTO credit_purchases (user_id, idempotency_key_id, package_id, credits, amount, currency,"
        " status, stripe_idempotency_key, created_at)"
        " SELECT 'u1', nextval('credit_purchases_id_seq') + 1000000, 'starter', 100, 1000, 'usd', s,"
        " 'seed-' || gen_random_uuid(), $2 FROM unnest($1::text[]) AS s",
        purchases,
        at,
    )
    await db.execute(
        "INSERT INTO webhook_events (event_id, type, object_id, stripe_created, payload, status, attempts,"
        " received_at) SELECT 'evt_seed_' || gen_random_uuid(), 'payment_intent.succeeded', 'pi_seed', $2, '{}',"
        " s, 1, $2 FROM unnest($1::text[]) AS s",
        events,
        at,
    )
    await db.execute(
        "INSERT INTO outbox_emails (kind, user_id, recipient, payload, status, trace_context, created_at)"
        " SELECT 'lead_purchased', 'u1', 'u1@example.com', '{}', s, '{}', $2 FROM unnest($1::text[]) AS s",
        emails,
        at,
    )


async def test_health_writes_failure_rates_and_alerts_and_the_api_shows_them(
    client: Client, db: asyncpg.Connection
) -> None:
    now: datetime = await db.fetchval("SELECT date_trunc('second', now())")
    # in the last hour: purchases 2 of 20 failed or abandoned (10 % > 5 %), events 1 of 20 dead
    # (5 %, not above 5 %), emails 2 of 10 failed or dead (20 % > 10 %)
    await _seed_window(
        db,
        now - timedelta(minutes=30),
        ["succeeded"] * 15 + ["pending"] * 3 + ["failed", "abandoned"],
        ["handled"] * 18 + ["ignored", "dead"],
        ["sent"] * 7 + ["held", "failed", "dead"],
    )
    # before the window: all failures, none of which count
    await _seed_window(db, now - timedelta(hours=2), ["failed"] * 5, ["dead"] * 5, ["dead"] * 5)

    result = await run(client, JobName.HEALTH, now=now)

    assert result.outcome == RunOutcome.SUCCEEDED, result.error
    assert result.counts == {"metrics": 3, "alerts_open": 2, "alerts_opened": 2, "alerts_resolved": 0}
    figures = {
        r["metric"]: (r["total"], r["failed"], r["failure_rate"])
        for r in await db.fetch("SELECT metric, total, failed, failure_rate FROM platform_metrics")
    }
    assert figures == {"purchases": (20, 2, 0.1), "webhooks": (20, 1, 0.05), "emails": (10, 2, 0.2)}
    health = (await client.get("/admin/operations-health", headers=ADMIN_AUTH)).json()
    assert health["measured_at"].startswith(now.isoformat()[:19])
    shown = {m["metric"]: (m["total"], m["failed"], m["breached"]) for m in health["metrics"]}
    assert shown == {"purchases": (20, 2, True), "webhooks": (20, 1, False), "emails": (10, 2, True)}
    assert [(a["metric"], a["failed"], a["total"]) for a in health["open_alerts"]] == [
        ("purchases", 2, 20),
        ("emails", 2, 10),
    ]
    assert "10.0%" in health["open_alerts"][0]["message"]

    # the same window again changes nothing: one row per metric and window, one open alert per metric
    again = await run(client, JobName.HEALTH, now=now)
    assert again.counts == {"metrics": 3, "alerts_open": 2, "alerts_opened": 0, "alerts_resolved": 0}
    assert await db.fetchval("SELECT count(*) FROM platform_metrics") == 3
    assert await db.fetchval("SELECT count(*) FROM platform_alerts") == 2

    # an hour later nothing failed: the alerts are resolved, and the API shows none open
    later = await run(client, JobName.HEALTH, now=now + timedelta(hours=1))
    assert later.counts["alerts_resolved"] == 2
    health = (await client.get("/admin/operations-health", headers=ADMIN_AUTH)).json()
    assert health["open_alerts"] == []
    assert {m["metric"]: m["total"] for m in health["metrics"]} == {
        "purchases": 0,
        "webhooks": 0,
        "emails": 0,
    }


async def test_health_alerts_only_with_enough_samples(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(health_min_samples=5)
    now: datetime = await db.fetchval("SELECT now()")
    await _seed_window(db, now - timedelta(minutes=1), ["failed"] * 4, ["dead"] * 5, [])
    result = await run(client, JobName.HEALTH, now=now)
    assert result.counts["alerts_open"] == 1  # the webhooks: 5 samples; the purchases had 4
    assert await db.fetchval("SELECT array_agg(metric) FROM platform_alerts") == ["webhooks"]


def _gauge(text: str, job: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "payguard_job_last_success_timestamp_seconds" and sample.labels == {"job": job}:
                return float(sample.value)
    return None


async def test_the_last_success_of_each_job_is_on_metrics_from_the_database(
    make_client: AppFactory, client: Client, db: asyncpg.Connection
) -> None:
    await run(client, JobName.HEALTH)
    finished: datetime = await db.fetchval("SELECT finished_at FROM job_runs WHERE job = 'health'")
    # another replica, or this one after a restart: the figure comes from job_runs at the scrape
    JOB_LAST_SUCCESS.clear()
    replica = await make_client()
    scraped = (await replica.get("/metrics")).text
    assert _gauge(scraped, "health") == pytest.approx(finished.timestamp())
    assert _gauge(scraped, "cleanup") is None  # never succeeded
    # a failed run is not a success: the figure stays
    await db.execute("UPDATE job_runs SET finished_at = finished_at - interval '1 hour'")
    await db.execute("ALTER TABLE platform_metrics RENAME TO platform_metrics_gone")
    assert (await run(client, JobName.HEALTH)).outcome == RunOutcome.FAILED
    scraped = (await replica.get("/metrics")).text
    assert _gauge(scraped, "health") == pytest.approx(finished.timestamp() - 3600)
    # the database unreachable at a scrape: /metrics still answers, with the last figures it knew
    dead = Client(
        create_app(client.app.state.services.settings, "postgresql+asyncpg://postgres@/x?host=/nonexistent")
    )
    answer = await dead.get("/metrics")
    assert answer.status_code == 200
    assert _gauge(answer.text, "health") == pytest.approx(finished.timestamp() - 3600)
    await dead.aclose()


async def test_a_failing_step_is_recorded_with_its_error_and_the_others_still_run(
    client: Client, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO rate_limits (key, tat) VALUES ('credit_purchase:u1', now() - interval '1 minute')"
    )
    await db.execute("ALTER TABLE webhook_events RENAME TO webhook_events_gone")  # a database error
    result = await run(client, JobName.CLEANUP)
    assert result.outcome == RunOutcome.FAILED
    assert result.error is not None and result.error.startswith("webhook_events: UndefinedTableError")
    assert "webhook_events" not in result.counts
    assert result.counts["rate_limit_buckets"] == 1  # the other steps did their work
    assert await runs(db, JobName.CLEANUP) == [(RunOutcome.FAILED, result.counts, result.error)]


# --- GET /admin/jobs/runs -------------------------------------------------------------------


async def test_job_runs_are_listed_newest_first_in_pages_for_admins_only(
    client: Client, db: asyncpg.Connection
) -> None:
    for _ in range(3):
        await run(client, JobName.CLEANUP)
    await run(client, JobName.HEALTH)
    first = await client.get("/admin/jobs/runs", params={"limit": 2}, headers=ADMIN_AUTH)
    assert first.status_code == 200
    body = first.json()
    assert [r["job"] for r in body["items"]] == ["health", "cleanup"]
    assert set(body["items"][0]) == {"id", "job", "started_at", "finished_at", "outcome", "counts", "error"}
    assert body["items"][0]["outcome"] == "succeeded" and body["items"][0]["counts"]["metrics"] == 3
    second = await client.get(
        "/admin/jobs/runs", params={"limit": 2, "cursor": body["next_cursor"]}, headers=ADMIN_AUTH
    )
    assert [r["job"] for r in second.json()["items"]] == ["cleanup", "cleanup"]
    assert second.json()["next_cursor"] is None
    ids = [r["id"] for r in body["items"] + second.json()["items"]]
    assert ids == sorted(ids, reverse=True)
    only = await client.get("/admin/jobs/runs", params={"job": "health"}, headers=ADMIN_AUTH)
    assert [r["job"] for r in only.json()["items"]] == ["health"]
    assert (
        await client.get("/admin/jobs/runs", params={"job": "vacuum"}, headers=ADMIN_AUTH)
    ).status_code == 400
    for path in ("/admin/jobs/runs", "/admin/operations-health"):
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers=auth("u1"))).status_code == 403


# --- reconcile -------------------------------------------------------------------------------


async def _balance(client: Client, user: str) -> int:
    balance: int = (await client.get("/v1/credits/balance", headers=auth(user))).json()["balance"]
    return balance


async def _bought(client: Client, user: str, key: str) -> str:
    r = await buy(client, user, key)
    assert r.status_code == 201, r.text
    intent: str = r.json()["payment_intent_id"]
    return intent


def _missed(source: str) -> float:
    return REGISTRY.get_sample_value("payguard_reconcile_missed_events_total", {"source": source}) or 0.0


async def test_an_event_stripe_never_delivered_is_found_and_credited_once(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    intent = await _bought(client, "u1", "never-delivered")
    event = stripe.settle(intent)  # paid at Stripe; its webhook never reaches us
    before = _missed("events")

    first = await run(client, JobName.RECONCILE)

    assert first.outcome == RunOutcome.SUCCEEDED, first.error
    assert first.counts["events_listed"] == 1 and first.counts["events_missed"] == 1
    assert _missed("events") - before == 1
    # it went through the ingest path: the same row a delivery makes, waiting for the worker
    row = await db.fetchrow("SELECT event_id, object_id, status FROM webhook_events")
    assert (row["event_id"], row["object_id"], row["status"]) == (event["id"], intent, EventStatus.PENDING)
    async with running_worker(client):
        await until_settled(db)
        # run again, and the late webhook arrives too: nothing more is stored, nothing more granted
        again = await run(client, JobName.RECONCILE)
        late = await deliver(client, event)
        assert late.json() == {"received": True, "duplicate": True}
        await until_settled(db)
    assert again.counts["events_missed"] == 0 and again.counts["intents_missed"] == 0
    assert await _balance(client, "u1") == 100
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == 1
    assert await db.fetchval("SELECT status FROM credit_purchases") == PurchaseStatus.SUCCEEDED


async def test_a_pending_intent_settled_at_stripe_is_credited_once_even_with_its_late_webhook(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    paid = await _bought(client, "u1", "paid")
    canceled = await _bought(client, "u2", "canceled")
    waiting = await _bought(client, "u3", "still-open")  # nobody paid yet: nothing to do
    young = await _bought(client, "u4", "young")  # within the grace period: its webhook may come
    await db.execute(
        "UPDATE credit_purchases SET created_at = now() - interval '1 hour' WHERE payment_intent_id <> $1",
        young,
    )
    now: datetime = await db.fetchval("SELECT now()")
    # settled before the watermark: Stripe's event list, from there on, does not have them
    await db.execute("INSERT INTO job_watermarks (job, watermark) VALUES ('reconcile', $1)", now)
    paid_event = stripe.settle(paid, created=int(now.timestamp()) - 600)
    stripe.settle(canceled, "canceled", created=int(now.timestamp()) - 600)
    stripe.settle(young, created=int(now.timestamp()) - 600)
    before = _missed("intents")

    first = await run(client, JobName.RECONCILE)

    assert first.counts == {
        "events_listed": 0,
        "events_missed": 0,
        "watermark_clamped": 0,
        "intents_checked": 3,
        "intents_missed": 2,
    }
    assert _missed("intents") - before == 2
    stored = {r["event_id"]: r["type"] for r in await db.fetch("SELECT event_id, type FROM webhook_events")}
    assert stored == {
        f"reconcile:{paid}:payment_intent.succeeded": "payment_intent.succeeded",
        f"reconcile:{canceled}:payment_intent.canceled": "payment_intent.canceled",
    }
    second = await run(client, JobName.RECONCILE)  # before the worker ran: the same events, not again
    assert second.counts["intents_missed"] == 0
    async with running_worker(client):
        await until_settled(db)
        assert (await deliver(client, paid_event)).json()["duplicate"] is False  # the real one, late
        await until_settled(db)
    assert await _balance(client, "u1") == 100
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == 1
    statuses = dict(await db.fetch("SELECT payment_intent_id, status FROM credit_purchases"))
    assert statuses == {
        paid: PurchaseStatus.SUCCEEDED,
        canceled: PurchaseStatus.FAILED,
        waiting: PurchaseStatus.PENDING,
        young: PurchaseStatus.PENDING,
    }
    assert await db.fetchval("SELECT count(*) FROM webhook_events WHERE status = 'handled'") == 3


async def test_events_older_than_stripe_keeps_are_never_asked_for(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    intent = await _bought(client, "u1", "long-ago")
    now: datetime = await db.fetchval("SELECT now()")
    await db.execute(
        "INSERT INTO job_watermarks (job, watermark) VALUES ('reconcile', $1)", now - timedelta(days=40)
    )
    stripe.settle(intent, created=int((now - timedelta(days=35)).timestamp()))

    result = await run(client, JobName.RECONCILE)

    assert result.counts["watermark_clamped"] == 1 and result.counts["events_listed"] == 0
    (query,) = stripe.event_list_requests
    asked = dict(query)
    thirty_days_ago = (now - timedelta(days=30)).timestamp()
    assert thirty_days_ago - 5 <= int(asked["created[gte]"]) <= thirty_days_ago + 5
    assert sorted(v for k, v in query if k.startswith("types[")) == sorted(
        [
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.canceled",
            "charge.refunded",
        ]
    )
    assert asked["limit"] == "100"
    watermark: datetime = await db.fetchval("SELECT watermark FROM job_watermarks")
    assert now - timedelta(minutes=6) < watermark < now  # this run's start, less the overlap


async def test_stripe_events_are_listed_page_by_page_and_the_watermark_moves_on(
    make_client: AppFactory, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    client = await make_client(reconcile_page_size=3)
    intents = [await _bought(client, f"u{i}", f"k{i}") for i in range(7)]
    for intent in intents:
        stripe.settle(intent)
    result = await run(client, JobName.RECONCILE)
    assert result.counts["events_listed"] == 7 and result.counts["events_missed"] == 7
    assert [dict(q)["limit"] for q in stripe.event_list_requests] == ["3", "3", "3"]
    assert [("starting_after" in dict(q)) for q in stripe.event_list_requests] == [False, True, True]
    assert await db.fetchval("SELECT count(*) FROM webhook_events") == 7
    # the next run lists from where this one started (less the overlap), not from 30 days back
    first_since = int(dict(stripe.event_list_requests[0])["created[gte]"])
    await run(client, JobName.RECONCILE)
    assert int(dict(stripe.event_list_requests[-1])["created[gte]"]) > first_since + 29 * 86_400


async def test_reconcile_with_stripe_down_fails_keeps_its_watermark_and_exits_non_zero(
    db_url: str, client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    watermark: datetime = await db.fetchval("SELECT now() - interval '1 hour'")
    await db.execute("INSERT INTO job_watermarks (job, watermark) VALUES ('reconcile', $1)", watermark)
    stripe.unavailable = True
    proc = start_cli(
        db_url, JobName.RECONCILE, STRIPE_SECRET_KEY="sk_test_payguard", STRIPE_API_BASE=stripe.url
    )
    code, record, log = await asyncio.to_thread(finish_cli, proc)
    assert code == 1, log
    assert record["outcome"] == RunOutcome.FAILED
    assert record["error"].startswith("events: PaymentProviderError: Stripe did not list its events")
    assert "Traceback" not in log
    assert await runs(db, JobName.RECONCILE) == [(RunOutcome.FAILED, record["counts"], record["error"])]
    assert await db.fetchval("SELECT watermark FROM job_watermarks") == watermark
