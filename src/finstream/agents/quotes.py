"""Quotes role: md.ticks -> the latest quote per symbol (Redis cache) and OHLCV bars (md.bars.1m).

Runs on the stream engine, exactly once: per batch of validated ticks it
updates two stores, ``latest-quote`` (the newest tick per symbol) and
``bar-state`` (the open bars per symbol and width, :mod:`finstream.domain.marketdata.bars`),
and publishes the bars that close or are corrected; bars, dead letters, the
stores' changelogs and the md.ticks offsets commit in one transaction.

The Redis quote cache (:mod:`finstream.stores.quotes`) is written first in
every batch, before its bars and its commit, newest tick per symbol in one
pipeline: writes are monotonic in event time, so a batch processed again
after a crash rewrites the same values and never moves a quote backwards.
If Redis is down, the newest tick per symbol waits in memory and is written
when Redis answers; after a restart or rebalance, and whenever Redis turns
out to have lost the cache (a partition's repair mark is gone,
:class:`finstream.stores.redis.RepairMarks`), the cache of the
partitions this replica owns is repaired from the ``latest-quote`` store
(the source of truth).

A tick too late for its bar goes to dlq with the reason (``LateTick``).
"""

from __future__ import annotations

from datetime import timedelta

from prometheus_client import Counter

from finstream.codec import Codec
from finstream.domain.marketdata.bars import BarState, IntervalError, add_tick, parse_intervals
from finstream.domain.marketdata.ticks import Tick
from finstream.runtime.engine import StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.state import Store
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.stores.quotes import QuoteCache, QuoteWriter
from finstream.stores.redis import RepairMarks, connect
from finstream.stores.redis import probe as redis_probe
from finstream.topics import contract

log = get_logger(__name__)

BARS_PUBLISHED = Counter(
    "finstream_bars_published_total", "Bar publications (revisions included)", ["interval", "final"]
)

_EMPTY = BarState()


class Quotes(Processor):
    def __init__(
        self, ctx: ServiceContext, writer: QuoteWriter, marks: RepairMarks | None = None
    ) -> None:
        settings = ctx.settings
        try:
            self.intervals = parse_intervals(settings.bar_intervals)
        except IntervalError as exc:
            raise SystemExit(f"FINSTREAM_BAR_INTERVALS: {exc}") from None
        self.lateness = timedelta(seconds=settings.bar_allowed_lateness)
        codec: Codec = ctx.codec
        self.bars_topic = contract("md.bars.1m", settings.namespace, codec)
        # The newest tick per symbol, kept as its md.ticks value.
        ticks = contract("md.ticks", settings.namespace, codec)
        self.latest: Store[Tick] = Store(
            "latest-quote",
            lambda tick: ticks.encode(tick.to_record()),
            lambda raw: Tick.from_record(ticks.decode_record(raw)),
        )
        self.bar_state: Store[BarState] = Store("bar-state", BarState.to_json, BarState.from_json)
        self.writer = writer
        self.marks = marks
        self.owned: set[int] = set()
        self._published = {
            (i.name, final): BARS_PUBLISHED.labels(i.name, str(final).lower())
            for i in self.intervals
            for final in (True, False)
        }
        self._keys = {i.name: f"|{i.name}".encode() for i in self.intervals}

    async def process(self, events: list[Event], out: Output) -> None:
        latest, bar_state, writer = self.latest, self.bar_state, self.writer
        bars_topic, lateness = self.bars_topic, self.lateness
        # The cache first: readers of quotes wait for nothing the bars do.
        for ev in events:
            tick: Tick = ev.item
            symbol = tick.symbol.encode()
            current = latest.get(ev.partition, symbol)
            if current is None or tick.ts >= current.ts:
                latest.put(ev.partition, symbol, tick)
                writer.offer(tick)
        await writer.flush()
        for ev in events:
            tick = ev.item
            p = ev.partition
            symbol = tick.symbol.encode()
            late: list[str] = []
            for interval in self.intervals:
                key = symbol + self._keys[interval.name]
                update = add_tick(bar_state.get(p, key) or _EMPTY, tick, interval, lateness)
                if update.late is not None:
                    late.append(update.late)
                    continue
                if update.duplicate:
                    continue
                for bar in update.publish:
                    out.produce(bars_topic.name, symbol, bars_topic.encode(bar.to_record()))
                    self._published[(bar.interval, bar.final)].inc()
                bar_state.put(p, key, update.state)
            if late:
                out.dead_letter(ev, "; ".join(late), "LateTick")

    async def assigned(self, partitions: frozenset[int]) -> None:
        # The store (restored from its changelog) is the truth; offering it
        # again repairs cache writes a crash lost. Monotonic writes make this safe.
        self.owned = set(partitions)
        await self._repair(partitions)

    async def revoked(self, partitions: frozenset[int]) -> None:
        self.owned -= partitions

    async def punctuate(self, out: Output) -> None:
        if self.writer.pending:
            # Writes failed: retry them here too (the writer's backoff applies),
            # or the last quotes before the ticks stop would wait for the next tick.
            await self.writer.flush()
            return
        if self.marks is None or not self.owned:
            return
        try:
            lost = await self.marks.missing(str(p) for p in sorted(self.owned))
        except Exception as exc:
            log.warning("quote cache repair marks unreadable", error=str(exc))
            return
        if lost:
            log.warning(
                "Redis lost the quote cache; repairing it from the latest-quote store",
                partitions=lost,
            )
            await self._repair(frozenset(int(p) for p in lost))

    async def _repair(self, partitions: frozenset[int]) -> None:
        for p in partitions:
            for _p, _key, tick in self.latest.items(p):
                self.writer.offer(tick)
        await self.writer.flush()
        if self.marks is not None and not self.writer.pending:
            try:
                await self.marks.mark(str(p) for p in sorted(partitions))
            except Exception as exc:
                log.warning("quote cache repair marks not written", error=str(exc))


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    redis = connect(settings)
    # The quote cache is this role's output: a Redis that is gone makes it not ready.
    ctx.health.add_dependency("redis", lambda: redis_probe(redis))
    writer = QuoteWriter(QuoteCache(redis, settings))
    quotes = Quotes(ctx, writer, RepairMarks(redis, settings, ctx.role))
    engine = StreamEngine(
        settings,
        ctx.role,
        ["md.ticks"],
        quotes,
        ctx.health,
        guarantee="exactly_once",
        stores=[quotes.latest, quotes.bar_state],
        punctuate_every=settings.redis_repair_check_seconds,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await writer.flush()
        await redis.aclose()
