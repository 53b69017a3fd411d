"""The ``bars`` role: md.bars.1m -> PostgreSQL and Redis (the writer: :mod:`finstream.sinks.bars`).

At least once on the stream engine: a batch is stored in PostgreSQL, then in
Redis, then its offsets are committed; the writer's revision checks make a
re-read batch harmless. Every ``redis_repair_check_seconds`` it looks at its
repair marks (:class:`finstream.stores.redis.RepairMarks`) and rewrites the
latest bars of the partitions it owns from PostgreSQL when Redis lost them.
"""

from __future__ import annotations

from collections.abc import Sequence

from finstream.domain.marketdata.bars import parse_intervals
from finstream.domain.partitioning import key_partition
from finstream.runtime.engine import StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.sinks.bars import BarStore
from finstream.stores.postgres import create_pool
from finstream.stores.postgres import probe as pg_probe
from finstream.stores.redis import RepairMarks, connect
from finstream.stores.redis import probe as redis_probe
from finstream.topics import contract

log = get_logger(__name__)


class BarsSink(Processor):
    def __init__(
        self,
        store: BarStore,
        marks: RepairMarks | None = None,
        partitions: int = 1,
        intervals: Sequence[str] = ("1m",),
    ) -> None:
        self.store = store
        self.marks = marks
        self.partitions = partitions
        self.intervals = list(intervals)
        self.owned: set[int] = set()

    async def process(self, events: list[Event], out: Output) -> None:
        bars = [ev.item for ev in events]
        stored = await self.store.write_postgres(bars)
        cached = await self.store.write_redis(bars)
        log.debug("bars stored", received=len(bars), postgres=stored, redis=cached)

    async def assigned(self, partitions: frozenset[int]) -> None:
        self.owned = set(partitions)

    async def revoked(self, partitions: frozenset[int]) -> None:
        self.owned -= partitions

    async def punctuate(self, out: Output) -> None:
        if self.marks is None or not self.owned:
            return
        try:
            lost = await self.marks.missing(str(p) for p in sorted(self.owned))
            if not lost:
                return
            wanted = {int(p) for p in lost}
            restored = await self.store.restore_redis(
                lambda symbol: key_partition(symbol.encode(), self.partitions) in wanted,
                self.intervals,
            )
            await self.marks.mark(lost)
        except Exception as exc:
            # Tried again at the next punctuation; the live writes go on meanwhile.
            log.warning("bars in Redis not repaired yet", error=f"{type(exc).__name__}: {exc}")
            return
        log.warning(
            "Redis had lost the latest bars; repaired them from PostgreSQL",
            partitions=lost,
            bars=restored,
        )


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    pool = await create_pool(settings)
    redis = connect(settings)
    ctx.health.add_dependency("postgresql", lambda: pg_probe(pool))
    ctx.health.add_dependency("redis", lambda: redis_probe(redis))
    sink = BarsSink(
        BarStore(pool, redis, settings),
        RepairMarks(redis, settings, ctx.role),
        contract("md.bars.1m", settings.namespace).partitions,
        [i.name for i in parse_intervals(settings.bar_intervals)],
    )
    engine = StreamEngine(
        settings,
        ctx.role,
        ["md.bars.1m"],
        sink,
        ctx.health,
        guarantee="at_least_once",
        batch_size=settings.bars_batch_size,
        batch_wait=settings.bars_batch_ms / 1000,
        punctuate_every=settings.redis_repair_check_seconds,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await pool.close()
        await redis.aclose()
