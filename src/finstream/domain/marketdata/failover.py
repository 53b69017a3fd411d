"""The failover chain: which provider serves which symbols, cycle by cycle (pure).

A chain is an ordered list of providers for one symbol set. Every poll cycle
starts with all the set's symbols pending and walks the chain in order:

1. a provider whose circuit is open, whose rate limit (or a pause it asked
   for with Retry-After) would make us wait longer than ``max_wait``, or
   which said recently that it does not know the pending symbols, is skipped;
2. otherwise it is asked for the pending symbols (an :class:`Attempt`); the
   symbols it serves leave the pending set, the rest stay for the next
   provider in the same cycle — so a failing primary costs no poll interval;
3. the cycle ends when nothing is pending or the chain is exhausted.

The *active* provider of a chain is the first one (in chain order) that
served anything in the last cycle; when it changes, :meth:`FailoverChain.finish`
reports a failover (to a lower-priority provider), a failback (to a higher
one), an outage (nobody served) or a recovery. Failback needs nothing
special: the primary is tried first every cycle, and its circuit breaker's
half-open probe lets one attempt through after the cool-down.

:class:`ProviderGate` (a circuit breaker plus rate-limit buckets) belongs to a
provider, not to a chain: one API key's limits are shared by every symbol set.
Everything here takes ``now`` (monotonic seconds) and does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from finstream.domain.marketdata.normalize import LOCAL_RATE_LIMIT, STREAM_NOT_READY, LimitSpec
from finstream.domain.resilience import (
    CircuitBreaker,
    CircuitState,
    ErrorClass,
    ProviderError,
    RateLimiter,
)

SkipReason = Literal["circuit_open", "rate_limited", "unknown_symbols"]
TransitionKind = Literal["failover", "failback", "outage", "recovered"]


@dataclass
class ProviderGate:
    """Admission control of one provider: circuit breaker and token buckets (all must allow)."""

    name: str
    breaker: CircuitBreaker
    limiters: list[RateLimiter] = field(default_factory=list)
    paused_until: float = 0.0

    @classmethod
    def build(
        cls,
        name: str,
        limits: Sequence[LimitSpec],
        failure_threshold: int,
        reset_timeout: float,
    ) -> ProviderGate:
        return cls(
            name,
            CircuitBreaker(
                failure_threshold=failure_threshold,
                reset_timeout=reset_timeout,
                # A probe is one attempt of one cycle; one that was never reported
                # must not keep the provider out past the next cool-down.
                probe_lease=reset_timeout,
            ),
            [RateLimiter(rate=spec.rate, burst=spec.burst) for spec in limits],
        )

    def wait_time(self, now: float) -> float:
        pause = max(self.paused_until - now, 0.0)
        return max([pause, *(lim.wait_time(now) for lim in self.limiters)])

    def try_acquire(self, now: float) -> bool:
        """Take one token from every bucket, or none when any is empty."""
        if self.wait_time(now) > 0:
            return False
        for lim in self.limiters:
            lim.try_acquire(now)
        return True

    def pause(self, seconds: float, now: float) -> None:
        """The provider said to wait (Retry-After, a reset time, a throttling message)."""
        self.paused_until = max(self.paused_until, now + max(seconds, 0.0))

    def circuit(self, now: float) -> CircuitState:
        return self.breaker.state(now)


@dataclass(frozen=True)
class Attempt:
    provider: str
    symbols: tuple[str, ...]


@dataclass
class Outcome:
    """What one attempt produced. ``error`` is a failure of the whole request
    (after any partial ``served``); ``symbol_errors`` are per-symbol problems."""

    served: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    symbol_errors: dict[str, ProviderError] = field(default_factory=dict)
    error: ProviderError | None = None


@dataclass(frozen=True)
class Skip:
    provider: str
    reason: SkipReason


@dataclass(frozen=True)
class Transition:
    chain: str
    kind: TransitionKind
    from_provider: str | None
    to_provider: str | None


@dataclass
class Cycle:
    symbols: tuple[str, ...]
    pending: list[str]
    served: dict[str, str] = field(default_factory=dict)
    tried: set[str] = field(default_factory=set)
    skips: list[Skip] = field(default_factory=list)
    errors: list[tuple[str, ProviderError]] = field(default_factory=list)


class FailoverChain:
    def __init__(
        self,
        name: str,
        providers: Sequence[str],
        gates: Mapping[str, ProviderGate],
        *,
        max_wait: float = 0.0,
        unknown_retry: float = 600.0,
        throttle_pause: float = 60.0,
    ) -> None:
        if not providers:
            raise ValueError(f"chain {name!r} has no providers")
        if len(set(providers)) != len(providers):
            raise ValueError(f"chain {name!r} lists a provider twice: {list(providers)}")
        missing = [p for p in providers if p not in gates]
        if missing:
            raise ValueError(f"chain {name!r}: no gate for {missing}")
        self.name = name
        self.providers = tuple(providers)
        self.gates = gates
        self.max_wait = max_wait
        self.unknown_retry = unknown_retry
        self.throttle_pause = throttle_pause
        self.active: str | None = None
        self.assignment: dict[str, str] = {}
        self._unknown_until: dict[tuple[str, str], float] = {}
        self._started = False

    # -- one cycle -------------------------------------------------------------------
    def start_cycle(self, symbols: Sequence[str]) -> Cycle:
        return Cycle(tuple(symbols), list(symbols))

    def next_attempt(self, cycle: Cycle, now: float) -> Attempt | None:
        """The next provider to ask and for which symbols; None when the cycle is over."""
        for name in self.providers:
            if not cycle.pending:
                return None
            if name in cycle.tried:
                continue
            cycle.tried.add(name)
            symbols = tuple(
                s for s in cycle.pending if self._unknown_until.get((name, s), 0.0) <= now
            )
            if not symbols:
                cycle.skips.append(Skip(name, "unknown_symbols"))
                continue
            gate = self.gates[name]
            if gate.circuit(now) is CircuitState.OPEN:
                cycle.skips.append(Skip(name, "circuit_open"))
                continue
            # Rate limits before the breaker: a half-open probe is not spent on a wait.
            if gate.wait_time(now) > self.max_wait:
                cycle.skips.append(Skip(name, "rate_limited"))
                continue
            if not gate.breaker.allow(now):
                cycle.skips.append(Skip(name, "circuit_open"))
                continue
            return Attempt(name, symbols)
        return None

    def record(self, cycle: Cycle, attempt: Attempt, outcome: Outcome, now: float) -> None:
        """Account for one attempt: symbols served, parked or failed, and the provider's health.

        Every attempt settles the breaker one way or the other (success, failure
        or, when it never reached the provider, the half-open probe handed
        back), so a half-open circuit cannot be left waiting for a report.
        """
        name = attempt.provider
        gate = self.gates[name]
        for sym in outcome.served:
            if sym in cycle.pending:
                cycle.pending.remove(sym)
                cycle.served[sym] = name
                # At once, not at the end of the cycle: a stream's ticks count from now.
                self.assignment[sym] = name
        for sym in outcome.unknown:
            self._unknown_until[(name, sym)] = now + self.unknown_retry
        if outcome.served:
            # It answered with data: healthy, whatever stopped the rest of the request.
            gate.breaker.record_success(now)
        if outcome.error is not None:
            cycle.errors.append((name, outcome.error))
            if outcome.error.error_class is ErrorClass.UNKNOWN_SYMBOL:
                for sym in attempt.symbols:
                    if sym not in outcome.served:
                        self._unknown_until[(name, sym)] = now + self.unknown_retry
                gate.breaker.record_success(now)
            else:
                self._failure(gate, outcome.error, now)
            return
        other = [e for e in outcome.symbol_errors.values()]
        cycle.errors.extend((name, e) for e in other)
        if outcome.served or not other:
            gate.breaker.record_success(now)
        else:
            # Every symbol failed: that is the provider failing, not the symbols.
            self._failure(gate, other[0], now)

    def _failure(self, gate: ProviderGate, error: ProviderError, now: float) -> None:
        if error.code in (LOCAL_RATE_LIMIT, STREAM_NOT_READY):
            # Our own bucket said no, or a stream is reconnecting on its own: the
            # provider was not asked, so a half-open probe it held goes back.
            gate.breaker.release(now)
            return
        if error.error_class is ErrorClass.THROTTLED:
            pause = error.retry_after if error.retry_after is not None else self.throttle_pause
            gate.pause(pause, now)
        # A permanent error to a market-data request means the request can never
        # work with this provider's configuration: for the chain that is a
        # provider failure (delivery treats it as the message's fault instead).
        if error.error_class.counts_against_provider or error.error_class is ErrorClass.PERMANENT:
            gate.breaker.record_failure(now)

    def finish(self, cycle: Cycle, now: float) -> list[Transition]:
        """Close the cycle: update the assignment and the active provider."""
        for sym in cycle.symbols:
            provider = cycle.served.get(sym)
            if provider is None:
                self.assignment.pop(sym, None)
            else:
                self.assignment[sym] = provider
        new = next((p for p in self.providers if p in cycle.served.values()), None)
        old = self.active
        self.active = new
        if not self._started:
            self._started = new is not None
            return []
        if new == old:
            return []
        if new is None:
            kind: TransitionKind = "outage"
        elif old is None:
            kind = "recovered"
        elif self.providers.index(new) > self.providers.index(old):
            kind = "failover"
        else:
            kind = "failback"
        return [Transition(self.name, kind, old, new)]

    # -- what should keep running ------------------------------------------------------
    def needed(self) -> tuple[str, ...]:
        """Providers at or above the active one (all when none is active).

        Streams below the active provider can be stopped; those above keep
        reconnecting so that they can take over again.
        """
        if self.active is None:
            return self.providers
        return self.providers[: self.providers.index(self.active) + 1]

    def unknown_everywhere(self, now: float) -> list[str]:
        """Symbols no provider of the chain currently knows."""
        symbols = {s for (_, s) in self._unknown_until}
        return sorted(
            s
            for s in symbols
            if all(self._unknown_until.get((p, s), 0.0) > now for p in self.providers)
        )
