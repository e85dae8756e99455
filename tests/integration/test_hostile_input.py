"""Hostile input on every endpoint: each request is refused with a problem detail and changes nothing.

Every case runs against a fresh database seeded with one user's credits, one sold lead and one
available lead. The row counts of every table, the balances, the lead states, the idempotency keys
and the rate-limit buckets are compared before and after the request: a refused request must not
have moved anything (it must be refused before it reaches a service, let alone the database).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from tests.fixtures.app import (
    ADMIN,
    TEST_SECRET,
    Client,
    auth,
    create_lead,
    create_ticket_type,
    grant,
    hold,
    token,
)

USER = "u1"
SQL = "'; DROP TABLE leads; --"
SQL_IN_URL = "%27%3B%20DROP%20TABLE%20leads%3B%20--"
MAX_BODY = 64 * 1024
TABLES = (
    "idempotency_keys",
    "credit_accounts",
    "credit_ledger",
    "credit_purchases",
    "leads",
    "lead_purchases",
    "outbox_emails",
    "ticket_types",
    "reservations",
    "rate_limits",
    "job_runs",
    "platform_metrics",
    "platform_alerts",
    "error_logs",
)
BUSINESS_TABLES = tuple(t for t in TABLES if t not in ("idempotency_keys", "rate_limits"))


# --- requests -------------------------------------------------------------------------------


class _NoBody:
    def __repr__(self) -> str:
        return "NO_BODY"


NO_BODY: Any = _NoBody()


@dataclass(frozen=True)
class Req:
    """One request. By default it carries a valid token of the right role and, on POST, a fresh key."""

    method: str
    path: str  # may name {lead}, {lead_arabic}, {lead_fullwidth}: the seeded available lead
    body: Any = NO_BODY  # sent as JSON
    raw: bytes | None = None  # sent as is, with content-type application/json
    chunked: bool = False  # an oversize body streamed without content-length
    params: dict[str, str] | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)  # override the defaults
    drop: tuple[str, ...] = ()  # default headers to leave out


def with_authorization(req: Req, value: str | None) -> Req:
    if value is None:
        return replace(req, drop=("Authorization",))
    return replace(req, headers={"Authorization": value})


def fullwidth(text: str) -> str:
    """The same text in fullwidth forms (U+FF01..U+FF5E): looks alike, and int() reads their digits."""
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def _path_vars(lead: int) -> dict[str, str]:
    digits = str(lead)
    return {
        "lead": digits,
        "lead_arabic": "".join(chr(0x0660 + int(d)) for d in digits),  # Arabic-Indic digits
        "lead_fullwidth": fullwidth(digits),
    }


async def _chunks() -> AsyncIterator[bytes]:
    yield b'{"padding": "'
    for _ in range(MAX_BODY // 1024 + 1):
        yield b"x" * 1024
    yield b'"}'


async def send(client: Client, req: Req, lead: int) -> httpx.Response:
    admin = req.path.startswith("/admin")
    headers: dict[str, str | bytes] = {
        "Authorization": f"Bearer {token(ADMIN if admin else USER, admin=admin)}",
        "Content-Type": "application/json",
    }
    if req.method == "POST":
        headers["Idempotency-Key"] = f"hostile-{time.monotonic_ns()}"
    headers.update(req.headers)
    for name in req.drop:
        headers.pop(name, None)
    content: Any = None
    if req.chunked:
        content = _chunks()
    elif req.raw is not None:
        content = req.raw
    elif req.body is not NO_BODY:
        content = json.dumps(req.body).encode()
    return await client.request(
        req.method,
        req.path.format_map(_path_vars(lead)),
        params=req.params,
        headers=headers,
        content=content,
    )


PURCHASE_BODY = {"package_id": "starter"}
GRANT_BODY = {"user_id": "u2", "credits": 5, "reason": "hostile"}
LEAD_BODY = {"title": "t", "price_credits": 5, "details": {"k": "v"}}
TICKET_TYPE_BODY = {"name": "t", "capacity": 5, "price": 500, "currency": "usd"}
HOLD_BODY = {"ticket_type_id": 1, "quantity": 1}  # the seeded ticket type
ERROR_BODY = {"severity": "error", "message": "m", "source": "web", "context": {"k": "v"}}

ENDPOINTS = {
    "credit-purchase": Req("POST", "/v1/credits/purchases", body=PURCHASE_BODY),
    "packages": Req("GET", "/v1/credits/packages"),
    "balance": Req("GET", "/v1/credits/balance"),
    "ledger": Req("GET", "/v1/credits/ledger"),
    "grant": Req("POST", "/admin/credits/grants", body=GRANT_BODY),
    "create-lead": Req("POST", "/admin/leads", body=LEAD_BODY),
    "leads": Req("GET", "/v1/leads"),
    "purchased-leads": Req("GET", "/v1/leads/purchased"),
    "lead-purchase": Req("POST", "/v1/leads/{lead}/purchase"),
    "create-ticket-type": Req("POST", "/admin/ticket-types", body=TICKET_TYPE_BODY),
    "ticket-type": Req("GET", "/v1/ticket-types/1"),
    "hold": Req("POST", "/v1/reservations", body=HOLD_BODY),
    "reservation": Req("GET", "/v1/reservations/1"),
    "cancel": Req("DELETE", "/v1/reservations/1"),
    "checkout": Req("POST", "/v1/reservations/1/checkout"),
    "reservation-stats": Req("GET", "/admin/reservations/stats"),
    "job-runs": Req("GET", "/admin/jobs/runs"),
    "operations-health": Req("GET", "/admin/operations-health"),
    "report-error": Req("POST", "/v1/errors", body=ERROR_BODY),
    "errors": Req("GET", "/admin/errors"),
    "resolve-error": Req("POST", "/admin/errors/{lead}/resolve"),  # no error log has that id
}
BODY_ENDPOINTS = ("credit-purchase", "grant", "create-lead", "create-ticket-type", "hold", "report-error")
KEYED_ENDPOINTS = (
    "credit-purchase",
    "grant",
    "create-lead",
    "lead-purchase",
    "create-ticket-type",
    "hold",
    "checkout",
    "report-error",
)
KEY_REQUIRED = ("credit-purchase", "grant", "lead-purchase", "checkout")
PAGED_ENDPOINTS = ("ledger", "leads", "purchased-leads", "job-runs", "errors")
ADMIN_ENDPOINTS = (
    "grant",
    "create-lead",
    "create-ticket-type",
    "reservation-stats",
    "job-runs",
    "operations-health",
    "errors",
    "resolve-error",
)


# --- state and assertions -------------------------------------------------------------------


@pytest.fixture
async def seeded(client: Client) -> tuple[Client, int]:
    """USER holds 90 credits and bought lead 1; lead 2 is available; USER holds one ticket of ticket
    type 1 (reservation 1). Returns the available lead."""
    await grant(client, USER, 100)
    sold = await create_lead(client, price=10, title="sold lead")
    r = await client.post(f"/v1/leads/{sold}/purchase", headers=auth(USER, key="seed-purchase"))
    assert r.status_code == 201, r.text
    available = await create_lead(client, price=10, title="available lead")
    assert await create_ticket_type(client, capacity=5) == 1
    assert (await hold(client, USER, 1, 1)).json()["id"] == 1
    return client, available


async def snapshot(db: asyncpg.Connection, tables: tuple[str, ...] = TABLES) -> dict[str, Any]:
    state: dict[str, Any] = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}  # noqa: S608
    queries = {
        "balances": "SELECT user_id, balance FROM credit_accounts ORDER BY user_id",
        "lead states": "SELECT id, status, buyer_id FROM leads ORDER BY id",
    }
    if "idempotency_keys" in tables:
        queries["keys"] = (
            "SELECT user_id, key, recovery_point, response_status FROM idempotency_keys ORDER BY id"
        )
    if "rate_limits" in tables:
        queries["buckets"] = "SELECT key, tat FROM rate_limits ORDER BY key"
    for name, query in queries.items():
        state[name] = [tuple(row) for row in await db.fetch(query)]
    return state


def assert_problem(r: httpx.Response, status: int | tuple[int, ...], type_: str | None = None) -> None:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, f"expected {statuses}, got {r.status_code}: {r.text[:300]}"
    assert 400 <= r.status_code < 500
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers.get("content-type")
    body = r.json()
    assert isinstance(body, dict), body
    assert body["status"] == r.status_code, body
    for member in ("type", "title", "detail"):
        assert isinstance(body[member], str) and body[member], body
    if type_ is not None:
        assert body["type"] == type_, body


async def assert_refused(
    seeded: tuple[Client, int],
    db: asyncpg.Connection,
    req: Req,
    status: int | tuple[int, ...],
    type_: str | None = None,
) -> None:
    client, lead = seeded
    before = await snapshot(db)
    r = await send(client, req, lead)
    assert_problem(r, status, type_)
    await assert_unchanged(db, before)


async def assert_unchanged(
    db: asyncpg.Connection, before: dict[str, Any], tables: tuple[str, ...] = TABLES
) -> None:
    after = await snapshot(db, tables)
    changed = {
        name: {"before": before[name], "after": after[name]} for name in before if before[name] != after[name]
    }
    assert not changed, f"a refused request changed the database: {changed}"


def case(name: str, req: Req, status: int | tuple[int, ...], type_: str | None = None) -> Any:
    return pytest.param(req, status, type_, id=name)


# --- bodies ---------------------------------------------------------------------------------


def _json_with(valid: dict[str, Any], extra: bytes) -> bytes:
    """The valid body's JSON with `extra` spliced in as one more member."""
    return json.dumps(valid).encode()[:-1] + b", " + extra + b"}"


