"""Webhook ingest: verify, store once, acknowledge. Handling is the worker's (app/webhooks/tasks.py).

The hot path does nothing but verify and insert. Concurrent deliveries share one
commit: while one flush is in flight, arriving events wait, and the next flush
writes all of them with one multi-row INSERT. Each delivery is answered only after
the commit that holds its row, so an acknowledged event is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import msgspec
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.config import Settings
from app.observability.metrics import WEBHOOKS_RECEIVED, WebhookReceipt
from app.problems import ServiceError
from app.webhooks.models import EventStatus
from app.webhooks.schemas import StripeId
from app.webhooks.signature import SignatureError, verify
from app.worker.leases import WORK_CHANNEL

log = logging.getLogger("payguard.webhooks")


class WebhooksNotConfigured(ServiceError):
    status, type, title = 503, "webhooks-not-configured", "Stripe webhooks are not configured"


class InvalidSignature(ServiceError):
    status, type, title = 400, "invalid-signature", "The Stripe signature does not verify"


class InvalidEvent(ServiceError):
    status, type, title = 400, "invalid-event", "The body is not a Stripe event"


# \u0000 not itself escaped: an odd run of backslashes before u0000 (an even run is literal text)
_ESCAPED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class _Object(msgspec.Struct):
    id: str | None = None
    payment_intent: str | None = None


class _Data(msgspec.Struct):
    object: _Object = msgspec.field(default_factory=_Object)


class _Event(msgspec.Struct):
    id: Annotated[str, StripeId]
    type: Annotated[str, StripeId]
    created: Annotated[int, msgspec.Meta(ge=0, le=2**40)] | None = None
    data: _Data = msgspec.field(default_factory=_Data)


@dataclass(frozen=True)
class NewEvent:
    event_id: str
    type: str
    object_id: str | None  # what the event is about: the PaymentIntent, for charges too
    created: float  # Stripe's, in Unix seconds
    payload: str  # the body as delivered (JSON)


def parse_event(body: bytes, *, received_at: float) -> NewEvent:
    """What we index of a Stripe event; InvalidEvent when the body is not one."""
    try:
        # msgspec refuses nesting past ~1000 levels (RecursionError), well within what jsonb parses
        event = msgspec.json.decode(body, type=_Event)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise InvalidEvent(f"the body is not a Stripe event: {str(exc).split(' - at', 1)[0]}") from None
    # jsonb cannot hold NUL; JSON can only carry it as this escape (the regex only when it may be there:
    # on every delivery it cost a sixth of the endpoint's CPU)
    if b"\\u0000" in body and _ESCAPED_NUL.search(body):
        raise InvalidEvent("the body is not a Stripe event: strings must not contain NUL characters")
    obj = event.data.object
    about = obj.payment_intent if event.type.startswith("charge.") else obj.id
    if about is not None and len(about) > 255:
        raise InvalidEvent("the event's object id is longer than Stripe's ids")
    created = float(event.created) if event.created is not None else received_at
    return NewEvent(event.id, event.type, about, created, body.decode())


_INSERT = text(
    "INSERT INTO webhook_events (event_id, type, object_id, stripe_created, payload, status, attempts)"
    " SELECT e.event_id, e.type, e.object_id, to_timestamp(e.created), e.payload::jsonb, :status, 0"
    " FROM unnest(CAST(:event_ids AS text[]), CAST(:types AS text[]), CAST(:object_ids AS text[]),"
    " CAST(:created AS float8[]), CAST(:payloads AS text[]))"
    " AS e(event_id, type, object_id, created, payload)"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
_NOTIFY = text(f"SELECT pg_notify('{WORK_CHANNEL}', 'webhook_events')")  # once per commit


class EventWriter:
    """Group commit for incoming events: one INSERT and one commit per flush, however many wait."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._waiting: list[tuple[NewEvent, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # flushes run one at a time, on a connection of their own: no pool checkout and ping per flush
        self._conn: AsyncConnection | None = None

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def store(self, event: NewEvent) -> bool:
        """Store `event` unless its id is stored already; True if this call stored it, after the commit."""
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, stored))
        if self._flusher is None:
            # its own task: a delivery whose client goes away does not cancel the others' commit
            self._flusher = asyncio.create_task(self._flush_while_waiting())
        return await asyncio.shield(stored)

    async def _flush_while_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    new = await self._insert([event for event, _ in batch])
                except DBAPIError as exc:
                    if not _bad_value(exc) or len(batch) == 1:
                        _fail(batch, exc)
                        continue
                    # one event PostgreSQL cannot hold must not refuse the others: one at a time
                    self._waiting = batch[1:] + self._waiting
                    batch = batch[:1]
                    try:
                        new = await self._insert([batch[0][0]])
                    except DBAPIError as exc:
                        _fail(batch, exc)
                        continue
                except Exception as exc:  # the whole batch failed: each delivery hears why (503 or 500)
                    _fail(batch, exc)
                    continue
                for event, stored in batch:
                    # of several deliveries of one id in one batch, only the first is the new one
                    first = event.event_id in new
                    new.discard(event.event_id)
                    if not stored.done():
                        stored.set_result(first)
        finally:
            self._flusher = None

    async def _insert(self, events: list[NewEvent]) -> set[str]:
        params = {
            "status": EventStatus.PENDING,
            "event_ids": [e.event_id for e in events],
            "types": [e.type for e in events],
            "object_ids": [e.object_id for e in events],
            "created": [e.created for e in events],
            "payloads": [e.payload for e in events],
        }
        if self._conn is None or self._conn.invalidated:
            if self._conn is not None:
                await self._conn.close()
            self._conn = await self._engine.connect()
        conn = self._conn
        try:
            async with conn.begin():
                new = set((await conn.execute(_INSERT, params)).scalars())
                if new:
                    await conn.execute(_NOTIFY)
        except BaseException:
            if conn.invalidated or conn.closed:
                self._conn = None
            raise
        return new


