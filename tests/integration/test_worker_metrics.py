"""What /metrics says about webhooks and the queues: a stall shows even when nothing fails."""

from __future__ import annotations

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.app import AppFactory, Client, auth
from tests.fixtures.webhooks import deliver, intent_event
from tests.fixtures.worker import FAST_WORKER, running_worker, until_settled


async def sample(client: Client, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_backlog_and_deliveries_are_visible(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(**FAST_WORKER)
    accepted = dict(type="payment_intent.succeeded", outcome="accepted")
    before = await sample(client, "payguard_webhooks_received_total", **accepted)
    await deliver(client, intent_event("payment_intent.succeeded", "pi_stalled", 4500))
    await deliver(client, b"not json")
    assert await sample(client, "payguard_webhooks_received_total", **accepted) == before + 1
    assert await sample(client, "payguard_webhooks_received_total", type="unknown", outcome="bad_event") >= 1

    # no worker runs: the event waits, and its age is what an alert looks at
    await db.execute("UPDATE webhook_events SET received_at = now() - interval '5 minutes'")
    assert await sample(client, "payguard_queue_depth", queue="webhook_events") == 1
    assert await sample(client, "payguard_queue_oldest_age_seconds", queue="webhook_events") >= 300

    ignored = dict(queue="webhook_events", kind="payment_intent.succeeded", outcome="ignored")
    handled_before = await sample(client, "payguard_work_items_total", **ignored)
    async with running_worker(client):
        await until_settled(db)
    assert await sample(client, "payguard_queue_depth", queue="webhook_events") == 0
    assert await sample(client, "payguard_queue_oldest_age_seconds", queue="webhook_events") == 0
    after = await sample(client, "payguard_work_items_total", **ignored)
    assert after == handled_before + 1  # an intent we never created


async def test_dead_failed_operations_are_counted_by_kind(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client()
    await db.execute(
        "INSERT INTO failed_operations (kind, reference, status, attempts, max_attempts)"
        " VALUES ('email', '1', 'dead', 4, 4), ('email', '2', 'dead', 4, 4), ('webhook', 'evt_1', 'retrying', 2, 6)"
    )
    assert await sample(client, "payguard_failed_operations", kind="email", status="dead") == 2
    assert await sample(client, "payguard_failed_operations", kind="webhook", status="retrying") == 1
    assert await sample(client, "payguard_failed_operations", kind="webhook", status="dead") == 0


async def test_a_paid_credit_purchase_is_counted_once(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    succeeded = dict(kind="credits", outcome="succeeded")
    before = await sample(client, "payguard_purchases_total", **succeeded)
    granted_before = await sample(client, "payguard_credits_granted_total", reason="purchase")
    r = await client.post(
        "/v1/credits/purchases", json={"package_id": "pro"}, headers=auth("u1", key="buy-1")
    )
    assert r.status_code == 201, r.text
    intent = r.json()["payment_intent_id"]
    for _ in range(2):  # a duplicate delivery grants nothing more
        await deliver(client, intent_event("payment_intent.succeeded", intent, 4500))
    async with running_worker(client):
        await until_settled(db)
    assert await sample(client, "payguard_purchases_total", **succeeded) == before + 1
    assert await sample(client, "payguard_credits_granted_total", reason="purchase") == granted_before + 500
