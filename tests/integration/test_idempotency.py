"""Idempotency keys against real PostgreSQL and a Stripe-shaped server on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from app.idempotency.models import RecoveryPoint
from app.payments.gateway import PaymentGateway, PaymentIntent
from tests.fixtures.app import AppFactory, Client, auth, create_lead, grant
from tests.fixtures.stripe import FakeStripe

PURCHASE = "/v1/credits/purchases"


async def buy(client: Client, user: str, key: str | None, package: str = "starter") -> Any:
    return await client.post(PURCHASE, json={"package_id": package}, headers=auth(user, key=key))


async def test_fifty_concurrent_requests_with_one_key_create_one_intent(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    responses = await asyncio.gather(*(buy(client, "u1", "same-key") for _ in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {201, 409}, statuses
    assert 201 in statuses
    assert len(stripe.create_requests) == 1
    assert len(stripe.intents) == 1
    created = [r for r in responses if r.status_code == 201]
    assert len({r.content for r in created}) == 1
    for r in responses:
        if r.status_code == 409:
            assert r.json()["type"] == "idempotency-key-in-use"
            assert r.headers["content-type"].startswith("application/problem+json")

    replay = await buy(client, "u1", "same-key")
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == created[0].content
    body = replay.json()
    assert body["payment_intent_id"] in stripe.intents
    assert body["credits"] == 100 and body["amount"] == 1000 and body["currency"] == "usd"
    assert await db.fetchval("SELECT count(*) FROM credit_purchases") == 1
    assert len(stripe.create_requests) == 1


async def test_same_key_with_another_body_or_path_is_422(client: Client) -> None:
    first = await buy(client, "u1", "k1", "starter")
    assert first.status_code == 201
    other_body = await buy(client, "u1", "k1", "pro")
    assert other_body.status_code == 422
    assert other_body.json()["type"] == "idempotency-key-mismatch"
    lead = await create_lead(client)
    other_path = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="k1"))
    assert other_path.status_code == 422


async def test_keys_are_scoped_to_the_caller(client: Client, stripe: FakeStripe) -> None:
    a = await buy(client, "alice", "shared")
    b = await buy(client, "bob", "shared")
    assert a.status_code == b.status_code == 201
    assert a.json()["payment_intent_id"] != b.json()["payment_intent_id"]
    assert len(stripe.intents) == 2


class CrashAfterStripe(PaymentGateway):
    """Calls Stripe for real, then dies before our commit (once)."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.__dict__.update(inner.__dict__)
        self.crashes = 1

    async def create_payment_intent(self, **kwargs: Any) -> PaymentIntent:
        intent = await super().create_payment_intent(**kwargs)
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("process died after Stripe answered")
        return intent


async def test_crash_between_stripe_call_and_commit_resumes_without_a_second_intent(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    services = client.app.state.services
    object.__setattr__(services, "payments", CrashAfterStripe(services.payments))

    crashed = await buy(client, "u1", "crash-key")
    assert crashed.status_code == 500
    assert crashed.json()["type"] == "internal-error"
    assert "died" not in crashed.text  # no internals leak
    assert len(stripe.intents) == 1
    assert await db.fetchval("SELECT payment_intent_id FROM credit_purchases") is None

    retried = await buy(client, "u1", "crash-key")
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert len(stripe.intents) == 1
    keys = {key for key, _ in stripe.create_requests}
    assert len(stripe.create_requests) == 2 and len(keys) == 1  # the same derived Stripe key twice
    assert retried.json()["payment_intent_id"] == next(iter(stripe.intents))
    assert (
        await db.fetchval("SELECT payment_intent_id FROM credit_purchases")
        == retried.json()["payment_intent_id"]
    )


class StallAfterStripe(PaymentGateway):
    """The first call stalls after Stripe answered until released: a request that hung."""

    def __init__(self, inner: PaymentGateway) -> None:
        self.__dict__.update(inner.__dict__)
        self.stalled = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def create_payment_intent(self, **kwargs: Any) -> PaymentIntent:
        intent = await super().create_payment_intent(**kwargs)
        self.calls += 1
        if self.calls == 1:
            self.stalled.set()
            await self.release.wait()
        return intent


async def test_stale_lock_is_taken_over_and_the_stalled_request_cannot_commit(
    make_client: AppFactory, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    client = await make_client(idempotency_lock_timeout_s=0.3)
    services = client.app.state.services
    gateway = StallAfterStripe(services.payments)
    object.__setattr__(services, "payments", gateway)

    original = asyncio.create_task(buy(client, "u1", "slow-key"))
    await gateway.stalled.wait()
    early = await buy(client, "u1", "slow-key")
    assert early.status_code == 409  # the lock is still fresh

    await asyncio.sleep(0.4)
    retry = await buy(client, "u1", "slow-key")
    assert retry.status_code == 201
    gateway.release.set()
    stalled = await original
    assert stalled.status_code == 409
    assert stalled.json()["type"] == "idempotency-key-in-use"

    assert len(stripe.intents) == 1
    row = await db.fetchrow("SELECT fencing_token, response_status, response_body FROM idempotency_keys")
    assert row["fencing_token"] == 2 and row["response_status"] == 201
    assert row["response_body"].encode() == retry.content
    replay = await buy(client, "u1", "slow-key")
    assert replay.content == retry.content and replay.headers["idempotent-replayed"] == "true"


async def test_provider_5xx_is_not_stored_and_a_retry_succeeds(client: Client, stripe: FakeStripe) -> None:
    stripe.failures_to_inject.append(500)
    failed = await buy(client, "u1", "k")
    assert failed.status_code == 502
    assert failed.json()["type"] == "payment-provider-error"
    retried = await buy(client, "u1", "k")
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert len(stripe.intents) == 1


async def test_4xx_results_are_stored_and_replayed(client: Client) -> None:
    lead = await create_lead(client, price=50)
    poor = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="buy-1"))
    assert poor.status_code == 402
    assert poor.json()["type"] == "insufficient-credits"
    await grant(client, "u1", 100)
    again = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="buy-1"))
    assert again.status_code == 402
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"].startswith("application/problem+json")
    assert again.content == poor.content
    fresh = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="buy-2"))
    assert fresh.status_code == 201
    assert fresh.json()["balance"] == 50


