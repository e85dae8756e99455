from typing import Any

from litestar import Controller, Request, Router, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.config import Settings
from app.context import Caller
from app.services import Services
from app.webhooks import replay, service
from app.webhooks.schemas import Received, ReplayOut, ReplayRequest


@post(
    "/stripe",
    status_code=200,
    summary="Receive a Stripe event (signed with Stripe-Signature); answered once it is stored",
    security=[],
    tags=["webhooks"],
)
async def receive_stripe_event(
    request: Request[Any, Any, Any], services: NamedDependency[Services]
) -> Received:
    body = await request.body()
    writer: service.EventWriter = request.app.state.events
    duplicate = await service.receive_event(
        services.settings, writer, body, request.headers.get("stripe-signature")
    )
    return Received(received=True, duplicate=duplicate)


class ReplayController(Controller):
    path = "/admin/webhooks"
    tags = ["admin"]

    @post(
        "/replay",
        status_code=200,
        summary="Re-apply stored events of a time range (dry_run: say what would change)",
    )
    async def replay(
        self,
        services: NamedDependency[Services],
        admin: NamedDependency[Caller],
        data: JSONBody[ReplayRequest],
    ) -> ReplayOut:
        return await replay.replay_events(services, data)


def webhook_routes(settings: Settings) -> Router:
    """Stripe's events can be larger than an API request: their own body limit (413 above it)."""
    return Router(
        "/webhooks",
        route_handlers=[receive_stripe_event],
        request_max_body_size=settings.webhook_max_body_bytes,
    )
