"""The email outbox: rows written inside the caller's transaction, sent later by the worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.notifications.models import EmailStatus


class EmailKind(StrEnum):
    LEAD_PURCHASED = "lead_purchased"
    CREDITS_PURCHASED = "credits_purchased"  # the receipt, once the payment's credits are granted
    TICKETS_ISSUED = "tickets_issued"  # a paid reservation's ticket codes


_ENQUEUE = text(
    "INSERT INTO outbox_emails (kind, user_id, recipient, payload, status, trace_context)"
    " SELECT e.kind, e.user_id, e.recipient, e.payload::jsonb, e.status, e.trace_context::jsonb"
    " FROM unnest(CAST(:kinds AS text[]), CAST(:user_ids AS text[]), CAST(:recipients AS text[]),"
    " CAST(:payloads AS text[]), CAST(:statuses AS text[]), CAST(:trace_contexts AS text[]))"
    " WITH ORDINALITY AS e(kind, user_id, recipient, payload, status, trace_context, n) ORDER BY e.n"
    " RETURNING id"
)


@dataclass(frozen=True)
class Email:
    kind: EmailKind
    user_id: str
    recipient: str | None  # None: the caller's token carried no email
    payload: dict[str, Any]
    trace_context: dict[str, str] = field(default_factory=dict)


async def enqueue_emails(session: AsyncSession | AsyncConnection, emails: Sequence[Email]) -> list[int]:
    """Add emails to the outbox in the caller's transaction: they exist iff the change commits.

    One with no recipient is kept as `skipped`: what it says stays readable through the API.
    """
    params = {
        "kinds": [e.kind for e in emails],
        "user_ids": [e.user_id for e in emails],
        "recipients": [e.recipient for e in emails],
        "payloads": [msgspec.json.encode(e.payload).decode() for e in emails],
        "statuses": [EmailStatus.PENDING if e.recipient else EmailStatus.SKIPPED for e in emails],
        "trace_contexts": [msgspec.json.encode(e.trace_context).decode() for e in emails],
    }
    return list((await session.execute(_ENQUEUE, params)).scalars())


async def enqueue_email(session: AsyncSession | AsyncConnection, email: Email) -> int:
    """One email into the outbox (enqueue_emails)."""
    return (await enqueue_emails(session, [email]))[0]


_BACKLOG = text(
    "SELECT count(*) FILTER (WHERE status IN (:pending, :failed)) AS depth,"
    " min(created_at) FILTER (WHERE status IN (:pending, :failed)) AS oldest,"
    " count(*) FILTER (WHERE status = :held) AS held"
    " FROM outbox_emails WHERE status IN (:pending, :failed, :held)"
)


async def backlog(conn: AsyncConnection) -> tuple[int, datetime | None, int]:
    """Emails still to send (waiting or failed and retried), the oldest one's time, and how many are held."""
    params = {"pending": EmailStatus.PENDING, "failed": EmailStatus.FAILED, "held": EmailStatus.HELD}
    row = (await conn.execute(_BACKLOG, params)).one()
    return row.depth, row.oldest, row.held


_OUTCOMES = text(
    "SELECT count(*) AS total, count(*) FILTER (WHERE status IN (:failed, :dead)) AS failed"
    " FROM outbox_emails WHERE created_at >= :start AND created_at < :end"
)


async def email_outcomes(conn: AsyncConnection, start: datetime, end: datetime) -> tuple[int, int]:
    """Emails queued in [start, end): how many, and how many of them failed or are dead (the health job)."""
    params = {"start": start, "end": end, "failed": EmailStatus.FAILED, "dead": EmailStatus.DEAD}
    row = (await conn.execute(_OUTCOMES, params)).one()
    return row.total, row.failed
