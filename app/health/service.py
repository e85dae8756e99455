from datetime import datetime

from sqlalchemy import text

from app.failures import service as failures
from app.jobs import service as jobs
from app.notifications import service as notifications
from app.observability.metrics import (
    EMAILS_HELD,
    FAILED_OPERATIONS,
    FAILED_OPERATIONS_OLDEST_OPEN_AGE,
    JOB_LAST_SUCCESS,
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    RECONCILE_MISSED_RECENT,
    RESERVATIONS_OLDEST_ACTIVE_AGE,
    Queue,
)
from app.reservations import service as reservations
from app.services import Services
from app.webhooks import service as webhooks

RECONCILE_MISSED_WINDOW_S = 3600.0  # PayguardReconcileFoundMissedEvents looks at an hour of runs


async def database_ready(services: Services) -> bool:
    """One round trip; any failure means not ready."""
    try:
        async with services.sessions() as session:
            return bool(await session.scalar(text("SELECT 1")) == 1)
    except Exception:
        return False


async def observe_queues(services: Services) -> None:
    """Set the backlog gauges from the database; a database that does not answer leaves them as they were."""
    try:
        async with services.sessions() as session:
            conn = await session.connection()
            now = await conn.scalar(text("SELECT now()"))
            events = await webhooks.backlog(conn)
            depth, oldest, held = await notifications.backlog(conn)
            retries = await failures.backlog(conn)
            by_kind = await failures.counts(conn)
            oldest_open = await failures.oldest_open(conn)
            oldest_hold = await reservations.oldest_active_hold(conn)
    except Exception:
        return
    for queue, (count, since) in {
        Queue.WEBHOOK_EVENTS: events,
        Queue.OUTBOX: (depth, oldest),
        Queue.RETRIES: retries,
    }.items():
        QUEUE_DEPTH.labels(queue).set(count)
        QUEUE_OLDEST_AGE.labels(queue).set(_age(now, since))
    EMAILS_HELD.set(held)
    for (kind, status), n in by_kind.items():
        FAILED_OPERATIONS.labels(kind, status).set(n)
    FAILED_OPERATIONS_OLDEST_OPEN_AGE.set(_age(now, oldest_open))
    RESERVATIONS_OLDEST_ACTIVE_AGE.set(_age(now, oldest_hold))


def _age(now: datetime, since: datetime | None) -> float:
    """Seconds from `since` to `now`; 0 when there is nothing (an empty queue is not a stalled one)."""
    return max(0.0, (now - since).total_seconds()) if since else 0.0


async def observe_jobs(services: Services) -> None:
    """Set each job's last success from job_runs: any replica, after any restart, says the same. A
    database that does not answer leaves the figures as they were (the last ones known)."""
    try:
        async with services.sessions() as session:
            conn = await session.connection()
            succeeded = await jobs.last_successes(conn)
            missed = await jobs.missed_recently(conn, RECONCILE_MISSED_WINDOW_S)
    except Exception:
        return
    for job, at in succeeded.items():
        JOB_LAST_SUCCESS.labels(job).set(at.timestamp())
    for source, n in missed.items():
        RECONCILE_MISSED_RECENT.labels(source).set(n)
