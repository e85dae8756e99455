"""Error logs: client reports and unhandled server exceptions, scrubbed, queried and resolved by admins."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import get
from sentry_sdk.scope import should_send_default_pii
from sqlalchemy import exc as sa_exc

from app.auth import Forbidden
from app.config import Settings
from app.db.engine import create_engine
from app.errors.service import prune_old_errors
from app.http import (
    EXCEPTION_HANDLERS,
    ClientDisconnected,
    is_internal_error,
    on_database_error,
    on_http_exception,
    on_pool_timeout,
    on_service_error,
    on_unexpected,
)
from app.main import create_app
from app.problems import NotFound
from tests.fixtures.app import ADMIN, AppFactory, Client, auth, connect, token
from tests.fixtures.sentry import TEST_DSN, MemoryTransport

# secrets made at run time, so no scanner takes this file for a leak
STRIPE_KEY = "sk_" + "live_" + "51HxQpL2eZvKYlo2C0123456789"
RESTRICTED_KEY = "rk_" + "test_" + "51HxQpL2eZvKYlo2Cabcdef"
WEBHOOK_SECRET = "whsec_" + "5f1d2c3b4a5f6e7d8c9b"
JWT = token("someone")  # a real HS256 token: header, payload and signature
BEARER = "Bearer opaque-access-token-0123456789"
CARDS = ["4242424242424242", "4242 4242 4242 4242", "3782-822463-10005", "5555555555554444"]
PASSWORD = "hunter2-correct-horse"
SECRETS = [STRIPE_KEY, RESTRICTED_KEY, WEBHOOK_SECRET, JWT, "opaque-access-token-0123456789", PASSWORD]
CARD_DIGITS = ["4242424242424242", "378282246310005", "5555555555554444"]
NOT_A_CARD = "1234567812345678"  # 16 digits that fail the Luhn check: an order number, kept


def report(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "severity": "error",
        "message": "checkout failed",
        "source": "web",
        "context": {"page": "/checkout"},
    }
    body.update(changes)
    return body


async def stored(db: asyncpg.Connection) -> str:
    """Every stored error log (message, context and all) as one text, to search for leaks."""
    rows = await db.fetch("SELECT message, context::text AS context FROM error_logs ORDER BY id")
    return "\n".join(f"{r['message']}\n{r['context']}" for r in rows)


def assert_no_secrets(text: str) -> None:
    digits_only = "".join(c for c in text if c.isdigit() or c == "\n")
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} was stored"
    for card in CARD_DIGITS:
        assert card not in digits_only.replace(" ", ""), f"card {card} was stored"
    for card in CARDS:
        assert card not in text, f"card {card!r} was stored"


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted + " "))


# --- client reports -------------------------------------------------------------------------


async def test_a_report_is_stored_with_every_secret_scrubbed(client: Client, db: asyncpg.Connection) -> None:
    before = _metric(
        (await client.get("/metrics")).text,
        "payguard_errors_recorded_total",
        source="client",
        severity="error",
    )
    message = (
        f"payment failed for {CARDS[1]} (order {NOT_A_CARD}) with {BEARER}, key {STRIPE_KEY},"
        f" token {JWT}, db postgres://app:{PASSWORD}@db/payguard?password={PASSWORD}"
    )
    context = {
        "password": PASSWORD,
        "headers": {"Authorization": BEARER, "Cookie": "session=abc", "X-Api-Key": "k-123456"},
        "nested": {
            "deeper": [
                {"note": f"card {CARDS[2]} declined", "card_number": CARDS[3]},
                {"pan": 4242424242424242, "amount": 1000, "order": NOT_A_CARD},
                f"restricted {RESTRICTED_KEY} and {WEBHOOK_SECRET}",
            ],
            "client_secret": {"anything": "inside"},
        },
        STRIPE_KEY: "a secret used as a key",
        "url": f"https://example.com/callback?api_key=abc123&access_token={JWT}&page=2",
    }
    r = await client.post(
        "/v1/errors",
        json=report(message=message, context=context),
        headers={**auth("u1"), "X-Request-ID": "client-req-1"},
    )
    assert r.status_code == 202, r.text
    error_id = r.json()["id"]
    assert r.json() == {"id": error_id}

    text = await stored(db)
    assert_no_secrets(text)
    row = await db.fetchrow("SELECT * FROM error_logs WHERE id = $1", error_id)
    assert (row["severity"], row["source"], row["user_id"], row["request_id"]) == (
        "error",
        "web",
        "u1",
        "client-req-1",
    )
    assert row["resolved_at"] is None and row["resolved_by"] is None
    assert row["message"].startswith(
        "payment failed for [REDACTED:card] (order 1234567812345678) with Bearer"
    )
    stored_context = json.loads(row["context"])
    assert stored_context["password"] == "[REDACTED]"
    assert stored_context["headers"]["Authorization"] == "[REDACTED]"
    assert stored_context["nested"]["deeper"][1] == {"pan": "[REDACTED]", "amount": 1000, "order": NOT_A_CARD}
    assert stored_context["nested"]["client_secret"] == "[REDACTED]"
    assert (
        stored_context["url"]
        == "https://example.com/callback?api_key=[REDACTED]&access_token=[REDACTED]&page=2"
    )
    assert "[REDACTED:stripe-key]" in stored_context
    after = _metric(
        (await client.get("/metrics")).text,
        "payguard_errors_recorded_total",
        source="client",
        severity="error",
    )
    assert after - before == 1


async def test_an_idempotency_key_replays_the_report_and_stores_only_scrubbed_parameters(
    client: Client, db: asyncpg.Connection
) -> None:
    body = report(message=f"declined {CARDS[0]}", context={"token": JWT})
    first = await client.post("/v1/errors", json=body, headers=auth("u1", key="report-1"))
    again = await client.post("/v1/errors", json=body, headers=auth("u1", key="report-1"))
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert await db.fetchval("SELECT count(*) FROM error_logs") == 1
    params = await db.fetchval("SELECT request_params::text FROM idempotency_keys WHERE key = 'report-1'")
    assert "[REDACTED:card]" in params
    assert_no_secrets(params)


OVERSIZE = 64 * 1024 + 1


@pytest.mark.parametrize(
    ("content", "headers", "status", "type_"),
    [
        (json.dumps(report(context={"pad": "x" * OVERSIZE})).encode(), {}, 413, "payload-too-large"),
        (b'{"severity": "error", "message": ', {}, 400, "invalid-json"),
        (b"not json at all", {}, 400, "invalid-json"),
        (json.dumps(report(severity="fatal")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(severity="ERROR")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(severity=3)).encode(), {}, 400, "validation-error"),
        (json.dumps(report(message=42)).encode(), {}, 400, "validation-error"),
        (json.dumps(report(message="")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(message="x" * 4097)).encode(), {}, 400, "validation-error"),
        (json.dumps(report(message="nul \x00 inside")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(source="")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(source="x" * 65)).encode(), {}, 400, "validation-error"),
        (json.dumps(report(source="has spaces")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(source="server")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(source="Server")).encode(), {}, 400, "validation-error"),
        (json.dumps(report(context=["not", "an", "object"])).encode(), {}, 400, "validation-error"),
        (json.dumps(report(context="text")).encode(), {}, 400, "validation-error"),
        (
            json.dumps(report(context={"a": [[[[[[[[["nine levels"]]]]]]]]]})).encode(),
            {},
            400,
            "validation-error",
        ),
        (json.dumps(report(context={"k\x00": 1})).encode(), {}, 400, "validation-error"),
        (json.dumps(report(extra_field=True)).encode(), {}, 400, "validation-error"),
        (json.dumps({"message": "m", "source": "web"}).encode(), {}, 400, "validation-error"),
        (json.dumps(report()).encode(), {"Authorization": None}, 401, "unauthorized"),
        (json.dumps(report()).encode(), {"Authorization": "Bearer not-a-token"}, 401, "unauthorized"),
        (json.dumps(report()).encode(), {"Content-Type": "text/plain"}, 415, "unsupported-media-type"),
    ],
    ids=[
        "oversize",
        "truncated-json",
        "not-json",
        "unknown-severity",
        "severity-upper-case",
        "severity-number",
        "message-number",
        "message-empty",
        "message-too-long",
        "message-nul",
        "source-empty",
        "source-too-long",
        "source-spaces",
        "source-server-reserved",
        "source-server-any-case",
        "context-array",
        "context-string",
        "context-too-deep",
        "context-nul-key",
        "unknown-field",
        "severity-missing",
        "unauthenticated",
        "bad-token",
        "not-json-media-type",
    ],
)
async def test_refused_reports_are_problems_and_store_nothing(
    client: Client,
    db: asyncpg.Connection,
    content: bytes,
    headers: dict[str, str | None],
    status: int,
    type_: str,
) -> None:
    sent = {**auth("u1"), "Content-Type": "application/json", **headers}
    r = await client.post(
        "/v1/errors", content=content, headers={k: v for k, v in sent.items() if v is not None}
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] == type_ and r.json()["status"] == status
    assert await db.fetchval("SELECT count(*) FROM error_logs") == 0
    assert await db.fetchval("SELECT count(*) FROM rate_limits") == 0  # refused before the limit counts


async def test_a_context_eight_levels_deep_is_accepted(client: Client) -> None:
    r = await client.post(
        "/v1/errors", json=report(context={"a": [[[[[[["eight levels"]]]]]]]}), headers=auth("u1")
    )
    assert r.status_code == 202, r.text


async def test_reports_have_their_own_rate_limit(make_client: AppFactory, db: asyncpg.Connection) -> None:
    client = await make_client(rate_error_reports=3, rate_lead_purchases=1, rate_window_s=60)
    statuses = [
        (await client.post("/v1/errors", json=report(), headers=auth("u1"))).status_code for _ in range(4)
    ]
    assert statuses == [202, 202, 202, 429]
    limited = await client.post("/v1/errors", json=report(), headers=auth("u1"))
    assert limited.status_code == 429
    assert limited.headers["content-type"].startswith("application/problem+json")
    assert limited.json()["type"] == "rate-limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 20  # one emission interval: 60 s / 3
    assert await db.fetchval("SELECT count(*) FROM error_logs") == 3
    keys = [r["key"] for r in await db.fetch("SELECT key FROM rate_limits")]
    assert keys == ["error_report:u1"]  # a bucket of its own, not the purchases'
    other = await client.post("/v1/errors", json=report(), headers=auth("u2"))
    assert other.status_code == 202


async def test_the_body_limit_is_a_setting_of_its_own(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    small = await make_client(error_max_body_bytes=1024)
    r = await small.post("/v1/errors", json=report(context={"pad": "x" * 2000}), headers=auth("u1"))
    assert r.status_code == 413 and r.json()["type"] == "payload-too-large"
    assert (await small.post("/v1/errors", json=report(), headers=auth("u1"))).status_code == 202
    # above the app-wide 64 KiB of other endpoints, when the setting says so
    large = await make_client(error_max_body_bytes=256 * 1024)
    r = await large.post("/v1/errors", json=report(context={"pad": "x" * 100_000}), headers=auth("u1"))
    assert r.status_code == 202, r.text[:300]
    assert await db.fetchval("SELECT count(*) FROM error_logs") == 2


# --- admin ----------------------------------------------------------------------------------


async def seed(db: asyncpg.Connection, rows: list[tuple[str, str, bool]]) -> list[int]:
    """Error logs straight into the table: (severity, source, resolved); their ids, in order."""
    ids = []
    for severity, source, resolved in rows:
        ids.append(
            await db.fetchval(
                "INSERT INTO error_logs (severity, source, message, resolved_at, resolved_by)"
                " VALUES ($1, $2, 'm', CASE WHEN $3 THEN now() END, CASE WHEN $3 THEN 'ops' END) RETURNING id",
                severity,
                source,
                resolved,
            )
        )
    return ids


async def listed(client: Client, **params: Any) -> list[int]:
    """Every id the admin list gives for `params`, following the cursor two at a time."""
    seen: list[int] = []
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await client.get("/admin/errors", params=query, headers=auth(ADMIN, admin=True))
        assert r.status_code == 200, r.text
        seen += [item["id"] for item in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return seen


async def test_admins_filter_and_page_newest_first(client: Client, db: asyncpg.Connection) -> None:
    ids = await seed(
        db,
        [
            ("error", "web", False),
            ("warning", "ios", False),
            ("error", "server", True),
            ("critical", "web", False),
            ("error", "web", True),
            ("info", "ios", False),
            ("error", "server", False),
        ],
    )
    newest_first = ids[::-1]
    assert await listed(client) == newest_first
    assert await listed(client, severity="error") == [ids[6], ids[4], ids[2], ids[0]]
    assert await listed(client, source="web") == [ids[4], ids[3], ids[0]]
    assert await listed(client, resolved="true") == [ids[4], ids[2]]
    assert await listed(client, resolved="false") == [ids[6], ids[5], ids[3], ids[1], ids[0]]
    assert await listed(client, severity="error", source="server", resolved="false") == [ids[6]]
    assert await listed(client, source="android") == []

    r = await client.get("/admin/errors", params={"limit": 1}, headers=auth(ADMIN, admin=True))
    [item] = r.json()["items"]
    assert set(item) == {
        "id",
        "severity",
        "source",
        "message",
        "context",
        "user_id",
        "request_id",
        "created_at",
        "resolved_at",
        "resolved_by",
    }
    for params in ({"severity": "fatal"}, {"resolved": "maybe"}, {"source": "has space"}, {"cursor": "x"}):
        bad = await client.get("/admin/errors", params=params, headers=auth(ADMIN, admin=True))
        assert bad.status_code == 400, (params, bad.text)
        assert bad.headers["content-type"].startswith("application/problem+json")


async def test_resolving_is_idempotent_and_records_who_and_when(
    client: Client, db: asyncpg.Connection
) -> None:
    [error_id] = await seed(db, [("error", "web", False)])
    first = await client.post(f"/admin/errors/{error_id}/resolve", headers=auth("ops-alice", admin=True))
    assert first.status_code == 200, first.text
    assert first.json()["resolved_by"] == "ops-alice" and first.json()["resolved_at"]
    again = await client.post(f"/admin/errors/{error_id}/resolve", headers=auth("ops-bob", admin=True))
    assert again.status_code == 200
    assert again.json() == first.json()  # the first resolver and time stay
    row = await db.fetchrow("SELECT resolved_by, resolved_at FROM error_logs WHERE id = $1", error_id)
    assert row["resolved_by"] == "ops-alice" and row["resolved_at"] is not None

    missing = await client.post("/admin/errors/999999/resolve", headers=auth(ADMIN, admin=True))
    assert missing.status_code == 404 and missing.json()["type"] == "not-found"


async def test_non_admins_are_refused(client: Client, db: asyncpg.Connection) -> None:
    [error_id] = await seed(db, [("error", "web", False)])
    listing = await client.get("/admin/errors", headers=auth("u1"))
    resolving = await client.post(f"/admin/errors/{error_id}/resolve", headers=auth("u1"))
    for r in (listing, resolving):
        assert r.status_code == 403 and r.json()["type"] == "forbidden"
    assert await db.fetchval("SELECT resolved_at FROM error_logs WHERE id = $1", error_id) is None
    assert (await client.get("/admin/errors")).status_code == 401


# --- server exceptions ----------------------------------------------------------------------


@get("/test-only/boom")
async def boom() -> None:
    raise RuntimeError(f"lost connection postgres://admin:{PASSWORD}@db with {STRIPE_KEY} for {CARDS[0]}")


@get("/test-only/not-found")
async def not_found() -> None:
    raise NotFound("no such thing")


async def test_an_unhandled_exception_is_recorded_with_its_request_id(
    client: Client, db: asyncpg.Connection
) -> None:
    client.app.register(boom)
    client.app.register(not_found)
    metrics = (await client.get("/metrics")).text
    before = _metric(metrics, "payguard_errors_recorded_total", source="server", severity="error")

    r = await client.get("/test-only/boom", headers={"X-Request-ID": "req-boom-1"})
    assert r.status_code == 500
    assert r.json()["type"] == "internal-error" and PASSWORD not in r.text
    row = await db.fetchrow("SELECT * FROM error_logs")
    assert (row["source"], row["severity"], row["request_id"], row["user_id"]) == (
        "server",
        "error",
        "req-boom-1",
        None,
    )
    assert row["message"].startswith("RuntimeError: lost connection postgres://admin:[REDACTED]@db with")
    context = json.loads(row["context"])
    assert context["route"] == "/test-only/boom" and context["method"] == "GET"
    assert context["exception"] == "builtins.RuntimeError"
    assert any(frame.endswith(" in boom") for frame in context["traceback"])
    assert_no_secrets(await stored(db))
    metrics = (await client.get("/metrics")).text
    assert _metric(metrics, "payguard_errors_recorded_total", source="server", severity="error") - before == 1

    # 4xx are the client's business: nothing recorded
    for path in ("/test-only/not-found", "/nowhere", "/v1/credits/balance"):
        assert (await client.get(path)).status_code in (401, 404)
    assert await db.fetchval("SELECT count(*) FROM error_logs") == 1


async def test_with_the_database_down_the_client_still_gets_a_clean_500(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    settings: Settings = client.app.state.services.settings
    dead = Client(
        create_app(settings, "postgresql+asyncpg://postgres@/payguard?host=/nonexistent-socket-dir")
    )
    dead.app.register(boom)
    with caplog.at_level(logging.WARNING, logger="payguard.errors"):
        r = await dead.get("/test-only/boom")
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json() == {
        "type": "internal-error",
        "title": "Internal server error",
        "status": 500,
        "detail": "the error was logged; retry later",
    }
    assert [rec.getMessage() for rec in caplog.records if rec.name == "payguard.errors"] == [
        "server error not recorded"
    ]
    await dead.aclose()


def _status(handler: Callable[..., Any], exc: Exception) -> int:
    class _State:
        def get(self, _: str) -> None:
            return None

    class _App:
        state = _State()

    class _Request:
        app = _App()
        method = "GET"
        scope: dict[str, Any] = {}

    return int(handler(_Request(), exc).status_code)


def _db_error(sqlstate: str | None) -> sa_exc.DBAPIError:
    class Orig(Exception):
        pass

    orig = Orig("x")
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]
    return sa_exc.DBAPIError("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("bug"),
        KeyError("k"),
        NotFound("x"),
        Forbidden("x"),
        ClientDisconnected("gone"),
        httpx.HTTPError("an outgoing call failed"),
        ConnectionRefusedError(),  # not raised by the database client: a bug of ours, 500
        _db_error("57014"),  # statement timeout: 503
        _db_error("08006"),  # connection failure: 503
        _db_error("23505"),  # unique violation nobody handled: 500
        sa_exc.TimeoutError("pool"),
    ],
    ids=repr,
)
def test_is_internal_error_says_what_the_handlers_answer_with_500(exc: Exception) -> None:
    handler = next(h for kind, h in EXCEPTION_HANDLERS.items() if isinstance(exc, kind))
    assert handler in (on_service_error, on_http_exception, on_database_error, on_pool_timeout, on_unexpected)
    assert is_internal_error(exc) == (_status(handler, exc) == 500)


# --- pruning --------------------------------------------------------------------------------


async def test_old_errors_are_pruned_in_batches_each_committed(
    settings_for: Callable[..., Settings], db_url: str, db: asyncpg.Connection
) -> None:
    await db.execute(
        "INSERT INTO error_logs (severity, source, message, created_at)"
        " SELECT 'error', 'web', 'old ' || g, now() - interval '40 days' + g * interval '1 second'"
        " FROM generate_series(1, 25) g"
    )
    await db.execute(
        "INSERT INTO error_logs (severity, source, message) SELECT 'error', 'web', 'new' FROM generate_series(1, 3)"
    )
    engine = create_engine(settings_for(db_lock_timeout_ms=60_000), db_url)
    cutoff = datetime.now(UTC) - timedelta(days=30)
    lock_holder = await connect(db_url)
    try:
        async with engine.connect() as conn:
            tx = lock_holder.transaction()
            await tx.start()
            # the newest old row is in the third batch: the first two commit while it is held
            await lock_holder.execute("SELECT 1 FROM error_logs WHERE message = 'old 25' FOR UPDATE")
            pruning = asyncio.create_task(prune_old_errors(conn, cutoff, 10))
            waiting = 0
            for _ in range(500):
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'payguard'"
                    " AND datname = current_database() AND wait_event_type = 'Lock'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert waiting, "the prune never reached the locked row"
            assert await db.fetchval("SELECT count(*) FROM error_logs WHERE message LIKE 'old%'") == 5
            await tx.rollback()
            assert await pruning == 25
            assert await prune_old_errors(conn, cutoff, 10) == 0
    finally:
        await lock_holder.close()
        await engine.dispose()
    assert [r["message"] for r in await db.fetch("SELECT message FROM error_logs")] == ["new"] * 3


# --- Sentry ---------------------------------------------------------------------------------


async def test_server_exceptions_reach_sentry_scrubbed_with_their_request_id(
    settings_for: Callable[..., Settings], db_url: str, db: asyncpg.Connection
) -> None:
    transport = MemoryTransport()
    app = create_app(settings_for(sentry_dsn=TEST_DSN), db_url, sentry_transport=transport)
    app.register(boom)
    app.register(not_found)
    client = Client(app)
    pii_while_on = should_send_default_pii()
    try:
        bad_report = report(message=f"card {CARDS[0]}", context={"password": PASSWORD})
        headers = {**auth("u1"), "X-Request-ID": "req-sentry-1"}
        r = await client.get(f"/test-only/boom?access_token={JWT}", headers=headers)
        assert r.status_code == 500 and r.json()["type"] == "internal-error"
        # not bugs of ours: a typed 404, a validation error, an unknown route
        assert (await client.get("/test-only/not-found")).status_code == 404
        assert (
            await client.post("/v1/errors", json={**bad_report, "severity": "x"}, headers=auth("u1"))
        ).status_code == 400
        assert (await client.get("/nowhere")).status_code == 404
        assert (await client.post("/v1/errors", json=bad_report, headers=auth("u1"))).status_code == 202
    finally:
        await client.aclose()
        for hook in app.on_shutdown:
            await hook()

    [event] = transport.events
    assert not pii_while_on  # send_default_pii left at its default: off
    assert event["tags"]["request_id"] == "req-sentry-1"
    [exception] = event["exception"]["values"]
    assert exception["type"] == "RuntimeError"
    assert exception["value"].startswith("lost connection postgres://admin:[REDACTED]@db with")
    sent = json.dumps(event)
    assert_no_secrets(sent)
    assert "Bearer" not in sent and "u1" not in sent  # no Authorization header, no user
    assert "data" not in event.get("request", {})  # no bodies: PII stays in PostgreSQL
    # and the database has the same exception
    assert await db.fetchval("SELECT request_id FROM error_logs WHERE source = 'server'") == "req-sentry-1"


async def test_nothing_goes_to_sentry_without_a_dsn(
    settings_for: Callable[..., Settings], db_url: str, db: asyncpg.Connection
) -> None:
    import sentry_sdk

    transport = MemoryTransport()
    app = create_app(settings_for(), db_url, sentry_transport=transport)
    app.register(boom)
    client = Client(app)
    try:
        r = await client.get("/test-only/boom", headers={"X-Request-ID": "req-no-sentry"})
        assert r.status_code == 500
    finally:
        await client.aclose()
        for hook in app.on_shutdown:
            await hook()
    assert transport.envelopes == []
    assert not sentry_sdk.get_client().is_active()
    assert await db.fetchval("SELECT request_id FROM error_logs") == "req-no-sentry"  # still recorded here