def _body_cases() -> list[Any]:
    cases = []
    for name in BODY_ENDPOINTS:
        endpoint = ENDPOINTS[name]
        valid = endpoint.body
        encoded = json.dumps(valid).encode()
        deep = b"[" * 5000 + b"]" * 5000
        for label, raw, status, type_ in [
            ("malformed", b"{bad", 400, "invalid-json"),
            ("truncated", encoded[:-1], 400, "invalid-json"),
            ("trailing-garbage", encoded + b" x", 400, "invalid-json"),
            ("byte-order-mark", b"\xef\xbb\xbf" + encoded, 400, "invalid-json"),
            ("single-quotes", encoded.replace(b'"', b"'"), 400, "invalid-json"),
            ("nan", _json_with(valid, b'"x": NaN'), 400, "invalid-json"),
            ("empty", b"", 400, "validation-error"),
            ("invalid-utf8", _json_with(valid, b'"x": "\xff\xfe"'), 400, "invalid-json"),
            ("invalid-utf8-in-key", _json_with(valid, b'"\xc3": 1'), 400, "invalid-json"),
            ("lone-surrogate", _json_with(valid, b'"x": "\\ud800"'), 400, "invalid-json"),
            ("deep-nesting", _json_with(valid, b'"x": ' + deep), 400, "invalid-json"),
        ]:
            cases.append(case(f"{name}-{label}", replace(endpoint, body=NO_BODY, raw=raw), status, type_))
        for label, body, status, type_ in [
            ("array", [valid], 400, "validation-error"),
            ("string", "starter", 400, "validation-error"),
            ("null", None, 400, "validation-error"),
            ("number", 1, 400, "validation-error"),
            ("boolean", True, 400, "validation-error"),
            ("empty-object", {}, 400, "validation-error"),
            ("unknown-field", {**valid, "is_admin": True}, 400, "validation-error"),
            ("oversize", {**valid, "padding": "x" * (MAX_BODY + 1)}, 413, "payload-too-large"),
        ]:
            cases.append(case(f"{name}-{label}", replace(endpoint, body=body), status, type_))
        cases.append(
            case(f"{name}-oversize-chunked", replace(endpoint, chunked=True), 413, "payload-too-large")
        )
        # a JSON body under another media type (curl -d sends a form's) is refused, not guessed at
        for label, content_type in NOT_JSON.items():
            req = replace(endpoint, headers={"Content-Type": content_type})
            cases.append(case(f"{name}-content-type-{label}", req, 415, "unsupported-media-type"))
        req = replace(endpoint, drop=("Content-Type",))
        cases.append(case(f"{name}-content-type-missing", req, 415, "unsupported-media-type"))
    return cases


