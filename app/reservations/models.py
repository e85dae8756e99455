from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, func, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class ReservationStatus(StrEnum):
    """A hold is `active` until it is cancelled, paid (`completed`) or past `expires_at`.

    An active hold past its expiry already counts as expired everywhere (reads, new holds,
    stats); the cleanup job only writes the status down.
    """

    ACTIVE = "active"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    COMPLETED = "completed"  # paid: its tickets are issued
    REFUNDED = "refunded"  # paid after it expired or was cancelled, with no room left: the money went back


class TicketType(Base):
    __tablename__ = "ticket_types"
    __table_args__ = (
        CheckConstraint("capacity > 0", name="capacity_positive"),
        CheckConstraint("price > 0", name="price_positive"),
        CheckConstraint("sold >= 0 AND sold <= capacity", name="sold_within_capacity"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    capacity: Mapped[int] = mapped_column(Integer)
    sold: Mapped[int] = mapped_column(Integer, default=0)  # tickets of completed reservations
    price: Mapped[int] = mapped_column(BigInteger)  # per ticket, minor units
    currency: Mapped[str] = mapped_column(String(3))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Reservation(Base):
    __tablename__ = "reservations"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint(one_of("status", ReservationStatus), name="status_known"),
        # what a new hold counts against capacity: the unexpired active holds of its type
        Index(
            "ix_reservations_active_type",
            "ticket_type_id",
            "expires_at",
            postgresql_include=["quantity"],
            postgresql_where=text(f"status = '{ReservationStatus.ACTIVE}'"),
        ),
        # the cleanup job and the stats: active holds by expiry
        Index(
            "ix_reservations_active_expiry",
            "expires_at",
            postgresql_where=text(f"status = '{ReservationStatus.ACTIVE}'"),
        ),
        Index("ix_reservations_user_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255))
    ticket_type_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("ticket_types.id"))
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ReservationStatus.ACTIVE)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # set by the first checkout: what Stripe is asked for, with a key unique across databases
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    stripe_idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    payment_intent_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    recipient: Mapped[str | None] = mapped_column(String(320))  # where the tickets email goes
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Ticket(Base):
    """An issued ticket: its code is random (128 bits), so it cannot be guessed from another."""

    __tablename__ = "tickets"
    __table_args__ = (Index("ix_tickets_reservation_id", "reservation_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    reservation_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("reservations.id"))
    code: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
