from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from app.context import Caller
from app.failures import service
from app.failures.models import FailureStatus, OperationKind
from app.failures.schemas import FailedOperationOut, FailedOperationPage, FailureDetail
from app.http import Cursor, Limit, RowId
from app.services import Services


class FailedOperationsController(Controller):
    path = "/admin/failed-operations"
    tags = ["admin"]

    @get("/", summary="Failed operations, newest first")
    async def list_operations(
        self,
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        kind: Annotated[OperationKind | None, QueryParameter(description="email, webhook, ...")] = None,
        status: Annotated[FailureStatus | None, QueryParameter(description="pending, dead, ...")] = None,
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> FailedOperationPage:
        return await service.list_failed_operations(
            services, kind=kind, status=status, cursor=cursor, limit=limit
        )

    @get("/{op_id:str}", summary="One failed operation, its payload and every attempt")
    async def show(
        self, services: NamedDependency[Services], admin: NamedDependency[Caller], op_id: RowId
    ) -> FailureDetail:
        return await service.get_failed_operation(services, int(op_id))

    @post("/{op_id:str}/retry", status_code=202, summary="Retry now (a dead one gets one more attempt)")
    async def retry(
        self, services: NamedDependency[Services], admin: NamedDependency[Caller], op_id: RowId
    ) -> FailedOperationOut:
        return await service.retry_failed_operation(services, int(op_id))

    @post("/{op_id:str}/discard", status_code=200, summary="Give up on it: never attempted again")
    async def discard(
        self, services: NamedDependency[Services], admin: NamedDependency[Caller], op_id: RowId
    ) -> FailedOperationOut:
        return await service.discard_failed_operation(services, int(op_id))
