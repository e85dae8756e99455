"""The HTTP side of Idempotency-Keys: the header, what a key is bound to, and answering with a result."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response
from litestar.params import HeaderParameter

from app.context import Caller
from app.idempotency.service import KeyedRequest, Result
from app.problems import PROBLEM_JSON, IdempotencyKeyInvalid

# documented on every keyed endpoint; the services validate it
IdempotencyKeyHeader = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="1-255 printable ASCII characters; a retry with the same key replays the first answer",
        required=False,
    ),
]


def keyed(
    request: Request[Any, Any, Any], caller: Caller, key: str | None, body: msgspec.Struct | None = None
) -> KeyedRequest:
    """What an Idempotency-Key is bound to: caller, method, path and the decoded body."""
    if len(request.headers.getall("idempotency-key", [])) > 1:
        # which one counts would depend on whoever parses the headers: refuse before anything is stored
        raise IdempotencyKeyInvalid("send one Idempotency-Key header, not several")
    return KeyedRequest(
        user_id=caller.user_id,
        key=key,
        method=request.method,
        path=request.url.path,
        body=msgspec.json.encode(body) if body is not None else b"",
    )


def respond(result: Result) -> Response[Any]:
    return Response(
        result.body,
        status_code=result.status,
        media_type=PROBLEM_JSON if result.status >= 400 else "application/json",
        headers={"Idempotent-Replayed": "true"} if result.replayed else None,
    )
