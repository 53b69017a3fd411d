"""Small builders shared by the connector tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from finstream.connectors.base import ConnectorOptions
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import parse_limits
from finstream.domain.resilience import Backoff

RECEIVED = datetime(2024, 5, 10, 18, 0, tzinfo=UTC)


def gate(name: str, limits: str = "", threshold: int = 3, reset: float = 0.5) -> ProviderGate:
    return ProviderGate.build(name, parse_limits(limits), threshold, reset)


def options(**kw: object) -> ConnectorOptions:
    base: dict[str, object] = {
        "timeout": 2.0,
        "max_wait": 0.05,
        "max_future": timedelta(seconds=300),
        "silence_timeout": 1.0,
        "backoff": Backoff(base=0.02, cap=0.1),
    }
    base.update(kw)
    return ConnectorOptions(**base)  # type: ignore[arg-type]
