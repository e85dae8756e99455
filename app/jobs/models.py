from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Float, Index, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class JobName(StrEnum):
    CLEANUP = "cleanup"  # prune what is past retention, finish what dead requests left behind
    HEALTH = "health"  # failure rates into platform_metrics, thresholds into platform_alerts
    RECONCILE = "reconcile"  # what Stripe settled that we never heard of, through the normal ingest


class RunOutcome(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a step failed; its error is recorded, the other steps still ran
    SKIPPED = "skipped"  # another run of the job held its lock: this one did nothing
    ABANDONED = "abandoned"  # its process died mid-run; closed by the job's next run


class HealthMetric(StrEnum):
    PURCHASES = "purchases"  # credit purchases made in the window: failed or abandoned since
    WEBHOOKS = "webhooks"  # Stripe events received in the window: failed or dead since
    EMAILS = "emails"  # outbox emails queued in the window: failed or dead since


class JobRun(Base):
    """One run of a job, whatever became of it (every step's count, the errors)."""

    __tablename__ = "job_runs"
    __table_args__ = (
        CheckConstraint(one_of("job", JobName), name="job_known"),
        CheckConstraint(one_of("outcome", RunOutcome), name="outcome_known"),
        Index("ix_job_runs_job_id", "job", "id"),  # the admin list filtered by job, newest first
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16))
    counts: Mapped[dict[str, int]] = mapped_column(JSONB, server_default="{}")
    error: Mapped[str | None] = mapped_column(Text)


class JobWatermark(Base):
    """How far a job got, kept between runs (reconcile: Stripe events are listed from here)."""

    __tablename__ = "job_watermarks"
    __table_args__ = (CheckConstraint(one_of("job", JobName), name="job_known"),)

    job: Mapped[str] = mapped_column(String(32), primary_key=True)
    watermark: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PlatformMetric(Base):
    """A failure rate over one window, as the health job measured it."""

    __tablename__ = "platform_metrics"
    __table_args__ = (
        CheckConstraint(one_of("metric", HealthMetric), name="metric_known"),
        CheckConstraint("failed BETWEEN 0 AND total", name="failed_within_total"),
        Index("uq_platform_metrics_metric_window_end", "metric", "window_end", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    metric: Mapped[str] = mapped_column(String(32))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    total: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)
    failure_rate: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PlatformAlert(Base):
    """A threshold breached: open while the health job keeps seeing it, resolved once it does not."""

    __tablename__ = "platform_alerts"
    __table_args__ = (
        CheckConstraint(one_of("metric", HealthMetric), name="metric_known"),
        # one open alert per metric: a breach seen again updates it
        Index(
            "uq_platform_alerts_open_metric",
            "metric",
            unique=True,
            postgresql_where=text("resolved_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    metric: Mapped[str] = mapped_column(String(32))
    failure_rate: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    total: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
