"""The quotes role's cache writes, with a QuoteCache stand-in that fails on demand."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from finstream.agents.quotes import Quotes
from finstream.codec import Codec
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.partitioning import key_partition
from finstream.runtime.stream.events import Event
from finstream.settings import Settings
from finstream.stores.quotes import QuoteWriter
from finstream.topics import contract


class FlakyCache:
    """Stands in for QuoteCache: the first ``failures`` writes raise, as a reset Redis does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.quotes: dict[str, str] = {}

    async def update_many(self, ticks: Sequence[Tick]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Connection reset by peer")
        for tick in ticks:
            self.quotes[tick.symbol] = tick.tick_id


class Discard:
    def produce(self, *args: Any, **kwargs: Any) -> None:
        pass

    def dead_letter(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"dead letter {args}")


async def test_a_quote_whose_cache_write_failed_reaches_the_cache_without_another_tick() -> None:
    now = [0.0]
    cache = FlakyCache(failures=1)
    writer = QuoteWriter(cache, clock=lambda: now[0])  # type: ignore[arg-type]
    ctx = SimpleNamespace(settings=Settings(namespace="unit."), codec=Codec())
    quotes = Quotes(ctx, writer)  # type: ignore[arg-type]
    tick = Tick(
        tick_id="t-last",
        symbol="AAPL",
        price=Decimal("190.25"),
        size=Decimal(10),
        ts=datetime.now(UTC),
        received_at=datetime.now(UTC),
        source="unit",
    )
    p = key_partition(b"AAPL", contract("md.ticks", "unit.", ctx.codec).partitions)
    await quotes.assigned(frozenset({p}))
    event = Event("unit.md.ticks", "md.ticks", p, 0, b"AAPL", b"", tick, None, 0)

    await quotes.process([event], Discard())  # the write fails: the last tick of the load
    assert cache.quotes == {}
    assert writer.pending == 1

    await quotes.punctuate(Discard())  # within the writer's backoff: not yet
    assert cache.quotes == {}
    now[0] += 10  # past the backoff; no tick arrives, the timer alone retries
    await quotes.punctuate(Discard())
    assert cache.quotes == {"AAPL": "t-last"}
    assert writer.pending == 0


class Recorder:
    """Stands in for QuoteCache and the engine's Output: one log of both, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []

    async def update_many(self, ticks: Sequence[Tick]) -> None:
        self.log.extend(f"cache {t.tick_id}" for t in ticks)

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
        self.log.append(f"produce {topic}")

    def dead_letter(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"dead letter {args}")


async def test_a_batch_writes_the_quote_cache_before_it_produces_any_bar() -> None:
    rec = Recorder()
    writer = QuoteWriter(rec)  # type: ignore[arg-type]
    ctx = SimpleNamespace(settings=Settings(namespace="unit."), codec=Codec())
    quotes = Quotes(ctx, writer)  # type: ignore[arg-type]
    p = key_partition(b"AAPL", contract("md.ticks", "unit.", ctx.codec).partitions)
    await quotes.assigned(frozenset({p}))
    start = datetime(2026, 12, 7, 14, 30, tzinfo=UTC)
    events = [
        Event(
            "unit.md.ticks",
            "md.ticks",
            p,
            offset,
            b"AAPL",
            b"",
            Tick(
                tick_id=f"t{offset}",
                symbol="AAPL",
                price=Decimal("190") + offset,
                size=Decimal(10),
                ts=start + timedelta(seconds=70 * offset),  # the second closes the first's bar
                received_at=start,
                source="unit",
            ),
            None,
            0,
        )
        for offset in range(2)
    ]
    await quotes.process(events, rec)  # type: ignore[arg-type]

    assert rec.log[0] == "cache t1"  # the newest tick of the symbol, once
    assert "produce unit.md.bars.1m" in rec.log[1:]
