"""Tick history sink: md.ticks -> PostgreSQL ``ticks``, in batches, idempotently.

Runs on the stream engine, at least once: each batch of validated ticks is
copied into a temporary table and inserted with ON CONFLICT DO NOTHING on
(symbol, tick_id), in one PostgreSQL transaction, before the engine commits the
batch's offsets. A worker killed at any point re-reads only what was not yet
committed, and the conflict clause turns the re-read into no new rows: no tick
lost, none duplicated. Undecodable or invalid ticks are dead-lettered by the
engine before the batch gets here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg

from finstream.domain.marketdata.ticks import Tick
from finstream.runtime.engine import Event, Output, Processor, StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.stores.postgres import create_pool

log = get_logger(__name__)

COLUMNS = (
    "symbol",
    "tick_id",
    "ts",
    "kind",
    "price",
    "size",
    "bid",
    "ask",
    "prev_close",
    "currency",
    "source",
    "received_at",
)

_INSERT = f"""
INSERT INTO ticks ({", ".join(COLUMNS)})
SELECT {", ".join(COLUMNS)} FROM _ticks_in
ON CONFLICT (symbol, tick_id, ts) DO NOTHING
"""


def tick_row(t: Tick) -> tuple[Any, ...]:
    return (
        t.symbol,
        t.tick_id,
        t.ts,
        t.kind,
        t.price,
        t.size,
        t.bid,
        t.ask,
        t.prev_close,
        t.currency,
        t.source,
        t.received_at,
    )


class TickWriter:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def write(self, ticks: Sequence[Tick]) -> int:
        """Insert ticks not yet stored; return how many rows were new."""
        if not ticks:
            return 0
        # A batch may hold the same tick twice (a re-sent message): keep one.
        unique = {(t.symbol, t.tick_id): t for t in ticks}
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _ticks_in "
                "(LIKE ticks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            await conn.copy_records_to_table(
                "_ticks_in", records=[tick_row(t) for t in unique.values()], columns=COLUMNS
            )
            status = await conn.execute(_INSERT)
        return int(status.split()[-1])


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
