from sqlalchemy import text

from app.failures.models import FailureStatus, OperationKind
from app.observability.metrics import EMAILS_HELD, FAILED_OPERATIONS, QUEUE_DEPTH, QUEUE_OLDEST_AGE
from app.services import Services


async def database_ready(services: Services) -> bool:
    """One round trip; any failure means not ready."""
    try:
        async with services.sessions() as session:
            return bool(await session.scalar(text("SELECT 1")) == 1)
    except Exception:
        return False


# one round trip over the partial indexes of each queue
_BACKLOG = text(
    "SELECT 'webhook_events' AS queue, count(*) AS depth, min(received_at) AS oldest"
    " FROM webhook_events WHERE status IN ('pending', 'failed')"
    " UNION ALL SELECT 'outbox', count(*), min(created_at) FROM outbox_emails"
    " WHERE status IN ('pending', 'failed')"
    " UNION ALL SELECT 'retries', count(*), min(next_attempt_at) FROM failed_operations"
    " WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()"
    " UNION ALL SELECT 'held', count(*), NULL FROM outbox_emails WHERE status = 'held'"
)
_FAILURES = text("SELECT kind, status, count(*) AS n FROM failed_operations GROUP BY kind, status")


async def observe_queues(services: Services) -> None:
    """Set the backlog gauges from the database; a database that does not answer leaves them as they were."""
    try:
        async with services.sessions() as session:
            now = await session.scalar(text("SELECT now()"))
            backlog = (await session.execute(_BACKLOG)).all()
            failures = (await session.execute(_FAILURES)).all()
    except Exception:
        return
    for row in backlog:
        if row.queue == "held":
            EMAILS_HELD.set(row.depth)
            continue
        QUEUE_DEPTH.labels(row.queue).set(row.depth)
        QUEUE_OLDEST_AGE.labels(row.queue).set(
            max(0.0, (now - row.oldest).total_seconds()) if row.oldest else 0
        )
    seen = {(r.kind, r.status): r.n for r in failures}
    for kind in OperationKind:
        for status in FailureStatus:
            FAILED_OPERATIONS.labels(kind, status).set(seen.get((kind, status), 0))
