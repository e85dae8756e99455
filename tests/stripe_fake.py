"""A Stripe-shaped HTTP server on loopback for the official SDK's requests.

It behaves like Stripe where our guarantees depend on it: form-encoded
parameters, secret-key auth, and idempotency keys (same key and parameters
replay the first answer; same key with other parameters is an error).
It records every request so tests can count what reached "Stripe".
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl


def _unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`metadata[a]=1&x=2` -> {"metadata": {"a": "1"}, "x": "2"} (one level is all we send)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if "[" in key:
            outer, inner = key.split("[", 1)
            out.setdefault(outer, {})[inner.rstrip("]")] = value
        else:
            out[key] = value
    return out


@dataclass
class FakeStripe:
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    create_requests: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    failures_to_inject: list[int] = field(default_factory=list)  # statuses for the next creates
    after_create: Any = None  # called once an intent exists, before the answer is sent (crash tests)
    _by_key: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def reset(self) -> None:
        with self._lock:
            self.intents.clear()
            self.create_requests.clear()
            self.failures_to_inject.clear()
            self.after_create = None
            self._by_key.clear()

    def create_intent(self, key: str | None, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.create_requests.append((key, params))
            if key is not None and key in self._by_key:
                first_params, status, body = self._by_key[key]
                if first_params != params:
                    return 400, {
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with the same parameters",
                        }
                    }
                return status, body
            if self.failures_to_inject:
                return self.failures_to_inject.pop(0), {
                    "error": {"type": "api_error", "message": "injected failure"}
                }
            n = next(self._ids)
            intent = {
                "id": f"pi_fake{n:06d}",
                "object": "payment_intent",
                "amount": int(params["amount"]),
                "currency": params["currency"],
                "client_secret": f"pi_fake{n:06d}_secret_{n * 7919:x}",
                "status": "requires_payment_method",
                "metadata": params.get("metadata", {}),
                "livemode": False,
                "created": int(time.time()),
            }
            self.intents[intent["id"]] = intent
            if key is not None:
                self._by_key[key] = (params, 200, intent)
            return 200, intent


class _Handler(BaseHTTPRequestHandler):
    fake: FakeStripe

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Request-Id", f"req_{time.monotonic_ns()}")
        self.end_headers()
        self.wfile.write(raw)

    def _authorized(self) -> bool:
        if (self.headers.get("Authorization") or "").startswith("Bearer sk_test_"):
            return True
        self._send(401, {"error": {"type": "invalid_request_error", "message": "Invalid API Key"}})
        return False

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        params = _unflatten(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
        if not self._authorized():
            return
        if self.path == "/v1/payment_intents":
            status, body = self.fake.create_intent(self.headers.get("Idempotency-Key"), params)
            if self.fake.after_create is not None:
                self.fake.after_create()
            self._send(status, body)
        else:
            self._send(404, {"error": {"type": "invalid_request_error", "message": "no such route"}})

    def do_GET(self) -> None:
        if not self._authorized():
            return
        intent_id = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/v1/payment_intents/") and intent_id in self.fake.intents:
            self._send(200, self.fake.intents[intent_id])
        else:
            self._send(404, {"error": {"type": "invalid_request_error", "message": "No such intent"}})


def start_fake_stripe() -> tuple[FakeStripe, ThreadingHTTPServer]:
    fake = FakeStripe()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake, server