NOT_JSON = {
    "form": "application/x-www-form-urlencoded",
    "multipart": "multipart/form-data; boundary=x",
    "text": "text/plain",
    "json-prefix": "application/jsonx",
    "json-as-parameter": "text/plain; profile=application/json",
    "empty": "",
}


def _field_cases(
    name: str, fields: dict[str, list[tuple[str, Any, int]]], optional: tuple[str, ...] = ()
) -> list[Any]:
    endpoint = ENDPOINTS[name]
    cases = []
    for field_name, values in fields.items():
        if field_name not in optional:
            missing = {k: v for k, v in endpoint.body.items() if k != field_name}
            cases.append(case(f"{name}-{field_name}-missing", replace(endpoint, body=missing), 400))
        for label, value, status in values:
            body = {**endpoint.body, field_name: value}
            cases.append(case(f"{name}-{field_name}-{label}", replace(endpoint, body=body), status))
    return cases


def _string_values(max_length: int) -> list[tuple[str, Any, int]]:
    return [
        ("null", None, 400),
        ("number", 5, 400),
        ("list", ["x"], 400),
        ("object", {"x": 1}, 400),
        ("empty", "", 400),
        ("one-too-long", "x" * (max_length + 1), 400),
        ("very-long", "x" * 60_000, 400),
        ("nul-byte", "a\x00b", 400),
        ("only-nul", "\x00", 400),
    ]


