"""The HTTP shell shared by every domain's routes: dependencies, responses, problem details."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import QueryParameter
from sqlalchemy import exc as sa_exc

from app.auth import Authenticator
from app.context import Caller
from app.observability.metrics import DB_TIMEOUTS
from app.problems import PROBLEM_JSON, DatabaseTimeout, ServiceError, problem

log = logging.getLogger("payguard.http")

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
_TIMEOUT_SQLSTATES = {"57014", "55P03"}  # statement timeout / query canceled, lock not available


class PayguardRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        # Litestar turns msgspec.DecodeError into a 400, but not these two
        try:
            return await super().json()
        except (UnicodeDecodeError, RecursionError):
            raise ValidationException("the request body is not UTF-8 JSON of reasonable depth") from None


async def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    auth: Authenticator = request.app.state.auth
    return await auth.caller(request.headers.get("authorization"))


async def provide_admin(request: Request[Any, Any, Any]) -> Caller:
    auth: Authenticator = request.app.state.auth
    return await auth.admin(request.headers.get("authorization"))


def _problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(body, status_code=body["status"], media_type=PROBLEM_JSON, headers=headers)


def on_service_error(_: Request[Any, Any, Any], exc: ServiceError) -> Response[Any]:
    return _problem_response(exc.problem(), exc.headers)


def on_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status >= 500:
        return _internal_error(exc)
    if isinstance(exc, ValidationException):
        errors = exc.extra if isinstance(exc.extra, list) else []
        body = problem(400, "validation-error", "Invalid request", exc.detail, errors=errors)
    else:
        slug, title = _SLUGS.get(status, ("client-error", "Client error"))
        body = problem(status, slug, title, exc.detail or title)
    return _problem_response(body, exc.headers)


def on_database_error(_: Request[Any, Any, Any], exc: sa_exc.DBAPIError) -> Response[Any]:
    if getattr(exc.orig, "sqlstate", None) in _TIMEOUT_SQLSTATES:
        return _database_timeout(exc)
    return _internal_error(exc)


def on_pool_timeout(_: Request[Any, Any, Any], exc: sa_exc.TimeoutError) -> Response[Any]:
    return _database_timeout(exc)


def _database_timeout(exc: Exception) -> Response[Any]:
    DB_TIMEOUTS.inc()
    log.warning("database timeout", extra={"error": type(exc).__name__})
    err = DatabaseTimeout("the database was too slow to answer; retry shortly")
    return _problem_response(err.problem(), err.headers)


def on_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _internal_error(exc)


def _internal_error(exc: Exception) -> Response[Any]:
    log.error("unhandled error", exc_info=exc)
    return _problem_response(
        problem(500, "internal-error", "Internal server error", "the error was logged; retry later")
    )


EXCEPTION_HANDLERS: Any = {
    ServiceError: on_service_error,
    HTTPException: on_http_exception,
    sa_exc.DBAPIError: on_database_error,
    sa_exc.TimeoutError: on_pool_timeout,
    Exception: on_unexpected,
}
