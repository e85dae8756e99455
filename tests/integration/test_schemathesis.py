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
   finds, 50 for the others, 100 per operation for the headers; the file takes about 40 s);
3. sends every case through the fixtures' `Client` (httpx on the ASGI app, in the test's own loop)
   with a valid bearer token of the operation's role (admin for /admin) and a fresh Idempotency-Key,
   so generated requests get past authentication and the key check into the services and database;
4. fuzzes those two headers in a test of their own: schema-valid cases (so body and path pass
   validation; a purchase gets a lead of its own) each sent with one faulty header while the other
   stays valid, so a fault reaches the code behind the first check. Which header or claim carries
   the fault rotates through FAULTS; the value is drawn by Hypothesis: text around one character
   from a small dictionary (NUL, control, non-ASCII), printable text past the length limits, any
   text, any JSON, schemathesis' own value, or none. A fuzzed claim travels in a token really
   signed with the test secret (random tokens never get past the signature check), as does a
   payload that is not an object.

Both positive (schema-valid) and negative (schema-violating) cases are generated. Checks: no 5xx,
and every 4xx is an RFC 9457 problem detail whose `status` matches. Hypothesis does not shrink a
failure (requests go out after generation), so each failing case is listed as generated, with a
curl command to reproduce it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from tests.fixtures.app import (
    ADMIN,
    TEST_SECRET,
    AppFactory,
    Client,
    create_lead,
    create_ticket_type,
    grant,
    hold,
    seed_leads,
    token,
)

USER = "fuzz-user"
SEEDED_HOLDS = 5
# per operation and generation mode: JSON bodies are a much larger space than a few query parameters
BODY_EXAMPLES = 150
OTHER_EXAMPLES = 50
HEADER_EXAMPLES = 100
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
    ("GET", "/v1/credits/purchases/{purchase_id}"),
    ("GET", "/admin/failed-operations"),
    ("GET", "/admin/failed-operations/{op_id}"),
    ("POST", "/admin/failed-operations/{op_id}/retry"),
    ("POST", "/admin/failed-operations/{op_id}/discard"),
    ("POST", "/admin/webhooks/replay"),
    ("POST", "/admin/ticket-types"),
    ("GET", "/v1/ticket-types/{type_id}"),
    ("POST", "/v1/reservations"),
    ("GET", "/v1/reservations/{reservation_id}"),
    ("DELETE", "/v1/reservations/{reservation_id}"),
    ("POST", "/v1/reservations/{reservation_id}/checkout"),
    ("GET", "/admin/reservations/stats"),
    ("GET", "/admin/jobs/runs"),
    ("GET", "/admin/operations-health"),
    ("POST", "/v1/errors"),
    ("GET", "/admin/errors"),
    ("POST", "/admin/errors/{error_id}/resolve"),
]
# the webhook takes no bearer token and no schema'd body, only signed bytes: its hostile bodies are
# in test_webhook_ingest.py (every body signed, any JSON at all) and its header in test_signature.py
NOT_FUZZED = {("GET", "/health/live"), ("GET", "/health/ready"), ("POST", "/webhooks/stripe")}


async def load_schema(client: Client) -> dict[str, Any]:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    schema: dict[str, Any] = r.json()
    return schema


@pytest.fixture
async def fuzz_client(make_client: AppFactory, db: asyncpg.Connection) -> Client:
    """Rate limits out of the way (so purchases do real work), a funded user, five cheap leads, a
    credit purchase, failed operations in every status, two error logs, a ticket type and holds of
    the user's (so ids in paths name real rows)."""
    client = await make_client(
        rate_credit_purchases=100_000,
        rate_lead_purchases=100_000,
        rate_reservations=100_000,
        rate_error_reports=100_000,
    )
    await grant(client, USER, 1_000_000)
    for i in range(5):
        await create_lead(client, price=1, title=f"seed lead {i}")
    bought = await client.post(
        "/v1/credits/purchases",
        json={"package_id": "starter"},
        headers={"Authorization": f"Bearer {token(USER)}", "Idempotency-Key": "fuzz-seed-purchase"},
    )
    assert bought.status_code == 201, bought.text
    await db.execute(
        "INSERT INTO failed_operations (kind, reference, status, attempts, max_attempts, next_attempt_at)"
        " SELECT 'refund_shortfall', 'seed-' || s, s, 1, 1, now() + interval '1 hour'"
        " FROM unnest(ARRAY['pending', 'retrying', 'succeeded', 'dead', 'discarded']) AS s"
    )
    ticket_type = await create_ticket_type(client, capacity=1_000_000)
    for _ in range(SEEDED_HOLDS):
        assert (await hold(client, USER, ticket_type, 1)).status_code == 201
    await db.execute(
        "INSERT INTO error_logs (severity, source, message, resolved_at, resolved_by)"
        " VALUES ('error', 'server', 'seed', NULL, NULL), ('warning', 'web', 'seed', now(), 'ops')"
    )
    return client


