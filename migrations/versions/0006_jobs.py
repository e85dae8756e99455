"""The jobs: their runs, their watermarks, the health job's metrics and alerts, and the indexes they read

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOBS = "job IN ('cleanup', 'health', 'reconcile')"
METRICS = "metric IN ('purchases', 'webhooks', 'emails')"


def upgrade() -> None:
    op.create_table(
        "job_runs",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("job", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("counts", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(JOBS, name=op.f("ck_job_runs_job_known")),
        sa.CheckConstraint(
            "outcome IN ('running', 'succeeded', 'failed', 'skipped', 'abandoned')",
            name=op.f("ck_job_runs_outcome_known"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_runs")),
    )
    op.create_index("ix_job_runs_job_id", "job_runs", ["job", "id"])
    op.create_table(
        "job_watermarks",
        sa.Column("job", sa.String(length=32), nullable=False),
        sa.Column("watermark", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(JOBS, name=op.f("ck_job_watermarks_job_known")),
        sa.PrimaryKeyConstraint("job", name=op.f("pk_job_watermarks")),
    )
    op.create_table(
        "platform_metrics",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("failure_rate", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(METRICS, name=op.f("ck_platform_metrics_metric_known")),
        sa.CheckConstraint(
            "failed BETWEEN 0 AND total", name=op.f("ck_platform_metrics_failed_within_total")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_platform_metrics")),
    )
    op.create_index(
        "uq_platform_metrics_metric_window_end", "platform_metrics", ["metric", "window_end"], unique=True
    )
    op.create_table(
        "platform_alerts",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("failure_rate", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(METRICS, name=op.f("ck_platform_alerts_metric_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_platform_alerts")),
    )
    op.create_index(
        "uq_platform_alerts_open_metric",
        "platform_alerts",
        ["metric"],
        unique=True,
        postgresql_where=sa.text("resolved_at IS NULL"),
    )
    # cleanup's abandoned purchases and reconcile's pending intents; the health job's windows
    op.create_index(
        "ix_credit_purchases_pending",
        "credit_purchases",
        ["id"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_credit_purchases_created_at", "credit_purchases", ["created_at"])
    op.create_index("ix_outbox_emails_created_at", "outbox_emails", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_emails_created_at", table_name="outbox_emails")
    op.drop_index("ix_credit_purchases_created_at", table_name="credit_purchases")
    op.drop_index("ix_credit_purchases_pending", table_name="credit_purchases")
    op.drop_table("platform_alerts")
    op.drop_table("platform_metrics")
    op.drop_table("job_watermarks")
    op.drop_table("job_runs")
