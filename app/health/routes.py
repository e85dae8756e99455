from litestar import Response, get
from litestar.di import NamedDependency
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.health import service
from app.services import Services


@get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "ok"}


@get("/health/ready", tags=["health"])
async def ready(services: NamedDependency[Services]) -> Response[dict[str, str]]:
    if await service.database_ready(services):
        return Response({"status": "ok"})
    return Response({"status": "unavailable", "database": "unreachable"}, status_code=503)


@get("/metrics", tags=["health"], include_in_schema=False)
async def metrics() -> Response[bytes]:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [live, ready, metrics]
