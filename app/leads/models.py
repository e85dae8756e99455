from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Index, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class LeadStatus(StrEnum):
    AVAILABLE = "available"
    SOLD = "sold"


class Lead(Base):
    __tablename__ = "leads"
    __table_args__ = (
        CheckConstraint("price_credits > 0", name="price_positive"),
        CheckConstraint(one_of("status", LeadStatus), name="status_known"),
        CheckConstraint(f"(status = '{LeadStatus.SOLD}') = (buyer_id IS NOT NULL)", name="sold_has_buyer"),
        Index("ix_leads_available", "id", postgresql_where=f"status = '{LeadStatus.AVAILABLE}'"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    price_credits: Mapped[int] = mapped_column(BigInteger)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=LeadStatus.AVAILABLE)
    buyer_id: Mapped[str | None] = mapped_column(String(255))
    sold_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LeadPurchase(Base):
    """The unique lead_id is the last line of defence: an exclusive lead is sold once."""

    __tablename__ = "lead_purchases"
    __table_args__ = (Index("ix_lead_purchases_user_id_id", "user_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    lead_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("leads.id"), unique=True)
    user_id: Mapped[str] = mapped_column(String(255))
    price_credits: Mapped[int] = mapped_column(BigInteger)
    ledger_entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("credit_ledger.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
