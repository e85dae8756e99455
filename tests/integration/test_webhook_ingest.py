"""POST /webhooks/stripe: verified, stored once, acknowledged after the commit, nothing else."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.webhooks.models import EventStatus
from tests.fixtures.app import AppFactory, Client
from tests.fixtures.webhooks import WEBHOOK_SECRET, deliver, intent_event, refund_event, signed


async def stored(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM webhook_events"))


async def test_a_signed_event_is_stored_once_and_acknowledged(client: Client, db: asyncpg.Connection) -> None:
    evt = intent_event("payment_intent.succeeded", "pi_123", 1000, created=1_700_000_000)
    r = await deliver(client, evt)
    assert r.status_code == 200, r.text
    assert r.json() == {"received": True, "duplicate": False}
    row = await db.fetchrow("SELECT * FROM webhook_events")
    assert (row["event_id"], row["type"], row["object_id"], row["status"]) == (
        evt["id"],
        "payment_intent.succeeded",
        "pi_123",
        EventStatus.PENDING,
    )
    assert row["stripe_created"].timestamp() == 1_700_000_000
    assert json.loads(row["payload"]) == evt

    again = await deliver(client, evt)
    assert again.status_code == 200 and again.json() == {"received": True, "duplicate": True}
    assert await stored(db) == 1


async def test_a_charge_is_filed_under_its_payment_intent(client: Client, db: asyncpg.Connection) -> None:
    assert (await deliver(client, refund_event("pi_9", 1000, 1000))).status_code == 200
    assert await db.fetchval("SELECT object_id FROM webhook_events") == "pi_9"


async def test_forged_stale_and_unsigned_deliveries_are_refused(
    client: Client, db: asyncpg.Connection
) -> None:
    evt = intent_event("payment_intent.succeeded", "pi_1", 1000)
    now = int(time.time())
    cases = {
        "forged": signed(evt, secret="whsec_someone_else"),
        "stale": signed(evt, timestamp=now - 301),
        "from the future": signed(evt, timestamp=now + 301),
    }
    raw, headers = signed(evt)
    tampered = raw.replace(b"1000", b"9000")
    for name, (body, hdrs) in {**cases, "tampered": (tampered, headers)}.items():
        r = await client.post("/webhooks/stripe", content=body, headers=hdrs)
        assert r.status_code == 400, name
        assert r.json()["type"] == "invalid-signature", name
    unsigned = await client.post(
        "/webhooks/stripe", content=raw, headers={"Content-Type": "application/json"}
    )
    assert unsigned.status_code == 400 and unsigned.json()["type"] == "invalid-signature"
    for bad in ["t=abc,v1=00", "v1=00", f"t={now}", f"t={now},v0=00", "garbage", "t=1" + "0" * 40 + ",v1=00"]:
        r = await client.post("/webhooks/stripe", content=raw, headers={"Stripe-Signature": bad})
        assert r.status_code == 400 and r.json()["type"] == "invalid-signature", bad
    assert await stored(db) == 0


async def test_every_secret_in_rotation_is_accepted(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(stripe_webhook_secrets=("whsec_old_0001", WEBHOOK_SECRET))
    for secret in ("whsec_old_0001", WEBHOOK_SECRET):
        r = await deliver(client, intent_event("payment_intent.succeeded", "pi_1", 1000), secret=secret)
        assert r.status_code == 200, r.text
    # Stripe signs with every secret during a rotation: one good signature among others is enough
    raw = json.dumps(intent_event("payment_intent.succeeded", "pi_2", 1000)).encode()
    t = int(time.time())
    good = signed(raw, secret=WEBHOOK_SECRET, timestamp=t)[1]["Stripe-Signature"].split("v1=")[1]
    r = await client.post(
        "/webhooks/stripe", content=raw, headers={"Stripe-Signature": f"t={t},v1={'0' * 64},v1={good}"}
    )
    assert r.status_code == 200, r.text
    r = await deliver(client, intent_event("payment_intent.succeeded", "pi_3", 1000), secret="whsec_retired")
    assert r.status_code == 400
    assert await stored(db) == 3


async def test_bodies_that_are_not_stripe_events_are_refused(client: Client, db: asyncpg.Connection) -> None:
    bodies = [
        b"not json",
        b"[]",
        b'{"type": "payment_intent.succeeded"}',  # no id
        b'{"id": "evt_1"}',  # no type
        b'{"id": "", "type": "x"}',
        b'{"id": 5, "type": "x"}',
        json.dumps({"id": "evt_1", "type": "x", "note": "nul \u0000 inside"}).encode(),
        json.dumps({"id": "evt_1", "type": "x", "note\u0000key": 1}).encode(),
        rb'{"id": "evt_1", "type": "x", "note": "a\\\u0000"}',  # an escaped backslash, then a NUL
        json.dumps({"id": "evt_" + "x" * 300, "type": "x"}).encode(),
        b'{"id": "evt_1", "type": "x", "created": -5}',
        # past what the decoder nests (about 1000 levels); PostgreSQL's jsonb would take it, but no event does
        b'{"id": "evt_1", "type": "x", "data": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
        b"\xff\xfe",
    ]
    for body in bodies:
        r = await deliver(client, body)
        assert r.status_code == 400, body
        assert r.json()["type"] == "invalid-event", body
    assert await stored(db) == 0


async def test_without_a_secret_webhooks_are_refused_with_503(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(stripe_webhook_secrets=())
    r = await deliver(client, intent_event("payment_intent.succeeded", "pi_1", 1000))
    assert r.status_code == 503 and r.json()["type"] == "webhooks-not-configured"
    assert await stored(db) == 0


async def test_a_body_over_the_limit_is_413(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(webhook_max_body_bytes=2048)
    evt = intent_event("payment_intent.succeeded", "pi_1", 1000)
    evt["data"]["object"]["description"] = "x" * 4096
    r = await deliver(client, evt)
    assert r.status_code == 413
    assert await stored(db) == 0
    # larger than the API's own limit is fine for a webhook within its own
    big = await make_client(max_body_bytes=1024)
    evt["data"]["object"]["description"] = "x" * 2048
    assert (await deliver(big, evt)).status_code == 200


async def test_fifty_concurrent_deliveries_of_one_event_store_it_once(
    client: Client, db: asyncpg.Connection
) -> None:
    evt = intent_event("payment_intent.succeeded", "pi_dup", 1000)
    answers = await asyncio.gather(*(deliver(client, evt) for _ in range(50)))
    assert [r.status_code for r in answers] == [200] * 50
    assert sorted(r.json()["duplicate"] for r in answers) == [False] + [True] * 49
    assert await stored(db) == 1


async def test_concurrent_deliveries_share_commits(client: Client, db: asyncpg.Connection) -> None:
    events = [intent_event("payment_intent.succeeded", f"pi_{n}", 1000) for n in range(300)]
    answers = await asyncio.gather(*(deliver(client, e) for e in events))
    assert all(r.status_code == 200 and r.json()["duplicate"] is False for r in answers)
    assert await stored(db) == 300
    # received_at is the inserting transaction's start: few distinct values, few commits
    commits = await db.fetchval("SELECT count(DISTINCT received_at) FROM webhook_events")
    assert commits <= 300 // 4, commits


async def test_an_event_postgresql_cannot_hold_does_not_refuse_its_batch(
    client: Client, db: asyncpg.Connection
) -> None:
    bad = b'{"id": "evt_huge", "type": "x", "data": {"object": {"n": 1e999999}}}'
    events = [intent_event("payment_intent.succeeded", f"pi_{n}", 1000) for n in range(40)]
    answers = await asyncio.gather(deliver(client, bad), *(deliver(client, e) for e in events))
    assert answers[0].status_code == 400, answers[0].text
    assert [r.status_code for r in answers[1:]] == [200] * 40
    assert await stored(db) == 40


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
EVENTISH = st.fixed_dictionaries(
    {"id": st.text(max_size=300), "type": st.text(max_size=40)},
    optional={"created": st.integers() | st.text(), "data": JSON},
)


def _bodies() -> list[bytes]:
    found: list[bytes] = []

    @settings(max_examples=150, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(JSON, EVENTISH))
    def collect(value: object) -> None:
        found.append(json.dumps(value).encode())

    collect()
    return found


async def test_any_signed_json_is_stored_or_refused_never_a_5xx(
    client: Client, db: asyncpg.Connection
) -> None:
    """Only Stripe can sign, but a bug of Stripe's (or a leaked secret) must still get a 400, not a 500."""
    statuses = [(await deliver(client, body)).status_code for body in _bodies()]
    assert set(statuses) <= {200, 400}, sorted(set(statuses))
    assert 200 in statuses and 400 in statuses
    assert 0 < await stored(db) <= statuses.count(200)  # a repeated id is stored once, answered 200 twice


