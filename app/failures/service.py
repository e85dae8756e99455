"""Failed operations: recorded with the failure, retried by one engine, inspected by admins.

An operation's first attempt belongs to its queue (a webhook event, an outbox email);
when it fails, a failed_operations row takes over: it is the retry queue, and in
Kubernetes its mirror is a FailedOperation resource. Whatever drives the retries
(the worker here, the operator there) calls `run_retry`, which asks
`app.failures.engine` what happens next.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import msgspec
from sqlalchemy import bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

from app.config import Settings
from app.errors.scrub import scrub_text
from app.failures import engine
from app.failures.engine import NotRetryable, Policy, RetryState
from app.failures.models import FailedOperation, FailureStatus, OperationKind
from app.failures.schemas import AttemptOut, FailedOperationOut, FailedOperationPage, FailureDetail
from app.observability.metrics import WORK_DONE, Queue, WorkOutcome
from app.pagination import page, parse_cursor
from app.problems import NotFound, ServiceError
from app.services import Services
from app.worker.leases import (
    WORK_CHANNEL,
    Claimed,
    Commit,
    claim_statement,
    fence_statement,
    fenced_attempt,
)


class OperationSucceeded(ServiceError):
    status, type, title = 409, "operation-succeeded", "The operation already succeeded"


class Operation(Protocol):
    """What a kind of failed operation does when retried (registered in app/worker/registry.py)."""

    async def perform(self, services: Services, item_id: int | None, payload: dict[str, Any]) -> Commit:
        """Do what happens outside a transaction (an SMTP send); return the effect to commit."""

    async def give_up(self, conn: AsyncConnection, item_id: int | None) -> None:
        """Mark the operation's item dead: no more attempts."""


def policy(settings: Settings, kind: str) -> Policy:
    retries = {
        OperationKind.EMAIL: settings.email_max_retries,
        OperationKind.WEBHOOK: settings.webhook_max_retries,
        OperationKind.REFUND_SHORTFALL: 0,  # a human decides: retried only when asked to
    }[OperationKind(kind)]
    return Policy(retries, settings.retry_base_delay_s, settings.retry_max_delay_s)


def _entry(attempt: int, now: datetime, error: str | None, outcome: str) -> list[dict[str, Any]]:
    return [{"attempt": attempt, "at": now.isoformat(), "outcome": outcome, "error": error}]


# wakes whatever drives retries (the worker, or the operator, which also mirrors new rows)
_NOTIFY_RETRIES = text(f"SELECT pg_notify('{WORK_CHANNEL}', 'failed_operations')")
_INSERT = text(
    "INSERT INTO failed_operations (kind, reference, item_id, payload, status, attempts, max_attempts,"
    " next_attempt_at, last_error, history, trace_context) VALUES (:kind, :reference, :item_id, :payload,"
    " :status, :attempts, :max_attempts, :next_attempt_at, :last_error, :history, :trace_context)"
).bindparams(
    bindparam("payload", type_=JSONB),
    bindparam("history", type_=JSONB),
    bindparam("trace_context", type_=JSONB),
)


async def record_failure(
    conn: AsyncConnection,
    settings: Settings,
    *,
    kind: OperationKind,
    reference: str,
    item_id: int | None,
    payload: dict[str, Any],
    now: datetime,
    error: str,
    permanent: bool,
    trace_context: dict[str, str] | None = None,
) -> RetryState:
    """Record a first failure in the caller's transaction; its retries are scheduled from here."""
    state = engine.first_failure(
        policy(settings, kind), now, error, permanent=permanent, draw=random.random()
    )
    await conn.execute(
        _INSERT,
        {
            "kind": kind,
            "reference": reference,
            "item_id": item_id,
            "payload": payload,
            "status": state.status,
            "attempts": state.attempts,
            "max_attempts": state.max_attempts,
            "next_attempt_at": state.next_attempt_at,
            "last_error": state.last_error,
            "history": _entry(
                1, now, error, WorkOutcome.DEAD if state.status == FailureStatus.DEAD else WorkOutcome.FAILED
            ),
            "trace_context": trace_context or {},
        },
    )
    if settings.retry_driver == "kubernetes":  # at commit, the operator mirrors it as a resource
        await conn.execute(_NOTIFY_RETRIES)
    return state


_COLUMNS = (
    "w.id, w.kind, w.item_id, w.payload, w.status, w.attempts, w.max_attempts,"
    " w.next_attempt_at, w.last_error"
)
# statuses inlined, not bound: a cached generic plan can then use the partial index (leases.py)
CLAIM = claim_statement(
    "failed_operations",
    f"t.status IN ('{FailureStatus.PENDING}', '{FailureStatus.RETRYING}') AND t.next_attempt_at <= now()"
    " AND NOT t.suspended",
    "t.next_attempt_at",
    _COLUMNS,
)
_FENCE = fence_statement("failed_operations")
_UPDATE = text(
    "UPDATE failed_operations SET status = :status, attempts = :attempts, max_attempts = :max_attempts,"
    " next_attempt_at = :next_attempt_at, last_error = :last_error, history = history || :entry,"
    " lease_token = NULL, lease_expires_at = NULL, updated_at = now() WHERE id = :id"
).bindparams(bindparam("entry", type_=JSONB))


