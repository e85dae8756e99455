"""The health job: failure rates over the last window into platform_metrics, breaches into platform_alerts.

One transaction reads each domain's figures and writes them: a rerun for the same window end
replaces its figures, and an alert stays one open row per metric (seen again: updated; no longer
breached: resolved), so running the job twice changes nothing more than running it once.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from app.credits import service as credits
from app.jobs.models import HealthMetric, JobName
from app.jobs.service import Counts, Job, JobContext, Step
from app.notifications import service as notifications
from app.webhooks import service as webhooks

_RECORD = text(
    "INSERT INTO platform_metrics (metric, window_start, window_end, total, failed, failure_rate, threshold)"
    " VALUES (:metric, :start, :end, :total, :failed, :rate, :threshold)"
    " ON CONFLICT (metric, window_end) DO UPDATE SET window_start = excluded.window_start,"
    " total = excluded.total, failed = excluded.failed, failure_rate = excluded.failure_rate,"
    " threshold = excluded.threshold"
)
_OPEN_ALERT = text(
    "INSERT INTO platform_alerts (metric, failure_rate, threshold, total, failed, message, opened_at,"
    " last_seen_at) VALUES (:metric, :rate, :threshold, :total, :failed, :message, :end, :end)"
    " ON CONFLICT (metric) WHERE resolved_at IS NULL DO UPDATE SET failure_rate = excluded.failure_rate,"
    " threshold = excluded.threshold, total = excluded.total, failed = excluded.failed,"
    " message = excluded.message, last_seen_at = excluded.last_seen_at"
    " RETURNING (xmax = 0) AS opened"
)
_RESOLVE = text(
    "UPDATE platform_alerts SET resolved_at = :end WHERE metric = :metric AND resolved_at IS NULL"
)


async def measure_failure_rates(context: JobContext) -> Counts:
    """Purchases, webhook events and emails of the window ending now: how many, how many failed."""
    settings = context.services.settings
    end = context.now
    start = end - timedelta(seconds=settings.health_window_s)
    opened = open_now = resolved = 0
    async with context.services.engine.begin() as conn:
        figures = {
            HealthMetric.PURCHASES: (
                await credits.purchase_outcomes(conn, start, end),
                settings.purchase_failure_alert_rate,
            ),
            HealthMetric.WEBHOOKS: (
                await webhooks.event_outcomes(conn, start, end),
                settings.webhook_failure_alert_rate,
            ),
            HealthMetric.EMAILS: (
                await notifications.email_outcomes(conn, start, end),
                settings.email_failure_alert_rate,
            ),
        }
        for metric, ((total, failed), threshold) in figures.items():
            rate = failed / total if total else 0.0
            row = {
                "metric": metric,
                "start": start,
                "end": end,
                "total": total,
                "failed": failed,
                "rate": rate,
                "threshold": threshold,
            }
            await conn.execute(_RECORD, row)
            if total >= settings.health_min_samples and rate > threshold:
                message = (
                    f"{metric}: {failed} of {total} failed in the last {settings.health_window_s:g} s"
                    f" ({rate:.1%}, above {threshold:.1%})"
                )
                opened += bool((await conn.execute(_OPEN_ALERT, {**row, "message": message})).scalar())
                open_now += 1
            else:
                resolved += (await conn.execute(_RESOLVE, {"metric": metric, "end": end})).rowcount
    return {
        "metrics": len(figures),
        "alerts_open": open_now,
        "alerts_opened": opened,
        "alerts_resolved": resolved,
    }


HEALTH = Job(JobName.HEALTH, (Step("failure_rates", measure_failure_rates),))
