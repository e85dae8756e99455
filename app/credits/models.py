from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Index, String, func, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class PurchaseStatus(StrEnum):
    """A purchase only moves forward: pending -> failed -> succeeded -> refunded (failed may still
    succeed: the card was retried), so an older event arriving late changes nothing."""

    PENDING = "pending"  # waiting for Stripe
    FAILED = "failed"  # the payment failed or was canceled
    SUCCEEDED = "succeeded"  # paid and credited
    REFUNDED = "refunded"  # refunded in full; its credits taken back
    ABANDONED = "abandoned"  # the request died before any intent was made: no money moved


class CreditAccount(Base):
    __tablename__ = "credit_accounts"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LedgerEntry(Base):
    """Append-only; `reference` names the source event, so it can be applied once only."""

    __tablename__ = "credit_ledger"
    __table_args__ = (
        CheckConstraint("delta <> 0", name="delta_not_zero"),
        CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
        Index("ix_credit_ledger_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    delta: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(255))
    reference: Mapped[str] = mapped_column(String(255), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class CreditPurchase(Base):
    """A credit package being paid for; credits are granted when its intent succeeds."""

    __tablename__ = "credit_purchases"
    __table_args__ = (
        CheckConstraint("credits > 0 AND amount > 0", name="positive"),
        CheckConstraint("credits_reversed BETWEEN 0 AND credits", name="reversed_within_credits"),
        CheckConstraint(one_of("status", PurchaseStatus), name="status_known"),
        Index("ix_credit_purchases_user_id", "user_id"),
        # the jobs: pending purchases (cleanup's abandoned ones, reconcile's intents), and by age (health)
        Index(
            "ix_credit_purchases_pending", "id", postgresql_where=text(f"status = '{PurchaseStatus.PENDING}'")
        ),
        Index("ix_credit_purchases_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    idempotency_key_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    package_id: Mapped[str] = mapped_column(String(64))
    credits: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default=PurchaseStatus.PENDING)
    # sent to Stripe with the intent's creation: random, so unique across every database that shares
    # the Stripe account (a per-database sequence would collide within Stripe's 24 h key window)
    stripe_idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    recipient: Mapped[str | None] = mapped_column(String(320))  # the receipt's address, from the token
    credits_reversed: Mapped[int] = mapped_column(BigInteger, server_default="0")  # by refunds, so far
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
