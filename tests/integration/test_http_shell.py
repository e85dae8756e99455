"""The HTTP shell: problem details for every error, health, metrics, OpenAPI, request ids."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Annotated, Any, Literal

import asyncpg
import pytest
from litestar import get
from litestar.params import HeaderParameter, QueryParameter

from app.main import create_app
from tests.fixtures.app import AppFactory, Client, auth, create_lead, grant


async def test_routing_errors_are_problems(client: Client) -> None:
    cases = [
        (client.get("/nowhere"), 404, "not-found"),
        (client.delete("/v1/credits/balance", headers=auth("u1")), 405, "method-not-allowed"),
        (
            client.post(
                "/admin/leads",
                content=b'{"title": "' + b"x" * 70_000 + b'", "price_credits": 1}',
                headers={**auth("a", admin=True), "Content-Type": "application/json"},
            ),
            413,
            "payload-too-large",
        ),
    ]
    for request, status, slug in cases:
        r = await request
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["type"] == slug and body["status"] == status and body["title"] and body["detail"]


async def test_unexpected_errors_are_500_without_internals(client: Client) -> None:
    @get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret connection string postgres://admin:hunter2@db")

    client.app.register(boom)
    r = await client.get("/boom")
    assert r.status_code == 500
    assert r.json()["type"] == "internal-error"
    assert "hunter2" not in r.text and "RuntimeError" not in r.text


async def test_validation_errors_are_400_problems(client: Client) -> None:
    r = await client.post(
        "/admin/leads", json={"title": "", "price_credits": -5}, headers=auth("a", admin=True)
    )
    assert r.status_code == 400
    assert r.json()["type"] == "validation-error"
    assert r.json()["errors"]


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    assert (await client.get("/health/ready")).status_code == 200


async def test_readiness_fails_when_the_database_is_gone(client: Client) -> None:
    settings = client.app.state.services.settings
    dead = Client(
        create_app(settings, "postgresql+asyncpg://postgres@/payguard?host=/nonexistent-socket-dir")
    )
    r = await dead.get("/health/ready")
    assert r.status_code == 503
    assert (await dead.get("/health/live")).status_code == 200
    await dead.aclose()


async def test_metrics_count_requests_and_domain_events(client: Client) -> None:
    lead = await create_lead(client, price=5)
    await grant(client, "u1", 5)
    await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="m1"))
    await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="m1"))
    text = (await client.get("/metrics")).text
    assert (
        'payguard_http_requests_total{method="POST",route="/v1/leads/{lead_id}/purchase",status="201"}'
        in text
    )
    assert "payguard_http_request_duration_seconds_bucket" in text
    assert 'payguard_purchases_total{kind="lead",outcome="succeeded"}' in text
    assert 'payguard_idempotency_total{outcome="replayed"}' in text
    assert "payguard_db_timeouts_total" in text


async def test_request_id_is_echoed_or_made(client: Client) -> None:
    given = await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = await client.get("/health/live", headers={"X-Request-ID": "bad id\twith junk"})
    assert made.headers["x-request-id"] != "bad id\twith junk" and len(made.headers["x-request-id"]) == 32


async def test_openapi_schema_is_served(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    for path in [
        "/v1/credits/purchases",
        "/v1/leads/{lead_id}/purchase",
        "/admin/credits/grants",
        "/v1/credits/ledger",
    ]:
        assert path in schema["paths"], path
    params = schema["paths"]["/v1/credits/purchases"]["post"]["parameters"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in params)


async def test_a_lock_timeout_is_a_503_and_releases_the_key(
    make_client: AppFactory, db: asyncpg.Connection
) -> None:
    client = await make_client(db_lock_timeout_ms=200)
    lead = await create_lead(client, price=1)
    await grant(client, "u1", 5)
    async with db.transaction():
        await db.execute("SELECT 1 FROM leads WHERE id = $1 FOR UPDATE", lead)  # someone holds the lead
        r = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="slow"))
    assert r.status_code == 503
    assert r.json()["type"] == "database-timeout"
    assert r.headers["retry-after"] == "1"
    metrics = (await client.get("/metrics")).text
    assert "payguard_db_timeouts_total 0.0" not in metrics
    retry = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="slow"))
    assert retry.status_code == 201


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connecting is refused


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres@/payguard?host=/nonexistent-socket-dir",
        f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/payguard",
    ],
    ids=["no-socket", "refused"],
)
async def test_an_unreachable_database_is_a_503_on_every_endpoint(
    client: Client, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    dead = Client(create_app(client.app.state.services.settings, url))
    before = _metric((await dead.get("/metrics")).text, "payguard_db_unavailable_total")
    requests = [
        ("GET", "/v1/credits/balance", auth("u1"), None),
        ("GET", "/v1/leads", auth("u1"), None),
        ("POST", "/v1/leads/1/purchase", auth("u1", key="k1"), None),
        ("POST", "/admin/leads", auth("a", admin=True), {"title": "t", "price_credits": 1}),
    ]
    with caplog.at_level(logging.WARNING):
        for method, path, headers, body in requests:
            r = await dead.request(method, path, headers=headers, json=body)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"] == "database-unavailable"
            assert int(r.headers["retry-after"]) >= 1
    assert not [rec for rec in caplog.records if rec.exc_info], "a refused request logged a traceback"
    warnings = [rec for rec in caplog.records if rec.getMessage() == "database unavailable"]
    assert len(warnings) == len(requests)
    after = _metric((await dead.get("/metrics")).text, "payguard_db_unavailable_total")
    assert after - before == len(requests)
    ready = await dead.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["database"] == "unreachable"
    await dead.aclose()


async def test_a_connection_killed_mid_request_is_a_503(client: Client, db: asyncpg.Connection) -> None:
    lead = await create_lead(client, price=1)
    await grant(client, "u1", 5)
    async with db.transaction():
        await db.execute("SELECT 1 FROM leads WHERE id = $1 FOR UPDATE", lead)  # the purchase waits here
        purchase = asyncio.create_task(client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="k")))
        waiting: list[int] = []
        for _ in range(200):
            waiting = [
                row["pid"]
                for row in await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'payguard'"
                    " AND datname = current_database() AND wait_event_type = 'Lock'"
                )
            ]
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the purchase never waited for the lead's lock"
        for pid in waiting:
            await db.execute("SELECT pg_terminate_backend($1)", pid)
        r = await purchase
    assert r.status_code == 503, r.text
    assert r.json()["type"] == "database-unavailable"
    assert r.headers["retry-after"]
    retry = await client.post(f"/v1/leads/{lead}/purchase", headers=auth("u1", key="k"))
    assert retry.status_code == 201, retry.text


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one labelled sample in Prometheus text, 0 when absent."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted + " "))


async def test_a_client_that_disconnects_mid_body_is_counted_as_499_not_500(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    counted = {"method": "POST", "route": "/admin/leads"}
    before = (await client.get("/metrics")).text
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"title": "half a bo', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = {**auth("a", admin=True), "Content-Type": "application/json", "Content-Length": "200"}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/admin/leads",
        "raw_path": b"/admin/leads",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    with caplog.at_level(logging.INFO):
        await client.app(scope, receive, send)
    after = (await client.get("/metrics")).text
    assert _sample(after, "payguard_http_requests_total", **counted, status="499") == (
        _sample(before, "payguard_http_requests_total", **counted, status="499") + 1
    )
    assert _sample(after, "payguard_http_requests_total", **counted, status="500") == _sample(
        before, "payguard_http_requests_total", **counted, status="500"
    )
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    [line] = [r for r in caplog.records if r.name == "payguard.http"]
    assert line.getMessage() == "request" and line.__dict__["status"] == 499


async def test_validation_errors_never_echo_request_values(client: Client) -> None:
    @get("/echo")
    async def echo(
        mode: Annotated[Literal["a", "b"], QueryParameter()],
        x_mode: Annotated[Literal["a"], HeaderParameter(name="X-Mode")],
        n: Annotated[int, QueryParameter()] = 1,
    ) -> None:
        return None

    client.app.register(echo)
    r = await client.get(
        "/echo?mode=query-secret&n=n-secret&token=token-secret", headers={"X-Mode": "header-secret"}
    )
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "validation-error"
    for secret in ("query-secret", "n-secret", "token-secret", "header-secret"):
        assert secret not in r.text, secret
    assert {(e["key"], e["source"]) for e in body["errors"]} == {
        ("mode", "query"),
        ("x_mode", "header"),
        ("n", "query"),
    }
    assert all(e["message"] for e in body["errors"])

    r = await client.get("/v1/leads?limit=abc&api_key=hunter2", headers=auth("u1"))
    assert r.status_code == 400 and r.json()["type"] == "validation-error"
    assert "hunter2" not in r.text
    assert r.json()["errors"] == [{"message": "Expected `int`, got `str`", "key": "limit", "source": "query"}]

    r = await client.post(
        "/admin/leads",
        content=b'{"title": "t", "price_credits": 1}',
        headers={**auth("a", admin=True), "Content-Type": "application/json", "Content-Length": "hunter2"},
    )
    assert r.status_code == 400 and "hunter2" not in r.text


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Big": "v" * 40_000},
        {f"X-H{i}": "v" for i in range(150)},
        {f"X-H{i}": "v" * 1000 for i in range(33)},
    ],
    ids=["one-40KiB-header", "150-headers", "33-KiB-in-33-headers"],
)
async def test_oversized_headers_are_refused_with_431_before_anything_runs(
    client: Client, db: asyncpg.Connection, headers: dict[str, str]
) -> None:
    ids = []
    for _ in range(2):
        r = await client.post(
            "/admin/leads",
            json={"title": "t", "price_credits": 1},
            headers={**auth("a", admin=True), **headers},
        )
        assert r.status_code == 431, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["type"] == "request-header-fields-too-large" and r.json()["status"] == 431
        ids.append(r.headers["x-request-id"])
    assert ids[0] != ids[1] and "," not in ids[1], "each refusal carries its own request id"
    assert await db.fetchval("SELECT count(*) FROM leads") == 0
    text = (await client.get("/metrics")).text
    assert _sample(text, "payguard_http_requests_total", method="POST", route="unmatched", status="431") >= 1


async def test_headers_within_the_limits_are_served(client: Client) -> None:
    many = {f"X-H{i}": "v" * 200 for i in range(90)}  # 90 + httpx's own, about 20 KiB
    r = await client.post(
        "/admin/leads", json={"title": "t", "price_credits": 1}, headers={**auth("a", admin=True), **many}
    )
    assert r.status_code == 201, r.text
