"""Idempotency keys as atomic phases (after Stripe and Brandur Leach's rocket-rides-atomic).

A request with a key runs as a loop over recovery points. Each phase is one
transaction that either moves the key to the next recovery point or finishes
it with a stored response. Before touching anything, a phase re-reads the key
under a row lock and checks that its fencing token is still current, so a slow
request that lost its key to a retry (after the lock timeout) can never commit.
A crash between phases leaves the key at its last recovery point; a retry with
the same key resumes there.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import CursorResult, bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from app.idempotency.models import IdempotencyKey as K
from app.idempotency.models import RecoveryPoint as RecoveryPoint  # re-exported for the domains
from app.observability.metrics import IDEMPOTENCY, IdempotencyOutcome
from app.problems import (
    IdempotencyKeyInUse,
    IdempotencyKeyInvalid,
    IdempotencyKeyMismatch,
    IdempotencyKeyRequired,
    ServiceError,
)
from app.services import Services

log = logging.getLogger("payguard.idempotency")

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class KeyedRequest:
    """What identifies a request for its key: who, which key, and what was asked."""

    user_id: str
    key: str | None
    method: str
    path: str
    body: bytes  # canonical encoding of the decoded body

    def fingerprint(self) -> str:
        return hashlib.sha256(b"\n".join([self.method.encode(), self.path.encode(), self.body])).hexdigest()


@dataclass(frozen=True)
class Key:
    """A request's hold on its key, and everything its phases need to run without the client.

    A request sent without an Idempotency-Key runs the same phases under a Key with no id:
    nothing is recorded and no fence is checked.
    """

    id: int | None
    token: int
    user_id: str
    recovery_point: RecoveryPoint
    params: Mapping[str, Any]


@dataclass(frozen=True)
class MoveTo:
    recovery_point: RecoveryPoint


@dataclass(frozen=True)
class Finish:
    status: int
    body: bytes  # JSON, encoded once so a replay is byte-identical


@dataclass(frozen=True)
class Result:
    status: int
    body: bytes
    replayed: bool = False


Outcome = MoveTo | Finish
# a phase is a plain function of (services, key): a completer can run it from the key's row alone
Phase = Callable[[Services, Key], Awaitable[Outcome]]
Phases = Mapping[RecoveryPoint, Phase]
Sessions = async_sessionmaker[AsyncSession]


class FencedOut(Exception):
    """The key was taken over by a retry: this request must not commit anything."""


def check_key(key: str | None, *, required: bool) -> str | None:
    if key is None:
        if required:
            raise IdempotencyKeyRequired("send an Idempotency-Key header (1-255 printable ASCII)")
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in key):
        raise IdempotencyKeyInvalid("Idempotency-Key must be 1-255 printable ASCII characters")
    return key


class Step:
    """One phase's transaction, already fenced: record where the key goes next.

    `conn` is the transaction's Core connection: phases run plain statements, no ORM
    unit of work, which keeps the money paths cheap in CPU (docs/performance.md).
    """

    def __init__(self, conn: AsyncConnection, key: Key) -> None:
        self.conn = conn
        self._key = key

    async def move(self, recovery_point: RecoveryPoint) -> MoveTo:
        if self._key.id is not None:
            await self.conn.execute(_MOVE, {"point": recovery_point, "key_id": self._key.id})
        return MoveTo(recovery_point)

    async def finish(self, status: int, body: Any) -> Finish:
        encoded = msgspec.json.encode(body)
        if self._key.id is not None:
            await self.conn.execute(
                _FINISH,
                {
                    "status": status,
                    "body": encoded.decode(),
                    "point": RecoveryPoint.FINISHED,
                    "key_id": self._key.id,
                },
            )
        return Finish(status, encoded)


# the hot path's statements are prebuilt SQL: building SQLAlchemy expressions per call cost
# more CPU than everything else a request does (docs/performance.md)
_FENCE = text("SELECT id FROM idempotency_keys WHERE id = :key_id AND fencing_token = :token FOR UPDATE")
_MOVE = text("UPDATE idempotency_keys SET recovery_point = :point WHERE id = :key_id")
_FINISH = text(
    "UPDATE idempotency_keys SET response_status = :status, response_body = :body,"
    " recovery_point = :point, locked_at = NULL WHERE id = :key_id"
)
_INSERT_KEY = text(
    "INSERT INTO idempotency_keys (user_id, key, request_method, request_path, request_fingerprint,"
    " request_params, recovery_point, fencing_token, locked_at)"
    " VALUES (:user_id, :key, :method, :path, :fingerprint, :params, :point, 1, now())"
    " ON CONFLICT (user_id, key) DO NOTHING RETURNING id"
).bindparams(bindparam("params", type_=JSONB))


@asynccontextmanager
async def step(sessions: Sessions, key: Key) -> AsyncIterator[Step]:
    """Open a phase's transaction; fail with FencedOut if the key is no longer ours."""
    async with sessions() as session, session.begin():
        conn = await session.connection()
        if key.id is not None:
            held = await conn.scalar(_FENCE, {"key_id": key.id, "token": key.token})
            if held is None:
                raise FencedOut
        yield Step(conn, key)


