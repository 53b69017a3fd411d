"""Backoff, rate limiting, circuit breaking and Retry-After parsing."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.domain.resilience import (
    Backoff,
    CircuitBreaker,
    CircuitState,
    ErrorClass,
    ProviderError,
    RateLimiter,
    parse_retry_after,
)


def test_retry_after_seconds_and_dates() -> None:
    now = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("99999999") == 24 * 3600.0


@given(attempt=st.integers(1, 50), floor=st.none() | st.floats(0, 100), seed=st.integers())
def test_backoff_is_bounded_and_honours_the_floor(
    attempt: int, floor: float | None, seed: int
) -> None:
    b = Backoff(base=0.5, cap=60)
    d = b.delay(attempt, random.Random(seed), floor)
    assert d >= (floor or 0)
    assert d <= max(60, floor or 0)


def test_backoff_ceiling_grows_exponentially() -> None:
    b = Backoff(base=1, cap=1000)
    rng = random.Random(1)
    maxima = [max(b.delay(n, rng) for _ in range(300)) for n in (1, 2, 3, 4)]
    assert maxima[0] <= 1 < maxima[1] <= 2 < maxima[2] <= 4 < maxima[3] <= 8


@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 5), min_size=1, max_size=200),
)
def test_rate_limiter_never_exceeds_rate_plus_burst(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now = 0.0
    granted = 0
    for gap in gaps:
        now += gap
        if limiter.try_acquire(now):
            granted += 1
    assert granted <= burst + rate * now + 1e-6


def test_rate_limiter_wait_time_and_pause() -> None:
    limiter = RateLimiter(rate=2, burst=1)
    assert limiter.try_acquire(0.0)
    assert not limiter.try_acquire(0.0)
    assert limiter.wait_time(0.0) == pytest.approx(0.5)
    assert limiter.try_acquire(0.5)
    limiter.pause_for(10, now=1.0)
    assert limiter.wait_time(1.0) == pytest.approx(10)
    assert not limiter.try_acquire(5.0)
    assert limiter.try_acquire(11.0)


def test_rate_limiter_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate=0)


def test_circuit_opens_probes_and_closes() -> None:
    cb = CircuitBreaker(failure_threshold=3, reset_timeout=10)
    for t in range(3):
        assert cb.allow(t)
        cb.record_failure(t)
    assert cb.state(2) is CircuitState.OPEN
    assert not cb.allow(5)
    assert cb.retry_in(5) == pytest.approx(7)
    assert cb.allow(12)  # half-open probe
    assert cb.state(12) is CircuitState.HALF_OPEN
    assert not cb.allow(12)  # only one probe at a time
    cb.record_failure(12)  # probe failed: open again, cool-down restarts
    assert cb.state(13) is CircuitState.OPEN
    assert not cb.allow(21)
    assert cb.allow(22)
    cb.record_success(22)
    assert cb.state(22) is CircuitState.CLOSED
    assert cb.allow(22)


def test_a_probe_handed_back_or_never_reported_does_not_keep_the_circuit_half_open() -> None:
    cb = CircuitBreaker(failure_threshold=1, reset_timeout=10)
    cb.record_failure(0)
    assert cb.allow(10)
    assert not cb.allow(10)
    cb.release(10)  # the probe never reached the provider
    assert cb.allow(11)
    # Without a lease, a probe nobody reports holds the circuit half-open...
    assert not cb.allow(100)
    # ...with one, it is written off after the lease and another probe goes.
    leased = CircuitBreaker(failure_threshold=1, reset_timeout=10, probe_lease=10)
    leased.record_failure(0)
    assert leased.allow(10)
    assert not leased.allow(19)
    assert leased.allow(20)
    assert not leased.allow(20)


def test_success_resets_the_failure_count() -> None:
    cb = CircuitBreaker(failure_threshold=2, reset_timeout=1)
    cb.record_failure(0)
    cb.record_success(0)
    cb.record_failure(0)
    assert cb.state(0) is CircuitState.CLOSED


@given(events=st.lists(st.tuples(st.booleans(), st.floats(0, 3)), max_size=100))
def test_circuit_never_allows_while_open_before_timeout(events: list[tuple[bool, float]]) -> None:
    cb = CircuitBreaker(failure_threshold=2, reset_timeout=5)
    now = 0.0
    for ok, gap in events:
        now += gap
        if cb.state(now) is CircuitState.OPEN:
            assert not cb.allow(now)
            continue
        if cb.allow(now):
            (cb.record_success if ok else cb.record_failure)(now)


def test_error_classes() -> None:
    assert ErrorClass.THROTTLED.retryable
    assert ErrorClass.TRANSIENT.retryable
    assert not ErrorClass.AUTH.retryable
    assert not ErrorClass.INVALID_RECIPIENT.retryable
    err = ProviderError(
        ErrorClass.THROTTLED, "slow down", provider="alphavantage", retry_after=60, status=429
    )
    assert str(err) == "alphavantage: throttled: slow down (status 429)"
