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
from sqlalchemy import CursorResult, delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from app.idempotency.models import IdempotencyKey as K
from app.observability.metrics import IDEMPOTENCY
from app.problems import (
    IdempotencyKeyInUse,
    IdempotencyKeyInvalid,
    IdempotencyKeyMismatch,
    IdempotencyKeyRequired,
    ServiceError,
)

log = logging.getLogger("payguard.idempotency")

STARTED = "started"
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
class Claim:
    """This request's hold on a key; None-claims run the same phases without a key."""

    key_id: int
    token: int
    recovery_point: str


@dataclass(frozen=True)
class MoveTo:
    recovery_point: str


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
Phase = Callable[[Claim | None], Awaitable[Outcome]]
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

    def __init__(self, conn: AsyncConnection, claim: Claim | None) -> None:
        self.conn = conn
        self._claim = claim

    async def move(self, recovery_point: str) -> MoveTo:
        if self._claim is not None:
            await self.conn.execute(_MOVE, {"point": recovery_point, "key_id": self._claim.key_id})
        return MoveTo(recovery_point)

    async def finish(self, status: int, body: Any) -> Finish:
        encoded = msgspec.json.encode(body)
        if self._claim is not None:
            await self.conn.execute(
                _FINISH, {"status": status, "body": encoded.decode(), "key_id": self._claim.key_id}
            )
        return Finish(status, encoded)


# the hot path's statements are prebuilt SQL: building SQLAlchemy expressions per call cost
# more CPU than everything else a request does (docs/performance.md)
_FENCE = text("SELECT id FROM idempotency_keys WHERE id = :key_id AND fencing_token = :token FOR UPDATE")
_MOVE = text("UPDATE idempotency_keys SET recovery_point = :point WHERE id = :key_id")
_FINISH = text(
    "UPDATE idempotency_keys SET response_status = :status, response_body = :body,"
    " recovery_point = 'finished', locked_at = NULL WHERE id = :key_id"
)
_INSERT_KEY = text(
    "INSERT INTO idempotency_keys (user_id, key, request_method, request_path, request_fingerprint,"
    " recovery_point, fencing_token, locked_at)"
    " VALUES (:user_id, :key, :method, :path, :fingerprint, :point, 1, now())"
    " ON CONFLICT (user_id, key) DO NOTHING RETURNING id"
)


@asynccontextmanager
async def step(sessions: Sessions, claim: Claim | None) -> AsyncIterator[Step]:
    """Open a phase's transaction; fail with FencedOut if the key is no longer ours."""
    async with sessions() as session, session.begin():
        conn = await session.connection()
        if claim is not None:
            held = await conn.scalar(_FENCE, {"key_id": claim.key_id, "token": claim.token})
            if held is None:
                raise FencedOut
        yield Step(conn, claim)


async def run(
    sessions: Sessions, request: KeyedRequest, phases: Mapping[str, Phase], lock_timeout_s: float
) -> Result:
    """Run `phases` under the request's key: replay, conflict, or execute from the recovery point.

    Typed 4xx errors raised by a phase are stored as the key's response (replayed
    like a success); 429, 5xx and unexpected errors are not stored and release the
    key so the client's retry resumes at the last recovery point.
    """
    if request.key is None:
        return await _drive(sessions, None, phases, STARTED)
    claim = await _acquire(sessions, request, lock_timeout_s)
    if isinstance(claim, Result):
        return claim
    return await _drive(sessions, claim, phases, claim.recovery_point)


async def _drive(sessions: Sessions, claim: Claim | None, phases: Mapping[str, Phase], point: str) -> Result:
    try:
        while True:
            outcome = await phases[point](claim)
            if isinstance(outcome, Finish):
                return Result(outcome.status, outcome.body)
            point = outcome.recovery_point
    except FencedOut:
        IDEMPOTENCY.labels("fenced_out").inc()
        raise IdempotencyKeyInUse(
            "a retry with this Idempotency-Key took over while this request was stalled"
        ) from None
    except ServiceError as exc:
        if claim is None or not exc.final or exc.status >= 500:
            await _release(sessions, claim)
            raise
        try:
            async with step(sessions, claim) as st:
                await st.finish(exc.status, exc.problem())
        except FencedOut:
            IDEMPOTENCY.labels("fenced_out").inc()
        raise
    except BaseException:
        await _release(sessions, claim)
        raise


async def _acquire(sessions: Sessions, req: KeyedRequest, lock_timeout_s: float) -> Claim | Result:
    fingerprint = req.fingerprint()
    async with sessions() as session, session.begin():
        key_id = await session.scalar(
            _INSERT_KEY,
            {
                "user_id": req.user_id,
                "key": req.key,
                "method": req.method,
                "path": req.path,
                "fingerprint": fingerprint,
                "point": STARTED,
            },
        )
        if key_id is not None:
            return Claim(key_id, 1, STARTED)

        lock_live = K.locked_at > func.now() - func.make_interval(0, 0, 0, 0, 0, 0, lock_timeout_s)
        row = (
            await session.execute(
                select(K, lock_live.label("lock_live"))
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
            IDEMPOTENCY.labels("mismatch").inc()
            raise IdempotencyKeyMismatch(
                "this Idempotency-Key was used for a different request; use a new key",
                first_request=f"{key.request_method} {key.request_path}",
            )
        if key.response_status is not None:
            IDEMPOTENCY.labels("replayed").inc()
            return Result(key.response_status, (key.response_body or "").encode(), replayed=True)
        if live:
            IDEMPOTENCY.labels("in_use").inc()
            raise IdempotencyKeyInUse("a request with this Idempotency-Key is still in progress")
        if key.locked_at is not None:
            IDEMPOTENCY.labels("takeover").inc()
            log.warning("taking over a stale idempotency key", extra={"key_id": key.id})
        key.fencing_token += 1
        key.locked_at = func.now()
        key.last_run_at = func.now()
        await session.flush()
        return Claim(key.id, key.fencing_token, key.recovery_point)


async def _release(sessions: Sessions, claim: Claim | None) -> None:
    """Unlock after a failure we did not store, so the client may retry at once."""
    if claim is None:
        return
    try:
        async with sessions() as session, session.begin():
            await session.execute(
                update(K).where(K.id == claim.key_id, K.fencing_token == claim.token).values(locked_at=None)
            )
    except Exception:  # the lock then expires after the lock timeout instead
        log.exception("could not release idempotency key", extra={"key_id": claim.key_id})


async def prune_expired_keys(sessions: Sessions, retention_s: int) -> int:
    """Delete keys older than the retention; returns how many went."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, retention_s)
    async with sessions() as session, session.begin():
        result: CursorResult[Any] = await session.execute(delete(K).where(K.created_at < cutoff))  # type: ignore[assignment]
        return result.rowcount
