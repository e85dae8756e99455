"""What the worker does with stored Stripe events: handle each once, in order per PaymentIntent.

A claim takes only events with no older unfinished event about the same object, so the
events of one intent are handled one at a time in Stripe's `created` order while other
intents proceed in parallel. Handlers are idempotent per event and per intent: the
purchase only moves forward (see PurchaseStatus), so a late older event changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.credits import service as credits
from app.failures import service as failures
from app.failures.engine import RetryLater
from app.failures.models import FailureStatus, OperationKind
from app.http import database_unreachable
from app.observability.metrics import (
    WEBHOOK_LAG,
    WORK_DONE,
    Queue,
    WorkOutcome,
)
from app.reservations import service as reservations
from app.services import Services
from app.webhooks.models import UNFINISHED, EventStatus
from app.webhooks.service import HANDLED_TYPES, metric_type
from app.worker.leases import (
    FENCED,
    Claimed,
    Commit,
    claim_statement,
    fence_statement,
    fenced_attempt,
)

log = logging.getLogger("payguard.webhooks")

# due events, at most one per object: the oldest unfinished one of each (statuses inlined, not
# bound: a cached generic plan can then use the partial indexes, leases.py). OFFSET 0 keeps the
# ordering rule a subplan run per candidate, which probes the index with that candidate's object:
# as a join, a plan cached while the table was empty scans every unfinished event per candidate,
# and stays cached when a burst arrives (tests/integration/test_claim_plans.py)
CLAIM = claim_statement(
    "webhook_events",
    f"t.status = '{EventStatus.PENDING}' AND NOT EXISTS (SELECT 1 FROM webhook_events o"  # noqa: S608 (enums)
    f" WHERE o.object_id = t.object_id AND o.status IN ('{EventStatus.PENDING}', '{EventStatus.FAILED}')"
    " AND (o.stripe_created, o.id) < (t.stripe_created, t.id) OFFSET 0)",
    "t.id",
    "w.id, w.event_id, w.type, w.payload::text AS payload, w.received_at",  # text: msgspec decodes it
)
_FENCE = fence_statement("webhook_events")
_EVENT = text("SELECT type, payload FROM webhook_events WHERE id = :id")
LOCK_EVENT = text(
    "SELECT id, event_id, type, payload, received_at, status FROM webhook_events WHERE id = :id FOR UPDATE"
)
_FENCE_BATCH = text(
    "SELECT t.id FROM webhook_events t JOIN unnest(CAST(:ids AS bigint[]), CAST(:tokens AS bigint[]))"
    " AS c(id, token) ON t.id = c.id AND t.lease_token = c.token ORDER BY t.id FOR UPDATE OF t"
)
_DONE = text(
    "UPDATE webhook_events w SET status = d.status, outcome = d.outcome, attempts = w.attempts + 1,"
    " handled_at = now(), lease_token = NULL, lease_expires_at = NULL"
    " FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:outcomes AS text[]))"
    " AS d(id, status, outcome) WHERE w.id = d.id"
)
_FAILED = text(
    "UPDATE webhook_events SET status = :status, attempts = attempts + 1, lease_token = NULL,"
    " lease_expires_at = NULL WHERE id = :id"
)


class _Object(msgspec.Struct):
    id: str | None = None
    payment_intent: str | None = None
    amount: int = 0
    amount_received: int | None = None
    amount_refunded: int = 0
    currency: str = ""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class _Data(msgspec.Struct):
    object: _Object


class _Event(msgspec.Struct):
    data: _Data


def _object(payload: Any) -> _Object:
    """The event's object, from the stored JSON text or a decoded payload."""
    if isinstance(payload, dict):
        return msgspec.convert(payload, _Event).data.object
    return msgspec.json.decode(payload, type=_Event).data.object


def _paid(obj: _Object) -> credits.Paid:
    assert obj.id is not None
    paid = obj.amount_received if obj.amount_received is not None else obj.amount
    return credits.Paid(obj.id, paid, obj.currency)


def _unrecorded(settled: str, obj: _Object) -> bool:
    """Made for one of our purchases, whose phase has not stored the intent id yet: money was taken,
    so never ignored; retried, and dead (a human looks) if the id never appears."""
    return settled == credits.Settlement.NOT_OURS and credits.PURCHASE_METADATA in obj.metadata


def _for_reservation(settled: str, obj: _Object) -> bool:
    """Not a credit purchase's intent, and made for a reservation's checkout: the reservation is
    looked up by the intent's id (the metadata only says where to look)."""
    return settled == credits.Settlement.NOT_OURS and reservations.RESERVATION_METADATA in obj.metadata