Headers = dict[str, str | None]  # header -> value sent instead of the valid one; None: leave it out
GENERATED = "<the case's own value>"  # send what schemathesis generated for the header (or nothing)
Drawn = dict[str, Any]


def generate(
    schema: dict[str, Any],
    method: str,
    path: str,
    mode: GenerationMode,
    max_examples: int | None = None,
    values: st.SearchStrategy[Drawn] = st.just({}),
) -> list[tuple[Case, Drawn]]:
    """Cases for one operation, each with `values` drawn alongside it."""
    operation = schemathesis.openapi.from_dict(schema)[path][method]
    cases: list[tuple[Case, Drawn]] = []
    if max_examples is None:
        has_body = "requestBody" in schema["paths"][path][method.lower()]
        max_examples = BODY_EXAMPLES if has_body else OTHER_EXAMPLES

    @settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode), values)
    def collect(case: Case, drawn: Drawn) -> None:
        cases.append((case, drawn))

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


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# a fuzzer's dictionary: characters that break storage or parsing, which st.text() seldom draws
EDGE = st.sampled_from("\x00\n\x1b\x7f\xe9\u202e\U0001f4b8")
# what hypothesis draws for every case; which header or claim carries which value rotates (FAULTS)
VALUES = st.fixed_dictionaries(
    {
        "edge": st.tuples(st.text(max_size=4), EDGE, st.text(max_size=4)).map("".join),
        # printable, so only the length is wrong: past the 255 of keys and ids, past 320 for email
        "long": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=321, max_size=500),
        "text": st.text(),
        "json": ANY_JSON,
    }
)
CLAIMS = ("sub", "email", "role", "exp", "nbf", "iat", "aud", "iss")
# one fault per request, so an early check does not hide a later one: (where, which value)
FAULTS: list[tuple[str, str]] = [
    *[("Idempotency-Key", which) for which in ("edge", "long", "text", "absent", "generated")],
    *[("Authorization", which) for which in ("edge", "long", "text", "absent", "generated")],
    *[(f"claim {claim}", which) for claim in CLAIMS for which in ("edge", "long", "json")],
    ("token payload", "json"),  # signed, but not even an object
    ("token header kid", "json"),
]


