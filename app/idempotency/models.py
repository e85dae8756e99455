from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base


class RecoveryPoint(StrEnum):
    """Where a keyed request resumes: each point is the start of one atomic phase."""

    STARTED = "started"
    PURCHASE_CREATED = "purchase_created"  # credit purchase row committed; Stripe not yet answered
    CHECKOUT_CREATED = "checkout_created"  # a reservation priced, its Stripe key stored; Stripe not answered
    FINISHED = "finished"  # the response is stored; a retry replays it


class IdempotencyKey(Base):
    """One client key, scoped to its caller; the request's progress through atomic phases."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),
        CheckConstraint("fencing_token > 0", name="fencing_token_positive"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(255))
    request_method: Mapped[str] = mapped_column(String(10))
    request_path: Mapped[str] = mapped_column(String(2048))
    request_fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of method, path, body
    # what the phases need to run without the client (a completer can finish an abandoned key)
    request_params: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    recovery_point: Mapped[str] = mapped_column(String(64), default=RecoveryPoint.STARTED)
    # a takeover bumps the token; a phase commits only while the token is still its own
    fencing_token: Mapped[int] = mapped_column(Integer, default=1)
    locked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)  # the exact bytes replayed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
