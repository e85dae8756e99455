from __future__ import annotations

from datetime import datetime

import msgspec


class JobRunOut(msgspec.Struct, kw_only=True):
    id: int
    job: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str  # running, succeeded, failed, skipped, abandoned
    counts: dict[str, int]  # per step: rows pruned, purchases abandoned, events found, ...
    error: str | None


class JobRunPage(msgspec.Struct):
    items: list[JobRunOut]
    next_cursor: str | None


class MetricOut(msgspec.Struct, kw_only=True):
    metric: str  # purchases, webhooks, emails
    window_start: datetime
    window_end: datetime
    total: int
    failed: int
    failure_rate: float
    threshold: float
    breached: bool


class AlertOut(msgspec.Struct, kw_only=True):
    id: int
    metric: str
    failure_rate: float
    threshold: float
    total: int
    failed: int
    message: str
    opened_at: datetime
    last_seen_at: datetime


class OperationsHealth(msgspec.Struct, kw_only=True):
    measured_at: datetime | None  # the health job's latest window end; None before its first run
    metrics: list[MetricOut]
    open_alerts: list[AlertOut]
