"""Outermost ASGI layer: request id, RED metrics by route template, one access-log line."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Send

from app.observability.logging import request_id
from app.observability.metrics import HTTP_LATENCY, HTTP_REQUESTS

log = logging.getLogger("payguard.http")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def observe_requests(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route, str(status)).observe(elapsed)
            log.info(
                "request",
                extra={"method": method, "route": route, "status": status, "ms": round(elapsed * 1e3, 2)},
            )
            request_id.reset(token)

    return middleware
