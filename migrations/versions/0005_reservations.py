"""Ticket types, reservations (holds that count against capacity until they expire) and tickets

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESERVATION_STATUSES = "status IN ('active', 'expired', 'cancelled', 'completed', 'refunded')"
ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    op.create_table(
        "ticket_types",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("sold", sa.Integer(), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("capacity > 0", name=op.f("ck_ticket_types_capacity_positive")),
        sa.CheckConstraint("price > 0", name=op.f("ck_ticket_types_price_positive")),
        sa.CheckConstraint(
            "sold >= 0 AND sold <= capacity", name=op.f("ck_ticket_types_sold_within_capacity")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ticket_types")),
    )
    op.create_table(
        "reservations",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("ticket_type_id", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("stripe_idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("recipient", sa.String(length=320), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_reservations_quantity_positive")),
        sa.CheckConstraint(RESERVATION_STATUSES, name=op.f("ck_reservations_status_known")),
        sa.ForeignKeyConstraint(
            ["ticket_type_id"], ["ticket_types.id"], name=op.f("fk_reservations_ticket_type_id_ticket_types")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
        sa.UniqueConstraint("payment_intent_id", name=op.f("uq_reservations_payment_intent_id")),
        sa.UniqueConstraint("stripe_idempotency_key", name=op.f("uq_reservations_stripe_idempotency_key")),
    )
    op.create_index(
        "ix_reservations_active_type",
        "reservations",
        ["ticket_type_id", "expires_at"],
        postgresql_include=["quantity"],
        postgresql_where=ACTIVE,
    )
    op.create_index("ix_reservations_active_expiry", "reservations", ["expires_at"], postgresql_where=ACTIVE)
    op.create_index("ix_reservations_user_id", "reservations", ["user_id", "id"])
    op.create_table(
        "tickets",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.BigInteger(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["reservation_id"], ["reservations.id"], name=op.f("fk_tickets_reservation_id_reservations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tickets")),
        sa.UniqueConstraint("code", name=op.f("uq_tickets_code")),
    )
    op.create_index("ix_tickets_reservation_id", "tickets", ["reservation_id"])


def downgrade() -> None:
    op.drop_table("tickets")
    op.drop_table("reservations")
    op.drop_table("ticket_types")
