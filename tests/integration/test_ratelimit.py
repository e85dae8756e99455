"""Rate limits live in PostgreSQL: shared by every replica, separate per action."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg

from app.leads.models import LeadStatus
from tests.fixtures.app import AppFactory, auth, create_lead, grant, seed_leads


async def test_lead_purchases_are_limited_per_user_with_retry_after(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(rate_lead_purchases=3, rate_window_s=60)
    await grant(client, "u1", 1000)
    leads = [await create_lead(client, price=1) for _ in range(5)]
    statuses = []
    for lead in leads:
        r = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key=f"k{lead}"))
        statuses.append(r.status_code)
    assert statuses == [201, 201, 201, 429, 429]
    limited = await client.post(f"/v1/leads/{leads[4]}/purchase", headers=auth("u1", key="again"))
    assert limited.status_code == 429
    assert limited.json()["type"] == "rate-limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 20  # one emission interval: 60 s / 3
    # a 429 is not stored: the same key is usable once the window allows
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE response_status = 429") == 0
    # another user is not affected
    await grant(client, "u2", 10)
    ok = await client.post(f"/v1/leads/{leads[4]}/purchase", headers=auth("u2", key="x"))
    assert ok.status_code == 201


async def test_credit_and_lead_purchases_have_separate_keys(make_client: AppFactory) -> None:
    client = await make_client(rate_lead_purchases=2, rate_credit_purchases=2)
    await grant(client, "u1", 1000)
    leads = [await create_lead(client, price=1) for _ in range(3)]
    credit = [
        (
            await client.post(
                "/v1/credits/purchases", json={"package_id": "starter"}, headers=auth("u1", key=f"c{i}")
            )
        ).status_code
        for i in range(3)
    ]
    lead = [
        (await client.post(f"/v1/leads/{lid}/purchase", headers=auth("u1", key=f"l{lid}"))).status_code
        for lid in leads
    ]
    assert credit == [201, 201, 429]
    assert lead == [201, 201, 429]


async def test_limit_holds_under_concurrency_and_across_app_instances(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    # two app instances on one database; tests/e2e/test_replicas.py runs two real processes
    # a window of an hour: no request is admitted by the window moving on during the test
    limits = {"rate_lead_purchases": 20, "rate_window_s": 3600}
    replicas = [await make_client(**limits), await make_client(**limits)]
    await grant(replicas[0], "u1", 1000)
    ids = await seed_leads(db, 100)
    responses = await asyncio.gather(
        *(
            replicas[i % 2].post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key=f"k{lead}"))
            for i, lead in enumerate(ids)
        )
    )
    assert Counter(r.status_code for r in responses) == {201: 20, 429: 80}
    # and a 429 moved nothing: the limit is checked before the purchase, not after its commit
    bought = {lead for lead, r in zip(ids, responses, strict=True) if r.status_code == 201}
    assert {
        r["id"] for r in await db.fetch("SELECT id FROM leads WHERE status = $1", LeadStatus.SOLD)
    } == bought
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == 1000 - 20
    assert await db.fetchval("SELECT count(*) FROM credit_ledger WHERE delta < 0") == 20
