"""The retry engine: when to try a failed operation again, and when to give up.

Plain functions of (state, policy, clock, random draw) with no I/O, so whatever drives
the retries (the worker in-process, or the Kopf operator through FailedOperation
resources) makes the same decisions, and property tests can check them for any
sequence of outcomes and clock readings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from app.failures.models import OPEN, FailureStatus

MAX_ERROR_CHARS = 2_000  # an error is a diagnosis, not a dump


class RetryLater(Exception):
    """A failure worth another attempt (SMTP down, a lock timeout, Stripe unreachable)."""


class NeedsHuman(Exception):
    """A failure no retry can fix (amount mismatch, a refused recipient): dead at once."""


@dataclass(frozen=True)
class Policy:
    max_retries: int  # attempts after the first failure
    base_delay_s: float
    max_delay_s: float

    @property
    def max_attempts(self) -> int:
        return 1 + self.max_retries


@dataclass(frozen=True)
class RetryState:
    status: FailureStatus
    attempts: int  # every attempt so far, the first failure included
    max_attempts: int
    next_attempt_at: datetime | None
    last_error: str | None


class NotRetryable(Exception):
    """The operation already succeeded: there is nothing to retry or discard."""


def delay_bounds(policy: Policy, retry: int) -> tuple[float, float]:
    """Retry number `retry` (1-based) waits between half and all of base * 2^(retry-1), capped."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(retry - 1, 64))
    return ceiling / 2, ceiling


def retry_delay(policy: Policy, retry: int, draw: float) -> float:
    """Exponential backoff with jitter; `draw` in [0, 1) spreads retries that failed together."""
    low, high = delay_bounds(policy, retry)
    return low + (high - low) * min(max(draw, 0.0), 1.0)


def first_failure(policy: Policy, now: datetime, error: str, *, permanent: bool, draw: float) -> RetryState:
    """The state of an operation that has just failed its first attempt."""
    start = RetryState(FailureStatus.PENDING, 0, policy.max_attempts, None, None)
    return record_attempt(start, policy, now, error, permanent=permanent, draw=draw)


def record_attempt(
    state: RetryState, policy: Policy, now: datetime, error: str | None, *, permanent: bool, draw: float
) -> RetryState:
    """Count one attempt: success ends it; a failure schedules the next retry or, past the budget, is dead."""
    attempts = state.attempts + 1
    if error is None:
        return RetryState(FailureStatus.SUCCEEDED, attempts, state.max_attempts, None, state.last_error)
    error = error[:MAX_ERROR_CHARS]
    if permanent or attempts >= state.max_attempts:
        return RetryState(FailureStatus.DEAD, attempts, state.max_attempts, None, error)
    status = FailureStatus.PENDING if attempts == 1 else FailureStatus.RETRYING
    delay = retry_delay(policy, attempts, draw)
    return RetryState(status, attempts, state.max_attempts, now + timedelta(seconds=delay), error)


def retry_now(state: RetryState, now: datetime) -> RetryState:
    """An operator's "retry now": due at once; a dead or discarded operation gets one more attempt."""
    if state.status == FailureStatus.SUCCEEDED:
        raise NotRetryable("the operation already succeeded")
    if state.status in OPEN:
        return replace(state, next_attempt_at=now)
    return replace(
        state,
        status=FailureStatus.RETRYING,
        # exactly one more: a permanent failure or an early discard left budget that is not resumed
        max_attempts=state.attempts + 1,
        next_attempt_at=now,
    )


def discard(state: RetryState) -> RetryState:
    """An operator gives up on it: never attempted again."""
    if state.status == FailureStatus.SUCCEEDED:
        raise NotRetryable("the operation already succeeded")
    return replace(state, status=FailureStatus.DISCARDED, next_attempt_at=None)


def is_due(state: RetryState, now: datetime) -> bool:
    return state.status in OPEN and state.next_attempt_at is not None and state.next_attempt_at <= now
