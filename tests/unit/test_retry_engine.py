"""The retry engine, for any policy, outcomes, clock readings (backwards too) and random draws."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.failures.engine import (
    NotRetryable,
    Policy,
    RetryState,
    delay_bounds,
    discard,
    first_failure,
    is_due,
    record_attempt,
    retry_delay,
    retry_now,
)
from app.failures.models import OPEN, FailureStatus

# timedelta keeps microseconds: a scheduled delay read back is within this of the one computed
TICK_S = 1e-6
FAR_FUTURE = datetime(9000, 1, 1, tzinfo=UTC)

FAIL, PERMANENT, SUCCESS = "fail", "permanent", "success"
ATTEMPT, RETRY_NOW, DISCARD = "attempt", "retry_now", "discard"


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    base = draw(st.floats(min_value=0.001, max_value=1000, allow_nan=False))
    cap = draw(st.floats(min_value=base, max_value=base * 4096, allow_nan=False))
    return Policy(draw(st.integers(min_value=0, max_value=10)), base, cap)


clocks = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
outcomes = st.sampled_from([FAIL, PERMANENT, SUCCESS])
# a driver's attempts, each at its own clock reading, in any order
attempts = st.lists(st.tuples(clocks, outcomes, draws), max_size=14)
# the same, with an operator's "retry now" and "discard" among them
operator_steps = st.lists(
    st.tuples(st.sampled_from([ATTEMPT, ATTEMPT, ATTEMPT, RETRY_NOW, DISCARD]), clocks, outcomes, draws),
    max_size=20,
)


def _error(outcome: str) -> str | None:
    return None if outcome == SUCCESS else f"{outcome}: boom"


def _assert_never_attempted_again(state: RetryState, seen: list[datetime]) -> None:
    assert state.next_attempt_at is None
    assert not any(is_due(state, t) for t in [*seen, FAR_FUTURE])


def _assert_scheduled(state: RetryState, policy: Policy, now: datetime, seen: list[datetime]) -> None:
    """An open state is due at exactly its next attempt, which lies inside the retry's bounds."""
    assert state.next_attempt_at is not None
    delay = (state.next_attempt_at - now).total_seconds()
    low, high = delay_bounds(policy, state.attempts)
    assert low - TICK_S <= delay <= high + TICK_S
    assert 0 <= delay <= policy.max_delay_s + TICK_S
    assert is_due(state, state.next_attempt_at)
    assert not is_due(state, state.next_attempt_at - timedelta(microseconds=1))
    assert all(is_due(state, t) == (t >= state.next_attempt_at) for t in seen)


def _check_attempt(
    before: RetryState, after: RetryState, policy: Policy, now: datetime, outcome: str, budget: int
) -> None:
    """One attempt of an open operation, whose budget allows `budget` attempts in all."""
    assert after.attempts == before.attempts + 1
    assert after.attempts <= budget
    if outcome == SUCCESS:
        assert after.status == FailureStatus.SUCCEEDED
    elif outcome == PERMANENT or after.attempts == budget:
        assert after.status == FailureStatus.DEAD
        assert after.last_error == _error(outcome)
    else:
        assert after.status in OPEN
        assert after.last_error == _error(outcome)


@settings(max_examples=200, deadline=None)
@given(policies(), clocks, st.booleans(), draws, attempts)
def test_a_driver_retries_within_the_budget_and_the_schedule(
    policy: Policy,
    t0: datetime,
    first_permanent: bool,
    d0: float,
    steps: list[tuple[datetime, str, float]],
) -> None:
    seen = [t0]
    state = first_failure(policy, t0, "boom", permanent=first_permanent, draw=d0)
    assert state.attempts == 1 and state.max_attempts == policy.max_attempts == 1 + policy.max_retries
    if first_permanent or policy.max_retries == 0:
        assert state.status == FailureStatus.DEAD
    else:
        assert state.status == FailureStatus.PENDING
        _assert_scheduled(state, policy, t0, seen)
    for now, outcome, draw in steps:
        seen.append(now)
        if state.status not in OPEN:
            # succeeded or dead: nothing claims it again, whatever the clock says
            _assert_never_attempted_again(state, seen)
            continue
        before = state
        state = record_attempt(
            before, policy, now, _error(outcome), permanent=outcome == PERMANENT, draw=draw
        )
        _check_attempt(before, state, policy, now, outcome, policy.max_attempts)
        assert state.attempts <= policy.max_attempts
        if state.status in OPEN:
            assert state.status == FailureStatus.RETRYING
            _assert_scheduled(state, policy, now, seen)
        else:
            _assert_never_attempted_again(state, seen)


@settings(max_examples=200, deadline=None)
@given(policies(), clocks, st.booleans(), draws, operator_steps)
def test_an_operator_retry_gives_one_more_attempt_and_a_discard_is_final(
    policy: Policy,
    t0: datetime,
    first_permanent: bool,
    d0: float,
    steps: list[tuple[str, datetime, str, float]],
) -> None:
    seen = [t0]
    state = first_failure(policy, t0, "boom", permanent=first_permanent, draw=d0)
    budget = policy.max_attempts  # attempts this operation may have in all, as operators extend it
    for action, now, outcome, draw in steps:
        seen.append(now)
        if action == ATTEMPT:
            if state.status not in OPEN:
                _assert_never_attempted_again(state, seen)
                continue
            before = state
            state = record_attempt(
                before, policy, now, _error(outcome), permanent=outcome == PERMANENT, draw=draw
            )
            _check_attempt(before, state, policy, now, outcome, budget)
            if state.status in OPEN:
                _assert_scheduled(state, policy, now, seen)
        elif action == RETRY_NOW:
            if state.status == FailureStatus.SUCCEEDED:
                with pytest.raises(NotRetryable):
                    retry_now(state, now)
                continue
            if state.status not in OPEN:
                budget = state.attempts + 1  # exactly one more attempt
            before, state = state, retry_now(state, now)
            assert state.status in OPEN and state.attempts == before.attempts
            assert state.next_attempt_at == now and is_due(state, now)
        else:
            if state.status == FailureStatus.SUCCEEDED:
                with pytest.raises(NotRetryable):
                    discard(state)
                continue
            state = discard(state)
            assert state.status == FailureStatus.DISCARDED
            _assert_never_attempted_again(state, seen)
            assert discard(state).status == FailureStatus.DISCARDED
        assert state.attempts <= budget