def _int_values() -> list[tuple[str, Any, int]]:
    return [
        ("null", None, 400),
        ("word", "ten", 400),
        ("boolean", True, 400),
        ("list", [5], 400),
        ("fraction", 1.5, 400),
        ("tiny-fraction", 1e-9, 400),
        ("zero", 0, 400),
        ("negative", -1, 400),
        ("one-too-many", 1_000_000_001, 400),
        ("2**63", 2**63, 400),
        ("-(2**63)", -(2**63), 400),
        ("10**30", 10**30, 400),
        ("huge-float", 1e308, 400),
    ]


FIELD_CASES = [
    *_field_cases(
        "credit-purchase",
        {
            "package_id": [
                *[v for v in _string_values(64) if v[0] not in ("nul-byte", "only-nul")],
                ("nul-byte", "starter\x00", 400),
                ("only-nul", "\x00", 400),
                # a string of the right shape is looked up: an unknown package is a 404
                ("sql", SQL, 404),
                ("fullwidth", fullwidth("starter"), 404),
                ("zero-width-space", "starter\u200b", 404),
                ("right-to-left-override", "\u202estarter", 404),
                ("upper-case", "STARTER", 404),
            ]
        },
    ),
    *_field_cases(
        "grant",
        {"user_id": _string_values(255), "credits": _int_values(), "reason": _string_values(200)},
    ),
    *_field_cases(
        "create-lead",
        {
            "title": _string_values(200),
            "price_credits": _int_values(),
            "details": [
                ("null", None, 400),
                ("list", [], 400),
                ("string", "x", 400),
                ("number", 5, 400),
                ("nul-in-value", {"k": "a\x00b"}, 400),
                ("nul-in-key", {"a\x00b": "v"}, 400),
                ("nul-nested", {"k": {"list": ["ok", "\x00"]}}, 400),
            ],
        },
        optional=("details",),
    ),
    *_field_cases(
        "report-error",
        {
            "severity": [
                *[v for v in _string_values(16) if v[0] != "one-too-long"],
                ("unknown", "fatal", 400),
                ("upper-case", "ERROR", 400),
                ("padded", " error", 400),
                ("sql", SQL, 400),
            ],
            "message": _string_values(4096),
            "source": [
                *_string_values(64),
                ("reserved", "server", 400),
                ("spaces", "my app", 400),
                ("sql", SQL, 400),
                ("right-to-left-override", "\u202eweb", 400),
            ],
            "context": [
                ("null", None, 400),
                ("list", [], 400),
                ("string", "x", 400),
                ("number", 5, 400),
                ("nul-in-value", {"k": "a\x00b"}, 400),
                ("nul-in-key", {"a\x00b": "v"}, 400),
                ("nine-levels", {"k": [[[[[[[["x"]]]]]]]]}, 400),
            ],
        },
        optional=("context",),
    ),
]


@pytest.mark.parametrize(("req", "status", "type_"), _body_cases())
async def test_bad_bodies_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, req: Req, status: int, type_: str | None
) -> None:
    await assert_refused(seeded, db, req, status, type_)


@pytest.mark.parametrize(("req", "status", "type_"), FIELD_CASES)
async def test_bad_fields_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, req: Req, status: int, type_: str | None
) -> None:
    await assert_refused(seeded, db, req, status, type_)


# --- query and path parameters ----------------------------------------------------------------

BAD_CURSORS = {
    "word": "abc",
    "negative": "-1",
    "zero": "0",
    "beyond-int64": "99999999999999999999999",
    "2**63": str(2**63),
    "5000-digits": "1" * 5000,
    "sql": SQL,
    "nul": "\x00",
    "arabic-digits": "١٢",
    "fraction": "1.5",
    "leading-space": " 1",
    "empty": "",
}
BAD_LIMITS = {
    "zero": "0",
    "one-too-many": "201",
    "negative": "-1",
    "word": "x",
    "fraction": "1.5",
    "10**30": str(10**30),
    "sql": SQL,
    "empty": "",
}
QUERY_CASES = [
    *[
        case(
            f"{name}-cursor-{label}",
            replace(ENDPOINTS[name], params={"cursor": value}),
            400,
            "invalid-cursor",
        )
        for name in PAGED_ENDPOINTS
        for label, value in BAD_CURSORS.items()
    ],
    *[
        case(
            f"{name}-limit-{label}",
            replace(ENDPOINTS[name], params={"limit": value}),
            400,
            "validation-error",
        )
        for name in PAGED_ENDPOINTS
        for label, value in BAD_LIMITS.items()
    ],
    *[
        case(
            f"job-runs-job-{label}",
            replace(ENDPOINTS["job-runs"], params={"job": value}),
            400,
            "validation-error",
        )
        for label, value in {
            "unknown": "vacuum",
            "capitalised": "Cleanup",
            "sql": SQL,
            "empty": "",
            "nul": "\x00",
        }.items()
    ],
]

