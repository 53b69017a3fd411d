"""The ``history`` role: md.ticks -> PostgreSQL ``ticks`` (the writer: :mod:`finstream.sinks.history`).

At least once on the stream engine: each batch of validated ticks is written
(in the background, overlapping the decoding of the next batch) before the
engine commits its offsets; the writer's conflict clause makes a re-read
batch add no rows.
"""

from __future__ import annotations

import asyncio

from finstream.runtime.engine import StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.sinks.history import TickWriter
from finstream.stores.postgres import create_pool
from finstream.stores.postgres import probe as pg_probe

log = get_logger(__name__)


class History(Processor):
    """Writes each batch in the background while the engine decodes the next one.

    At most ``depth`` writes are in flight (each on its own pooled connection);
    the engine's commit waits for all of them (:meth:`flush`), so offsets are
    committed only for ticks that are in PostgreSQL.
    """

    def __init__(self, writer: TickWriter, depth: int = 2) -> None:
        self.writer = writer
        self.depth = depth
        self._writes: list[asyncio.Task[int]] = []

    async def process(self, events: list[Event], out: Output) -> None:
        while len(self._writes) >= self.depth:
            await self._reap(self._writes[0])
        self._writes.append(asyncio.create_task(self.writer.write([ev.item for ev in events])))

    async def flush(self) -> None:
        while self._writes:
            await self._reap(self._writes[0])

    async def _reap(self, task: asyncio.Task[int]) -> None:
        try:
            inserted = await task
        except BaseException:
            # The engine rewinds to its last commit and writes everything after
            # it again; writes still in flight are void.
            for other in self._writes:
                other.cancel()
            await asyncio.gather(*self._writes, return_exceptions=True)
            self._writes.clear()
            raise
        self._writes.remove(task)
        log.debug("batch stored", inserted=inserted)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    pool = await create_pool(settings)
    ctx.health.add_dependency("postgresql", lambda: pg_probe(pool))
    engine = StreamEngine(
        settings,
        ctx.role,
        ["md.ticks"],
        History(TickWriter(pool)),
        ctx.health,
        guarantee="at_least_once",
        batch_size=settings.history_batch_size,
        batch_wait=settings.history_batch_ms / 1000,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await pool.close()