async def refund_late_payment(services: Services, event_type: str, payload: Any) -> bool:
    """Before an attempt's transaction: a reservation paid too late, with no room left, is refunded
    at Stripe (reservations.refund_if_no_room); True if it was."""
    if event_type != "payment_intent.succeeded":
        return False
    obj = _object(payload)
    if obj.id is None or reservations.RESERVATION_METADATA not in obj.metadata:
        return False
    paid = _paid(obj)
    return await reservations.refund_if_no_room(
        services, intent_id=paid.intent_id, amount=paid.amount, currency=paid.currency
    )


async def apply_events(
    conn: AsyncConnection, services: Services, events: Sequence[tuple[str, Any]]
) -> list[str | None]:
    """The effects of several (type, payload) events about distinct objects, in the caller's
    transaction: the payments that succeeded settle together (credits.settle_paid_intents), the
    rest one by one. None for an event that needs an attempt of its own (apply_event raises for it).
    """
    outcomes: list[str | None] = []
    paid: list[tuple[int, _Object]] = []
    for event_type, payload in events:
        if event_type == "payment_intent.succeeded":
            obj = _object(payload)
            if obj.id is not None:
                paid.append((len(outcomes), obj))
            outcomes.append(None if obj.id is not None else WorkOutcome.IGNORED)
        else:
            outcomes.append(await apply_event(conn, services, event_type, payload))
    if paid:
        settled = await credits.settle_paid_intents(conn, [_paid(obj) for _, obj in paid])
        for (i, obj), outcome in zip(paid, settled, strict=True):
            redo = outcome == credits.Settlement.MISMATCH or _unrecorded(outcome, obj)
            redo |= _for_reservation(outcome, obj)  # its own attempt: a late payment may need a refund
            outcomes[i] = None if redo else outcome
    return outcomes


async def apply_event(
    conn: AsyncConnection, services: Services, event_type: str, payload: Any, *, refunded: bool = False
) -> str:
    """The effect of one event, in the caller's transaction: a Settlement or a Checkout, or ignored.
    `refunded`: refund_late_payment refunded this payment before the transaction."""
    if event_type not in HANDLED_TYPES:
        return WorkOutcome.IGNORED
    obj = _object(payload)
    if event_type == "payment_intent.succeeded":
        if obj.id is None:
            return WorkOutcome.IGNORED
        paid = _paid(obj)
        settled = await credits.settle_paid_intent(
            conn, intent_id=paid.intent_id, amount=paid.amount, currency=paid.currency
        )
        if _unrecorded(settled, obj):
            raise RetryLater(
                f"intent {obj.id} of purchase {obj.metadata[credits.PURCHASE_METADATA]} is not recorded yet"
            )
        if not _for_reservation(settled, obj):
            return settled
        checkout = await reservations.settle_paid_checkout(
            conn, intent_id=paid.intent_id, amount=paid.amount, currency=paid.currency, refunded=refunded
        )
        if checkout == reservations.Checkout.NOT_OURS:
            reservation = obj.metadata[reservations.RESERVATION_METADATA]
            raise RetryLater(f"intent {obj.id} of reservation {reservation} is not recorded yet")
        return checkout
    if event_type in ("payment_intent.payment_failed", "payment_intent.canceled"):
        if obj.id is None:
            return WorkOutcome.IGNORED
        return await credits.mark_payment_failed(conn, intent_id=obj.id)
    if obj.payment_intent is None:
        return WorkOutcome.IGNORED
    settlement, shortfall = await credits.reverse_refund(
        conn,
        intent_id=obj.payment_intent,
        amount=obj.amount,
        refunded=obj.amount_refunded,
        currency=obj.currency,
    )
    if shortfall is not None:
        now: datetime = await conn.scalar(text("SELECT now()"))
        await failures.record_failure(
            conn,
            services.settings,
            kind=OperationKind.REFUND_SHORTFALL,
            reference=f"{obj.payment_intent}:{obj.amount_refunded}",
            item_id=shortfall.purchase_id,
            payload={
                "user_id": shortfall.user_id,
                "purchase_id": shortfall.purchase_id,
                "credits": shortfall.credits,
            },
            now=now,
            error=f"{shortfall.credits} refunded credits were already spent; the balance is 0",
            permanent=True,
        )
    return settlement


def _status(outcome: str) -> EventStatus:
    ignored = outcome in (WorkOutcome.IGNORED, credits.Settlement.NOT_OURS)
    return EventStatus.IGNORED if ignored else EventStatus.HANDLED


async def mark_done(conn: AsyncConnection, done: list[tuple[int, str]]) -> None:
    """Record (event id, outcome) pairs as handled or ignored, and release their leases."""
    params = {
        "ids": [event_id for event_id, _ in done],
        "statuses": [_status(outcome) for _, outcome in done],
        "outcomes": [outcome for _, outcome in done],
    }
    await conn.execute(_DONE, params)


