"""Lead purchases under real concurrency against PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg

from app.leads.models import LeadStatus
from app.notifications.models import EmailStatus
from app.notifications.service import EmailKind
from tests.fixtures.app import PATIENT_DB, AppFactory, Client, auth, create_lead, grant, seed_leads


async def test_two_hundred_funded_buyers_race_for_one_lead(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(**PATIENT_DB)
    lead = await create_lead(client, price=30)
    buyers = [f"buyer-{i}" for i in range(200)]
    await asyncio.gather(*(grant(client, b, 100) for b in buyers))

    responses = await asyncio.gather(
        *(client.post(f"/v1/leads/{lead}/purchase", headers=auth(b, key=f"k-{b}")) for b in buyers)
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 409: 199}, statuses
    assert all(r.json()["type"] == "lead-unavailable" for r in responses if r.status_code == 409)
    winner = next(b for b, r in zip(buyers, responses, strict=True) if r.status_code == 201)

    assert await db.fetchval("SELECT count(*) FROM credit_ledger WHERE delta < 0") == 1
    assert await db.fetchval("SELECT count(*) FROM lead_purchases") == 1
    assert await db.fetchval("SELECT buyer_id FROM leads WHERE id = $1", lead) == winner
    balances = dict(await db.fetch("SELECT user_id, balance FROM credit_accounts"))
    assert balances[winner] == 70
    assert sum(balances.values()) == 200 * 100 - 30
    assert (
        await db.fetchval("SELECT count(*) FROM outbox_emails WHERE kind = $1", EmailKind.LEAD_PURCHASED) == 1
    )


async def test_five_hundred_purchases_against_credits_for_one_hundred(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(rate_lead_purchases=10_000, **PATIENT_DB)
    lead_ids = await seed_leads(db, 500)
    await grant(client, "spender", 100)

    responses = await asyncio.gather(
        *(
            client.post(f"/v1/leads/{lead}/purchase", headers=auth("spender", key=f"k-{lead}"))
            for lead in lead_ids
        )
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 100, 402: 400}, statuses
    assert all(r.json()["type"] == "insufficient-credits" for r in responses if r.status_code == 402)
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'spender'") == 0
    assert await db.fetchval("SELECT count(*) FROM leads WHERE status = $1", LeadStatus.SOLD) == 100
    assert await db.fetchval("SELECT sum(delta) FROM credit_ledger WHERE user_id = 'spender'") == 0
    assert await db.fetchval("SELECT min(balance_after) FROM credit_ledger") == 0
    seen_balances = sorted(r.json()["balance"] for r in responses if r.status_code == 201)
    assert seen_balances == list(range(100))  # every debit saw a distinct, never-negative balance


async def test_purchase_flow_lists_and_details(client: Client, db: asyncpg.Connection) -> None:
    first = await create_lead(client, price=10, title="roofing, Austin")
    second = await create_lead(client, price=10, title="plumbing, Denver")
    await grant(client, "u1", 25)

    listed = (await client.get("/v1/leads", headers=auth("u1"))).json()
    assert [i["id"] for i in listed["items"]] == [first, second]
    assert listed["items"][0] == {
        "id": first,
        "title": "roofing, Austin",
        "price_credits": 10,
        "status": LeadStatus.AVAILABLE,
    }

    bought = await client.post(f"/v1/leads/{first}/purchase", headers=auth("u1", key="b1"))
    assert bought.status_code == 201
    assert bought.json() == {
        "purchase_id": bought.json()["purchase_id"],
        "lead_id": first,
        "price_credits": 10,
        "balance": 15,
    }
    listed = (await client.get("/v1/leads", headers=auth("u1"))).json()
    assert [i["id"] for i in listed["items"]] == [second]

    mine = (await client.get("/v1/leads/purchased", headers=auth("u1"))).json()
    assert len(mine["items"]) == 1
    assert mine["items"][0]["details"] == {"phone": "+1 555 0100"}
    assert mine["items"][0]["title"] == "roofing, Austin"
    theirs = (await client.get("/v1/leads/purchased", headers=auth("u2"))).json()
    assert theirs == {"items": [], "next_cursor": None}

    email = await db.fetchrow("SELECT kind, user_id, payload, status FROM outbox_emails")
    assert (email["kind"], email["user_id"], email["status"]) == (
        EmailKind.LEAD_PURCHASED,
        "u1",
        EmailStatus.SKIPPED,  # this token has no email claim: nobody to send it to
    )
    missing = await client.post("/v1/leads/999999/purchase", headers=auth("u1", key="b2"))
    assert missing.status_code == 404
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == 15


async def test_lead_pages_follow_the_cursor(client: Client, db: asyncpg.Connection) -> None:
    await seed_leads(db, 7, price=5)
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/leads", params=params, headers=auth("u1"))).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 and seen == sorted(seen)
