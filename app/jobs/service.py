"""Running a job: its advisory lock, its record in job_runs, its named steps; and what the API reads.

Every run of a job takes the job's PostgreSQL advisory lock on a connection of its own, held for
the whole run. A run that cannot take it does nothing and is recorded as `skipped`. The lock
holder is the only run of its job, so a `running` record it finds was left by a process that
died mid-run: it is closed as `abandoned`. Steps are independent: each one runs even when an
earlier one failed, and the run fails (with every failed step's error) if any did.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.jobs.models import JobName, RunOutcome
from app.jobs.schemas import AlertOut, JobRunOut, JobRunPage, MetricOut, OperationsHealth
from app.observability.metrics import JOB_LAST_SUCCESS, MissedSource
from app.pagination import page, parse_cursor
from app.problems import ServiceError
from app.services import Services

log = logging.getLogger("payguard.jobs")

Counts = dict[str, int]


@dataclass(frozen=True)
class JobContext:
    services: Services
    now: datetime  # the run's clock: the database's at its start, unless a test injects one


@dataclass(frozen=True)
class Step:
    """One named, independent piece of a job: its result is the run's count under its name (an
    int), or several counts (a dict)."""

    name: str
    run: Callable[[JobContext], Awaitable[int | Counts]]


@dataclass(frozen=True)
class Job:
    name: JobName
    steps: tuple[Step, ...]


# pg_try_advisory_lock(LOCK_SPACE, key): the migrations' lock is a one-key lock, another space
LOCK_SPACE = 7_365_002
LOCK_KEYS = {JobName.CLEANUP: 1, JobName.HEALTH: 2, JobName.RECONCILE: 3}
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:space, :key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:space, :key)")
MAX_ERROR_CHARS = 2_000

_COLUMNS = "id, job, started_at, finished_at, outcome, counts, error"
_SKIPPED = text(
    "INSERT INTO job_runs (job, finished_at, outcome, counts)"  # noqa: S608 (constants)
    f" VALUES (:job, now(), :outcome, '{{}}') RETURNING {_COLUMNS}"
)
_CLOSE_ABANDONED = text(
    "UPDATE job_runs SET outcome = :abandoned, finished_at = now(),"
    " error = 'the run never finished: its process died or lost the database mid-run'"
    " WHERE job = :job AND outcome = :running"
)
_START = text(
    "INSERT INTO job_runs (job, outcome, counts) VALUES (:job, :running, '{}') RETURNING id, started_at"
)
_FINISH = text(
    "UPDATE job_runs SET finished_at = now(), outcome = :outcome, counts = :counts, error = :error"  # noqa: S608
    f" WHERE id = :id RETURNING {_COLUMNS}"
).bindparams(bindparam("counts", type_=JSONB))


async def run_job(services: Services, job: Job, *, now: datetime | None = None) -> JobRunOut:
    """Run `job` once under its advisory lock, recorded in job_runs; `skipped` if another run holds it.

    Never raises for a failed step (the record says `failed` and why); raises only when the
    database cannot record the run at all.
    """
    key = {"space": LOCK_SPACE, "key": LOCK_KEYS[job.name]}
    # a connection of its own, not in a transaction: the lock lives as long as the session does
    # (a transaction-mode pooler cannot hold it: point the jobs at PostgreSQL or a session pooler)
    async with services.engine.connect() as lock:
        held = bool(await lock.scalar(_TRY_LOCK, key))
        await lock.commit()
        if not held:
            async with services.engine.begin() as conn:
                skipped = _out(
                    (await conn.execute(_SKIPPED, {"job": job.name, "outcome": RunOutcome.SKIPPED})).one()
                )
            log.info("job skipped: another run holds its lock", extra={"job": job.name, "run_id": skipped.id})
            return skipped
        try:
            return await _run_locked(services, job, now)
        finally:
            await _unlock(lock, key)


async def _unlock(lock: AsyncConnection, key: dict[str, int]) -> None:
    try:
        await lock.execute(_UNLOCK, key)
        await lock.commit()
    except Exception:  # a session lock must never go back to the pool: drop the connection instead
        await lock.invalidate()


async def _run_locked(services: Services, job: Job, now: datetime | None) -> JobRunOut:
    async with services.engine.begin() as conn:
        closed = await conn.execute(
            _CLOSE_ABANDONED,
            {"job": job.name, "abandoned": RunOutcome.ABANDONED, "running": RunOutcome.RUNNING},
        )
        run_id, started_at = (
            await conn.execute(_START, {"job": job.name, "running": RunOutcome.RUNNING})
        ).one()
    if closed.rowcount:
        log.warning(
            "closed runs left running by a dead process", extra={"job": job.name, "runs": closed.rowcount}
        )
    log.info("job started", extra={"job": job.name, "run_id": run_id})
    context = JobContext(services, now or started_at)
    counts: Counts = {}
    errors: list[str] = []
    try:
        for step in job.steps:
            try:
                result = await step.run(context)
            except Exception as exc:
                expected = isinstance(exc, DBAPIError | ServiceError | OSError)
                log.error(
                    "job step failed",
                    extra={"job": job.name, "step": step.name, "error": describe(exc)},
                    exc_info=not expected,  # a traceback only where the cause is ours to find
                )
                errors.append(f"{step.name}: {describe(exc)}")
                continue
            counts.update(result if isinstance(result, dict) else {step.name: result})
    except BaseException:  # cancelled (the process is stopping): say so, if the database still answers
        await _finish(services, run_id, RunOutcome.FAILED, counts, "interrupted: the process was stopping")
        raise
    outcome = RunOutcome.FAILED if errors else RunOutcome.SUCCEEDED
    run = await _finish(services, run_id, outcome, counts, "; ".join(errors)[:MAX_ERROR_CHARS] or None)
    if run.outcome == RunOutcome.SUCCEEDED and run.finished_at is not None:
        JOB_LAST_SUCCESS.labels(job.name).set(run.finished_at.timestamp())
    log.info("job finished", extra={"job": job.name, "run_id": run_id, "outcome": outcome, "counts": counts})
    return run


async def _finish(
    services: Services, run_id: int, outcome: RunOutcome, counts: Counts, error: str | None
) -> JobRunOut:
    async with services.engine.begin() as conn:
        row = (
            await conn.execute(_FINISH, {"id": run_id, "outcome": outcome, "counts": counts, "error": error})
        ).one()
    return _out(row)


def describe(exc: BaseException) -> str:
    """One line about a failure: the driver's message for a database error (SQLAlchemy's own text
    carries the statement and its parameters), the detail of a typed error."""
    if isinstance(exc, DBAPIError):
        # asyncpg's own error, named after its SQLSTATE, under SQLAlchemy's DBAPI wrapper
        driver: BaseException = (exc.orig.__cause__ if exc.orig is not None else None) or exc.orig or exc
        return f"{type(driver).__name__}: {driver}".splitlines()[0]
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _out(row: Any) -> JobRunOut:
    return JobRunOut(
        id=row.id,
        job=row.job,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=row.outcome,
        counts=row.counts,
        error=row.error,
    )


_LIST = text(
    f"SELECT {_COLUMNS} FROM job_runs WHERE (CAST(:job AS text) IS NULL OR job = :job)"  # noqa: S608
    " AND (CAST(:before AS bigint) IS NULL OR id < :before) ORDER BY id DESC LIMIT :limit"
)


async def list_runs(services: Services, *, job: str | None, cursor: str | None, limit: int) -> JobRunPage:
    """Newest first, of one job or all."""
    before = parse_cursor(cursor)
    async with services.engine.connect() as conn:
        rows = (await conn.execute(_LIST, {"job": job, "before": before, "limit": limit + 1})).all()
    items, next_cursor = page(rows, limit)
    return JobRunPage([_out(r) for r in items], next_cursor)


_LAST_SUCCESSES = text(
    "SELECT job, max(finished_at) AS at FROM job_runs WHERE outcome = :succeeded GROUP BY job"
)


async def last_successes(conn: AsyncConnection) -> dict[str, datetime]:
    """When each job last finished a run that succeeded (the scrape's gauge)."""
    rows = await conn.execute(_LAST_SUCCESSES, {"succeeded": RunOutcome.SUCCEEDED})
    return {row.job: row.at for row in rows}


# reconcile's steps count what they found as `<source>_missed` (events_missed, intents_missed)
_MISSED_RECENTLY = text(
    "SELECT c.key, sum(c.value::bigint) AS n FROM job_runs, jsonb_each_text(job_runs.counts) AS c"
    " WHERE job = :job AND finished_at > now() - make_interval(secs => :window) AND c.key = ANY(:keys)"
    " GROUP BY c.key"
)


async def missed_recently(conn: AsyncConnection, window_s: float) -> dict[MissedSource, int]:
    """What reconcile runs that finished in the last `window_s` seconds found Stripe settled and we never
    heard of, by source (the scrape's gauge: a CronJob's own counters die with its pod)."""
    keys = {f"{source}_missed": source for source in MissedSource}
    params = {"job": JobName.RECONCILE, "window": window_s, "keys": list(keys)}
    found = {keys[row.key]: int(row.n) for row in await conn.execute(_MISSED_RECENTLY, params)}
    return {source: found.get(source, 0) for source in MissedSource}


_DUE_IN = text(
    "SELECT extract(epoch FROM started_at + make_interval(secs => :interval) - now()) FROM job_runs"
    " WHERE job = :job AND outcome <> :skipped ORDER BY id DESC LIMIT 1"
)


async def seconds_until_due(services: Services, job: JobName, interval_s: float) -> float:
    """How long until `job` should run again, counted from its last run that was not skipped (by
    any process on this database); 0 or less: now."""
    async with services.engine.connect() as conn:
        due = await conn.scalar(_DUE_IN, {"job": job, "interval": interval_s, "skipped": RunOutcome.SKIPPED})
    return float(due) if due is not None else 0.0


_PRUNE_RUNS = text(
    "DELETE FROM job_runs WHERE id IN (SELECT id FROM job_runs"
    " WHERE started_at < now() - make_interval(secs => :retention) AND outcome <> :running"
    " ORDER BY id LIMIT :limit)"
)
_PRUNE_METRICS = text(
    "DELETE FROM platform_metrics WHERE id IN (SELECT id FROM platform_metrics"
    " WHERE window_end < now() - make_interval(secs => :retention) ORDER BY id LIMIT :limit)"
)
_PRUNE_ALERTS = text(
    "DELETE FROM platform_alerts WHERE id IN (SELECT id FROM platform_alerts"
    " WHERE resolved_at < now() - make_interval(secs => :retention) ORDER BY id LIMIT :limit)"
)


async def prune_runs(services: Services, retention_s: int, *, limit: int) -> int:
    """Up to `limit` finished runs that started before the retention."""
    params = {"retention": retention_s, "limit": limit, "running": RunOutcome.RUNNING}
    async with services.engine.begin() as conn:
        return int((await conn.execute(_PRUNE_RUNS, params)).rowcount)


async def prune_health_history(services: Services, retention_s: int, *, limit: int) -> int:
    """Up to `limit` platform metrics, and as many resolved alerts, older than the retention."""
    params = {"retention": retention_s, "limit": limit}
    async with services.engine.begin() as conn:
        metrics = (await conn.execute(_PRUNE_METRICS, params)).rowcount
        alerts = (await conn.execute(_PRUNE_ALERTS, params)).rowcount
    return int(metrics + alerts)


_READ_WATERMARK = text("SELECT watermark FROM job_watermarks WHERE job = :job")
_SAVE_WATERMARK = text(
    "INSERT INTO job_watermarks (job, watermark) VALUES (:job, :at)"
    " ON CONFLICT (job) DO UPDATE SET watermark = excluded.watermark, updated_at = now()"
)


async def read_watermark(services: Services, job: JobName) -> datetime | None:
    async with services.engine.connect() as conn:
        watermark: datetime | None = await conn.scalar(_READ_WATERMARK, {"job": job})
    return watermark


async def save_watermark(services: Services, job: JobName, at: datetime) -> None:
    async with services.engine.begin() as conn:
        await conn.execute(_SAVE_WATERMARK, {"job": job, "at": at})


_LATEST_METRICS = text(
    "SELECT DISTINCT ON (metric) metric, window_start, window_end, total, failed, failure_rate, threshold"
    " FROM platform_metrics ORDER BY metric, window_end DESC"
)
_OPEN_ALERTS = text(
    "SELECT id, metric, failure_rate, threshold, total, failed, message, opened_at, last_seen_at"
    " FROM platform_alerts WHERE resolved_at IS NULL ORDER BY id"
)


async def operations_health(services: Services) -> OperationsHealth:
    """The health job's latest figures per metric, and the alerts still open."""
    async with services.engine.connect() as conn:
        metrics = (await conn.execute(_LATEST_METRICS)).all()
        alerts = (await conn.execute(_OPEN_ALERTS)).all()
    open_metrics = {a.metric for a in alerts}
    return OperationsHealth(
        measured_at=max((m.window_end for m in metrics), default=None),
        metrics=[
            MetricOut(
                metric=m.metric,
                window_start=m.window_start,
                window_end=m.window_end,
                total=m.total,
                failed=m.failed,
                failure_rate=m.failure_rate,
                threshold=m.threshold,
                breached=m.metric in open_metrics,
            )
            for m in metrics
        ],
        open_alerts=[
            AlertOut(
                id=a.id,
                metric=a.metric,
                failure_rate=a.failure_rate,
                threshold=a.threshold,
                total=a.total,
                failed=a.failed,
                message=a.message,
                opened_at=a.opened_at,
                last_seen_at=a.last_seen_at,
            )
            for a in alerts
        ],
    )
