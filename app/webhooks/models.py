from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Index, Integer, String, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class EventStatus(StrEnum):
    PENDING = "pending"  # stored and acknowledged, not yet handled
    HANDLED = "handled"  # its effect (possibly none: a duplicate or stale event) is committed
    IGNORED = "ignored"  # a type we do not handle, or an intent we never created
    FAILED = "failed"  # handling failed; its failed operation retries it
    DEAD = "dead"  # the retries ran out, or it needs a human; see its failed operation


# an event of one object waits while an older one of the same object is in one of these
UNFINISHED = (EventStatus.PENDING, EventStatus.FAILED)


class WebhookEvent(Base):
    """A Stripe event as delivered, stored once per Stripe event id."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        CheckConstraint(one_of("status", EventStatus), name="status_known"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        # the claim: due events in arrival order
        Index("ix_webhook_events_pending", "id", postgresql_where=text(f"status = '{EventStatus.PENDING}'")),
        # the ordering rule: is an older event of the same object still unfinished?
        Index(
            "ix_webhook_events_unfinished_object",
            "object_id",
            "stripe_created",
            "id",
            postgresql_where=text(f"status IN ('{EventStatus.PENDING}', '{EventStatus.FAILED}')"),
        ),
        Index("ix_webhook_events_received_at", "received_at"),  # replay by range, pruning by age
        # half of each page free: a claim's update stays on its page (migration 0004)
        {"postgresql_with": {"fillfactor": 50}},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)  # Stripe's evt_…, global at Stripe
    type: Mapped[str] = mapped_column(String(255))
    object_id: Mapped[str | None] = mapped_column(String(255))  # the PaymentIntent it is about
    stripe_created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.PENDING)
    outcome: Mapped[str | None] = mapped_column(String(32))  # what handling did (granted, stale, ...)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # the lease: a claim sets a fresh token; an effect commits only while its token is current
    lease_token: Mapped[int | None] = mapped_column(BigInteger)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trace_context: Mapped[dict[str, str]] = mapped_column(JSONB, server_default="{}")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    handled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
