from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from app.context import Caller
from app.http import Cursor, Limit
from app.jobs import service
from app.jobs.models import JobName
from app.jobs.schemas import JobRunPage, OperationsHealth
from app.services import Services


class JobsController(Controller):
    path = "/admin"
    tags = ["admin"]

    @get("/jobs/runs", summary="Runs of the jobs (cleanup, health, reconcile), newest first")
    async def list_runs(
        self,
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        job: Annotated[JobName | None, QueryParameter(description="cleanup, health or reconcile")] = None,
        cursor: Cursor = None,
        limit: Limit = 50,
    ) -> JobRunPage:
        return await service.list_runs(services, job=job, cursor=cursor, limit=limit)

    @get("/operations-health", summary="Failure rates and counts of the last hour, and the open alerts")
    async def operations_health(
        self, services: NamedDependency[Services], admin: NamedDependency[Caller]
    ) -> OperationsHealth:
        return await service.operations_health(services)
