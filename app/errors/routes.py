from typing import Annotated, Any

from litestar import Controller, Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter

from app.config import Settings
from app.context import Caller
from app.errors import service
from app.errors.models import Severity
from app.errors.schemas import SOURCE_PATTERN, ErrorAccepted, ErrorLogOut, ErrorLogPage, ErrorReport
from app.http import Cursor, Limit, RowId
from app.idempotency.http import IdempotencyKeyHeader, keyed, respond
from app.services import Services


@post("/", status_code=202, summary="Report a client error (secrets are scrubbed before it is stored)")
async def report_error(
    request: Request[Any, Any, Any],
    services: NamedDependency[Services],
    caller: NamedDependency[Caller],
    data: JSONBody[ErrorReport],
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response[ErrorAccepted]:
    req = keyed(request, caller, idempotency_key, data)
    return respond(await service.report_error(services, req, data))


def error_report_routes(settings: Settings) -> Router:
    """POST /v1/errors under its own body limit (PAYGUARD_ERROR_MAX_BODY_BYTES)."""
    return Router(
        "/v1/errors",
        route_handlers=[report_error],
        request_max_body_size=settings.error_max_body_bytes,
        tags=["errors"],
    )


class ErrorLogsController(Controller):
    path = "/admin/errors"
    tags = ["admin"]

    @get("/", summary="Error logs, newest first")
    async def list_errors(
        self,
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        severity: Annotated[Severity | None, QueryParameter(description="debug, info, ...")] = None,
        source: Annotated[
            str | None, QueryParameter(pattern=SOURCE_PATTERN, description="server, or a client's source")
        ] = None,
        resolved: Annotated[bool | None, QueryParameter(description="true or false")] = None,
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> ErrorLogPage:
        return await service.list_errors(
            services, severity=severity, source=source, resolved=resolved, cursor=cursor, limit=limit
        )

    @post("/{error_id:str}/resolve", status_code=200, summary="Mark resolved (again: no change)")
    async def resolve(
        self, services: NamedDependency[Services], admin: NamedDependency[Caller], error_id: RowId
    ) -> ErrorLogOut:
        return await service.resolve_error(services, admin, int(error_id))
