"""The reconcile job: what Stripe settled that we never heard of, fed through the normal ingest path.

Two independent steps, both storing with the webhook's own EventWriter (unique Stripe event id,
ON CONFLICT DO NOTHING, a NOTIFY that wakes the worker), so a found event is deduplicated like
any delivery and handled by the worker like any:

- `events`: Stripe's events of the handled types created since the watermark (kept in
  job_watermarks), page by page. Stripe lists 30 days of events, so a watermark older than that
  is clamped (and logged). Events already stored are duplicates; the others were missed. The
  watermark moves only after the whole listing was stored, to this run's start less an overlap.
- `intents`: purchases still pending here past a grace period are looked up at Stripe. An intent
  Stripe says succeeded (or was canceled) with no such event waiting here becomes a synthetic
  event `reconcile:<intent>:<type>` whose object is the intent as Stripe returned it: one id per
  intent and type, so a second run stores nothing new, and its handling is the webhook's, which
  credits once per intent (the ledger's unique `payment_intent:<id>`), so the real webhook
  arriving before or after it changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from datetime import datetime, timedelta
from typing import Any

from app.credits import service as credits
from app.jobs import service
from app.jobs.models import JobName
from app.jobs.service import Counts, Job, JobContext, Step
from app.observability.metrics import RECONCILE_MISSED, MissedSource
from app.webhooks import service as webhooks
from app.webhooks.service import HANDLED_TYPES, EventWriter, InvalidEvent, parse_event

log = logging.getLogger("payguard.jobs")

STRIPE_EVENTS_KEPT_S = 30 * 86_400  # Stripe lists the events of the last 30 days, no older ones
# an intent in these states at Stripe has an event we act on; any other state is still in progress
SETTLED = {"succeeded": "payment_intent.succeeded", "canceled": "payment_intent.canceled"}


async def _store(writer: EventWriter, events: list[dict[str, Any]]) -> int:
    """Store events through the ingest path; how many were new (the others were stored already)."""
    parsed = []
    for event in events:
        try:
            parsed.append(parse_event(json.dumps(event).encode(), received_at=time.time()))
        except InvalidEvent as exc:  # not Stripe's: never stored, as the webhook would refuse it
            log.warning(
                "reconcile: an event that is not one", extra={"event_id": event.get("id"), "error": str(exc)}
            )
    return sum(await asyncio.gather(*(writer.store(event) for event in parsed)))


async def list_missed_events(context: JobContext) -> Counts:
    """Every event of the handled types Stripe created since the watermark, stored if it was missed."""
    services = context.services
    settings = services.settings
    oldest = context.now - timedelta(seconds=STRIPE_EVENTS_KEPT_S)
    since = await service.read_watermark(services, JobName.RECONCILE) or oldest
    clamped = since < oldest
    if clamped:
        log.warning(
            "reconcile: the watermark is older than the 30 days of events Stripe keeps; listing from there",
            extra={"watermark": since.isoformat(), "listed_from": oldest.isoformat()},
        )
        since = oldest
    listed = missed = 0
    writer = EventWriter(services.engine)
    pages = services.payments.list_events(
        created_gte=int(since.timestamp()), types=HANDLED_TYPES, page_size=settings.reconcile_page_size
    )
    try:
        async with aclosing(pages):  # a page that fails to store stops the listing at once
            async for page in pages:
                listed += len(page)
                missed += await _store(writer, page)
    finally:
        await writer.close()
    RECONCILE_MISSED.labels(MissedSource.EVENTS).inc(missed)
    if missed:
        log.warning("reconcile: stored events Stripe never delivered", extra={"events": missed})
    next_since = context.now - timedelta(seconds=settings.reconcile_overlap_s)
    await service.save_watermark(services, JobName.RECONCILE, max(next_since, oldest))
    return {"events_listed": listed, "events_missed": missed, "watermark_clamped": int(clamped)}


def synthetic_event(intent: dict[str, Any], event_type: str, now: datetime) -> dict[str, Any]:
    """An event in Stripe's shape about `intent` as Stripe returned it; one id per intent and type."""
    return {
        "id": f"reconcile:{intent['id']}:{event_type}",
        "object": "event",
        "type": event_type,
        "created": int(now.timestamp()),
        "livemode": intent.get("livemode", False),
        "data": {"object": intent},
    }


async def check_pending_intents(context: JobContext) -> Counts:
    """Purchases pending past the grace period, asked about at Stripe; the settled ones become events."""
    services = context.services
    settings = services.settings
    checked = missed = 0
    after = 0
    writer = EventWriter(services.engine)
    try:
        while True:
            batch = await credits.pending_intents(
                services,
                grace_s=settings.reconcile_grace_s,
                max_age_s=settings.reconcile_intent_max_age_s,
                after=after,
                limit=settings.jobs_batch_size,
            )
            if not batch:
                break
            after = batch[-1][0]
            waiting = await webhooks.unfinished_events(services.engine, [intent for _, intent in batch])
            found = []
            for _, intent_id in batch:
                intent = await services.payments.retrieve_payment_intent(intent_id)
                checked += 1
                event_type = SETTLED.get(intent.get("status", ""))
                if event_type is not None and (intent_id, event_type) not in waiting:
                    found.append(synthetic_event(intent, event_type, context.now))
            missed += await _store(writer, found)
            if len(batch) < settings.jobs_batch_size:
                break
    finally:
        await writer.close()
    RECONCILE_MISSED.labels(MissedSource.INTENTS).inc(missed)
    if missed:
        log.warning("reconcile: intents settled at Stripe and pending here", extra={"intents": missed})
    return {"intents_checked": checked, "intents_missed": missed}


RECONCILE = Job(
    JobName.RECONCILE,
    (Step("events", list_missed_events), Step("intents", check_pending_intents)),
)
