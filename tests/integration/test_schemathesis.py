"""Schemathesis over the app's own OpenAPI schema: no generated request may get a 5xx.

How it runs, and why this way: the app is built per test on the test's fresh database, and its
connection pool lives in the test's event loop (pytest-asyncio, one session loop). Schemathesis'
own drivers (`schema.parametrize()`, `case.call(app=...)`) call an ASGI app from synchronous code
through an event loop of their own, which cannot share that pool. So each test:

1. builds the app with `make_client` (rate limits raised), seeds a funded user and five leads,
   fetches /schema/openapi.json from the app and loads the dict with `schemathesis.openapi.from_dict`;
   `package_id` is narrowed to the real package ids so positive purchases reach the (fake) Stripe,
   while negative mode still sends every other string;
2. draws cases from `operation.as_strategy()` in a plain synchronous Hypothesis `@given` function
   that only collects them: no I/O inside Hypothesis, `derandomize=True` (the same cases every run)
   and a bounded `max_examples` (150 for the JSON-body operations, where 50 found nothing that 150
   finds, 50 for the others; the whole file takes about half a minute);
3. sends every case through the conftest `Client` (httpx on the ASGI app, in the test's own loop)
   with a valid bearer token of the operation's role (admin for /admin) and a fresh Idempotency-Key,
   so generated requests get past authentication and the key check into the services and database.

Both positive (schema-valid) and negative (schema-violating) cases are generated. Checks: no 5xx,
and every 4xx is an RFC 9457 problem detail whose `status` matches. Hypothesis does not shrink a
failure (requests go out after generation), so each failing case is listed as generated, with a
curl command to reproduce it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, GenerationMode

from tests.fixtures.app import ADMIN, AppFactory, Client, create_lead, grant, token

USER = "fuzz-user"
# per operation and generation mode: JSON bodies are a much larger space than a few query parameters
BODY_EXAMPLES = 150
OTHER_EXAMPLES = 50
OPERATIONS = [
    ("GET", "/v1/credits/packages"),
    ("POST", "/v1/credits/purchases"),
    ("GET", "/v1/credits/balance"),
    ("GET", "/v1/credits/ledger"),
    ("POST", "/admin/credits/grants"),
    ("POST", "/admin/leads"),
    ("GET", "/v1/leads"),
    ("GET", "/v1/leads/purchased"),
    ("POST", "/v1/leads/{lead_id}/purchase"),
]
NOT_FUZZED = {("GET", "/health/live"), ("GET", "/health/ready")}


async def load_schema(client: Client) -> dict[str, Any]:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    schema: dict[str, Any] = r.json()
    return schema


@pytest.fixture
async def fuzz_client(make_client: AppFactory) -> Client:
    """Rate limits out of the way (so purchases do real work), a funded user and five cheap leads."""
    client = await make_client(rate_credit_purchases=100_000, rate_lead_purchases=100_000)
    await grant(client, USER, 1_000_000)
    for i in range(5):
        await create_lead(client, price=1, title=f"seed lead {i}")
    return client


def generate(schema: dict[str, Any], method: str, path: str, mode: GenerationMode) -> list[Case]:
    operation = schemathesis.openapi.from_dict(schema)[path][method]
    cases: list[Case] = []

    @settings(
        max_examples=BODY_EXAMPLES
        if "requestBody" in schema["paths"][path][method.lower()]
        else OTHER_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode))
    def collect(case: Case) -> None:
        cases.append(case)

    collect()
    return cases


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _query(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Generated query values can be lists, objects, numbers or null: send them as text."""
    return [
        (str(name), _text(item))
        for name, value in params.items()
        for item in (value if isinstance(value, list) else [value])
    ]


async def send(client: Client, case: Case, forced: dict[str, str]) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    headers = {**kwargs["headers"], **forced}
    if "json" in kwargs:
        content: bytes | None = json.dumps(kwargs["json"]).encode()
    elif "data" in kwargs:
        data = kwargs["data"]
        content = data if isinstance(data, bytes) else _text(data).encode()
    else:
        content = None
    return await client.request(
        kwargs["method"],
        kwargs["url"],
        params=_query(kwargs.get("params") or {}),
        # generated header values may be any unicode: send their UTF-8 bytes
        headers={str(k): str(v).encode() for k, v in headers.items()},
        content=content,
    )


def problem_error(r: httpx.Response) -> str | None:
    """What is wrong with a 4xx response as an RFC 9457 problem detail, if anything."""
    if not r.headers.get("content-type", "").startswith("application/problem+json"):
        return f"content-type {r.headers.get('content-type')!r}"
    try:
        body = r.json()
    except ValueError:
        return "body is not JSON"
    if not isinstance(body, dict):
        return "body is not an object"
    if body.get("status") != r.status_code:
        return f"status member {body.get('status')!r}"
    missing = [m for m in ("type", "title", "detail") if not isinstance(body.get(m), str) or not body[m]]
    return f"missing {missing}" if missing else None


def describe(case: Case, forced: dict[str, str], r: httpx.Response, why: str) -> str:
    try:
        reproduce = case.as_curl_command(headers=forced)
    except Exception as exc:  # a curl line is a courtesy; the case itself still gets reported
        reproduce = f"{case.method} {case.formatted_path} query={case.query} body={case.body!r} ({exc})"
    return f"{r.status_code} {why}: {r.text[:200]}\n    {reproduce[:600]}"


async def test_the_schema_documents_exactly_the_fuzzed_operations(client: Client) -> None:
    schema = await load_schema(client)
    documented = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert documented - NOT_FUZZED == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
async def test_generated_requests_never_get_a_5xx(
    fuzz_client: Client, db: asyncpg.Connection, method: str, path: str, mode: GenerationMode
) -> None:
    schema = await load_schema(fuzz_client)
    # purchases of the real packages go all the way to (fake) Stripe; other ids are left to negative mode
    listed = await fuzz_client.get("/v1/credits/packages", headers={"Authorization": f"Bearer {token('u')}"})
    packages = [p["id"] for p in listed.json()]
    schema["components"]["schemas"]["PurchaseRequest"]["properties"]["package_id"]["enum"] = packages
    cases = generate(schema, method, path, mode)
    assert cases

    failures: list[str] = []
    statuses: list[int] = []
    is_admin = path.startswith("/admin")
    for i, case in enumerate(cases):
        forced = {
            "Authorization": f"Bearer {token(ADMIN if is_admin else USER, admin=is_admin)}",
            "Idempotency-Key": f"fuzz-{mode}-{i}-{time.monotonic_ns()}",
        }
        r = await send(fuzz_client, case, forced)
        statuses.append(r.status_code)
        if r.status_code >= 500:
            failures.append(describe(case, forced, r, "server error"))
        elif r.status_code >= 400 and (why := problem_error(r)) is not None:
            failures.append(describe(case, forced, r, f"not a problem detail ({why})"))

    assert not failures, f"{len(failures)} of {len(cases)} generated requests failed:\n" + "\n".join(failures)
    if mode == GenerationMode.POSITIVE:
        assert any(200 <= s < 300 for s in statuses), f"no valid request succeeded: {sorted(set(statuses))}"
    assert await db.fetchval("SELECT to_regclass('leads')::text") == "leads"
