from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Index, String, Uuid, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class EmailStatus(StrEnum):
    PENDING = "pending"  # waiting for the worker
    HELD = "held"  # no SMTP server is configured; goes out once one is
    SENT = "sent"
    FAILED = "failed"  # a send failed; its failed operation retries it
    DEAD = "dead"  # the retries ran out (or it was discarded); see its failed operation
    SKIPPED = "skipped"  # nobody to send it to (the token had no email); what it says is in the API


class OutboxEmail(Base):
    """An email to send, committed in the same transaction as the change it reports."""

    __tablename__ = "outbox_emails"
    __table_args__ = (
        CheckConstraint(one_of("status", EmailStatus), name="status_known"),
        Index(
            "ix_outbox_emails_unsent",
            "id",
            postgresql_where=text(
                f"status IN ('{EmailStatus.PENDING}', '{EmailStatus.HELD}', '{EmailStatus.FAILED}')"
            ),
        ),
        Index("ix_outbox_emails_created_at", "created_at"),  # the health job's window
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # random: the Message-ID is unique across every database, and the same on every retry
    public_id: Mapped[UUID] = mapped_column(Uuid, unique=True, server_default=text("gen_random_uuid()"))
    kind: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(255))
    recipient: Mapped[str | None] = mapped_column(String(320))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), default=EmailStatus.PENDING)
    lease_token: Mapped[int | None] = mapped_column(BigInteger)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trace_context: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)  # W3C traceparent
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
