"""Server exceptions to Sentry when SENTRY_DSN is set, through sentry-sdk's Litestar integration.

Only what the shell answers with 500 is sent (a typed 4xx or a database outage is not a bug),
tagged with the request id. Nothing personal or secret goes: no default PII, no local variables,
no request bodies (PII stays in PostgreSQL), and every other part of an event goes through the
same scrubber as the error logs.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import sentry_sdk
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.litestar import LitestarIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport
from sentry_sdk.types import Event, Hint

from app.config import Settings
from app.errors.scrub import scrub_json
from app.http import is_internal_error
from app.observability.logging import request_id

FLUSH_TIMEOUT_S = 2.0  # at shutdown, how long queued events may take to leave
# the SDK's own values: ids and timestamps (a long id could pass for a card number), runtime facts
_NOT_SCRUBBED = frozenset({"event_id", "timestamp", "start_timestamp", "contexts", "sdk", "modules", "level"})


def start_sentry(settings: Settings, transport: Transport | None = None) -> bool:
    """Turn Sentry on when SENTRY_DSN is set (before the app is built: the integration wraps it).
    `transport` replaces the SDK's HTTP one (tests keep events in memory)."""
    if not settings.sentry_dsn:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        transport=transport,
        # send_default_pii is left unset, which means False (sentry-sdk 2.75 deprecates passing it):
        # no user, no client address, sensitive headers filtered
        include_local_variables=False,
        max_request_body_size="never",
        default_integrations=False,
        auto_enabling_integrations=False,
        # log lines become breadcrumbs, never events of their own: the 500 is sent once, as an exception
        integrations=[LitestarIntegration(), LoggingIntegration(event_level=None), DedupeIntegration()],
        before_send=scrub_event,
    )
    return True


def scrub_event(event: Event, hint: Hint) -> Event | None:
    """The before_send hook: drop what is not a 500, strip bodies, scrub the rest, add the request id."""
    exc_info = hint.get("exc_info")
    if not exc_info or not is_internal_error(exc_info[1]):
        return None
    raw = cast(dict[str, Any], event)
    request = raw.get("request")
    if isinstance(request, dict):
        for part in ("data", "cookies"):
            request.pop(part, None)
    scrubbed = {key: value if key in _NOT_SCRUBBED else scrub_json(value) for key, value in raw.items()}
    if rid := request_id.get():
        scrubbed["tags"] = {**(scrubbed.get("tags") or {}), "request_id": rid}
    return cast(Event, scrubbed)


async def stop_sentry() -> None:
    """Send what is queued, then turn Sentry off for this process."""
    client = sentry_sdk.get_client()
    if client.is_active():
        await asyncio.to_thread(client.close, FLUSH_TIMEOUT_S)
    sentry_sdk.get_global_scope().set_client(None)