def _state(row: Any) -> RetryState:
    return RetryState(
        FailureStatus(row.status), row.attempts, row.max_attempts, row.next_attempt_at, row.last_error
    )


async def _save(conn: AsyncConnection, op_id: int, state: RetryState, entry: list[dict[str, Any]]) -> None:
    await conn.execute(
        _UPDATE,
        {
            "id": op_id,
            "status": state.status,
            "attempts": state.attempts,
            "max_attempts": state.max_attempts,
            "next_attempt_at": state.next_attempt_at,
            "last_error": state.last_error,
            "entry": entry,
        },
    )


async def run_retry(services: Services, item: Claimed) -> str:
    """One retry of a claimed failed operation: succeeded, scheduled again, or dead past its budget."""
    op = item.row
    operation: Operation = services.operations[op.kind]
    rules = policy(services.settings, op.kind)
    state = _state(op)
    payload = op.payload if isinstance(op.payload, dict) else msgspec.json.decode(op.payload)

    async def perform() -> Commit:
        return await operation.perform(services, op.item_id, payload)

    async def succeed(conn: AsyncConnection, now: datetime, outcome: str) -> str:
        done = engine.record_attempt(state, rules, now, None, permanent=False, draw=0.0)
        await _save(conn, op.id, done, _entry(done.attempts, now, None, outcome))
        return WorkOutcome.DONE

    async def fail(conn: AsyncConnection, now: datetime, error: str, permanent: bool) -> str:
        after = engine.record_attempt(state, rules, now, error, permanent=permanent, draw=random.random())
        dead = after.status == FailureStatus.DEAD
        outcome = WorkOutcome.DEAD if dead else WorkOutcome.FAILED
        await _save(conn, op.id, after, _entry(after.attempts, now, error, outcome))
        if dead:
            await operation.give_up(conn, op.item_id)
        return outcome

    outcome = await fenced_attempt(services.sessions, _FENCE, item, perform, succeed, fail)
    WORK_DONE.labels(Queue.RETRIES, op.kind, outcome).inc()
    return outcome


async def list_failed_operations(
    services: Services, *, kind: str | None, status: str | None, cursor: str | None, limit: int
) -> FailedOperationPage:
    """Newest first."""
    before = parse_cursor(cursor)
    query = select(FailedOperation)
    if kind is not None:
        query = query.where(FailedOperation.kind == kind)
    if status is not None:
        query = query.where(FailedOperation.status == status)
    if before is not None:
        query = query.where(FailedOperation.id < before)
    async with services.sessions() as session:
        rows = (await session.scalars(query.order_by(FailedOperation.id.desc()).limit(limit + 1))).all()
    items, next_cursor = page(rows, limit)
    return FailedOperationPage([_out(r) for r in items], next_cursor)


