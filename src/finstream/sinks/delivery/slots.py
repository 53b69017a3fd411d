"""A provider of the chain with its own circuit breaker and rate limiter."""

from __future__ import annotations

import time

from finstream.domain.resilience import CircuitBreaker, RateLimiter
from finstream.settings import Settings
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.base import Provider

# The shared breaker hands back a probe that was not used (a lost claim or a failed
# claim: no call happens, and nothing else would resolve the probe); kept under this
# name for callers.
Breaker = CircuitBreaker


class ProviderSlot:
    """A provider with its own circuit breaker and rate limiter."""

    def __init__(
        self, provider: Provider, settings: Settings, channel: str, probe_lease: float | None = None
    ) -> None:
        self.provider = provider
        self.channel = channel
        self.breaker = Breaker(
            failure_threshold=settings.delivery_circuit_failures,
            reset_timeout=settings.delivery_circuit_reset,
            probe_lease=probe_lease,
        )
        self.limiter = RateLimiter(rate=provider.rate, burst=max(1.0, provider.rate))
        self.publish_state()

    @property
    def name(self) -> str:
        return self.provider.name

    def publish_state(self) -> None:
        state = self.breaker.state(time.monotonic())
        m.CIRCUIT.labels(self.channel, self.name).set(m.CIRCUIT_VALUE[state])