async def test_a_literal_backslash_u0000_is_text_not_a_nul(client: Client, db: asyncpg.Connection) -> None:
    evt = intent_event("payment_intent.succeeded", "pi_1", 1000)
    evt["data"]["object"]["description"] = "C:\\u0000"  # backslash, then the letters u0000
    assert (await deliver(client, evt)).status_code == 200
    assert json.loads(await db.fetchval("SELECT payload FROM webhook_events")) == evt


async def test_only_post_is_allowed_and_answers_are_problem_details(client: Client) -> None:
    r = await client.get("/webhooks/stripe")
    assert r.status_code == 405 and r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["allow"] == "POST"
    raw, headers = signed(intent_event("payment_intent.succeeded", "pi_1", 1000))
    r = await client.post("/webhooks/stripe", content=raw, headers={**headers, "Content-Length": "99999999"})
    assert r.status_code == 413 and r.json()["type"] == "payload-too-large"


async def test_ingest_survives_losing_its_connection(client: Client, db: asyncpg.Connection) -> None:
    assert (await deliver(client, intent_event("payment_intent.succeeded", "pi_1", 1000))).status_code == 200
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    statuses = [
        (await deliver(client, intent_event("payment_intent.succeeded", f"pi_{n}", 1000))).status_code
        for n in range(2, 5)
    ]
    assert set(statuses) <= {200, 503} and statuses[-1] == 200, statuses  # Stripe retries a 503
    assert await stored(db) == 1 + statuses.count(200)