async def handle_events(services: Services, items: list[Claimed]) -> list[str]:
    """Claimed events in one transaction: one fence, their effects set by set, one status update.

    An event whose effect needs an attempt of its own (a mismatch to record, an intent not recorded
    yet) gets it after the commit. If anything else fails (a lock timeout, a deadlock with another
    batch), the transaction rolls back and each event gets an attempt of its own (`handle_event`),
    which records its failure without touching the others.
    """
    if len(items) == 1:
        return [await handle_event(services, items[0])]
    try:
        async with services.engine.begin() as conn:
            fence = {"ids": [i.id for i in items], "tokens": [i.token for i in items]}
            owned = set((await conn.execute(_FENCE_BATCH, fence)).scalars())
            mine = [item for item in items if item.id in owned]
            applied = await apply_events(conn, services, [(i.row.type, i.row.payload) for i in mine])
            outcomes = dict(zip([item.id for item in mine], applied, strict=True))
            if done := [(event_id, outcome) for event_id, outcome in outcomes.items() if outcome]:
                await mark_done(conn, done)
    except Exception as exc:
        if database_unreachable(exc):
            raise
        log.info(
            "batch rolled back; one event at a time", extra={"events": len(items), "error": repr(exc)[:300]}
        )
        return [await handle_event(services, item) for item in items]
    counts: Counter[tuple[str, str]] = Counter()
    results = []
    for item in items:
        if item.id not in outcomes:  # not owned: this worker lost the lease
            outcome = FENCED
        elif (applied_outcome := outcomes[item.id]) is None:
            results.append(await handle_event(services, item))
            continue
        else:
            outcome = _handled(applied_outcome)
        counts[metric_type(item.row.type), outcome] += 1
        if outcome != FENCED:
            _observe_lag(item)
        results.append(outcome)
    for (event_type, outcome), n in counts.items():
        WORK_DONE.labels(Queue.WEBHOOK_EVENTS, event_type, outcome).inc(n)
    return results


def _handled(outcome: str) -> str:
    """What a handled event counts as: done, or ignored."""
    return WorkOutcome.IGNORED if _status(outcome) == EventStatus.IGNORED else WorkOutcome.DONE


def _observe_lag(item: Claimed) -> None:
    WEBHOOK_LAG.observe(max(0.0, time.time() - item.row.received_at.timestamp()))


def _counted(item: Claimed, outcome: str) -> str:
    """Count one attempt's outcome, and the lag of an event it finished."""
    if outcome in (WorkOutcome.DONE, WorkOutcome.IGNORED):
        _observe_lag(item)
    WORK_DONE.labels(Queue.WEBHOOK_EVENTS, metric_type(item.row.type), outcome).inc()
    return outcome


async def handle_event(services: Services, item: Claimed) -> str:
    """First attempt at a claimed event: its effect and its new status commit together, under the fence."""
    row = item.row

    async def perform() -> Commit:
        refunded = await refund_late_payment(services, row.type, row.payload)

        async def commit(conn: AsyncConnection) -> str:
            return await apply_event(conn, services, row.type, row.payload, refunded=refunded)

        return commit

    async def succeed(conn: AsyncConnection, now: datetime, outcome: str) -> str:
        await mark_done(conn, [(row.id, outcome)])
        return _handled(outcome)

    async def fail(conn: AsyncConnection, now: datetime, error: str, permanent: bool) -> str:
        state = await failures.record_failure(
            conn,
            services.settings,
            kind=OperationKind.WEBHOOK,
            reference=row.event_id,
            item_id=row.id,
            payload={"event_id": row.event_id, "type": row.type},
            now=now,
            error=error,
            permanent=permanent,
        )
        dead = state.status == FailureStatus.DEAD
        await conn.execute(
            _FAILED, {"id": row.id, "status": EventStatus.DEAD if dead else EventStatus.FAILED}
        )
        return WorkOutcome.DEAD if dead else WorkOutcome.FAILED

    return _counted(item, await fenced_attempt(services.sessions, _FENCE, item, perform, succeed, fail))


class EventHandling:
    """A failed event's retry: the same handler, on the event's row, under the failed operation's lease."""

    async def perform(self, services: Services, item_id: int | None, payload: dict[str, Any]) -> Commit:
        async with services.sessions() as session:
            stored = (await session.execute(_EVENT, {"id": item_id})).first()
        refunded = stored is not None and await refund_late_payment(services, stored.type, stored.payload)

        async def commit(conn: AsyncConnection) -> str:
            event = (await conn.execute(LOCK_EVENT, {"id": item_id})).first()
            if event is None:
                return WorkOutcome.IGNORED  # pruned: nothing left to do
            outcome = await apply_event(conn, services, event.type, event.payload, refunded=refunded)
            await mark_done(conn, [(event.id, outcome)])
            return outcome

        return commit

    async def give_up(self, conn: AsyncConnection, item_id: int | None) -> None:
        await conn.execute(_SET_STATUS, {"id": item_id, "status": EventStatus.DEAD, "open": list(UNFINISHED)})


_SET_STATUS = text(
    "UPDATE webhook_events SET status = :status WHERE id = :id AND status = ANY(CAST(:open AS text[]))"
)
