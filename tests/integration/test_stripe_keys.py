"""Stripe idempotency keys are unique across every database that shares one Stripe account."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from app.config import Settings
from app.credits.models import PurchaseStatus
from app.main import create_app
from tests.fixtures.app import Client, auth
from tests.fixtures.stripe import FakeStripe

PURCHASE = "/v1/credits/purchases"


async def buy(client: Client, user: str, key: str) -> Any:
    return await client.post(PURCHASE, json={"package_id": "starter"}, headers=auth(user, key=key))


@pytest.mark.parametrize("users", [("alice", "alice"), ("alice", "bob")], ids=["same user", "other users"])
async def test_two_databases_on_one_stripe_account_never_share_a_stripe_key(
    client: Client,
    stripe: FakeStripe,
    new_database: Callable[[], Awaitable[str]],
    settings_for: Callable[..., Settings],
    users: tuple[str, str],
) -> None:
    # staging and production on one test key, a restored backup, two developers: same purchase ids
    other_url = await new_database()
    other = Client(create_app(settings_for(database_url=other_url), other_url))
    try:
        first = await buy(client, users[0], "k1")
        second = await buy(other, users[1], "k1")
    finally:
        await other.aclose()
        for hook in other.app.on_shutdown:
            await hook()
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["purchase_id"] == second.json()["purchase_id"]  # the sequences do collide
    assert first.json()["payment_intent_id"] != second.json()["payment_intent_id"]
    assert len(stripe.intents) == 2
    stripe_keys = [key for key, _ in stripe.create_requests]
    assert len(set(stripe_keys)) == 2, stripe_keys


async def test_the_stripe_key_is_stored_with_the_purchase_and_reused_on_resume(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    stripe.failures_to_inject.append(500)
    assert (await buy(client, "u1", "k")).status_code == 502
    assert (await buy(client, "u1", "k")).status_code == 201
    stored = await db.fetchval("SELECT stripe_idempotency_key FROM credit_purchases")
    assert [key for key, _ in stripe.create_requests] == [stored, stored]
    assert (
        stored.startswith("payguard-credit-purchase-") and len(stored) > len("payguard-credit-purchase-") + 30
    )


async def test_stripe_idempotency_error_is_a_final_logged_error_never_a_retry_loop(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    stripe.key_conflicts_to_inject = 1
    with caplog.at_level(logging.ERROR, logger="payguard.payments"):
        refused = await buy(client, "u1", "k")
    assert refused.status_code == 502
    assert refused.json()["type"] == "payment-provider-conflict"
    assert "new Idempotency-Key" in refused.json()["detail"]
    assert any("idempotency key" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert await db.fetchval("SELECT status FROM credit_purchases") == PurchaseStatus.FAILED

    # the retry replays the refusal: Stripe is not asked again, and no intent was bound
    again = await buy(client, "u1", "k")
    assert again.status_code == 502 and again.content == refused.content
    assert again.headers["idempotent-replayed"] == "true"
    assert len(stripe.create_requests) == 1
    assert await db.fetchval("SELECT payment_intent_id FROM credit_purchases") is None
    # a new key is a new purchase, and it goes through
    fresh = await buy(client, "u1", "k2")
    assert fresh.status_code == 201