# not a canonical decimal id of a lead: refused as not found (no route) or as invalid
BAD_LEAD_IDS = {
    "word": ("abc", (400, 404)),
    "negative": ("-1", 400),
    "zero": ("0", 400),
    "2**63": (str(2**63), 400),
    "10**30": (str(10**30), 400),
    "5000-digits": ("1" * 5000, (400, 404)),
    "fraction": ("1.5", (400, 404)),
    "exponent": ("1e3", (400, 404)),
    "hex": ("0x2", (400, 404)),
    "sql": (f"1{SQL_IN_URL}", (400, 404)),
    "nul": ("%00", (400, 404)),
    "plus-sign": ("+{lead}", (400, 404)),
    "leading-space": ("%20{lead}", (400, 404)),
    "underscore": ("{lead}_0", (400, 404)),
    "arabic-digits": ("{lead_arabic}", (400, 404)),
    "fullwidth-digits": ("{lead_fullwidth}", (400, 404)),
}
PATH_CASES = [
    *[
        case(f"lead-id-{label}", Req("POST", f"/v1/leads/{value}/purchase"), status)
        for label, (value, status) in BAD_LEAD_IDS.items()
    ],
    *[
        case(f"error-id-{label}", Req("POST", f"/admin/errors/{value}/resolve"), status)
        for label, (value, status) in BAD_LEAD_IDS.items()
    ],
    case("error-id-unknown", Req("POST", "/admin/errors/{lead}/resolve"), 404, "not-found"),
]
ERROR_FILTERS = {
    "severity-unknown": {"severity": "fatal"},
    "severity-sql": {"severity": SQL},
    "resolved-word": {"resolved": "maybe"},
    "resolved-number": {"resolved": "2"},
    "source-spaces": {"source": "my app"},
    "source-sql": {"source": SQL},
    "source-too-long": {"source": "s" * 65},
}
QUERY_CASES += [
    case(f"errors-{label}", replace(ENDPOINTS["errors"], params=params), 400, "validation-error")
    for label, params in ERROR_FILTERS.items()
]


@pytest.mark.parametrize(("req", "status", "type_"), QUERY_CASES)
async def test_bad_cursors_and_limits_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, req: Req, status: int, type_: str | None
) -> None:
    await assert_refused(seeded, db, req, status, type_)


@pytest.mark.parametrize(("req", "status", "type_"), PATH_CASES)
async def test_bad_lead_ids_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, req: Req, status: int, type_: str | None
) -> None:
    await assert_refused(seeded, db, req, status, type_)


async def test_purchase_of_a_lead_that_does_not_exist_moves_nothing(
    seeded: tuple[Client, int], db: asyncpg.Connection
) -> None:
    """A well-formed id passes validation: the 404 may be stored under its key, nothing else moves."""
    client, lead = seeded
    before = await snapshot(db, BUSINESS_TABLES)
    for missing in (lead + 1, 10**18 - 1):  # the largest id the path accepts
        r = await send(client, Req("POST", f"/v1/leads/{missing}/purchase"), lead)
        assert_problem(r, 404, "not-found")
    await assert_unchanged(db, before, BUSINESS_TABLES)


# --- headers: tokens, roles, idempotency keys ---------------------------------------------------

