import msgspec
from litestar import Controller, Router, asgi, post
from litestar.di import NamedDependency
from litestar.exceptions import MethodNotAllowedException
from litestar.params import JSONBody
from litestar.types import Receive, Scope, Send

from app.context import Caller
from app.http import read_body
from app.services import Services
from app.webhooks import replay, service
from app.webhooks.schemas import Received, ReplayOut, ReplayRequest

_ANSWERS = {dup: msgspec.json.encode(Received(received=True, duplicate=dup)) for dup in (False, True)}
_JSON = [(b"content-type", b"application/json")]


@asgi("/stripe", copy_scope=False)
async def receive_stripe_event(scope: Scope, receive: Receive, send: Send) -> None:
    """POST a Stripe event (signed with Stripe-Signature): 200 {received, duplicate} once it is stored.

    A bare ASGI handler: the hot path skips dependency injection and response building
    (docs/performance.md); errors still go through the shell's problem details.
    """
    if scope.get("method") != "POST":
        raise MethodNotAllowedException(headers={"Allow": "POST"})
    state = scope["litestar_app"].state
    settings = state.services.settings
    headers = dict(scope["headers"])
    body = await read_body(receive, settings.webhook_max_body_bytes, headers.get(b"content-length"))
    signature = headers.get(b"stripe-signature")
    duplicate = await service.receive_event(
        settings, state.events, body, signature.decode("latin-1") if signature is not None else None
    )
    answer = _ANSWERS[duplicate]
    length = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": _JSON + length})
    await send({"type": "http.response.body", "body": answer, "more_body": False})


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


WEBHOOK_ROUTES = Router("/webhooks", route_handlers=[receive_stripe_event])
