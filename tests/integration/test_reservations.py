"""Ticket holds under real concurrency against PostgreSQL: never oversold, free the instant they expire."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import asyncpg

from app.reservations.models import ReservationStatus
from app.reservations.service import RESERVATION_METADATA, Checkout, expire_holds, refund_if_no_room
from tests.fixtures.app import PATIENT_DB, AppFactory, Client, auth, create_ticket_type, hold, token
from tests.fixtures.smtp import SmtpServer
from tests.fixtures.stripe import FakeStripe
from tests.fixtures.webhooks import deliver, event
from tests.fixtures.worker import FAST_WORKER, running_worker, until_settled

EXPIRE_NOW = "UPDATE reservations SET expires_at = now() - interval '1 second' WHERE id = $1"  # time passes


async def available(client: Client, ticket_type: int) -> int:
    response = await client.get(f"/v1/ticket-types/{ticket_type}", headers=auth("reader"))
    assert response.status_code == 200, response.text
    return int(response.json()["available"])


async def test_one_hundred_holds_of_one_on_capacity_ten(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**PATIENT_DB)
    ticket_type = await create_ticket_type(client, capacity=10)

    responses = await asyncio.gather(*(hold(client, f"fan-{i}", ticket_type, 1) for i in range(100)))
    assert Counter(r.status_code for r in responses) == {201: 10, 409: 90}
    assert {r.json()["type"] for r in responses if r.status_code == 409} == {"sold-out"}
    assert await available(client, ticket_type) == 0
    held = await db.fetchval("SELECT sum(quantity) FROM reservations WHERE status = 'active'")
    assert held == 10


async def test_random_holds_of_three_hundred_users_never_exceed_capacity(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**PATIENT_DB)
    ticket_type = await create_ticket_type(client, capacity=250)
    sizes = [random.randint(1, 5) for _ in range(300)]

    responses = await asyncio.gather(*(hold(client, f"u{i}", ticket_type, n) for i, n in enumerate(sizes)))
    assert {r.status_code for r in responses} <= {201, 409}
    granted = sum(n for n, r in zip(sizes, responses, strict=True) if r.status_code == 201)
    held = await db.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM reservations WHERE ticket_type_id = $1", ticket_type
    )
    assert granted == held <= 250
    # holds only accumulate here, so a refused hold still does not fit: no refusal was spurious
    refused = [n for n, r in zip(sizes, responses, strict=True) if r.status_code == 409]
    assert all(held + n > 250 for n in refused)
    assert await available(client, ticket_type) == 250 - held


async def test_an_expired_hold_frees_capacity_at_once_and_cleanup_marks_it(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client()
    ticket_type = await create_ticket_type(client, capacity=3)
    first = (await hold(client, "early", ticket_type, 3)).json()
    assert (await hold(client, "late", ticket_type, 1)).json()["type"] == "sold-out"

    await db.execute(EXPIRE_NOW, first["id"])  # no job has run: the hold stops counting anyway
    assert await available(client, ticket_type) == 3
    shown = await client.get(f"/v1/reservations/{first['id']}", headers=auth("early"))
    assert shown.json()["status"] == ReservationStatus.EXPIRED
    assert (await hold(client, "late", ticket_type, 3)).status_code == 201
    stats = (await client.get("/admin/reservations/stats", headers=auth("admin", admin=True))).json()
    assert (stats["active"], stats["expired"], stats["awaiting_cleanup"]) == (1, 1, 1)

    services = client.app.state.services
    assert await expire_holds(services, batch=100) == 1
    assert await expire_holds(services, batch=100) == 0
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", first["id"]) == "expired"
    stats = (await client.get("/admin/reservations/stats", headers=auth("admin", admin=True))).json()
    assert (stats["active"], stats["expired"], stats["awaiting_cleanup"]) == (1, 1, 0)
    cancelled = await client.delete(f"/v1/reservations/{first['id']}", headers=auth("early"))
    assert cancelled.status_code == 409
    assert cancelled.json()["type"] == "reservation-not-active"


async def test_two_concurrent_cleanups_mark_each_expired_hold_once(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**PATIENT_DB)
    ticket_type = await create_ticket_type(client, capacity=500)
    await asyncio.gather(*(hold(client, f"u{i}", ticket_type, 1) for i in range(300)))
    await db.execute("UPDATE reservations SET expires_at = now() - interval '1 second'")

    services = client.app.state.services
    marked = await asyncio.gather(*(expire_holds(services, batch=50) for _ in range(8)))
    while done := await expire_holds(services, batch=50):
        marked.append(done)
    assert sum(marked) == 300
    assert await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'expired'") == 300


async def test_cancel_releases_at_once_and_only_the_owner_sees_a_reservation(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client()
    ticket_type = await create_ticket_type(client, capacity=2)
    mine = (await hold(client, "owner", ticket_type, 2)).json()
    assert mine["status"] == "active" and mine["quantity"] == 2

    for method in (client.get, client.delete):
        other = await method(f"/v1/reservations/{mine['id']}", headers=auth("stranger"))
        assert other.status_code == 404, other.text
    assert (await client.delete(f"/v1/reservations/{mine['id']}", headers=auth("owner"))).json() == {
        "status": "cancelled"
    }
    assert await available(client, ticket_type) == 2
    again = await client.delete(f"/v1/reservations/{mine['id']}", headers=auth("owner"))
    assert again.status_code == 409
    stats = (await client.get("/admin/reservations/stats", headers=auth("admin", admin=True))).json()
    assert stats["cancelled"] == 1 and stats["oldest_active_at"] is None


async def test_bad_holds_change_nothing(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(reservation_max_quantity=4)
    ticket_type = await create_ticket_type(client, capacity=10)
    cases = [
        ({"ticket_type_id": ticket_type, "quantity": 5}, 400),  # above the per-hold maximum
        ({"ticket_type_id": ticket_type, "quantity": 0}, 400),
        ({"ticket_type_id": ticket_type}, 400),
        ({"ticket_type_id": ticket_type, "quantity": 1, "extra": 1}, 400),
        ({"ticket_type_id": 999_999, "quantity": 1}, 404),
    ]
    for body, status in cases:
        response = await client.post("/v1/reservations", json=body, headers=auth("u"))
        assert response.status_code == status, (body, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert (
        await client.post("/v1/reservations", json={"ticket_type_id": ticket_type, "quantity": 1})
    ).status_code == 401
    bad_types = [
        {"name": "x", "capacity": 0, "price": 100, "currency": "usd"},
        {"name": "x", "capacity": 1, "price": 0, "currency": "usd"},
        {"name": "x", "capacity": 1, "price": 100, "currency": "USD"},
        {"name": "", "capacity": 1, "price": 100, "currency": "usd"},
    ]
    for body in bad_types:
        response = await client.post("/admin/ticket-types", json=body, headers=auth("admin", admin=True))
        assert response.status_code == 400, (body, response.text)
    forbidden = await client.post(
        "/admin/ticket-types", json={**bad_types[0], "capacity": 1}, headers=auth("u")
    )
    assert forbidden.status_code == 403
    assert await db.fetchval("SELECT count(*) FROM reservations") == 0
    assert await db.fetchval("SELECT count(*) FROM ticket_types") == 1


async def test_a_keyed_hold_is_made_once(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(**PATIENT_DB)
    ticket_type = await create_ticket_type(client, capacity=100)
    body = {"ticket_type_id": ticket_type, "quantity": 2}
    responses = await asyncio.gather(
        *(client.post("/v1/reservations", json=body, headers=auth("u", key="hold-1")) for _ in range(50))
    )
    assert {r.status_code for r in responses} <= {201, 409}
    assert len({r.json()["id"] for r in responses if r.status_code == 201}) == 1
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1


# --- checkout and payment -----------------------------------------------------------------------


async def checkout(client: Client, reservation: int, user: str, key: str) -> Any:
    headers = {"Authorization": f"Bearer {token(user, email=f'{user}@example.com')}", "Idempotency-Key": key}
    return await client.post(f"/v1/reservations/{reservation}/checkout", headers=headers)


def paid(intent_id: str, amount: int, reservation: int) -> dict[str, Any]:
    """payment_intent.succeeded as Stripe sends it for a checkout: our metadata on the intent."""
    intent = {
        "id": intent_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_received": amount,
        "currency": "usd",
        "status": "succeeded",
        "metadata": {RESERVATION_METADATA: str(reservation)},
    }
    return event("payment_intent.succeeded", intent)


async def hold_and_checkout(
    client: Client, user: str, ticket_type: int, quantity: int
) -> tuple[int, dict[str, Any]]:
    held = await hold(client, user, ticket_type, quantity)
    assert held.status_code == 201, held.text
    reservation = int(held.json()["id"])
    r = await checkout(client, reservation, user, f"pay-{reservation}")
    assert r.status_code == 201, r.text
    return reservation, r.json()


def worker_settings(smtp: SmtpServer) -> dict[str, Any]:
    return {**FAST_WORKER, "smtp_host": "127.0.0.1", "smtp_port": smtp.port, "smtp_starttls": False}


async def test_a_hold_paid_in_time_gets_its_tickets_once_and_one_email(
    make_client: AppFactory, db: asyncpg.Connection, smtp: SmtpServer, stripe: FakeStripe
) -> None:
    client = await make_client(**worker_settings(smtp))
    ticket_type = await create_ticket_type(client, capacity=5, price=2500, name="Friday night")
    reservation, intent = await hold_and_checkout(client, "buyer", ticket_type, 2)
    assert (intent["amount"], intent["currency"]) == (5000, "usd")
    again = await checkout(client, reservation, "buyer", "another-key")  # a second checkout: the same intent
    assert again.json()["payment_intent_id"] == intent["payment_intent_id"]
    assert len(stripe.intents) == 1

    evt = paid(intent["payment_intent_id"], 5000, reservation)
    async with running_worker(client):
        await asyncio.gather(*(deliver(client, evt) for _ in range(20)))
        await deliver(client, paid(intent["payment_intent_id"], 5000, reservation))  # a distinct second event
        await until_settled(db)
    outcomes = [r["outcome"] for r in await db.fetch("SELECT outcome FROM webhook_events ORDER BY id")]
    assert outcomes == [Checkout.COMPLETED, Checkout.UNCHANGED]
    shown = (await client.get(f"/v1/reservations/{reservation}", headers=auth("buyer"))).json()
    assert shown["status"] == ReservationStatus.COMPLETED
    assert len(shown["tickets"]) == len(set(shown["tickets"])) == 2
    assert all(len(code) >= 20 for code in shown["tickets"])  # 128 random bits each
    assert await db.fetchval("SELECT sold FROM ticket_types WHERE id = $1", ticket_type) == 2
    assert await db.fetchval("SELECT count(*) FROM tickets") == 2
    assert [m.rcpt_tos for m in smtp.received] == [["buyer@example.com"]]
    body = smtp.received[0].message.get_body().get_content()  # type: ignore[union-attr]
    assert all(code in body for code in shown["tickets"]) and "Friday night" in body
    assert await available(client, ticket_type) == 3
    assert stripe.refund_requests == []


async def test_a_hold_paid_after_it_expired_is_honoured_while_there_is_room(
    make_client: AppFactory, db: asyncpg.Connection, stripe: FakeStripe
) -> None:
    client = await make_client(**FAST_WORKER)
    ticket_type = await create_ticket_type(client, capacity=3)
    reservation, intent = await hold_and_checkout(client, "slow", ticket_type, 2)
    await db.execute(EXPIRE_NOW, reservation)
    async with running_worker(client):
        await deliver(client, paid(intent["payment_intent_id"], 5000, reservation))
        await until_settled(db)
    assert await db.fetchval("SELECT outcome FROM webhook_events") == Checkout.HONOURED
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", reservation) == "completed"
    assert await db.fetchval("SELECT count(*) FROM tickets") == 2
    assert await available(client, ticket_type) == 1
    assert stripe.refund_requests == []


async def test_a_hold_paid_after_it_expired_and_sold_out_is_refunded_once(
    make_client: AppFactory, db: asyncpg.Connection, stripe: FakeStripe
) -> None:
    client = await make_client(**FAST_WORKER)
    ticket_type = await create_ticket_type(client, capacity=2)
    reservation, intent = await hold_and_checkout(client, "slow", ticket_type, 2)
    await db.execute(EXPIRE_NOW, reservation)
    assert (await hold(client, "quick", ticket_type, 1)).status_code == 201  # the freed tickets go to another

    evt = paid(intent["payment_intent_id"], 5000, reservation)
    async with running_worker(client):
        await deliver(client, evt)
        await deliver(client, evt)  # delivered twice: stored once
        await deliver(client, paid(intent["payment_intent_id"], 5000, reservation))  # and a second event
        await until_settled(db)
    outcomes = [r["outcome"] for r in await db.fetch("SELECT outcome FROM webhook_events ORDER BY id")]
    assert outcomes == [Checkout.REFUNDED, Checkout.UNCHANGED]
    assert len(stripe.refunds) == 1
    (refund,) = stripe.refunds.values()
    assert (refund["payment_intent"], refund["amount"]) == (intent["payment_intent_id"], 5000)
    assert len(set(stripe.refund_requests)) == 1  # every request carried the reservation's refund key
    assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", reservation) == "refunded"
    assert await db.fetchval("SELECT count(*) FROM tickets") == 0
    assert await db.fetchval("SELECT sold FROM ticket_types") == 0
    stats = (await client.get("/admin/reservations/stats", headers=auth("admin", admin=True))).json()
    assert (stats["refunded"], stats["active"]) == (1, 1)


async def test_a_refund_repeated_after_a_crash_is_the_same_refund(
    make_client: AppFactory, db: asyncpg.Connection, stripe: FakeStripe
) -> None:
    # the refund happens before the transaction that records it: a worker that dies in between
    # refunds again on the next attempt, with the same key, and Stripe answers with the same refund
    client = await make_client()
    ticket_type = await create_ticket_type(client, capacity=1)
    reservation, intent = await hold_and_checkout(client, "slow", ticket_type, 1)
    await db.execute(EXPIRE_NOW, reservation)
    assert (await hold(client, "quick", ticket_type, 1)).status_code == 201
    services = client.app.state.services
    for _ in range(3):
        assert await refund_if_no_room(
            services, intent_id=intent["payment_intent_id"], amount=2500, currency="usd"
        )
    assert len(stripe.refund_requests) == 3 and len(stripe.refunds) == 1


async def test_checkout_refuses_what_cannot_be_paid(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client()
    ticket_type = await create_ticket_type(client, capacity=5)
    expired = (await hold(client, "u", ticket_type, 1)).json()["id"]
    await db.execute(EXPIRE_NOW, expired)
    cancelled = (await hold(client, "u", ticket_type, 1)).json()["id"]
    await client.delete(f"/v1/reservations/{cancelled}", headers=auth("u"))
    mine = (await hold(client, "u", ticket_type, 1)).json()["id"]
    for reservation, user, status, type_ in [
        (expired, "u", 409, "reservation-expired"),
        (cancelled, "u", 409, "reservation-not-active"),
        (mine, "stranger", 404, "not-found"),
        (999_999, "u", 404, "not-found"),
    ]:
        r = await checkout(client, reservation, user, f"k-{reservation}-{user}")
        assert (r.status_code, r.json()["type"]) == (status, type_), r.text
    no_key = await client.post(f"/v1/reservations/{mine}/checkout", headers=auth("u"))
    assert no_key.json()["type"] == "idempotency-key-required"
    assert await db.fetchval("SELECT count(*) FROM reservations WHERE payment_intent_id IS NOT NULL") == 0