NOW = int(time.time())
OTHER_SECRET = "another-secret-that-is-also-long-enough-for-hs256-987654"


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _signed(header: bytes, payload: bytes) -> str:
    """A token with the right HS256 signature over arbitrary header and payload bytes."""
    signing_input = _b64(header) + b"." + _b64(payload)
    signature = hmac.new(TEST_SECRET.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


def _claims(admin: bool, **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": ADMIN if admin else USER, "iat": NOW, "exp": NOW + 3600}
    if admin:
        claims["role"] = "admin"
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _bearer(claims: dict[str, Any], key: str | None = TEST_SECRET, algorithm: str = "HS256") -> str:
    return "Bearer " + jwt.encode(claims, key, algorithm=algorithm)


def _tampered(admin: bool) -> str:
    """A genuine user token whose payload was swapped for an admin's, keeping the signature."""
    header, _, signature = token(USER).split(".")
    payload = _b64(json.dumps(_claims(True, sub="intruder")).encode()).decode()
    return f"Bearer {header}.{payload}.{signature}"


# each builds the Authorization header (None: no header) for a user or an admin endpoint
BAD_AUTHORIZATION: dict[str, Any] = {
    "missing": lambda admin: None,
    "empty": lambda admin: "",
    "basic-scheme": lambda admin: "Basic dTE6cGFzc3dvcmQ=",
    "bearer-without-token": lambda admin: "Bearer ",
    "garbage": lambda admin: "Bearer garbage",
    "dots-only": lambda admin: "Bearer ..",
    "sql": lambda admin: f"Bearer {SQL}",
    "oversized": lambda admin: "Bearer " + "a" * 9000,
    "expired": lambda admin: _bearer(_claims(admin, iat=NOW - 7200, exp=NOW - 3600)),
    "not-yet-valid": lambda admin: _bearer(_claims(admin, nbf=NOW + 3600)),
    "wrong-signature": lambda admin: _bearer(_claims(admin), OTHER_SECRET),
    "tampered-payload": _tampered,
    "alg-none": lambda admin: _bearer(_claims(admin), None, "none"),
    "alg-hs512": lambda admin: _bearer(_claims(admin), TEST_SECRET, "HS512"),
    "no-exp": lambda admin: _bearer({k: v for k, v in _claims(admin).items() if k != "exp"}),
    "exp-not-a-number": lambda admin: _bearer(_claims(admin, exp="tomorrow")),
    "no-sub": lambda admin: _bearer({k: v for k, v in _claims(admin).items() if k != "sub"}),
    "sub-number": lambda admin: _bearer(_claims(admin, sub=123)),
    "sub-list": lambda admin: _bearer(_claims(admin, sub=["u1"])),
    "sub-empty": lambda admin: _bearer(_claims(admin, sub="")),
    "sub-too-long": lambda admin: _bearer(_claims(admin, sub="u" * 256)),
    "sub-nul-byte": lambda admin: _bearer(_claims(admin, sub="u1\x00")),
    "payload-not-an-object": lambda admin: "Bearer " + _signed(b'{"alg":"HS256","typ":"JWT"}', b'["u1"]'),
    "header-not-json": lambda admin: "Bearer " + _signed(b"not json", json.dumps(_claims(admin)).encode()),
}
TOKEN_CASES = [
    pytest.param(name, kind, id=f"{name}-{kind}") for name in ENDPOINTS for kind in BAD_AUTHORIZATION
]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the HS512 token, on purpose
@pytest.mark.parametrize(("endpoint", "kind"), TOKEN_CASES)
async def test_bad_tokens_are_401(
    seeded: tuple[Client, int], db: asyncpg.Connection, endpoint: str, kind: str
) -> None:
    """Every endpoint takes a bearer token (API.md: only webhooks, health and metrics do not)."""
    admin = endpoint in ADMIN_ENDPOINTS
    req = with_authorization(ENDPOINTS[endpoint], BAD_AUTHORIZATION[kind](admin))
    await assert_refused(seeded, db, req, 401, "unauthorized")


NOT_ADMIN = {
    "no-role": _claims(False),
    "role-user": _claims(False, role="user"),
    "role-capitalised": _claims(False, role="Admin"),
    "role-padded": _claims(False, role="admin "),
    "role-list": _claims(False, role=["admin"]),
    "role-object": _claims(False, role={"admin": True}),
    "roles-claim": _claims(False, roles=["admin"]),
}


@pytest.mark.parametrize("endpoint", ADMIN_ENDPOINTS)
@pytest.mark.parametrize("kind", NOT_ADMIN)
async def test_admin_endpoints_refuse_non_admins(
    seeded: tuple[Client, int], db: asyncpg.Connection, endpoint: str, kind: str
) -> None:
    req = with_authorization(ENDPOINTS[endpoint], _bearer(NOT_ADMIN[kind]))
    await assert_refused(seeded, db, req, 403, "forbidden")


BAD_KEYS: dict[str, str | bytes] = {
    "empty": "",
    "too-long": "k" * 256,
    "very-long": "k" * 10_000,
    "tab": "a\tb",
    "newline": "a\nb",
    "nul": "a\x00b",
    "delete-char": "\x7f",
    "utf8": "clé".encode(),
}
KEY_CASES = [
    *[
        case(f"{name}-key-{label}", replace(ENDPOINTS[name], headers={"Idempotency-Key": value}), 400)
        for name in KEYED_ENDPOINTS
        for label, value in BAD_KEYS.items()
    ],
    *[
        case(f"{name}-key-missing", replace(ENDPOINTS[name], drop=("Idempotency-Key",)), 400)
        for name in KEY_REQUIRED
    ],
]


@pytest.mark.parametrize(("req", "status", "type_"), KEY_CASES)
async def test_bad_idempotency_keys_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, req: Req, status: int, type_: str | None
) -> None:
    client, lead = seeded
    before = await snapshot(db)
    r = await send(client, req, lead)
    assert_problem(r, status)
    assert r.json()["type"] in ("idempotency-key-invalid", "idempotency-key-required")
    await assert_unchanged(db, before)


# --- methods and paths ----------------------------------------------------------------------

ROUTING_CASES = [
    case("put-credit-purchases", Req("PUT", "/v1/credits/purchases", body=PURCHASE_BODY), 405),
    case("get-credit-purchases", Req("GET", "/v1/credits/purchases"), 405),
    case("post-packages", Req("POST", "/v1/credits/packages"), 405),
    case("delete-balance", Req("DELETE", "/v1/credits/balance"), 405),
    case("patch-ledger", Req("PATCH", "/v1/credits/ledger", body={}), 405),
    case("get-grants", Req("GET", "/admin/credits/grants"), 405),
    case("delete-admin-leads", Req("DELETE", "/admin/leads"), 405),
    case("post-leads", Req("POST", "/v1/leads", body=LEAD_BODY), 405),
    case("put-purchased-leads", Req("PUT", "/v1/leads/purchased"), 405),
    case("get-lead-purchase", Req("GET", "/v1/leads/{lead}/purchase"), 405),
    case("trace-balance", Req("TRACE", "/v1/credits/balance"), 405),
    case("get-report-error", Req("GET", "/v1/errors"), 405),
    case("delete-admin-errors", Req("DELETE", "/admin/errors"), 405),
    case("get-resolve-error", Req("GET", "/admin/errors/{lead}/resolve"), 405),
    case("unknown-path", Req("GET", "/v1/nope"), 404),
    case("unknown-admin-path", Req("POST", "/admin/users", body={}), 404),
    case("bare-prefix", Req("GET", "/v1/credits"), 404),
    case("upper-case-path", Req("GET", "/V1/credits/balance"), 404),
    case("extra-segment", Req("POST", "/v1/leads/{lead}/purchase/again"), 404),
    case("unknown-lead-action", Req("POST", "/v1/leads/{lead}/refund"), 404),
    case("sql-in-path", Req("GET", f"/v1/credits/balance{SQL_IN_URL}"), 404),
    case("nul-in-path", Req("GET", "/v1/credits/balance%00"), 404),
    case("dot-dot-path", Req("GET", "/v1/credits/../../admin/leads"), (404, 405)),
]


@pytest.mark.parametrize(("req", "status", "type_"), ROUTING_CASES)
async def test_wrong_methods_and_unknown_paths_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, req: Req, status: int, type_: str | None
) -> None:
    await assert_refused(seeded, db, req, status, type_)


