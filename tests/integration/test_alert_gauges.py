"""The gauges alerts need that /metrics reads from the database at each scrape: any replica says the same,
and a job that runs as a CronJob (whose own counters die with its pod) is still seen."""

from __future__ import annotations

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from app.jobs.models import JobName, RunOutcome
from app.reservations.models import ReservationStatus
from tests.fixtures.app import Client, auth, create_ticket_type, hold
from tests.fixtures.jobs import run
from tests.fixtures.stripe import FakeStripe

HOLD_AGE = "payguard_reservations_oldest_active_age_seconds"
OPEN_AGE = "payguard_failed_operations_oldest_open_age_seconds"
MISSED = "payguard_reconcile_missed_events_recent"


async def sample(client: Client, name: str, **labels: str) -> float:
    """The one sample of `name` with `labels` on /metrics (fails when there is none)."""
    families = text_string_to_metric_families((await client.get("/metrics")).text)
    (value,) = [
        s.value for f in families for s in f.samples if s.name == name and labels.items() <= s.labels.items()
    ]
    return float(value)


async def test_the_oldest_active_hold_ages_until_it_is_no_longer_active(
    client: Client, db: asyncpg.Connection
) -> None:
    assert await sample(client, HOLD_AGE) == 0
    ticket_type = await create_ticket_type(client, capacity=10)
    assert (await hold(client, "u1", ticket_type, 1)).status_code == 201
    assert (await hold(client, "u2", ticket_type, 1)).status_code == 201
    # the cleanup job stalled: a hold is still marked active 25 minutes after it was made
    await db.execute(
        "UPDATE reservations SET created_at = now() - interval '25 minutes' WHERE user_id = 'u1'"
    )
    assert 1500 <= await sample(client, HOLD_AGE) < 1600
    await db.execute("UPDATE reservations SET status = $1 WHERE user_id = 'u1'", ReservationStatus.EXPIRED)
    assert await sample(client, HOLD_AGE) < 60  # u2's fresh hold is the oldest active one now
    await db.execute("UPDATE reservations SET status = $1", ReservationStatus.CANCELLED)
    assert await sample(client, HOLD_AGE) == 0


async def test_the_oldest_open_failed_operation_ages_from_its_first_failure(
    client: Client, db: asyncpg.Connection
) -> None:
    assert await sample(client, OPEN_AGE) == 0
    await db.execute(
        "INSERT INTO failed_operations (kind, reference, status, attempts, max_attempts, created_at)"
        " VALUES ('email', '1', 'dead', 4, 4, now() - interval '5 hours'),"
        " ('email', '2', 'retrying', 2, 4, now() - interval '2 hours'),"
        " ('webhook', 'evt_1', 'pending', 1, 6, now() - interval '10 minutes')"
    )
    assert 7200 <= await sample(client, OPEN_AGE) < 7300  # a dead one is not open: it has its own alert
    await db.execute("UPDATE failed_operations SET status = 'succeeded' WHERE reference = '2'")
    assert 600 <= await sample(client, OPEN_AGE) < 700
    await db.execute("UPDATE failed_operations SET status = 'discarded' WHERE reference = 'evt_1'")
    assert await sample(client, OPEN_AGE) == 0


async def test_what_reconcile_found_in_the_last_hour_is_read_from_its_runs(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    assert await sample(client, MISSED, source="events") == 0
    r = await client.post(
        "/v1/credits/purchases", json={"package_id": "starter"}, headers=auth("u1", key="missed-1")
    )
    assert r.status_code == 201, r.text
    stripe.settle(r.json()["payment_intent_id"])  # paid at Stripe; its webhook never reaches us

    found = await run(client, JobName.RECONCILE)

    assert found.outcome == RunOutcome.SUCCEEDED and found.counts["events_missed"] == 1
    assert await sample(client, MISSED, source="events") == 1
    assert await sample(client, MISSED, source="intents") == 0
    # a run of another process (a CronJob's pod) counts the same: it is the run record that is read
    await db.execute(
        "INSERT INTO job_runs (job, started_at, finished_at, outcome, counts) VALUES"
        " ('reconcile', now(), now(), 'succeeded', '{\"events_missed\": 2, \"intents_missed\": 3}')"
    )
    assert await sample(client, MISSED, source="events") == 3
    assert await sample(client, MISSED, source="intents") == 3
    await db.execute("UPDATE job_runs SET finished_at = now() - interval '61 minutes'")
    assert await sample(client, MISSED, source="events") == 0