async def test_key_required_and_validated(client: Client, db: asyncpg.Connection) -> None:
    missing = await buy(client, "u1", None)
    assert missing.status_code == 400
    assert missing.json()["type"] == "idempotency-key-required"
    for bad in ["x" * 256, "caf\u00e9".encode("latin-1"), "tab\there"]:
        r = await client.post(
            PURCHASE,
            json={"package_id": "starter"},
            headers={**auth("u1"), "Idempotency-Key": bad},
        )
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["type"] in {"idempotency-key-invalid", "bad-request", "validation-error"}
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    assert await db.fetchval("SELECT count(*) FROM credit_purchases") == 0


async def test_payments_refused_with_503_without_a_stripe_key(make_client: AppFactory) -> None:
    client = await make_client(stripe_secret_key=None)
    r = await buy(client, "u1", "k")
    assert r.status_code == 503
    assert r.json()["type"] == "payments-not-configured"


async def test_prune_removes_keys_past_retention(client: Client, db: asyncpg.Connection) -> None:
    from app.idempotency.service import prune_expired_keys

    await buy(client, "u1", "old")
    await buy(client, "u1", "new")
    await db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old'")
    services = client.app.state.services
    assert await prune_expired_keys(services.sessions, 24 * 3600, limit=1000) == 1
    assert await db.fetchval("SELECT array_agg(key) FROM idempotency_keys") == ["new"]


async def test_an_abandoned_purchase_is_completed_from_its_key_row_without_the_client(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    from app.credits.service import PURCHASE_PHASES
    from app.idempotency.service import complete_abandoned

    services = client.app.state.services
    object.__setattr__(services, "payments", CrashAfterStripe(services.payments))
    assert (await buy(client, "u1", "gone")).status_code == 500  # the client never comes back
    key_id = await db.fetchval("SELECT id FROM idempotency_keys")
    assert await db.fetchval("SELECT recovery_point FROM idempotency_keys") == RecoveryPoint.PURCHASE_CREATED

    done = await complete_abandoned(services, key_id, PURCHASE_PHASES)
    assert done is not None and done.status == 201
    assert len(stripe.intents) == 1  # the same Stripe key: the intent Stripe already made
    row = await db.fetchrow("SELECT payment_intent_id, user_id FROM credit_purchases")
    assert row["payment_intent_id"] == next(iter(stripe.intents)) and row["user_id"] == "u1"
    assert await complete_abandoned(services, key_id, PURCHASE_PHASES) is None  # finished: nothing to do
    late = await buy(client, "u1", "gone")  # if the client does come back, it sees the same purchase
    assert late.headers["idempotent-replayed"] == "true" and late.content == done.body


async def test_a_key_held_by_a_live_request_is_not_completed(client: Client, db: asyncpg.Connection) -> None:
    from app.credits.service import PURCHASE_PHASES
    from app.idempotency.service import complete_abandoned

    await db.execute(
        "INSERT INTO idempotency_keys (user_id, key, request_method, request_path, request_fingerprint,"
        " request_params, recovery_point, fencing_token, locked_at)"
        " VALUES ('u1', 'k', 'POST', '/v1/credits/purchases', 'f', '{\"package_id\": \"starter\"}', $1, 1, now())",
        RecoveryPoint.STARTED,
    )
    key_id = await db.fetchval("SELECT id FROM idempotency_keys")
    assert await complete_abandoned(client.app.state.services, key_id, PURCHASE_PHASES) is None
    assert await db.fetchval("SELECT fencing_token FROM idempotency_keys") == 1
    assert await db.fetchval("SELECT count(*) FROM credit_purchases") == 0


async def test_a_key_made_before_keys_kept_parameters_resumes_with_the_retry_s(
    client: Client, stripe: FakeStripe, db: asyncpg.Connection
) -> None:
    # a request that died before migration 0002 left its key at `started` with no parameters
    first = await buy(client, "u1", "old-key")
    assert first.status_code == 201
    await db.execute("DELETE FROM credit_purchases")
    await db.execute(
        "UPDATE idempotency_keys SET request_params = '{}', recovery_point = $1, response_status = NULL,"
        " response_body = NULL, locked_at = now() - interval '1 hour'",
        RecoveryPoint.STARTED,
    )
    retried = await buy(client, "u1", "old-key")
    assert retried.status_code == 201, retried.text
    assert await db.fetchval("SELECT request_params->>'package_id' FROM idempotency_keys") == "starter"
