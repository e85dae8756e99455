"""GCRA rate limiting in one UPSERT: smooth, burst up to the limit, no background reset.

Each (action, user) row holds the theoretical arrival time (TAT) of the next
request. A request is allowed when pushing the TAT one emission interval
(window / limit) further keeps it within one window of now.
"""

from __future__ import annotations

import math
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.observability.metrics import RATE_LIMITED
from app.problems import RateLimited


class RateAction(StrEnum):
    """Each action has its own bucket per user, so one kind of traffic never starves another."""

    CREDIT_PURCHASE = "credit_purchase"
    LEAD_PURCHASE = "lead_purchase"
    RESERVATION = "reservation"
    ERROR_REPORT = "error_report"


_ADMIT = text(
    """
    INSERT INTO rate_limits AS b (key, tat)
    VALUES (:key, now() + make_interval(secs => :interval))
    ON CONFLICT (key) DO UPDATE
       SET tat = greatest(b.tat, now()) + make_interval(secs => :interval)
     WHERE greatest(b.tat, now()) + make_interval(secs => :interval)
           <= now() + make_interval(secs => :window)
    RETURNING 1
    """
)
_WAIT = text(
    """
    SELECT extract(epoch FROM
        b.tat + make_interval(secs => :interval) - now() - make_interval(secs => :window))
      FROM rate_limits b WHERE key = :key
    """
)


async def hit(
    sessions: async_sessionmaker[AsyncSession], action: RateAction, user_id: str, limit: int, window_s: int
) -> None:
    """Count one request of `action` by `user_id`; raise RateLimited past `limit` per window."""
    params = {"key": f"{action}:{user_id}", "interval": window_s / limit, "window": window_s}
    async with sessions() as session, session.begin():
        if await session.scalar(_ADMIT, params) is not None:
            return
        wait = await session.scalar(_WAIT, params)
    RATE_LIMITED.labels(action).inc()
    retry_after = max(1, math.ceil(float(wait or 1)))
    raise RateLimited(f"too many {action.replace('_', ' ')} requests; retry in {retry_after} s", retry_after)


_PRUNE = text(
    "DELETE FROM rate_limits WHERE tat < now() AND key IN"
    " (SELECT key FROM rate_limits WHERE tat < now() LIMIT :limit FOR UPDATE SKIP LOCKED)"
)


async def prune_idle_buckets(sessions: async_sessionmaker[AsyncSession], *, limit: int) -> int:
    """Up to `limit` buckets whose TAT has passed: they hold no state worth keeping."""
    async with sessions() as session, session.begin():
        result = await session.execute(_PRUNE, {"limit": limit})
        return int(result.rowcount)  # type: ignore[attr-defined]
