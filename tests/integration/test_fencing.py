"""A retry's takeover that lands while a phase holds its key, between the fence and the commit.

The request passes its fence (the key row, locked FOR UPDATE, still carries its token) and then
stalls inside the phase's transaction, before any other write. A retry with the same key arrives
once the key's lock is stale and tries to take it over. The row lock must make the takeover wait
for the phase's commit: then exactly one effect is committed, no answer is a 500, and each answer
is either the key's stored response or 409 idempotency-key-in-use. A fence without FOR UPDATE
lets the takeover run the phase a second time underneath the stalled one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import httpx
import pytest

from app.credits.models import PurchaseStatus
from tests.fixtures.app import ADMIN, AppFactory, Client, auth, create_lead, grant
from tests.fixtures.stall import StallAfter, engine_of, is_fence, until_blocked_or_done
from tests.fixtures.stripe import FakeStripe

LOCK_TIMEOUT_S = 0.3  # the key's lock goes stale quickly, so the retry may take over


async def takeover_inside_phase(
    client: Client,
    db: asyncpg.Connection,
    send: Callable[[], Coroutine[Any, Any, httpx.Response]],
    fence: int = 1,
) -> tuple[httpx.Response, httpx.Response]:
    """Stall the original request after its `fence`-th fence query; send the retry after the lock timeout."""
    with StallAfter(engine_of(client), is_fence, nth=fence) as stall:
        original = asyncio.create_task(send())
        await asyncio.wait_for(stall.stalled.wait(), 10)
        await asyncio.sleep(LOCK_TIMEOUT_S + 0.2)
        retry = asyncio.create_task(send())
        await until_blocked_or_done(db, retry)  # release only once the takeover waits (or is done)
        stall.release.set()
        return await asyncio.wait_for(original, 30), await asyncio.wait_for(retry, 30)


async def assert_one_answer(
    db: asyncpg.Connection, key_name: str, *responses: httpx.Response
) -> asyncpg.Record:
    """Every answer is the key's stored response or 409 in-use; the stored one is the committed 201."""
    key = await db.fetchrow(
        "SELECT fencing_token, response_status, response_body FROM idempotency_keys WHERE key = $1", key_name
    )
    assert key["response_status"] == 201, [(r.status_code, r.text) for r in responses]
    answered = 0
    for r in responses:
        assert r.status_code < 500, r.text
        if r.status_code == 409 and r.json()["type"] == "idempotency-key-in-use":
            continue
        assert (r.status_code, r.content) == (201, key["response_body"].encode()), r.text
        answered += 1
    assert answered >= 1
    return key


async def test_admin_grant(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(idempotency_lock_timeout_s=LOCK_TIMEOUT_S)
    body = {"user_id": "u1", "credits": 25, "reason": "goodwill"}

    async def send() -> httpx.Response:
        return await client.post(
            "/admin/credits/grants", json=body, headers=auth(ADMIN, admin=True, key="g1")
        )

    original, retry = await takeover_inside_phase(client, db, send)

    key = await assert_one_answer(db, "g1", original, retry)
    assert original.status_code == 201 and "idempotent-replayed" not in original.headers
    assert retry.headers.get("idempotent-replayed") == "true"  # it waited for the commit, then replayed
    assert key["fencing_token"] == 1  # the takeover never happened
    assert await db.fetchval("SELECT count(*) FROM credit_ledger") == 1
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == 25


async def test_lead_purchase(client: Client, make_client: AppFactory, db: asyncpg.Connection) -> None:
    lead = await create_lead(client, price=30)
    await grant(client, "u1", 100)
    fast = await make_client(idempotency_lock_timeout_s=LOCK_TIMEOUT_S)

    async def send() -> httpx.Response:
        return await fast.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="buy-1"))

    original, retry = await takeover_inside_phase(fast, db, send)

    key = await assert_one_answer(db, "buy-1", original, retry)
    assert original.status_code == 201 and "idempotent-replayed" not in original.headers
    assert retry.headers.get("idempotent-replayed") == "true"
    assert key["fencing_token"] == 1
    assert original.json()["balance"] == 70
    assert await db.fetchval("SELECT balance FROM credit_accounts WHERE user_id = 'u1'") == 70
    assert await db.fetchval("SELECT count(*) FROM credit_ledger WHERE delta < 0") == 1
    assert await db.fetchval("SELECT count(*) FROM lead_purchases") == 1
    assert await db.fetchval("SELECT buyer_id FROM leads WHERE id = $1", lead) == "u1"
    assert await db.fetchval("SELECT count(*) FROM outbox_emails") == 1


@pytest.mark.parametrize("fence", [1, 2], ids=["started", "purchase_created"])
async def test_credit_purchase(
    make_client: AppFactory, stripe: FakeStripe, db: asyncpg.Connection, fence: int
) -> None:
    client = await make_client(idempotency_lock_timeout_s=LOCK_TIMEOUT_S)

    async def send() -> httpx.Response:
        return await client.post(
            "/v1/credits/purchases", json={"package_id": "starter"}, headers=auth("u1", key="p1")
        )

    original, retry = await takeover_inside_phase(client, db, send, fence)

    await assert_one_answer(db, "p1", original, retry)
    assert await db.fetchval("SELECT count(*) FROM credit_purchases") == 1
    assert len(stripe.intents) == 1
    stored = await db.fetchrow("SELECT payment_intent_id, status FROM credit_purchases")
    assert (stored["payment_intent_id"], stored["status"]) == (
        next(iter(stripe.intents)),
        PurchaseStatus.PENDING,
    )
    if fence == 2:
        # stalled in the last phase: the retry waits for its commit and replays it
        assert original.status_code == 201 and retry.headers.get("idempotent-replayed") == "true"
        assert len(stripe.create_requests) == 1
    # stalled in the first phase: the retry may take over once that phase has committed (the key's
    # lock is stale), and then one of the two is fenced out of the second phase with a 409
