"""The cleanup job: named, independent steps, each in bounded batches of short transactions.

Add a step by appending it to CLEANUP's steps: a name (its count's key in the run record) and
an async function of the run's context that returns how many rows it handled. A step that
fails does not stop the others; the run is then `failed` with that step's error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

from app.credits import service as credits
from app.errors import service as errors
from app.idempotency import service as keys
from app.jobs import service
from app.jobs.models import JobName
from app.jobs.service import Job, JobContext, Step
from app.ratelimit import service as ratelimit
from app.reservations import service as reservations
from app.webhooks import service as webhooks


async def in_batches(prune: Callable[[int], Awaitable[int]], limit: int) -> int:
    """Call `prune(limit)` until a batch comes back short; the total."""
    total = 0
    while True:
        done = await prune(limit)
        total += done
        if done < limit:
            return total


async def abandon_dead_purchases(context: JobContext) -> int:
    """Credit purchases whose request died before an intent was recorded: `abandoned`, no money moved."""
    total, after = 0, 0
    while True:
        done, cursor = await credits.abandon_dead_purchases(
            context.services, after=after, limit=context.services.settings.jobs_batch_size
        )
        total += done
        if cursor is None:
            return total
        after = cursor


async def expire_holds(context: JobContext) -> int:
    """Write `expired` on holds past their expiry (capacity stopped counting them when they expired)."""
    s = context.services
    return await in_batches(lambda limit: reservations.expire_holds(s, limit), s.settings.jobs_batch_size)


async def prune_error_logs(context: JobContext) -> int:
    s = context.services
    before = context.now - timedelta(seconds=s.settings.error_log_retention_s)
    async with s.engine.connect() as conn:  # each batch commits on its own
        return await errors.prune_old_errors(conn, before, s.settings.jobs_batch_size)


async def prune_idempotency_keys(context: JobContext) -> int:
    s = context.services
    return await in_batches(
        lambda limit: keys.prune_expired_keys(s.sessions, s.settings.idempotency_retention_s, limit=limit),
        s.settings.jobs_batch_size,
    )


async def prune_rate_limit_buckets(context: JobContext) -> int:
    s = context.services
    return await in_batches(
        lambda limit: ratelimit.prune_idle_buckets(s.sessions, limit=limit), s.settings.jobs_batch_size
    )


async def prune_webhook_events(context: JobContext) -> int:
    s = context.services
    return await in_batches(
        lambda limit: webhooks.prune_finished_events(
            s.engine, s.settings.webhook_event_retention_s, limit=limit
        ),
        s.settings.jobs_batch_size,
    )


async def prune_job_runs(context: JobContext) -> int:
    s = context.services
    return await in_batches(
        lambda limit: service.prune_runs(s, s.settings.job_run_retention_s, limit=limit),
        s.settings.jobs_batch_size,
    )


async def prune_health_history(context: JobContext) -> int:
    s = context.services
    return await in_batches(
        lambda limit: service.prune_health_history(s, s.settings.health_retention_s, limit=limit),
        s.settings.jobs_batch_size,
    )


CLEANUP = Job(
    JobName.CLEANUP,
    (
        # before the keys are pruned: a purchase whose key is gone is abandoned as surely, but the
        # key's takeover is what tells a slow request and a late retry
        Step("expired_holds", expire_holds),
        Step("abandoned_purchases", abandon_dead_purchases),
        Step("idempotency_keys", prune_idempotency_keys),
        Step("rate_limit_buckets", prune_rate_limit_buckets),
        Step("webhook_events", prune_webhook_events),
        Step("job_runs", prune_job_runs),
        Step("error_logs", prune_error_logs),
        Step("health_history", prune_health_history),
    ),
)
