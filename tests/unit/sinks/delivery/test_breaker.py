"""The engine's circuit breaker hands back a half-open probe that was never used."""

from __future__ import annotations

from finstream.domain.resilience import CircuitState
from finstream.sinks.delivery.engine import Breaker


def test_an_unused_probe_is_handed_back() -> None:
    b = Breaker(failure_threshold=1, reset_timeout=10)
    b.record_failure(0)
    assert b.allow(10)  # the one half-open probe
    assert not b.allow(10)
    b.release()  # the claim was lost: no call was made
    assert b.state(10) is CircuitState.HALF_OPEN
    assert b.allow(10)  # another task may probe
    b.record_success(10)
    assert b.state(10) is CircuitState.CLOSED
    b.release()  # nothing to hand back: harmless
    assert b.allow(11)
