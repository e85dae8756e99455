"""idempotency keys keep their request's parameters; Stripe keys unique across databases

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "idempotency_keys",
        sa.Column(
            "request_params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column(
        "credit_purchases", sa.Column("stripe_idempotency_key", sa.String(length=255), nullable=True)
    )
    # rows made before this revision keep the key Stripe has already seen for them, so a purchase
    # resumed after the upgrade asks Stripe for the same intent, never a second one
    op.execute("UPDATE credit_purchases SET stripe_idempotency_key = 'payguard-credit-purchase-' || id")
    op.alter_column("credit_purchases", "stripe_idempotency_key", nullable=False)
    op.create_unique_constraint(
        op.f("uq_credit_purchases_stripe_idempotency_key"), "credit_purchases", ["stripe_idempotency_key"]
    )


def downgrade() -> None:
    op.drop_constraint(op.f("uq_credit_purchases_stripe_idempotency_key"), "credit_purchases", type_="unique")
    op.drop_column("credit_purchases", "stripe_idempotency_key")
    op.drop_column("idempotency_keys", "request_params")