# --- hostile strings that are valid input ---------------------------------------------------

ODD_STRINGS = [
    SQL,
    "Robert'); DROP TABLE credit_ledger;--",
    "1 OR 1=1",
    "$$; SELECT pg_sleep(10); $$",
    "\\x00 is not a NUL; \\u0000 neither",
    "%s %(title)s {0} {title}",
    "<script>alert(1)</script>",
    "\u202eevil\u202c",
    "zero\u200bwidth\u200djoiner",
    "e\u0301 combining",
    "😀" * 50,
    "\U0001d518\U0001d52b\U0001d526 中文 العربية",  # Fraktur, CJK, Arabic
    "x" * 200,
]


async def test_sql_ish_and_odd_strings_are_stored_and_returned_verbatim(
    client: Client, db: asyncpg.Connection
) -> None:
    admin_headers = auth(ADMIN, admin=True)
    details = {SQL: SQL, "nested": {"odd": ODD_STRINGS}, "quote": 'it\'s "quoted"'}
    for i, title in enumerate(ODD_STRINGS):
        body = {"title": title, "price_credits": 1, "details": details}
        r = await client.post(
            "/admin/leads", json=body, headers={**admin_headers, "Idempotency-Key": f"{SQL} {i}"}
        )
        assert r.status_code == 201, r.text
    r = await client.get("/v1/leads", params={"limit": 200}, headers=auth(USER))
    assert r.status_code == 200, r.text
    assert [item["title"] for item in r.json()["items"]] == ODD_STRINGS

    # a user whose id, grant reason and idempotency key are SQL-ish buys the first lead
    grant_body = {"user_id": SQL, "credits": 5, "reason": SQL}
    r = await client.post(
        "/admin/credits/grants", json=grant_body, headers={**admin_headers, "Idempotency-Key": SQL}
    )
    assert r.status_code == 201, r.text
    buyer = {"Authorization": f"Bearer {token(SQL)}"}
    r = await client.post("/v1/leads/1/purchase", headers={**buyer, "Idempotency-Key": SQL})
    assert r.status_code == 201, r.text
    r = await client.get("/v1/credits/balance", headers=buyer)
    assert r.json() == {"user_id": SQL, "balance": 4}
    r = await client.get("/v1/credits/ledger", headers=buyer)
    assert [item["reason"] for item in r.json()["items"]] == ["purchase of lead 1", SQL]
    r = await client.get("/v1/leads/purchased", headers=buyer)
    [bought] = r.json()["items"]
    assert bought["title"] == SQL
    assert bought["details"] == details

    for table in TABLES:
        assert await db.fetchval("SELECT to_regclass($1)::text", table) == table
    assert await db.fetchval("SELECT count(*) FROM leads") == len(ODD_STRINGS)
    assert [r["title"] for r in await db.fetch("SELECT title FROM leads ORDER BY id")] == ODD_STRINGS
    assert await db.fetchval("SELECT key FROM idempotency_keys WHERE user_id = $1", SQL) == SQL


