from typing import Any

from litestar import Request, Router, post
from litestar.di import NamedDependency

from app.config import Settings
from app.services import Services
from app.webhooks import service
from app.webhooks.schemas import Received


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


def webhook_routes(settings: Settings) -> Router:
    """Stripe's events can be larger than an API request: their own body limit (413 above it)."""
    return Router(
        "/webhooks",
        route_handlers=[receive_stripe_event],
        request_max_body_size=settings.webhook_max_body_bytes,
    )