def _bad_value(exc: DBAPIError) -> bool:
    """A data exception (invalid text for jsonb, an unpaired surrogate): the event's fault, not ours."""
    return str(getattr(exc.orig, "sqlstate", "") or "").startswith("22")


def _fail(batch: list[tuple[NewEvent, asyncio.Future[bool]]], exc: Exception) -> None:
    for _, stored in batch:
        if not stored.done():
            stored.set_exception(exc)


async def receive_event(settings: Settings, writer: EventWriter, body: bytes, signature: str | None) -> bool:
    """Verify and store one delivery: exactly one row per Stripe event id. True if it was a duplicate."""
    if not settings.stripe_webhook_secrets:
        WEBHOOKS_RECEIVED.labels("unknown", WebhookReceipt.NOT_CONFIGURED).inc()
        raise WebhooksNotConfigured("set STRIPE_WEBHOOK_SECRETS to the endpoint's signing secrets")
    now = time.time()
    try:
        verify(
            body,
            signature,
            settings.stripe_webhook_secrets,
            now=now,
            tolerance_s=settings.webhook_tolerance_s,
        )
    except SignatureError as exc:
        WEBHOOKS_RECEIVED.labels("unknown", WebhookReceipt.BAD_SIGNATURE).inc()
        raise InvalidSignature(str(exc)) from None
    try:
        event = parse_event(body, received_at=now)
    except InvalidEvent:
        WEBHOOKS_RECEIVED.labels("unknown", WebhookReceipt.BAD_EVENT).inc()
        raise
    try:
        new = await writer.store(event)
    except DBAPIError as exc:
        if _bad_value(exc):
            WEBHOOKS_RECEIVED.labels("unknown", WebhookReceipt.BAD_EVENT).inc()
            raise InvalidEvent("the event cannot be stored (invalid JSON value)") from None
        raise
    outcome = WebhookReceipt.ACCEPTED if new else WebhookReceipt.DUPLICATE
    WEBHOOKS_RECEIVED.labels(metric_type(event.type), outcome).inc()
    return not new


HANDLED_TYPES = (
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
    "charge.refunded",
)


def metric_type(event_type: str) -> str:
    """Types we handle by name; everything else as `other`, so a sender cannot grow our label set."""
    return event_type if event_type in HANDLED_TYPES else "other"


_BACKLOG = text(
    "SELECT count(*) AS depth, min(received_at) AS oldest FROM webhook_events"
    " WHERE status IN (:pending, :failed)"
)


async def backlog(conn: AsyncConnection) -> tuple[int, datetime | None]:
    """Events not handled yet (waiting or failed and retried): how many, and the oldest receipt."""
    row = (await conn.execute(_BACKLOG, {"pending": EventStatus.PENDING, "failed": EventStatus.FAILED})).one()
    return row.depth, row.oldest


_OUTCOMES = text(
    "SELECT count(*) AS total, count(*) FILTER (WHERE status IN (:failed, :dead)) AS failed"
    " FROM webhook_events WHERE received_at >= :start AND received_at < :end"
)


async def event_outcomes(conn: AsyncConnection, start: datetime, end: datetime) -> tuple[int, int]:
    """Events received in [start, end): how many, and how many of them failed or are dead (the health job)."""
    params = {"start": start, "end": end, "failed": EventStatus.FAILED, "dead": EventStatus.DEAD}
    row = (await conn.execute(_OUTCOMES, params)).one()
    return row.total, row.failed


# finished events only (handled or ignored): pending, failed and dead ones stay whatever their age
_PRUNE = text(
    "DELETE FROM webhook_events WHERE id IN (SELECT id FROM webhook_events"
    " WHERE received_at < now() - make_interval(secs => :retention) AND status IN (:handled, :ignored)"
    " ORDER BY received_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
)


async def prune_finished_events(engine: AsyncEngine, retention_s: int, *, limit: int) -> int:
    """Delete up to `limit` handled or ignored events received before the retention; returns how many.

    A redelivery of a pruned event is stored and handled again, which changes nothing: handlers
    are idempotent per payment intent.
    """
    params = {
        "retention": retention_s,
        "limit": limit,
        "handled": EventStatus.HANDLED,
        "ignored": EventStatus.IGNORED,
    }
    async with engine.begin() as conn:
        return int((await conn.execute(_PRUNE, params)).rowcount)


# the ordering rule's partial index answers it (statuses inlined so a cached generic plan can use it)
_UNFINISHED = text(
    "SELECT object_id, type FROM webhook_events WHERE object_id = ANY(CAST(:objects AS text[]))"  # noqa: S608
    f" AND status IN ('{EventStatus.PENDING}', '{EventStatus.FAILED}')"
)


async def unfinished_events(engine: AsyncEngine, object_ids: list[str]) -> set[tuple[str, str]]:
    """The (object id, event type) pairs of these objects whose event is stored and not handled yet."""
    async with engine.connect() as conn:
        return {(row.object_id, row.type) for row in await conn.execute(_UNFINISHED, {"objects": object_ids})}
