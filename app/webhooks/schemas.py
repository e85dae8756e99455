from __future__ import annotations

from datetime import datetime

import msgspec

# Stripe's ids are short; a longer one is not Stripe's
StripeId = msgspec.Meta(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")


class Received(msgspec.Struct):
    received: bool
    duplicate: bool


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True, rename={"start": "from", "end": "to"}):
    start: datetime
    end: datetime
    types: list[str] | None = None
    dry_run: bool = True  # the safe default: say what would change


class ReplayedEvent(msgspec.Struct):
    event_id: str
    type: str
    outcome: str  # what the handler did (or would do), or the error it raised


class ReplayOut(msgspec.Struct):
    matched: int
    would_change: int
    replayed: int
    dry_run: bool
    events: list[ReplayedEvent]
