"""The email outbox: rows written inside the caller's transaction, sent later by the worker."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.notifications.models import OutboxEmail


async def enqueue_email(
    session: AsyncSession,
    *,
    kind: str,
    user_id: str,
    recipient: str | None,
    payload: dict[str, Any],
    max_attempts: int,
    trace_context: dict[str, str] | None = None,
) -> int:
    """Add an email to the outbox in the caller's transaction: it exists iff the change commits."""
    email = OutboxEmail(
        kind=kind,
        user_id=user_id,
        recipient=recipient,
        payload=payload,
        max_attempts=max_attempts,
        trace_context=trace_context or {},
    )
    session.add(email)
    await session.flush()
    return email.id
