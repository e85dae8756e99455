"""The HTTP shell shared by every domain's routes: dependencies, responses, problem details."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.connection.base import empty_receive, empty_send
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.params import PathParameter, QueryParameter
from litestar.types import (
    ASGIApp,
    HTTPResponseStartEvent,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)
from sqlalchemy import exc as sa_exc

from app.auth import Authenticator
from app.context import Caller
from app.observability.logging import request_id
from app.observability.metrics import DB_TIMEOUTS, DB_UNAVAILABLE
from app.problems import (
    PROBLEM_JSON,
    DatabaseTimeout,
    DatabaseUnavailable,
    InvalidJson,
    ServiceError,
    UnsupportedMediaType,
    problem,
)

log = logging.getLogger("payguard.http")

# a row id in a path: digits only, within BIGINT, so a lookup never reaches the database with nonsense
RowId = Annotated[str, PathParameter(pattern=r"^[1-9][0-9]{0,17}$", description="id")]
Limit = Annotated[int, QueryParameter(ge=1, le=200, description="page size")]
Cursor = Annotated[str | None, QueryParameter(description="next_cursor of the previous page")]

_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("unprocessable", "Unprocessable request"),
    429: ("rate-limited", "Too many requests"),
}
# uvicorn (httptools) takes headers of any size and number; a browser sends a few KiB
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it, so dashboards and 5xx alerts tell it apart
_TIMEOUT_SQLSTATES = {"57014", "55P03"}  # statement timeout / query canceled, lock not available
# besides class 08 (connection exception): admin shutdown, crash shutdown, cannot connect now
_GONE_SQLSTATES = {"57P01", "57P02", "57P03"}
DB_UNAVAILABLE_RETRY_AFTER_S = 5  # long enough for a restart or failover to make progress
_DB_CLIENT_MODULES = ("sqlalchemy.", "asyncpg.")


@dataclass(frozen=True)
class ServerFault:
    """An unhandled exception the shell answered with 500, handed to `app.state.record_fault` (if set)."""

    exc: BaseException
    method: str
    route: str  # the route template, "unmatched" outside any route
    request_id: str | None


RecordFault = Callable[[ServerFault], Awaitable[None]]


class ClientDisconnected(HTTPException):
    """The client went away before sending its whole request: nobody to answer, nothing of ours broke."""

    status_code = CLIENT_CLOSED_REQUEST


class PayguardRequest(Request[Any, Any, Any]):
    def __init__(self, scope: Scope, receive: Receive = empty_receive, send: Send = empty_send) -> None:
        async def receive_or_raise() -> ReceiveMessage:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client disconnected before sending the whole request")
            return message

        super().__init__(scope, receive_or_raise, send)

    async def json(self) -> Any:
        # called for a body only; a form's (curl -d) or a text's would otherwise be read as JSON
        if await self.body() and not is_json_media_type(self.headers.get("content-type", "")):
            raise UnsupportedMediaType("send the body as application/json")
        # one answer for every body that does not decode: malformed, not UTF-8, or nested past the decoder
        try:
            return await super().json()
        except SerializationException as exc:  # Litestar's wrapping of msgspec.DecodeError
            raise InvalidJson(f"the body is not valid JSON ({exc.__cause__ or 'malformed'})") from None
        except UnicodeDecodeError:
            raise InvalidJson("the body is not valid UTF-8") from None
        except RecursionError:
            raise InvalidJson("the body nests deeper than the JSON decoder allows") from None


async def read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes:
    """The whole request body, for a bare ASGI handler: 413 above `limit`, 499 if the client goes away."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected before sending the whole request")
        chunk: bytes = message.get("body", b"")  # type: ignore[assignment]
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413, detail=f"the body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def refuse_oversized_headers(app: ASGIApp, max_bytes: int, max_count: int) -> ASGIApp:
    """Answer 431 to a request whose headers exceed the limits, before routing, auth or a body read."""
    detail = f"send at most {max_count} headers of at most {max_bytes} bytes in all"
    body = msgspec.json.encode(
        problem(431, "request-header-fields-too-large", "Request header fields too large", detail)
    )

    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]

    async def middleware(scope: Any, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            sent: list[tuple[bytes, bytes]] = scope["headers"]
            size = sum(len(name) + len(value) + 4 for name, value in sent)
            if len(sent) > max_count or size > max_bytes:
                # new messages each time: an outer layer may add to them
                start: HTTPResponseStartEvent = {
                    "type": "http.response.start",
                    "status": 431,
                    "headers": headers,
                }
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
        await app(scope, receive, send)

    return middleware


def is_json_media_type(content_type: str) -> bool:
    """application/json or a structured application/…+json type, parameters (charset) aside."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    auth: Authenticator = request.app.state.auth
    return await auth.caller(request.headers.get("authorization"))


async def provide_admin(request: Request[Any, Any, Any]) -> Caller:
    auth: Authenticator = request.app.state.auth
    return await auth.admin(request.headers.get("authorization"))


def _problem_response(
    body: dict[str, Any], headers: dict[str, str] | None = None, background: BackgroundTask | None = None
) -> Response[Any]:
    return Response(
        body, status_code=body["status"], media_type=PROBLEM_JSON, headers=headers, background=background
    )


def on_service_error(_: Request[Any, Any, Any], exc: ServiceError) -> Response[Any]:
    return _problem_response(exc.problem(), exc.headers)


def on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if isinstance(exc, ClientDisconnected):  # the access log line and the metric record it
        body = problem(status, "client-closed-request", "Client closed request", exc.detail)
        return _problem_response(body)
    if status >= 500:
        return _internal_error(request, exc)
    if isinstance(exc, ValidationException):
        errors = [_error_without_value(e) for e in exc.extra] if isinstance(exc.extra, list) else []
        # Litestar's detail repeats the path and query string, secrets and all
        body = problem(400, "validation-error", "Invalid request", "the request is not valid", errors=errors)
    else:
        slug, title = _SLUGS.get(status, ("client-error", "Client error"))
        body = problem(status, slug, title, _without_values(exc.detail) or title)
    return _problem_response(body, exc.headers)


def _without_values(text: str) -> str:
    """Litestar and msgspec quote the offending value ('…'): keep what precedes it, the reason."""
    return text.split("'", 1)[0].rstrip(" :")


def _error_without_value(error: Any) -> dict[str, Any]:
    if not isinstance(error, dict):
        return {"message": "invalid value"}
    kept = {k: v for k, v in error.items() if k in ("key", "source")}
    return {"message": _without_values(str(error.get("message", ""))) or "invalid value", **kept}


def on_database_error(request: Request[Any, Any, Any], exc: sa_exc.DBAPIError) -> Response[Any]:
    if _is_database_timeout(exc):
        return _database_timeout(exc)
    if database_unreachable(exc):
        return _database_unavailable(exc)
    return _internal_error(request, exc)


def _is_database_timeout(exc: sa_exc.DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _TIMEOUT_SQLSTATES


def on_pool_timeout(_: Request[Any, Any, Any], exc: sa_exc.TimeoutError) -> Response[Any]:
    return _database_timeout(exc)


def _database_timeout(exc: Exception) -> Response[Any]:
    DB_TIMEOUTS.inc()
    log.warning("database timeout", extra={"error": type(exc).__name__})
    err = DatabaseTimeout("the database was too slow to answer; retry shortly")
    return _problem_response(err.problem(), err.headers)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached or dropped the connection (not a bug of ours)."""
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or any(_connection_lost(e) for e in _causes(exc.orig))
    # the pool lets errors of a failed connect through unwrapped: only those raised by the driver count
    return _connection_lost(exc) and _raised_by_database_client(exc)


def _causes(exc: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _connection_lost(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.InterfaceError):  # also raised for misuse, which is a bug of ours
        return "connection is closed" in str(exc)
    if isinstance(exc, OSError):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and (
        sqlstate.startswith("08") or sqlstate in _GONE_SQLSTATES
    )


def _raised_by_database_client(exc: BaseException) -> bool:
    return any(
        str(frame.f_globals.get("__name__", "")).startswith(_DB_CLIENT_MODULES)
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def _database_unavailable(exc: Exception) -> Response[Any]:
    DB_UNAVAILABLE.inc()
    log.warning("database unavailable", extra={"error": type(exc).__name__})
    err = DatabaseUnavailable("the database cannot be reached; retry shortly", DB_UNAVAILABLE_RETRY_AFTER_S)
    return _problem_response(err.problem(), err.headers)


def on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if database_unreachable(exc):
        return _database_unavailable(exc)
    return _internal_error(request, exc)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("unhandled error", exc_info=exc)
    # recorded after the answer is sent, by a recorder that never raises: a database that is down
    # costs the record, never the client's problem detail
    record: RecordFault | None = request.app.state.get("record_fault")
    fault = ServerFault(
        exc, request.method, request.scope.get("path_template") or "unmatched", request_id.get()
    )
    return _problem_response(
        problem(500, "internal-error", "Internal server error", "the error was logged; retry later"),
        background=BackgroundTask(record, fault) if record is not None else None,
    )


def is_internal_error(exc: BaseException) -> bool:
    """Whether the handlers below answer `exc` with 500 internal-error (Sentry gets those, and only those)."""
    if isinstance(exc, ServiceError | sa_exc.TimeoutError):
        return False
    if isinstance(exc, HTTPException):
        return exc.status_code >= 500
    if isinstance(exc, sa_exc.DBAPIError) and _is_database_timeout(exc):
        return False
    return not database_unreachable(exc)


EXCEPTION_HANDLERS: Any = {
    ServiceError: on_service_error,
    HTTPException: on_http_exception,
    sa_exc.DBAPIError: on_database_error,
    sa_exc.TimeoutError: on_pool_timeout,
    Exception: on_unexpected,
}