@given(policies(), st.integers(min_value=1, max_value=200))
def test_bounds_grow_with_each_retry_up_to_the_cap(policy: Policy, retry: int) -> None:
    low, high = delay_bounds(policy, retry)
    next_low, next_high = delay_bounds(policy, retry + 1)
    assert 0 < low <= high <= policy.max_delay_s
    assert low == high / 2
    assert low <= next_low and high <= next_high
    assert high == min(policy.max_delay_s, policy.base_delay_s * 2 ** (retry - 1))


@given(policies(), st.integers(min_value=1, max_value=200), draws)
def test_a_drawn_delay_lies_within_its_bounds(policy: Policy, retry: int, draw: float) -> None:
    low, high = delay_bounds(policy, retry)
    assert low <= retry_delay(policy, retry, draw) <= high <= policy.max_delay_s


T0 = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("retry", "low", "high"),
    [(1, 5, 10), (2, 10, 20), (3, 20, 40), (4, 40, 80), (5, 50, 100), (6, 50, 100), (60, 50, 100)],
)
def test_the_schedule_for_a_ten_second_base_capped_at_a_hundred(retry: int, low: float, high: float) -> None:
    policy = Policy(max_retries=100, base_delay_s=10, max_delay_s=100)
    assert delay_bounds(policy, retry) == (low, high)
    assert retry_delay(policy, retry, 0.0) == low
    assert retry_delay(policy, retry, 0.5) == (low + high) / 2


def test_three_retries_then_dead() -> None:
    policy = Policy(max_retries=3, base_delay_s=10, max_delay_s=100)
    state = first_failure(policy, T0, "smtp down", permanent=False, draw=0.0)
    assert (state.status, state.attempts, state.next_attempt_at) == (
        FailureStatus.PENDING,
        1,
        T0 + timedelta(seconds=5),
    )
    state = record_attempt(state, policy, T0, "smtp down", permanent=False, draw=0.0)
    assert (state.status, state.attempts, state.next_attempt_at) == (
        FailureStatus.RETRYING,
        2,
        T0 + timedelta(seconds=10),
    )
    state = record_attempt(state, policy, T0, "smtp down", permanent=False, draw=0.0)
    assert (state.status, state.next_attempt_at) == (FailureStatus.RETRYING, T0 + timedelta(seconds=20))
    state = record_attempt(state, policy, T0, "smtp down", permanent=False, draw=0.0)
    assert (state.status, state.attempts, state.next_attempt_at) == (FailureStatus.DEAD, 4, None)


def test_no_retries_means_dead_at_the_first_failure() -> None:
    state = first_failure(Policy(0, 10, 100), T0, "smtp down", permanent=False, draw=0.5)
    assert (state.status, state.attempts, state.max_attempts) == (FailureStatus.DEAD, 1, 1)


def test_a_permanent_failure_is_dead_at_once() -> None:
    state = first_failure(Policy(5, 10, 100), T0, "amount mismatch", permanent=True, draw=0.5)
    assert (state.status, state.attempts, state.next_attempt_at) == (FailureStatus.DEAD, 1, None)


def test_a_retried_dead_operation_that_fails_again_is_dead_again() -> None:
    policy = Policy(max_retries=1, base_delay_s=10, max_delay_s=100)
    state = first_failure(policy, T0, "smtp down", permanent=False, draw=0.0)
    state = record_attempt(state, policy, T0, "smtp down", permanent=False, draw=0.0)
    assert state.status == FailureStatus.DEAD
    state = retry_now(state, T0)
    assert (state.status, state.max_attempts, state.next_attempt_at) == (FailureStatus.RETRYING, 3, T0)
    state = record_attempt(state, policy, T0, "smtp down", permanent=False, draw=0.0)
    assert (state.status, state.attempts) == (FailureStatus.DEAD, 3)


def test_a_retried_permanent_failure_gets_one_attempt_not_the_rest_of_its_budget() -> None:
    policy = Policy(max_retries=5, base_delay_s=10, max_delay_s=100)
    state = retry_now(first_failure(policy, T0, "amount mismatch", permanent=True, draw=0.0), T0)
    state = record_attempt(state, policy, T0, "smtp down", permanent=False, draw=0.0)
    assert (state.status, state.attempts) == (FailureStatus.DEAD, 2)


def test_a_succeeded_operation_cannot_be_retried_or_discarded() -> None:
    policy = Policy(max_retries=2, base_delay_s=10, max_delay_s=100)
    state = first_failure(policy, T0, "smtp down", permanent=False, draw=0.0)
    state = record_attempt(state, policy, T0, None, permanent=False, draw=0.0)
    assert state.status == FailureStatus.SUCCEEDED and not is_due(state, FAR_FUTURE)
    with pytest.raises(NotRetryable):
        retry_now(state, T0)
    with pytest.raises(NotRetryable):
        discard(state)