async def run(services: Services, request: KeyedRequest, params: Mapping[str, Any], phases: Phases) -> Result:
    """Run `phases` under the request's key: replay, conflict, or execute from the recovery point.

    `params` is what the phases read (JSON); it is stored with the key, so a retry, or a
    completer without the client, runs the same phases on the same input.
    Typed 4xx errors raised by a phase are stored as the key's response (replayed
    like a success); 429, 5xx and unexpected errors are not stored and release the
    key so the client's retry resumes at the last recovery point.
    """
    if request.key is None:
        key: Key | Result = Key(None, 0, request.user_id, RecoveryPoint.STARTED, params)
    else:
        key = await _acquire(services, request, params)
    if isinstance(key, Result):
        return key
    return await _drive(services, key, phases)


async def _drive(services: Services, key: Key, phases: Phases) -> Result:
    point = key.recovery_point
    try:
        while True:
            outcome = await phases[point](services, key)
            if isinstance(outcome, Finish):
                return Result(outcome.status, outcome.body)
            point = outcome.recovery_point
    except FencedOut:
        IDEMPOTENCY.labels(IdempotencyOutcome.FENCED_OUT).inc()
        raise IdempotencyKeyInUse(
            "a retry with this Idempotency-Key took over while this request was stalled"
        ) from None
    except ServiceError as exc:
        if key.id is None or not exc.final or exc.status >= 500:
            await _release(services.sessions, key)
            raise
        try:
            async with step(services.sessions, key) as st:
                await st.finish(exc.status, exc.problem())
        except FencedOut:
            IDEMPOTENCY.labels(IdempotencyOutcome.FENCED_OUT).inc()
        raise
    except BaseException:
        await _release(services.sessions, key)
        raise


async def _acquire(services: Services, req: KeyedRequest, params: Mapping[str, Any]) -> Key | Result:
    fingerprint = req.fingerprint()
    lock_timeout_s = services.settings.idempotency_lock_timeout_s
    async with services.sessions() as session, session.begin():
        key_id = await session.scalar(
            _INSERT_KEY,
            {
                "user_id": req.user_id,
                "key": req.key,
                "method": req.method,
                "path": req.path,
                "fingerprint": fingerprint,
                "params": params,
                "point": RecoveryPoint.STARTED,
            },
        )
        if key_id is not None:
            return Key(key_id, 1, req.user_id, RecoveryPoint.STARTED, params)

        row = (
            await session.execute(
                select(K, _lock_live(lock_timeout_s))
                .where(K.user_id == req.user_id, K.key == req.key)
                .with_for_update()
            )
        ).first()
        if row is None:  # pruned between our insert and select: the retry will insert afresh
            raise IdempotencyKeyInUse("the key was being pruned; retry the request")
        key, live = row
        if (key.request_method, key.request_path, key.request_fingerprint) != (
            req.method,
            req.path,
            fingerprint,
        ):
            IDEMPOTENCY.labels(IdempotencyOutcome.MISMATCH).inc()
            raise IdempotencyKeyMismatch(
                "this Idempotency-Key was used for a different request; use a new key",
                first_request=f"{key.request_method} {key.request_path}",
            )
        if key.response_status is not None:
            IDEMPOTENCY.labels(IdempotencyOutcome.REPLAYED).inc()
            return Result(key.response_status, (key.response_body or "").encode(), replayed=True)
        if live:
            IDEMPOTENCY.labels(IdempotencyOutcome.IN_USE).inc()
            raise IdempotencyKeyInUse("a request with this Idempotency-Key is still in progress")
        if not key.request_params:  # made before keys kept their parameters (migration 0002)
            key.request_params = dict(params)
        return await _take(session, key)


def _lock_live(lock_timeout_s: float) -> Any:
    return (K.locked_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, lock_timeout_s)).label(
        "lock_live"
    )


