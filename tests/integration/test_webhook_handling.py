"""Stripe events through the worker: paid purchases credited exactly once, in any order, whatever arrives."""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg

from app.credits.models import PurchaseStatus
from app.failures.models import FailureStatus, OperationKind
from app.notifications.models import EmailStatus
from app.webhooks.models import EventStatus
from tests.fixtures.app import AppFactory, Client, auth, connect, create_lead, token
from tests.fixtures.webhooks import deliver, event, intent_event, refund_event
from tests.fixtures.worker import FAST_WORKER, running_worker, until_settled

PRO = {"package_id": "pro"}  # 500 credits for 4500 usd


async def buy(client: Client, user: str = "u1", key: str = "buy-1", email: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token(user, email=email)}", "Idempotency-Key": key}
    r = await client.post("/v1/credits/purchases", json=PRO, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def balance(db: asyncpg.Connection, user: str = "u1") -> int:
    return int(
        await db.fetchval("SELECT coalesce(sum(delta), 0) FROM credit_ledger WHERE user_id = $1", user)
    )


async def status_of(client: Client, purchase: dict, user: str = "u1") -> str:
    r = await client.get(f"/v1/credits/purchases/{purchase['purchase_id']}", headers=auth(user))
    assert r.status_code == 200, r.text
    return str(r.json()["status"])


async def test_a_paid_purchase_is_credited_once_and_its_receipt_queued(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    purchase = await buy(client, email="u1@example.com")
    assert await status_of(client, purchase) == PurchaseStatus.PENDING
    evt = intent_event("payment_intent.succeeded", purchase["payment_intent_id"], 4500)
    async with running_worker(client):
        answers = await asyncio.gather(*(deliver(client, evt) for _ in range(50)))
        assert sum(not r.json()["duplicate"] for r in answers) == 1
        # a second, distinct event about the same intent (Stripe may send one) grants nothing more
        await deliver(client, intent_event("payment_intent.succeeded", purchase["payment_intent_id"], 4500))
        await until_settled(db)
    assert await balance(db) == 500
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == 500
    assert await status_of(client, purchase) == PurchaseStatus.SUCCEEDED
    outcomes = await db.fetch("SELECT status, outcome FROM webhook_events ORDER BY id")
    assert [tuple(r) for r in outcomes] == [
        (EventStatus.HANDLED, "granted"),
        (EventStatus.HANDLED, "unchanged"),
    ]
    receipt = await db.fetchrow("SELECT kind, recipient, payload, status FROM outbox_emails")
    assert (receipt["kind"], receipt["recipient"]) == ("credits_purchased", "u1@example.com")
    assert receipt["status"] == EmailStatus.HELD  # no SMTP server configured in this test


async def test_another_users_purchase_is_not_found(client: Client) -> None:
    purchase = await buy(client)
    r = await client.get(f"/v1/credits/purchases/{purchase['purchase_id']}", headers=auth("u2"))
    assert r.status_code == 404
    for bad in ["0", "-1", "abc", "99999999999999999999999"]:
        assert (await client.get(f"/v1/credits/purchases/{bad}", headers=auth("u1"))).status_code in (
            400,
            404,
        )


async def test_failed_then_succeeded_and_the_reverse_both_end_credited(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    first, second = await buy(client, key="a"), await buy(client, key="b")
    t = 1_700_000_000
    failed_a = intent_event("payment_intent.payment_failed", first["payment_intent_id"], 4500, created=t)
    paid_a = intent_event("payment_intent.succeeded", first["payment_intent_id"], 4500, created=t + 60)
    failed_b = intent_event("payment_intent.payment_failed", second["payment_intent_id"], 4500, created=t)
    paid_b = intent_event("payment_intent.succeeded", second["payment_intent_id"], 4500, created=t + 60)
    async with running_worker(client):
        await deliver(client, failed_a)  # in order: the card failed, was retried, and succeeded
        await until_settled(db)
        assert await status_of(client, first) == PurchaseStatus.FAILED
        await deliver(client, paid_a)
        await deliver(client, paid_b)  # reversed: the older failure arrives after the success
        await until_settled(db)
        await deliver(client, failed_b)
        await until_settled(db)
    assert await status_of(client, first) == PurchaseStatus.SUCCEEDED
    assert await status_of(client, second) == PurchaseStatus.SUCCEEDED
    assert await balance(db) == 1000


async def test_an_amount_mismatch_grants_nothing_and_needs_a_human(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    purchase = await buy(client)
    async with running_worker(client):
        await deliver(client, intent_event("payment_intent.succeeded", purchase["payment_intent_id"], 45))
        await deliver(
            client, intent_event("payment_intent.succeeded", purchase["payment_intent_id"], 4500, "eur")
        )
        await until_settled(db)
    assert await balance(db) == 0
    assert await status_of(client, purchase) == PurchaseStatus.PENDING
    assert await db.fetchval("SELECT count(*) FROM webhook_events WHERE status = $1", EventStatus.DEAD) == 2
    ops = await db.fetch("SELECT kind, status, attempts, last_error FROM failed_operations")
    assert {(r["kind"], r["status"], r["attempts"]) for r in ops} == {
        (OperationKind.WEBHOOK, FailureStatus.DEAD, 1)
    }
    assert all("nothing was granted" in r["last_error"] for r in ops)


async def test_a_refund_takes_the_credits_back_once_and_records_a_shortfall(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    full, spent = await buy(client, key="a"), await buy(client, "u2", key="b")
    async with running_worker(client):
        for p in (full, spent):
            await deliver(client, intent_event("payment_intent.succeeded", p["payment_intent_id"], 4500))
        await until_settled(db)
        lead = await create_lead(client, price=400)
        r = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u2", key="lead"))
        assert r.status_code == 201, r.text  # u2 spends 400 of the 500 credits
        # the refund of u1's purchase, delivered twice as two events with the same cumulative amount
        for _ in range(2):
            await deliver(client, refund_event(full["payment_intent_id"], 4500, 4500))
        await deliver(client, refund_event(spent["payment_intent_id"], 4500, 4500))
        await until_settled(db)
    assert await balance(db, "u1") == 0
    assert await balance(db, "u2") == 0  # 100 taken back; the balance never goes negative
    assert await status_of(client, full) == PurchaseStatus.REFUNDED
    assert await status_of(client, spent, "u2") == PurchaseStatus.REFUNDED
    shortfall = await db.fetchrow("SELECT kind, status, payload FROM failed_operations")
    assert (shortfall["kind"], shortfall["status"]) == (OperationKind.REFUND_SHORTFALL, FailureStatus.DEAD)
    assert '"credits": 400' in shortfall["payload"]


async def test_unknown_types_and_intents_are_stored_and_ignored(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    async with running_worker(client):
        await deliver(client, event("customer.created", {"id": "cus_1", "object": "customer"}))
        await deliver(client, intent_event("payment_intent.succeeded", "pi_not_ours", 4500))
        await deliver(client, refund_event("pi_not_ours", 4500, 4500))
        await until_settled(db)
    statuses = await db.fetch("SELECT status FROM webhook_events")
    assert [r["status"] for r in statuses] == [EventStatus.IGNORED] * 3
    assert await db.fetchval("SELECT count(*) FROM failed_operations") == 0


async def test_a_handler_error_is_retried_then_dead_after_the_budget(
    make_client: AppFactory, db: asyncpg.Connection, db_url: str
) -> None:
    client = await make_client(**FAST_WORKER, db_lock_timeout_ms=50, webhook_max_retries=2)
    purchase = await buy(client)
    # another session holds the purchase's row: every attempt times out on its lock
    holder = await connect(db_url)
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1 FROM credit_purchases FOR UPDATE")
    try:
        async with running_worker(client):
            await deliver(
                client, intent_event("payment_intent.succeeded", purchase["payment_intent_id"], 4500)
            )
            await until_settled(db)
    finally:
        await tx.rollback()
        await holder.close()
    op = await db.fetchrow("SELECT status, attempts, max_attempts, history FROM failed_operations")
    assert (op["status"], op["attempts"], op["max_attempts"]) == (FailureStatus.DEAD, 3, 3)
    assert await db.fetchval("SELECT status FROM webhook_events") == EventStatus.DEAD
    assert await balance(db) == 0

    # an admin retry, with the lock gone, applies it once
    op_id = await db.fetchval("SELECT id FROM failed_operations")
    async with running_worker(client):
        r = await client.post(f"/admin/failed-operations/{op_id}/retry", headers=auth("admin", admin=True))
        assert r.status_code == 202, r.text
        await until_settled(db)
    assert await balance(db) == 500
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.SUCCEEDED
    assert await db.fetchval("SELECT status FROM webhook_events") == EventStatus.HANDLED
    again = await client.post(f"/admin/failed-operations/{op_id}/retry", headers=auth("admin", admin=True))
    assert again.status_code == 409


async def test_interleaved_out_of_order_events_end_in_each_intents_newest_state(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**FAST_WORKER)
    rng = random.Random(7)
    purchases = [await buy(client, f"user{n}", key=f"k{n}") for n in range(30)]
    t = 1_700_000_000
    deliveries, paid = [], set()
    for n, p in enumerate(purchases):
        pi = p["payment_intent_id"]
        story = [intent_event("payment_intent.payment_failed", pi, 4500, created=t)]
        if n % 3:  # two in three intents succeed after a failed attempt
            story.append(intent_event("payment_intent.succeeded", pi, 4500, created=t + 10))
            paid.add(f"user{n}")
        if n % 5 == 0 and n % 3:
            story.append(refund_event(pi, 4500, 4500, created=t + 20))
        deliveries += [*story, rng.choice(story)]  # and one duplicate of each story
    rng.shuffle(deliveries)
    async with running_worker(client):
        answers = await asyncio.gather(*(deliver(client, d) for d in deliveries))
        assert all(r.status_code == 200 for r in answers)
        await until_settled(db)
    for n, p in enumerate(purchases):
        user = f"user{n}"
        expected = PurchaseStatus.FAILED
        if n % 3:
            expected = PurchaseStatus.REFUNDED if n % 5 == 0 else PurchaseStatus.SUCCEEDED
        assert await status_of(client, p, user) == expected, user
        assert await balance(db, user) == (500 if expected == PurchaseStatus.SUCCEEDED else 0), user
    grants = await db.fetchval("SELECT count(*) FROM credit_ledger WHERE reference LIKE 'payment_intent:%'")
    assert grants == len(paid)


async def test_replay_dry_run_changes_nothing_and_a_real_one_applies_only_what_failed(
    make_client: AppFactory, db: asyncpg.Connection, db_url: str
) -> None:
    client = await make_client(**FAST_WORKER, db_lock_timeout_ms=50, webhook_max_retries=0)
    handled, failing = await buy(client, key="a"), await buy(client, key="b")
    async with running_worker(client):
        await deliver(client, intent_event("payment_intent.succeeded", handled["payment_intent_id"], 4500))
        await until_settled(db)
        holder = await connect(db_url)
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT 1 FROM credit_purchases WHERE id = $1 FOR UPDATE", failing["purchase_id"]
        )
        await deliver(client, intent_event("payment_intent.succeeded", failing["payment_intent_id"], 4500))
        await until_settled(db)
        await tx.rollback()
        await holder.close()
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.DEAD
    assert await balance(db) == 500
    window = {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}
    admin = auth("admin", admin=True)
    before = await db.fetchval("SELECT count(*) FROM credit_ledger")

    dry = await client.post("/admin/webhooks/replay", json={**window, "dry_run": True}, headers=admin)
    assert dry.status_code == 200, dry.text
    assert (dry.json()["matched"], dry.json()["would_change"], dry.json()["replayed"]) == (2, 1, 0)
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == before
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.DEAD

    real = await client.post("/admin/webhooks/replay", json={**window, "dry_run": False}, headers=admin)
    assert (real.json()["matched"], real.json()["would_change"], real.json()["replayed"]) == (2, 1, 1)
    again = await client.post("/admin/webhooks/replay", json={**window, "dry_run": False}, headers=admin)
    assert (again.json()["would_change"], again.json()["replayed"]) == (0, 0)
    assert await balance(db) == 1000
    assert await db.fetchval("SELECT status FROM failed_operations") == FailureStatus.SUCCEEDED
    assert (
        await db.fetchval("SELECT count(*) FROM webhook_events WHERE status = $1", EventStatus.HANDLED) == 2
    )

    for bad in [
        {"from": "2100-01-01T00:00:00Z", "to": "2000-01-01T00:00:00Z"},
        {"from": "0001-01-01T00:00:12+01:00", "to": "0001-01-01T00:00:00Z"},  # before year 1 in UTC
        {"from": "2000-01-01T00:00:00", "to": "2100-01-01T00:00:00"},  # no time zone
        {"from": "x", "to": "y"},
        {},
    ]:
        r = await client.post("/admin/webhooks/replay", json=bad, headers=admin)
        assert r.status_code == 400, bad
    assert (await client.post("/admin/webhooks/replay", json=window, headers=auth("u1"))).status_code == 403


async def test_a_paid_intent_made_for_us_but_not_yet_recorded_is_retried_not_ignored(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    """Money was taken: an intent whose metadata names our purchase is never ignored, only retried."""
    client = await make_client(**FAST_WORKER, webhook_max_retries=2)
    evt = intent_event("payment_intent.succeeded", "pi_unrecorded", 4500)
    evt["data"]["object"]["metadata"] = {"payguard_credit_purchase_id": "42"}
    async with running_worker(client):
        await deliver(client, evt)
        await until_settled(db)
    assert await db.fetchval("SELECT status FROM webhook_events") == EventStatus.DEAD
    op = await db.fetchrow("SELECT kind, status, attempts, last_error FROM failed_operations")
    assert (op["kind"], op["status"], op["attempts"]) == (OperationKind.WEBHOOK, FailureStatus.DEAD, 3)
    assert "not recorded yet" in op["last_error"]


async def test_one_batch_grants_each_payment_once_and_sends_a_mismatch_to_a_human(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    """Events stored before the worker starts are claimed as one batch and handled in one transaction:
    two payments of one buyer move the account in order, a mismatch and an intent not recorded yet
    each get an attempt of their own, and nothing else in the batch is held back by them."""
    client = await make_client(**FAST_WORKER, webhook_max_retries=1)
    first = await buy(client, "u1", "b-1", email="u1@example.com")
    second = await buy(client, "u1", "b-2", email="u1@example.com")
    other = await buy(client, "u3", "b-3")
    mismatched = await buy(client, "u2", "b-4")
    unrecorded = intent_event("payment_intent.succeeded", "pi_not_yet", 4500)
    unrecorded["data"]["object"]["metadata"] = {"payguard_credit_purchase_id": "99"}
    for evt in (
        intent_event("payment_intent.succeeded", first["payment_intent_id"], 4500),
        intent_event("payment_intent.succeeded", mismatched["payment_intent_id"], 4499),
        unrecorded,
        intent_event("payment_intent.succeeded", second["payment_intent_id"], 4500),
        intent_event("payment_intent.succeeded", other["payment_intent_id"], 4500),
    ):
        await deliver(client, evt)
    async with running_worker(client):
        await until_settled(db)

    assert (await balance(db, "u1"), await balance(db, "u3"), await balance(db, "u2")) == (1000, 500, 0)
    entries = await db.fetch(
        "SELECT delta, balance_after FROM credit_ledger WHERE user_id = 'u1' ORDER BY id"
    )
    assert [tuple(e) for e in entries] == [(500, 500), (500, 1000)]  # each entry's balance, in order
    receipts = await db.fetch(
        "SELECT payload FROM outbox_emails WHERE user_id = 'u1' AND kind = 'credits_purchased' ORDER BY id"
    )
    assert [json.loads(r["payload"])["balance"] for r in receipts] == [500, 1000]
    for purchase, user in ((first, "u1"), (second, "u1"), (other, "u3")):
        assert await status_of(client, purchase, user) == PurchaseStatus.SUCCEEDED
    assert await status_of(client, mismatched, "u2") == PurchaseStatus.PENDING
    dead = await db.fetch("SELECT event_id FROM webhook_events WHERE status = $1", EventStatus.DEAD)
    assert len(dead) == 2  # the mismatch at once, the unrecorded intent after its retry
    ops = await db.fetch("SELECT status, attempts, last_error FROM failed_operations ORDER BY id")
    assert [(r["status"], r["attempts"]) for r in ops] == [(FailureStatus.DEAD, 1), (FailureStatus.DEAD, 2)]
    assert "nothing was granted" in ops[0]["last_error"]
    assert "not recorded yet" in ops[1]["last_error"]
