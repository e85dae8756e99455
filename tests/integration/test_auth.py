"""Bearer tokens: HS256 secret, RS256 from a JWKS URL, roles."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fixtures.app import TEST_SECRET, AppFactory, Client, token


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "missing"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "wrong scheme"),
        ({"Authorization": "Bearer"}, "empty"),
        (bearer("not.a.jwt"), "garbage"),
        (bearer(token("u1", ttl=-120)), "expired"),
        (bearer(token("u1", secret="another-secret-of-sufficient-length-000000")), "wrong secret"),
        (
            bearer(jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, key=None, algorithm="none")),
            "alg none",
        ),
        (bearer(jwt.encode({"exp": int(time.time()) + 60}, TEST_SECRET, algorithm="HS256")), "no sub"),
        (
            bearer(jwt.encode({"sub": 7, "exp": int(time.time()) + 60}, TEST_SECRET, algorithm="HS256")),
            "int sub",
        ),
        (bearer(jwt.encode({"sub": "u1"}, TEST_SECRET, algorithm="HS256")), "no exp"),
        (bearer("a" * 9000), "huge"),
    ],
)
async def test_bad_tokens_are_401_problems(client: Client, headers: dict[str, str], why: str) -> None:
    r = await client.get("/v1/credits/balance", headers=headers)
    assert r.status_code == 401, why
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_admin_endpoints_need_the_admin_role(client: Client) -> None:
    r = await client.post(
        "/admin/leads", json={"title": "t", "price_credits": 1}, headers=bearer(token("u1"))
    )
    assert r.status_code == 403
    assert r.json()["type"] == "forbidden"
    ok = await client.post(
        "/admin/leads", json={"title": "t", "price_credits": 1}, headers=bearer(token("a", admin=True))
    )
    assert ok.status_code == 201


@pytest.fixture(scope="module")
def jwks() -> Iterator[tuple[str, Any]]:
    """A JWKS endpoint on loopback, as an identity provider would serve it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json", key
    server.shutdown()


async def test_rs256_tokens_verified_against_jwks(make_client: AppFactory, jwks: tuple[str, Any]) -> None:
    url, key = jwks
    client = await make_client(jwt_secret=None, jwks_url=url)
    now = int(time.time())
    good = jwt.encode({"sub": "u9", "exp": now + 60}, key, algorithm="RS256", headers={"kid": "k1"})
    r = await client.get("/v1/credits/balance", headers=bearer(good))
    assert r.status_code == 200 and r.json()["user_id"] == "u9"
    # an HS256 token is refused when the service trusts the key set only
    r = await client.get("/v1/credits/balance", headers=bearer(token("u9")))
    assert r.status_code == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "u9", "exp": now + 60}, other, algorithm="RS256", headers={"kid": "k1"})
    assert (await client.get("/v1/credits/balance", headers=bearer(forged))).status_code == 401


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connecting is refused


async def test_an_unreachable_key_set_is_a_503_not_a_401(
    make_client: AppFactory, jwks: tuple[str, Any]
) -> None:
    _, key = jwks
    client = await make_client(jwt_secret=None, jwks_url=f"http://127.0.0.1:{_closed_port()}/jwks.json")
    good = jwt.encode(
        {"sub": "u9", "exp": int(time.time()) + 60}, key, algorithm="RS256", headers={"kid": "k1"}
    )
    r = await client.get("/v1/credits/balance", headers=bearer(good))
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"] == "auth-unavailable"
    assert int(r.headers["retry-after"]) >= 1
    # a token that could never be valid is still a 401, key set or not
    assert (await client.get("/v1/credits/balance", headers=bearer("not.a.jwt"))).status_code == 401
    ready = await client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": "ok", "jwks": "unreachable"}


async def test_readiness_checks_the_key_set(make_client: AppFactory, jwks: tuple[str, Any]) -> None:
    url, _ = jwks
    client = await make_client(jwt_secret=None, jwks_url=url)
    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ok", "database": "ok", "jwks": "ok"}