def _out(r: FailedOperation) -> FailedOperationOut:
    return FailedOperationOut(
        id=r.id,
        kind=r.kind,
        reference=r.reference,
        status=r.status,
        attempts=r.attempts,
        max_attempts=r.max_attempts,
        last_error=r.last_error,
        next_attempt_at=r.next_attempt_at,
        suspended=r.suspended,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


async def get_failed_operation(services: Services, op_id: int) -> FailureDetail:
    async with services.sessions() as session:
        row = await session.get(FailedOperation, op_id)
    if row is None:
        raise NotFound(f"no failed operation {op_id}")
    history = [AttemptOut(**h) for h in row.history]
    return FailureDetail(
        **msgspec.structs.asdict(_out(row)), item_id=row.item_id, payload=row.payload, history=history
    )


async def retry_failed_operation(services: Services, op_id: int) -> FailedOperationOut:
    """An admin's "retry now": due at once; a dead or discarded one gets one more attempt."""
    async with services.sessions() as session, session.begin():
        row = await session.get(FailedOperation, op_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no failed operation {op_id}")
        now = await session.scalar(text("SELECT now()"))
        try:
            state = engine.retry_now(_state(row), now)
        except NotRetryable as exc:
            raise OperationSucceeded(str(exc)) from None
        row.status, row.max_attempts, row.next_attempt_at = (
            state.status,
            state.max_attempts,
            state.next_attempt_at,
        )
        row.updated_at = now
        await session.execute(_NOTIFY_RETRIES)
    return _out(row)


async def discard_failed_operation(services: Services, op_id: int) -> FailedOperationOut:
    """An admin gives up on it: never attempted again, and its item is marked dead."""
    async with services.sessions() as session, session.begin():
        row = await session.get(FailedOperation, op_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no failed operation {op_id}")
        try:
            state = engine.discard(_state(row))
        except NotRetryable as exc:
            raise OperationSucceeded(str(exc)) from None
        row.status, row.next_attempt_at = state.status, None
        row.lease_token = row.lease_expires_at = None  # a retry in flight commits nothing now
        row.updated_at = await session.scalar(text("SELECT now()"))
        operation: Operation = services.operations[row.kind]
        await operation.give_up(await session.connection(), row.item_id)
    return _out(row)


async def suspend_failed_operation(services: Services, op_id: int, suspended: bool) -> FailedOperationOut:
    """Pause or resume: while suspended, no attempt starts (one already running finishes)."""
    async with services.sessions() as session, session.begin():
        row = await session.get(FailedOperation, op_id, with_for_update=True)
        if row is None:
            raise NotFound(f"no failed operation {op_id}")
        if row.suspended != suspended:
            row.suspended = suspended
            row.updated_at = await session.scalar(text("SELECT now()"))
            if not suspended:
                await session.execute(_NOTIFY_RETRIES)
    return _out(row)


MIRROR_ERROR_CHARS = 256  # a resource shows a diagnosis; the row keeps the whole error
_EMAIL_ADDRESS = re.compile(r"[^\s<>@\"',;:()\[\]]++@[^\s<>@\"',;:()\[\]]++")


@dataclass(frozen=True)
class Mirror:
    """What a FailedOperation resource may show of a row: no payload, no addresses, no secrets."""

    id: int
    kind: str
    reference: str
    status: FailureStatus
    attempts: int
    max_attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    suspended: bool
    expired: bool  # succeeded or discarded longer ago than the mirrors' TTL: its resource goes


_MIRRORS = text(
    "SELECT id, kind, reference, status, attempts, max_attempts, next_attempt_at, last_error, suspended,"
    " status IN (:succeeded, :discarded) AND updated_at < now() - make_interval(secs => :ttl_s) AS expired"
    " FROM failed_operations WHERE (:needing AND status IN (:pending, :retrying, :dead)) OR id = ANY(:ids)"
    " ORDER BY id"
)


def shown_error(error: str | None) -> str | None:
    """An error as a resource may show it: scrubbed of secrets and addresses, and short."""
    if error is None:
        return None
    shown = _EMAIL_ADDRESS.sub("[REDACTED:email]", scrub_text(error))
    return shown if len(shown) <= MIRROR_ERROR_CHARS else shown[: MIRROR_ERROR_CHARS - 1] + "…"


async def mirrors(services: Services, ids: Collection[int], *, needing: bool) -> list[Mirror]:
    """The rows `ids`, whatever their status, and if `needing`, every row that needs a resource
    (pending, retrying, dead)."""
    params = {
        "pending": FailureStatus.PENDING,
        "retrying": FailureStatus.RETRYING,
        "dead": FailureStatus.DEAD,
        "succeeded": FailureStatus.SUCCEEDED,
        "discarded": FailureStatus.DISCARDED,
        "ttl_s": services.settings.operator_finished_ttl_s,
        "ids": list(ids),
        "needing": needing,
    }
    async with services.engine.connect() as conn:
        rows = (await conn.execute(_MIRRORS, params)).all()
    return [
        Mirror(
            r.id,
            r.kind,
            r.reference,
            FailureStatus(r.status),
            r.attempts,
            r.max_attempts,
            r.next_attempt_at,
            shown_error(r.last_error),
            r.suspended,
            r.expired,
        )
        for r in rows
    ]


_DUE = text(
    "SELECT count(*) AS depth, min(next_attempt_at) AS oldest FROM failed_operations"
    " WHERE status IN (:pending, :retrying) AND next_attempt_at <= now()"
)
_COUNTS = text("SELECT kind, status, count(*) AS n FROM failed_operations GROUP BY kind, status")
_OLDEST_OPEN = text("SELECT min(created_at) FROM failed_operations WHERE status IN (:pending, :retrying)")


async def backlog(conn: AsyncConnection) -> tuple[int, datetime | None]:
    """Retries that are due: how many, and since when the oldest has been."""
    params = {"pending": FailureStatus.PENDING, "retrying": FailureStatus.RETRYING}
    row = (await conn.execute(_DUE, params)).one()
    return row.depth, row.oldest


async def oldest_open(conn: AsyncConnection) -> datetime | None:
    """When the oldest operation still pending or retrying first failed (suspended or not yet due too)."""
    params = {"pending": FailureStatus.PENDING, "retrying": FailureStatus.RETRYING}
    oldest: datetime | None = await conn.scalar(_OLDEST_OPEN, params)
    return oldest


async def counts(conn: AsyncConnection) -> dict[tuple[str, str], int]:
    """Failed operations by (kind, status), every pair present (0 when none)."""
    seen = {(r.kind, r.status): r.n for r in (await conn.execute(_COUNTS)).all()}
    return {(k, st): seen.get((k, st), 0) for k in OperationKind for st in FailureStatus}
