"""create_app(): wiring only."""

from __future__ import annotations

import asyncio
from functools import partial

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from sentry_sdk.transport import Transport
from sqlalchemy.ext.asyncio import AsyncEngine

from app.auth import Authenticator
from app.config import Settings
from app.credits.routes import CreditsAdminController, CreditsController
from app.db.engine import create_engine, session_factory
from app.errors import service as errors
from app.errors.routes import ErrorLogsController, error_report_routes
from app.errors.sentry import start_sentry, stop_sentry
from app.failures.routes import FailedOperationsController
from app.health.routes import ROUTES as HEALTH_ROUTES
from app.http import (
    EXCEPTION_HANDLERS,
    PayguardRequest,
    provide_admin,
    provide_caller,
    refuse_oversized_headers,
)
from app.jobs.routes import JobsController
from app.jobs.scheduler import JobScheduler
from app.leads.routes import LeadsAdminController, LeadsController
from app.observability.http import observe_requests
from app.payments.gateway import PaymentGateway
from app.reservations.routes import ReservationsAdminController, ReservationsController, TicketTypesController
from app.services import Services
from app.webhooks.routes import WEBHOOK_ROUTES, ReplayController
from app.webhooks.service import EventWriter
from app.worker.registry import OPERATIONS
from app.worker.runner import Worker


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def build_services(settings: Settings, engine: AsyncEngine) -> Services:
    """What every use case is handed, the same in `serve` and in `payguard worker`."""
    return Services(settings, session_factory(engine), PaymentGateway(settings), OPERATIONS)


def create_app(
    settings: Settings, database_url: str, *, sentry_transport: Transport | None = None
) -> Litestar:
    """`sentry_transport` replaces the Sentry SDK's HTTP transport when SENTRY_DSN is set (tests)."""
    sentry = start_sentry(settings, sentry_transport)  # before Litestar(): the integration wraps the app
    engine = create_engine(settings, database_url)
    services = build_services(settings, engine)
    worker = Worker(services, engine)
    jobs = JobScheduler(services)
    events = EventWriter(engine)
    running: list[asyncio.Task[None]] = []

    async def start_worker_and_jobs() -> None:
        if settings.run_worker:  # off where a worker Deployment runs it
            running.append(asyncio.create_task(worker.run()))
        if settings.run_jobs:  # off where CronJobs run them
            jobs.start()

    async def stop_worker_then_engine() -> None:
        worker.stop()
        await jobs.stop()
        await asyncio.gather(*running)
        await events.close()
        await engine.dispose()
        if sentry:
            await stop_sentry()

    app = Litestar(
        route_handlers=[
            *HEALTH_ROUTES,
            CreditsController,
            CreditsAdminController,
            LeadsController,
            LeadsAdminController,
            TicketTypesController,
            ReservationsController,
            ReservationsAdminController,
            FailedOperationsController,
            error_report_routes(settings),
            ErrorLogsController,
            ReplayController,
            JobsController,
            WEBHOOK_ROUTES,
        ],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "caller": Provide(provide_caller),
            "admin": Provide(provide_admin),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        request_class=PayguardRequest,
        on_startup=[start_worker_and_jobs],
        on_shutdown=[stop_worker_then_engine],
        openapi_config=OpenAPIConfig(
            title="payguard",
            version="1",
            path="/schema",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
            ),
            security=[{"bearer": []}],
        ),
        logging_config=None,
        debug=False,
    )
    app.state.services = services
    app.state.worker = worker
    app.state.auth = Authenticator(settings)
    app.state.events = events
    app.state.record_fault = partial(errors.record_server_error, services)  # the shell's 500s
    # outermost layer, so 404s and 405s raised while routing are counted and logged too, and so are
    # requests refused for their headers before anything else runs
    app.asgi_handler = observe_requests(
        refuse_oversized_headers(app.asgi_handler, settings.max_header_bytes, settings.max_header_count)
    )
    return app