@pytest.mark.parametrize(
    "email",
    [SQL, "e" * 400 + "@example.com", "nul\x00@example.com", "😀@example.com"],
    ids=["sql", "over-320-chars", "nul-byte", "emoji"],
)
async def test_odd_email_claims_never_break_a_lead_purchase(
    seeded: tuple[Client, int], db: asyncpg.Connection, email: str
) -> None:
    """The email claim of a valid token is only a mail recipient: it may be dropped, never a 5xx."""
    client, lead = seeded
    headers = {"Authorization": f"Bearer {token(USER, email=email)}", "Idempotency-Key": "odd-email"}
    r = await client.post(f"/v1/leads/{lead}/purchase", headers=headers)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_problem(r, r.status_code)
    else:
        assert r.status_code == 201
        recipient = await db.fetchval("SELECT recipient FROM outbox_emails ORDER BY id DESC LIMIT 1")
        assert recipient in (email, None)


# --- nesting depth of free-form JSON ------------------------------------------------------------

MAX_DETAILS_DEPTH = 32  # docs/api.md: lead details nest at most 32 levels of objects and arrays
DEPTHS = sorted(
    {*range(1, 41), *range(900, 1001), *range(40, 900, 37), *range(1000, 1201, 7), 2000, 5000, 20_000}
)


async def test_lead_details_of_any_depth_are_201_or_400_never_5xx(
    client: Client, db: asyncpg.Connection
) -> None:
    """The details object itself is depth 1; each level of arrays inside it adds one."""
    headers = {**auth(ADMIN, admin=True), "Content-Type": "application/json"}
    created = 0
    for depth in DEPTHS:
        nested = b"[" * (depth - 1) + b"]" * (depth - 1) if depth > 1 else b'"v"'
        body = b'{"title": "deep", "price_credits": 1, "details": {"k": ' + nested + b"}}"
        r = await client.post(
            "/admin/leads", content=body, headers={**headers, "Idempotency-Key": f"depth-{depth}"}
        )
        if depth <= MAX_DETAILS_DEPTH:
            assert r.status_code == 201, (depth, r.text)
            created += 1
        else:
            assert_problem(r, 400)
    assert await db.fetchval("SELECT count(*) FROM leads") == created


@pytest.mark.parametrize("endpoint", KEYED_ENDPOINTS)
@pytest.mark.parametrize("keys", [("dup-a", "dup-b"), ("dup-same", "dup-same")], ids=["different", "same"])
async def test_duplicate_idempotency_key_headers_are_refused(
    seeded: tuple[Client, int], db: asyncpg.Connection, endpoint: str, keys: tuple[str, str]
) -> None:
    """Two keys make the request ambiguous, whichever one a proxy or framework would pick."""
    client, lead = seeded
    req = ENDPOINTS[endpoint]
    admin = endpoint in ADMIN_ENDPOINTS
    headers = [
        ("Authorization", f"Bearer {token(ADMIN if admin else USER, admin=admin)}"),
        ("Content-Type", "application/json"),
        *[("Idempotency-Key", key) for key in keys],
    ]
    before = await snapshot(db)
    r = await client.request(
        req.method,
        req.path.format_map(_path_vars(lead)),
        headers=headers,
        content=json.dumps(req.body).encode() if req.body is not NO_BODY else None,
    )
    assert_problem(r, 400, "idempotency-key-invalid")
    await assert_unchanged(db, before)


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"],
)
async def test_json_media_types_are_accepted(client: Client, content_type: str) -> None:
    r = await client.post(
        "/admin/leads",
        content=json.dumps(LEAD_BODY).encode(),
        headers={**auth(ADMIN, admin=True), "Content-Type": content_type},
    )
    assert r.status_code == 201, r.text


async def test_a_request_without_a_body_needs_no_content_type(seeded: tuple[Client, int]) -> None:
    client, lead = seeded
    r = await client.post(f"/v1/leads/{lead}/purchase", headers=auth(USER, key="no-content-type"))
    assert r.status_code == 201, r.text
