"""The email outbox: rows written inside the caller's transaction, sent later by the worker."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.notifications.models import EmailStatus


class EmailKind(StrEnum):
    LEAD_PURCHASED = "lead_purchased"
    CREDITS_PURCHASED = "credits_purchased"  # the receipt, once the payment's credits are granted


_ENQUEUE = text(
    "INSERT INTO outbox_emails (kind, user_id, recipient, payload, status, trace_context)"
    " VALUES (:kind, :user_id, :recipient, :payload, :status, :trace_context) RETURNING id"
).bindparams(bindparam("payload", type_=JSONB), bindparam("trace_context", type_=JSONB))


async def enqueue_email(
    session: AsyncSession | AsyncConnection,
    *,
    kind: EmailKind,
    user_id: str,
    recipient: str | None,
    payload: dict[str, Any],
    trace_context: dict[str, str] | None = None,
) -> int:
    """Add an email to the outbox in the caller's transaction: it exists iff the change commits.

    With no recipient (the caller's token carried no email) it is kept as `skipped`: what it
    says stays readable through the API.
    """
    email_id: int = await session.scalar(
        _ENQUEUE,
        {
            "kind": kind,
            "user_id": user_id,
            "recipient": recipient,
            "payload": payload,
            "status": EmailStatus.PENDING if recipient else EmailStatus.SKIPPED,
            "trace_context": trace_context or {},
        },
    )
    return email_id


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
