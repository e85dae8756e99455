"""Claims are leases with a fencing token, the same SQL for every queue.

A claim sets a fresh token from one sequence and a lease expiry on the database's
clock; an item whose lease has expired (its worker died or stalled) can be claimed
again, which changes the token. The transaction that commits an effect first locks
the item where the token is still its own, so a worker that lost its lease can
never commit: its fence finds no row.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from app.failures.engine import NeedsHuman, RetryLater
from app.http import database_unreachable  # the database gone: the lease expires, nothing is recorded
from app.observability.metrics import LEASE_TAKEOVERS, WORKER_CLAIMS

WORK_CHANNEL = "payguard_work"  # the worker LISTENs here; one NOTIFY per commit, never per row


def claim_statement(table: str, due: str, order_by: str, returning: str) -> TextClause:
    """Lease up to :batch due rows of `table` for :lease_s seconds; RETURNING `returning`, taken_over, token.

    `due` and `order_by` are SQL over the alias `t`; they must not depend on the lease columns. Write
    statuses in `due` as literals, not parameters: the driver prepares the claim once per connection,
    and PostgreSQL's cached generic plan can only use a partial index (`WHERE status = 'pending'`)
    whose predicate it can prove from the statement's text; with a parameter it walks the table's
    primary key through every finished row, on every claim.
    """
    return text(
        f"WITH due AS (SELECT t.id, t.lease_token IS NOT NULL AS taken_over FROM {table} t"
        f" WHERE {due} AND (t.lease_expires_at IS NULL OR t.lease_expires_at < now())"
        f" ORDER BY {order_by} LIMIT :batch FOR UPDATE OF t SKIP LOCKED),"
        " lease AS (SELECT nextval('work_lease_tokens') AS token,"
        " now() + make_interval(secs => :lease_s) AS expires_at)"
        f" UPDATE {table} w SET lease_token = lease.token, lease_expires_at = lease.expires_at"
        f" FROM due, lease WHERE w.id = due.id RETURNING due.taken_over, w.lease_token AS token, {returning}"
    )


def fence_statement(table: str) -> TextClause:
    """Lock row :id if its lease is still :token's (and say the time); no row means this worker lost it."""
    return text(f"SELECT now() AS now FROM {table} t WHERE t.id = :id AND t.lease_token = :token FOR UPDATE")


# A queue table's statistics are always stale: a burst arrives after a quiet time, when the planner
# thinks few rows are due, and a claim planned as a bitmap scan and sort of every due row costs
# O(backlog) per claim. In a claim's transaction the planner walks an index in order and stops at the
# batch (docs/performance.md). Local to the transaction: no session state, which a transaction-mode
# pooler would hand to another client.
IN_INDEX_ORDER = text(
    "SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true),"
    " set_config('enable_seqscan', 'off', true)"
)


@functools.cache
def _driver_sql(statement: TextClause) -> str:
    return statement.text.replace(":batch", "$1").replace(":lease_s", "$2")


FENCED = "fenced"  # the outcome of an attempt whose worker had lost its lease


@dataclass(frozen=True)
class Claimed:
    """A leased row: commit nothing about it unless the fence still finds `token` on it."""

    id: int
    token: int
    taken_over: bool  # the previous lease had expired: its worker died or stalled
    row: Any  # the claim's RETURNING row


Commit = Callable[[AsyncConnection], Awaitable[str]]  # the effect, in the fenced transaction; an outcome
Decide = Callable[[AsyncConnection, datetime, str], Awaitable[str]]  # (now, outcome): record the success
Fail = Callable[[AsyncConnection, datetime, str, bool], Awaitable[str]]  # (now, error, needs a human)


async def claim(
    conn: AsyncConnection,
    statement: TextClause,
    queue: str,
    *,
    batch: int,
    lease_s: float,
) -> list[Claimed]:
    """Run a claim statement (claim_statement) in a transaction of its own; count claims and takeovers.

    On the driver's connection: the claim is the worker's most frequent statement, and SQLAlchemy's
    handling of a statement and its rows cost as much CPU as the claim itself (docs/performance.md).
    """
    raw: Any = (await conn.get_raw_connection()).driver_connection
    async with raw.transaction():
        await raw.execute(IN_INDEX_ORDER.text)
        records = await raw.fetch(_driver_sql(statement), batch, lease_s)
    rows = [SimpleNamespace(**record) for record in records]
    WORKER_CLAIMS.labels(queue).inc(len(rows))
    if taken := sum(r.taken_over for r in rows):
        LEASE_TAKEOVERS.labels(queue).inc(taken)
    return [Claimed(r.id, r.token, r.taken_over, r) for r in rows]


def describe(exc: BaseException) -> tuple[str, bool]:
    """(error text, permanent) for a failed attempt: only NeedsHuman is permanent."""
    if isinstance(exc, NeedsHuman | RetryLater):
        return str(exc) or type(exc).__name__, isinstance(exc, NeedsHuman)
    return f"{type(exc).__name__}: {exc}", False


async def fenced_attempt(
    sessions: async_sessionmaker[AsyncSession],
    fence: TextClause,
    item: Claimed,
    perform: Callable[[], Awaitable[Commit]],
    succeed: Decide,
    fail: Fail,
) -> str:
    """One attempt: `perform` outside any transaction (an SMTP send), then one transaction that
    fences the lease, commits the effect and records the outcome.

    If the effect fails, that transaction rolls back and a second one (fenced again) records the
    failure: the common, successful path pays for no savepoint. A lost lease commits nothing
    (FENCED); losing the database loses nothing: the lease expires and the item is claimed again.
    """
    commit: Commit | None = None
    error: str | None = None
    permanent = False
    try:
        commit = await perform()
    except Exception as exc:
        error, permanent = describe(exc)
    async with sessions() as session:
        if commit is not None:
            effect_failed = False
            try:
                async with session.begin():
                    conn = await session.connection()
                    now = await _fenced(conn, fence, item)
                    if now is None:
                        return FENCED
                    try:
                        outcome = await commit(conn)
                    except Exception:
                        effect_failed = True
                        raise
                    return await succeed(conn, now, outcome)
            except Exception as exc:
                if not effect_failed or database_unreachable(exc):
                    raise
                error, permanent = describe(exc)
        assert error is not None
        async with session.begin():
            conn = await session.connection()
            now = await _fenced(conn, fence, item)
            if now is None:
                return FENCED
            return await fail(conn, now, error, permanent)


async def _fenced(conn: AsyncConnection, fence: TextClause, item: Claimed) -> datetime | None:
    """The transaction's time if the item's lease is still this worker's (its row now locked), else None."""
    row = (await conn.execute(fence, {"id": item.id, "token": item.token})).first()
    return None if row is None else row.now
