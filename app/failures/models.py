from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class FailureStatus(StrEnum):
    """The FailedOperation resource's phases, lower-cased."""

    PENDING = "pending"  # failed once; its first retry is scheduled
    RETRYING = "retrying"  # retried and failed again; another retry is scheduled
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # the budget is spent, or it needs a human
    DISCARDED = "discarded"  # an operator gave up on it


class OperationKind(StrEnum):
    EMAIL = "email"  # send an outbox email
    WEBHOOK = "webhook"  # handle a stored Stripe event
    REFUND_SHORTFALL = "refund_shortfall"  # refunded credits the balance could not give back


# scheduled for another attempt
OPEN = (FailureStatus.PENDING, FailureStatus.RETRYING)


class FailedOperation(Base):
    """One failed operation and its attempts; the database row is the record (PII stays here)."""

    __tablename__ = "failed_operations"
    __table_args__ = (
        CheckConstraint(one_of("status", FailureStatus), name="status_known"),
        CheckConstraint(one_of("kind", OperationKind), name="kind_known"),
        CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="attempts_sane"),
        UniqueConstraint("kind", "reference", name="uq_failed_operations_kind_reference"),
        Index(
            "ix_failed_operations_due",
            "next_attempt_at",
            postgresql_where=text(f"status IN ('{FailureStatus.PENDING}', '{FailureStatus.RETRYING}')"),
        ),
        Index("ix_failed_operations_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    reference: Mapped[str] = mapped_column(String(255))  # the Stripe event id, the outbox email id, ...
    item_id: Mapped[int | None] = mapped_column(BigInteger)  # the row the operation works on
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)  # every attempt, the first failure included
    max_attempts: Mapped[int] = mapped_column(Integer)  # 1 + the kind's retry budget
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    suspended: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))  # no claim starts it
    last_error: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default="[]")
    lease_token: Mapped[int | None] = mapped_column(BigInteger)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trace_context: Mapped[dict[str, str]] = mapped_column(JSONB, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
