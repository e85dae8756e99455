"""Replay stored events of a time range through the same idempotent handlers the worker runs.

Each event is re-applied in its own transaction under the locks its handler takes; a dry
run rolls every one back and reports what would have changed. Nothing is applied twice:
the handlers are idempotent per event and per intent.
"""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import text

from app.credits.service import Settlement
from app.failures.models import FailureStatus, OperationKind
from app.problems import ServiceError
from app.services import Services
from app.webhooks.models import EventStatus
from app.webhooks.schemas import ReplayedEvent, ReplayOut, ReplayRequest
from app.webhooks.tasks import LOCK_EVENT, apply_event, mark_done

CHANGES = (Settlement.GRANTED, Settlement.MARKED_FAILED, Settlement.REVERSED)


class InvalidRange(ServiceError):
    status, type, title = 400, "invalid-range", "Invalid replay range"


_MATCH = text(
    "SELECT id, event_id, type FROM webhook_events WHERE received_at >= :start AND received_at < :end"
    " AND (CAST(:types AS text[]) IS NULL OR type = ANY(CAST(:types AS text[])))"
    " AND status <> :pending ORDER BY stripe_created, id LIMIT :limit"
)
# taken before the event's row, in the order a retry takes them (its failed operation, then the event)
_LOCK_OPERATION = text(
    "SELECT id FROM failed_operations WHERE kind = :kind AND reference = :reference FOR UPDATE"
)
# a replay that handles a failed event settles its failed operation; a retry in flight is fenced out
_RESOLVE = text(
    "UPDATE failed_operations SET status = :succeeded, next_attempt_at = NULL, lease_token = NULL,"
    " lease_expires_at = NULL, updated_at = now(), history = history || jsonb_build_array(jsonb_build_object("
    "'attempt', attempts, 'at', now(), 'outcome', 'replayed', 'error', NULL))"
    " WHERE kind = :kind AND reference = :reference AND status <> :succeeded"
)


async def replay_events(services: Services, request: ReplayRequest) -> ReplayOut:
    """Re-apply the events received in [from, to) that the worker is done with (pending ones are its own)."""
    if request.start.tzinfo is None or request.end.tzinfo is None:
        raise InvalidRange("from and to need a time zone (2026-01-01T00:00:00Z)")
    try:  # a time zone can carry year 1 or 9999 out of what a datetime (and PostgreSQL's driver) holds
        start, end = request.start.astimezone(UTC), request.end.astimezone(UTC)
    except OverflowError:
        raise InvalidRange("from and to must be within years 1-9999 in UTC") from None
    if start >= end:
        raise InvalidRange("from must be before to")
    limit = services.settings.replay_max_events
    params = {
        "start": start,
        "end": end,
        "types": request.types,
        "pending": EventStatus.PENDING,
        "limit": limit + 1,
    }
    async with services.sessions() as session:
        matched = (await session.execute(_MATCH, params)).all()
    if len(matched) > limit:
        raise InvalidRange(f"more than {limit} events in the range; replay a narrower one")
    events, changed, replayed = [], 0, 0
    for match in matched:
        outcome = await _replay_one(services, match.id, match.event_id, dry_run=request.dry_run)
        events.append(ReplayedEvent(match.event_id, match.type, outcome))
        if outcome in CHANGES:
            changed += 1
            replayed += not request.dry_run
    return ReplayOut(len(matched), changed, replayed, request.dry_run, events)


async def _replay_one(services: Services, row_id: int, event_id: str, *, dry_run: bool) -> str:
    async with services.sessions() as session:
        tx = await session.begin()
        conn = await session.connection()
        try:
            await conn.execute(_LOCK_OPERATION, {"kind": OperationKind.WEBHOOK, "reference": event_id})
            event = (await conn.execute(LOCK_EVENT, {"id": row_id})).first()
            if event is None:
                return "pruned"
            try:
                async with conn.begin_nested():
                    outcome = await apply_event(conn, services, event.type, event.payload)
            except Exception as exc:
                return f"error: {exc}"
            if dry_run:
                return outcome
            if event.status in (EventStatus.FAILED, EventStatus.DEAD):  # its failure is resolved now
                await mark_done(conn, [(event.id, outcome)])
                await conn.execute(
                    _RESOLVE,
                    {
                        "succeeded": FailureStatus.SUCCEEDED,
                        "kind": OperationKind.WEBHOOK,
                        "reference": event.event_id,
                    },
                )
            await tx.commit()
            return outcome
        finally:
            if tx.is_active:
                await tx.rollback()
