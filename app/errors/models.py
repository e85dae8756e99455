"""Error logs: what clients report and the unhandled exceptions of the service, scrubbed, until resolved."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Index, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, one_of


class Severity(StrEnum):
    """Python's logging levels, lower-cased (Sentry's, with critical for its fatal)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


SERVER_SOURCE = "server"  # the service's own unhandled exceptions; refused from clients


class ErrorLog(Base):
    __tablename__ = "error_logs"
    __table_args__ = (
        CheckConstraint(one_of("severity", Severity), name="severity_known"),
        CheckConstraint("(resolved_at IS NULL) = (resolved_by IS NULL)", name="resolved_by_someone"),
        Index("ix_error_logs_created_at", "created_at"),  # pruning by age
        # the admin list: newest first, by one filter each
        Index("ix_error_logs_severity_id", "severity", "id"),
        Index("ix_error_logs_source_id", "source", "id"),
        Index("ix_error_logs_unresolved", "id", postgresql_where=text("resolved_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    severity: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    context: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    user_id: Mapped[str | None] = mapped_column(String(255))  # who reported it; NULL for the server's own
    request_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_by: Mapped[str | None] = mapped_column(String(255))
