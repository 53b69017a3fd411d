"""Resilience policy shared by market-data connectors and delivery providers.

Pure and clock-injected (every method takes ``now`` in monotonic seconds), so
it is tested exhaustively without sleeping:

* :class:`ErrorClass` — how a provider failure is classified everywhere;
* :class:`ProviderError` — a classified failure, with when to retry if known;
* :class:`Backoff` — exponential backoff with full jitter, capped;
* :class:`RateLimiter` — a token bucket that also honours a provider's
  ``Retry-After`` / reset instruction;
* :class:`CircuitBreaker` — closed, open after repeated failures, half-open
  probes after a cool-down, closed again on success;
* :func:`parse_retry_after` — the HTTP ``Retry-After`` header (seconds or date).
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class ErrorClass(enum.StrEnum):
    THROTTLED = "throttled"  # slow down; retry after a while
    AUTH = "auth"  # credentials rejected; retrying will not help
    UNKNOWN_SYMBOL = "unknown_symbol"  # market data: the provider does not know it
    INVALID_RECIPIENT = "invalid_recipient"  # delivery: bad address, unregistered token
    TRANSIENT = "transient"  # timeouts, 5xx, resets: retry
    PERMANENT = "permanent"  # the request itself is wrong: do not retry
    MALFORMED = "malformed"  # the provider answered something that is not its format

    @property
    def retryable(self) -> bool:
        return self in (ErrorClass.THROTTLED, ErrorClass.TRANSIENT, ErrorClass.MALFORMED)

    @property
    def counts_against_provider(self) -> bool:
        """Whether the failure says the provider is unhealthy (feeds its circuit breaker)."""
        return self in (
            ErrorClass.THROTTLED,
            ErrorClass.TRANSIENT,
            ErrorClass.MALFORMED,
            ErrorClass.AUTH,
        )


class ProviderError(Exception):
    """A classified provider failure."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        provider: str = "",
        retry_after: float | None = None,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.provider = provider
        self.retry_after = retry_after
        self.status = status
        self.code = code

    def __str__(self) -> str:
        where = f"{self.provider}: " if self.provider else ""
        extra = f" (status {self.status})" if self.status is not None else ""
        return f"{where}{self.error_class.value}: {self.args[0]}{extra}"


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or seconds < 0:  # in the past
        return 0.0
    return min(seconds, 24 * 3600.0)


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog), capped."""

    base: float = 0.5
    cap: float = 60.0
    factor: float = 2.0

    def delay(
        self, attempt: int, rng: random.Random | None = None, floor: float | None = None
    ) -> float:
        """Delay before retry number ``attempt`` (1-based); never below ``floor`` (a Retry-After)."""
        ceiling = min(self.cap, self.base * self.factor ** max(attempt - 1, 0))
        jittered = (rng or random).uniform(0, ceiling)
        return max(jittered, floor or 0.0)


@dataclass
class RateLimiter:
    """Token bucket: ``rate`` tokens per second, up to ``burst``; plus provider pauses."""

    rate: float
    burst: float = 1.0
    _tokens: float = field(init=False)
    _updated: float | None = field(init=False, default=None)
    _paused_until: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._tokens = self.burst

    def _refill(self, now: float) -> None:
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def wait_time(self, now: float) -> float:
        """Seconds until one call may go out (0 when it may go now)."""
        self._refill(now)
        pause = max(self._paused_until - now, 0.0)
        shortfall = 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate
        return max(pause, shortfall)

    def try_acquire(self, now: float) -> bool:
        if self.wait_time(now) > 0:
            return False
        self._tokens -= 1
        return True

    def pause_for(self, seconds: float, now: float) -> None:
        """The provider said to wait (429 with Retry-After or a reset time)."""
        self._paused_until = max(self._paused_until, now + max(seconds, 0.0))


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; probes after ``reset_timeout``.

    In half-open state up to ``half_open_max`` calls are let through; one
    success closes the circuit, one failure opens it again (with the
    cool-down restarted). A probe that ends without saying anything about the
    provider (it never reached it: our own rate limit, a lost claim) is handed
    back with :meth:`release`. With ``probe_lease`` set, a probe that was
    neither reported nor released within that many seconds is written off and
    another one is let through, so a forgotten probe cannot lock a healthy
    provider out for good.
    """

    failure_threshold: int = 5
    reset_timeout: float = 30.0
    half_open_max: int = 1
    probe_lease: float | None = None
    _state: CircuitState = field(init=False, default=CircuitState.CLOSED)
    _failures: int = field(init=False, default=0)
    _opened_at: float = field(init=False, default=0.0)
    _probes: int = field(init=False, default=0)
    _probe_at: float = field(init=False, default=0.0)

    def state(self, now: float) -> CircuitState:
        if self._state is CircuitState.OPEN and now - self._opened_at >= self.reset_timeout:
            self._state = CircuitState.HALF_OPEN
            self._probes = 0
        return self._state

    def allow(self, now: float) -> bool:
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is not CircuitState.HALF_OPEN:
            return False
        if (
            self._probes >= self.half_open_max
            and self.probe_lease is not None
            and now - self._probe_at >= self.probe_lease
        ):
            self._probes = 0  # the probes out there never reported: write them off
        if self._probes < self.half_open_max:
            self._probes += 1
            self._probe_at = now
            return True
        return False

    def release(self, now: float | None = None) -> None:
        """Hand back a half-open probe that never reached the provider."""
        if self._probes > 0:
            self._probes -= 1

    def record_success(self, now: float) -> None:
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._probes = 0

    def record_failure(self, now: float) -> None:
        state = self.state(now)
        self._failures += 1
        if state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = CircuitState.OPEN
            self._opened_at = now
            self._probes = 0

    def retry_in(self, now: float) -> float:
        """Seconds until the next probe is allowed (0 if calls may go now)."""
        if self.state(now) is CircuitState.OPEN:
            return max(self.reset_timeout - (now - self._opened_at), 0.0)
        return 0.0
