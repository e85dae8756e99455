"""Stripe webhook events, failed operations, leases on the outbox, purchases that can be refunded

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


PURCHASE_STATUSES_BEFORE = "status IN ('pending', 'succeeded', 'failed', 'canceled')"
PURCHASE_STATUSES = "status IN ('pending', 'failed', 'succeeded', 'refunded', 'abandoned')"
EMAIL_STATUSES_BEFORE = "status IN ('pending', 'sent', 'dead')"
EMAIL_STATUSES = "status IN ('pending', 'held', 'sent', 'failed', 'dead', 'skipped')"


def _replace_check(table: str, name: str, condition: str) -> None:
    op.drop_constraint(op.f(f"ck_{table}_{name}"), table, type_="check")
    op.create_check_constraint(op.f(f"ck_{table}_{name}"), table, condition)


def upgrade() -> None:
    # every claim of the worker takes a fresh token from here; an effect commits only under its own
    op.execute("CREATE SEQUENCE work_lease_tokens AS bigint")
    op.create_table(
        "failed_operations",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("reference", sa.String(length=255), nullable=False),
        sa.Column("item_id", sa.BigInteger(), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("history", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False),
        sa.Column("lease_token", sa.BigInteger(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "trace_context", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "kind IN ('email', 'webhook', 'refund_shortfall')", name=op.f("ck_failed_operations_kind_known")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'retrying', 'succeeded', 'dead', 'discarded')",
            name=op.f("ck_failed_operations_status_known"),
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND max_attempts >= 1", name=op.f("ck_failed_operations_attempts_sane")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failed_operations")),
        sa.UniqueConstraint("kind", "reference", name="uq_failed_operations_kind_reference"),
    )
    op.create_index(
        "ix_failed_operations_due",
        "failed_operations",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'retrying')"),
    )
    op.create_index("ix_failed_operations_status_id", "failed_operations", ["status", "id"], unique=False)
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("object_id", sa.String(length=255), nullable=True),
        sa.Column("stripe_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_token", sa.BigInteger(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "trace_context", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'handled', 'ignored', 'failed', 'dead')",
            name=op.f("ck_webhook_events_status_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_webhook_events_attempts_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_webhook_events_event_id")),
    )
    op.create_index(
        "ix_webhook_events_pending",
        "webhook_events",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_webhook_events_received_at", "webhook_events", ["received_at"], unique=False)
    op.create_index(
        "ix_webhook_events_unfinished_object",
        "webhook_events",
        ["object_id", "stripe_created", "id"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
    )
    op.add_column("credit_purchases", sa.Column("recipient", sa.String(length=320), nullable=True))
    op.add_column(
        "credit_purchases", sa.Column("credits_reversed", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "outbox_emails",
        sa.Column("public_id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
    )
    op.add_column("outbox_emails", sa.Column("lease_token", sa.BigInteger(), nullable=True))
    op.add_column("outbox_emails", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_index(
        op.f("ix_outbox_emails_due"),
        table_name="outbox_emails",
        postgresql_where="((status)::text = 'pending'::text)",
    )
    op.create_index(
        "ix_outbox_emails_unsent",
        "outbox_emails",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'held', 'failed')"),
    )
    op.create_unique_constraint(op.f("uq_outbox_emails_public_id"), "outbox_emails", ["public_id"])
    op.drop_column("outbox_emails", "attempts")
    op.drop_column("outbox_emails", "last_error")
    op.drop_column("outbox_emails", "next_attempt_at")
    op.drop_column("outbox_emails", "max_attempts")
    # nothing sent emails before this revision: every row is pending, or has nobody to go to
    op.execute("UPDATE outbox_emails SET status = 'skipped' WHERE recipient IS NULL AND status = 'pending'")
    _replace_check("outbox_emails", "status_known", EMAIL_STATUSES)
    op.execute("UPDATE credit_purchases SET status = 'failed' WHERE status = 'canceled'")
    _replace_check("credit_purchases", "status_known", PURCHASE_STATUSES)
    op.create_check_constraint(
        op.f("ck_credit_purchases_reversed_within_credits"),
        "credit_purchases",
        "credits_reversed BETWEEN 0 AND credits",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_credit_purchases_reversed_within_credits"), "credit_purchases", type_="check")
    op.execute("UPDATE credit_purchases SET status = 'failed' WHERE status IN ('refunded', 'abandoned')")
    _replace_check("credit_purchases", "status_known", PURCHASE_STATUSES_BEFORE)
    op.execute("UPDATE outbox_emails SET status = 'pending' WHERE status IN ('held', 'failed', 'skipped')")
    _replace_check("outbox_emails", "status_known", EMAIL_STATUSES_BEFORE)
    op.add_column(
        "outbox_emails", sa.Column("max_attempts", sa.INTEGER(), server_default="3", nullable=False)
    )
    op.add_column(
        "outbox_emails",
        sa.Column(
            "next_attempt_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            autoincrement=False,
            nullable=False,
        ),
    )
    op.add_column("outbox_emails", sa.Column("last_error", sa.TEXT(), autoincrement=False, nullable=True))
    op.add_column("outbox_emails", sa.Column("attempts", sa.INTEGER(), server_default="0", nullable=False))
    for column in ("attempts", "max_attempts"):  # the defaults only filled the rows that existed
        op.alter_column("outbox_emails", column, server_default=None)
    op.drop_constraint(op.f("uq_outbox_emails_public_id"), "outbox_emails", type_="unique")
    op.drop_index(
        "ix_outbox_emails_unsent",
        table_name="outbox_emails",
        postgresql_where=sa.text("status IN ('pending', 'held', 'failed')"),
    )
    op.create_index(
        op.f("ix_outbox_emails_due"),
        "outbox_emails",
        ["next_attempt_at"],
        unique=False,
        postgresql_where="((status)::text = 'pending'::text)",
    )
    op.drop_column("outbox_emails", "lease_expires_at")
    op.drop_column("outbox_emails", "lease_token")
    op.drop_column("outbox_emails", "public_id")
    op.drop_column("credit_purchases", "credits_reversed")
    op.drop_column("credit_purchases", "recipient")
    op.drop_index(
        "ix_webhook_events_unfinished_object",
        table_name="webhook_events",
        postgresql_where=sa.text("status IN ('pending', 'failed')"),
    )
    op.drop_index("ix_webhook_events_received_at", table_name="webhook_events")
    op.drop_index(
        "ix_webhook_events_pending",
        table_name="webhook_events",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_table("webhook_events")
    op.drop_index("ix_failed_operations_status_id", table_name="failed_operations")
    op.drop_index(
        "ix_failed_operations_due",
        table_name="failed_operations",
        postgresql_where=sa.text("status IN ('pending', 'retrying')"),
    )
    op.drop_table("failed_operations")
    op.execute("DROP SEQUENCE work_lease_tokens")