def _segment(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def signed(header: Any, payload: Any) -> str:
    """A token the test secret really signed, whatever its header and payload say: it gets past
    the signature check to the code that reads the claims."""
    signing_input = f"{_segment(header)}.{_segment(payload)}"
    mac = hmac.new(TEST_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def fault_headers(fault: tuple[str, str], drawn: Drawn, user: str, admin: bool) -> Headers:
    """The one header that carries the fault; the other stays valid."""
    where, which = fault
    value = {"absent": None, "generated": GENERATED}.get(which, drawn.get(which))
    if where == "Idempotency-Key":
        return {where: value}
    if where == "Authorization":
        return {where: f"Bearer {value}" if which in ("edge", "long") else value}
    now = int(time.time())
    claims: Any = {"sub": user, "iat": now, "exp": now + 3600, **({"role": "admin"} if admin else {})}
    jose: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if where.startswith("claim "):
        claims[where.removeprefix("claim ")] = value
    elif where == "token payload":
        claims = value
    else:
        jose["kid"] = value
    return {"Authorization": f"Bearer {signed(jose, claims)}"}


def headers_to_send(faulty: Headers, authorization: str, fresh_key: str) -> Headers:
    """A valid token and a fresh key, but for the faulty header (GENERATED: the case's own)."""
    out: Headers = {"Authorization": authorization, "Idempotency-Key": fresh_key}
    for name, value in faulty.items():
        if value == GENERATED:
            out.pop(name, None)
        else:
            out[name] = value
    return out


async def send(client: Client, case: Case, forced: Headers) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    headers = {**kwargs["headers"], **forced}
    headers = {name: value for name, value in headers.items() if value is not None}
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


def describe(case: Case, forced: Headers, r: httpx.Response, why: str) -> str:
    try:
        sent = {name: value for name, value in forced.items() if value is not None}
        dropped = [name for name, value in forced.items() if value is None]
        reproduce = case.as_curl_command(headers=sent) + (f"  (without {dropped})" if dropped else "")
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
    schema = await fuzz_schema(fuzz_client)
    cases = [(case, {}) for case, _ in generate(schema, method, path, mode)]
    statuses = await send_all(fuzz_client, path, str(mode), cases)
    if mode == GenerationMode.POSITIVE:
        assert any(200 <= s < 300 for s in statuses), f"no valid request succeeded: {sorted(set(statuses))}"
    assert await db.fetchval("SELECT to_regclass('leads')::text") == "leads"


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
async def test_fuzzed_authorization_and_idempotency_keys_never_get_a_5xx(
    fuzz_client: Client, db: asyncpg.Connection, method: str, path: str
) -> None:
    schema = await fuzz_schema(fuzz_client)
    is_admin = path.startswith("/admin")
    user = ADMIN if is_admin else USER
    cases = generate(schema, method, path, GenerationMode.POSITIVE, HEADER_EXAMPLES, VALUES)
    if "{lead_id}" in path:  # a lead of its own per case: good headers buy it, down to the email outbox
        leads = await seed_leads(db, len(cases), title="header lead")
        for (case, _), lead in zip(cases, leads, strict=True):
            case.path_parameters = {**(case.path_parameters or {}), "lead_id": lead}
    faulty = [
        (case, fault_headers(FAULTS[i % len(FAULTS)], drawn, user, is_admin))
        for i, (case, drawn) in enumerate(cases)
    ]
    statuses = await send_all(fuzz_client, path, "headers", faulty)
    assert 401 in statuses, sorted(set(statuses))


async def fuzz_schema(client: Client) -> dict[str, Any]:
    schema = await load_schema(client)
    # purchases of the real packages go all the way to (fake) Stripe; other ids are left to negative mode
    listed = await client.get("/v1/credits/packages", headers={"Authorization": f"Bearer {token('u')}"})
    packages = [p["id"] for p in listed.json()]
    schema["components"]["schemas"]["PurchaseRequest"]["properties"]["package_id"]["enum"] = packages
    # ids of rows that exist, so valid requests reach the code behind the lookup
    ops = await client.get(
        "/admin/failed-operations", headers={"Authorization": f"Bearer {token(ADMIN, admin=True)}"}
    )
    errors = await client.get(
        "/admin/errors", headers={"Authorization": f"Bearer {token(ADMIN, admin=True)}"}
    )
    ids = {
        "purchase_id": ["1"],
        "op_id": [str(op["id"]) for op in ops.json()["items"]],
        "error_id": [str(error["id"]) for error in errors.json()["items"]],
        "type_id": ["1"],
        "reservation_id": [str(i) for i in range(1, SEEDED_HOLDS + 1)],
    }
    schema["components"]["schemas"]["HoldCreate"]["properties"]["ticket_type_id"]["enum"] = [1]
    for item in schema["paths"].values():
        for operation in item.values():
            for param in operation.get("parameters", []):
                if param["in"] == "path" and param["name"] in ids:
                    param["schema"] = {"type": "string", "enum": ids[param["name"]]}
    return schema


async def send_all(client: Client, path: str, label: str, cases: list[tuple[Case, Headers]]) -> list[int]:
    """Send every case with a valid token and a fresh key but for its faulty header; fail listing
    each 5xx and each 4xx that is not a problem detail."""
    assert cases
    failures: list[str] = []
    statuses: list[int] = []
    is_admin = path.startswith("/admin")
    authorization = f"Bearer {token(ADMIN if is_admin else USER, admin=is_admin)}"
    for i, (case, faulty) in enumerate(cases):
        forced = headers_to_send(faulty, authorization, f"fuzz-{label}-{i}-{time.monotonic_ns()}")
        r = await send(client, case, forced)
        statuses.append(r.status_code)
        if r.status_code >= 500:
            failures.append(describe(case, forced, r, "server error"))
        elif r.status_code >= 400 and (why := problem_error(r)) is not None:
            failures.append(describe(case, forced, r, f"not a problem detail ({why})"))
    assert not failures, f"{len(failures)} of {len(cases)} generated requests failed:\n" + "\n".join(failures)
    return statuses
