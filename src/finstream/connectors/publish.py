"""Publishing normalized ticks to md.ticks, shared by every connector."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from finstream.connectors.metrics import PUBLISH_LATENCY, TICKS_PUBLISHED, TICKS_SUPPRESSED
from finstream.domain.marketdata.dedupe import TickDeduper
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.time import utcnow
from finstream.runtime.kafka import Publisher
from finstream.topics import Contract


class TickPublisher:
    """Encodes ticks and sends them to md.ticks keyed by symbol (co-partitioning)."""

    def __init__(self, publisher: Publisher, ticks: Contract) -> None:
        self._publisher = publisher
        self._ticks = ticks
        self.topic = ticks.name

    async def publish(self, tick: Tick) -> None:
        await self._publisher.send(
            self.topic, tick.symbol.encode(), self._ticks.encode(tick.to_record())
        )

    async def flush(self) -> None:
        await self._publisher.flush()


class TickOutput(Protocol):
    async def publish(self, tick: Tick) -> None: ...

    async def flush(self) -> None: ...


class TickSink:
    """Where every connector's ticks go: deduplicated, published, measured.

    One sink per process, so a quote seen from two providers, a re-sent
    WebSocket trade or a re-polled unchanged quote is published once (see
    :class:`~finstream.domain.marketdata.dedupe.TickDeduper`). The latency
    metric runs from a tick's ``received_at`` to Kafka's acknowledgement.
    """

    def __init__(self, out: TickOutput, window: int = 4096) -> None:
        self.out = out
        self.deduper = TickDeduper(window)
        self._unflushed: list[tuple[str, datetime]] = []
        self.published = 0
        self.suppressed = 0
        self.last_error: str | None = None  # the last failed flush, until one succeeds

    async def offer(self, provider: str, tick: Tick, historical: bool = False) -> bool:
        """Publish ``tick`` unless it is a duplicate; True when published."""
        reason = self.deduper.offer(tick, historical)
        if reason is not None:
            self.suppressed += 1
            TICKS_SUPPRESSED.labels(provider, reason).inc()
            return False
        await self.out.publish(tick)
        self._unflushed.append((provider, tick.received_at))
        return True

    def suppress(self, provider: str, reason: str) -> None:
        self.suppressed += 1
        TICKS_SUPPRESSED.labels(provider, reason).inc()

    @property
    def pending(self) -> int:
        return len(self._unflushed)

    async def flush(self) -> None:
        batch, self._unflushed = self._unflushed, []
        if not batch:
            return
        try:
            await self.out.flush()
        except Exception as exc:
            # The producer has already retried for its request timeout: these ticks
            # are lost. Say so (readiness, logs) rather than pretend.
            self.last_error = f"{type(exc).__name__}: {exc}"
            TICKS_SUPPRESSED.labels("-", "publish_failed").inc(len(batch))
            raise
        self.last_error = None
        now = utcnow()
        for provider, received_at in batch:
            TICKS_PUBLISHED.labels(provider).inc()
            PUBLISH_LATENCY.labels(provider).observe(max((now - received_at).total_seconds(), 0.0))
        self.published += len(batch)
