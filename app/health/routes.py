from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.auth import Authenticator
from app.health import service
from app.services import Services


@get("/health/live", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "ok"}


@get("/health/ready", tags=["health"])
async def ready(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> Response[dict[str, str]]:
    auth: Authenticator = request.app.state.auth
    checks = {"database": "ok" if await service.database_ready(services) else "unreachable"}
    if auth.uses_key_set:  # without its keys no bearer token can be verified
        checks["jwks"] = "ok" if await auth.key_set_reachable() else "unreachable"
    if all(state == "ok" for state in checks.values()):
        return Response({"status": "ok", **checks})
    return Response({"status": "unavailable", **checks}, status_code=503)


@get("/metrics", tags=["health"], include_in_schema=False)
async def metrics(services: NamedDependency[Services]) -> Response[bytes]:
    await service.observe_queues(services)
    await service.observe_jobs(services)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [live, ready, metrics]
