"""The ``bars`` role: md.bars.1m -> PostgreSQL and Redis (the writer: :mod:`finstream.sinks.bars`).

At least once on the stream engine: a batch is stored in PostgreSQL, then in
Redis, then its offsets are committed; the writer's revision checks make a
re-read batch harmless.
"""

from __future__ import annotations

from finstream.runtime.engine import Event, Output, Processor, StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.sinks.bars import BarStore
from finstream.stores.postgres import create_pool
from finstream.stores.redis import connect

log = get_logger(__name__)


class BarsSink(Processor):
    def __init__(self, store: BarStore) -> None:
        self.store = store

    async def process(self, events: list[Event], out: Output) -> None:
        bars = [ev.item for ev in events]
        stored = await self.store.write_postgres(bars)
        cached = await self.store.write_redis(bars)
        log.debug("bars stored", received=len(bars), postgres=stored, redis=cached)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    pool = await create_pool(settings)
    redis = connect(settings)
    engine = StreamEngine(
        settings,
        ctx.role,
        ["md.bars.1m"],
        BarsSink(BarStore(pool, redis, settings)),
        ctx.health,
        guarantee="at_least_once",
        batch_size=settings.bars_batch_size,
        batch_wait=settings.bars_batch_ms / 1000,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await pool.close()
        await redis.aclose()