async def _take(session: AsyncSession, key: K) -> Key:
    """Hold a key that nobody holds (or whose holder's lock went stale): bump its fencing token."""
    if key.locked_at is not None:
        IDEMPOTENCY.labels(IdempotencyOutcome.TAKEOVER).inc()
        log.warning("taking over a stale idempotency key", extra={"key_id": key.id})
    key.fencing_token += 1
    key.locked_at = func.now()
    key.last_run_at = func.now()
    await session.flush()
    # the stored parameters, not this request's: a resumed key runs on what it started with
    point = RecoveryPoint(key.recovery_point)
    return Key(key.id, key.fencing_token, key.user_id, point, key.request_params)


async def complete_abandoned(services: Services, key_id: int, phases: Phases) -> Result | None:
    """Finish a key its client gave up on, from the key's row alone (rocket-rides' completer).

    Taken over exactly as a retry would take it (only once its lock is stale, with a new
    fencing token), then driven from its recovery point. None when the key is finished,
    gone, or still held by a live request.
    """
    async with services.sessions() as session, session.begin():
        row = (
            await session.execute(
                select(K, _lock_live(services.settings.idempotency_lock_timeout_s))
                .where(K.id == key_id)
                .with_for_update()
            )
        ).first()
        if row is None or row[0].response_status is not None or row.lock_live:
            return None
        key = await _take(session, row[0])
    return await _drive(services, key, phases)


async def _release(sessions: Sessions, key: Key) -> None:
    """Unlock after a failure we did not store, so the client may retry at once."""
    if key.id is None:
        return
    try:
        async with sessions() as session, session.begin():
            await session.execute(
                update(K).where(K.id == key.id, K.fencing_token == key.token).values(locked_at=None)
            )
    except Exception as exc:  # the lock then expires after the lock timeout instead
        # one line, no traceback: the usual cause is the database being gone, already answered as 503
        log.warning(
            "could not release idempotency key", extra={"key_id": key.id, "error": type(exc).__name__}
        )


_PRUNE_KEYS = text(
    "DELETE FROM idempotency_keys WHERE id IN (SELECT id FROM idempotency_keys"
    " WHERE created_at < now() - make_interval(secs => :retention)"
    " ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED)"
)


async def prune_expired_keys(sessions: Sessions, retention_s: int, *, limit: int) -> int:
    """Delete up to `limit` keys older than the retention (one short transaction); returns how many went."""
    async with sessions() as session, session.begin():
        result: CursorResult[Any] = await session.execute(  # type: ignore[assignment]
            _PRUNE_KEYS, {"retention": retention_s, "limit": limit}
        )
        return result.rowcount


# a key whose request is dead: no response stored, no live lock, and no run started within the lock
# timeout (a request released after a 5xx is not running either); the takeover bumps the fencing
# token as a retry's would, so the dead request, should it wake, commits nothing
_CLOSE_DEAD = text(
    "UPDATE idempotency_keys SET fencing_token = fencing_token + 1, locked_at = NULL,"
    " recovery_point = :finished, response_status = :status, response_body = :body, last_run_at = now()"
    " WHERE id = ANY(CAST(:ids AS bigint[])) AND response_status IS NULL"
    " AND last_run_at < now() - make_interval(secs => :timeout)"
    " AND (locked_at IS NULL OR locked_at < now() - make_interval(secs => :timeout))"
    " RETURNING id"
)
_EXISTING = text("SELECT id FROM idempotency_keys WHERE id = ANY(CAST(:ids AS bigint[]))")


async def close_dead_requests(
    conn: AsyncConnection, key_ids: list[int], lock_timeout_s: float, answer: ServiceError
) -> set[int]:
    """Of `key_ids`, the keys no request can ever run again, in the caller's transaction.

    A key whose request died (its lock stale, no run within the lock timeout) is taken over as a
    retry would take it and finished with `answer` as its stored response: a later retry replays
    that answer, and the dead request, should it wake, is fenced out. A key already pruned counts
    too (ids are never reused). A key held by a live request, or finished, is left alone. Lock
    keys before the rows their phases write, as the phases do.
    """
    closed = set(
        (
            await conn.execute(
                _CLOSE_DEAD,
                {
                    "ids": key_ids,
                    "timeout": lock_timeout_s,
                    "finished": RecoveryPoint.FINISHED,
                    "status": answer.status,
                    "body": msgspec.json.encode(answer.problem()).decode(),
                },
            )
        ).scalars()
    )
    existing = set((await conn.execute(_EXISTING, {"ids": key_ids})).scalars())
    return closed | (set(key_ids) - existing)
