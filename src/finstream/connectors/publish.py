"""Publishing normalized ticks to md.ticks, shared by every connector."""

from __future__ import annotations

from finstream.codec import Codec
from finstream.domain.ticks import Tick
from finstream.runtime.kafka import Publisher


class TickPublisher:
    """Encodes ticks and sends them to md.ticks keyed by symbol (co-partitioning)."""

    def __init__(self, codec: Codec, publisher: Publisher, topic: str) -> None:
        self._codec = codec
        self._publisher = publisher
        self.topic = topic

    async def publish(self, tick: Tick) -> None:
        await self._publisher.send(
            self.topic, tick.symbol.encode(), self._codec.encode("Tick", tick.to_record())
        )

    async def flush(self) -> None:
        await self._publisher.flush()
