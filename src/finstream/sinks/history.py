"""Tick history sink: md.ticks -> PostgreSQL ``ticks``, in batches, idempotently.

Each batch is copied into a temporary table and inserted with ON CONFLICT DO
NOTHING on (symbol, tick_id), in one transaction, before the offsets are
committed. A worker killed at any point re-reads at most the uncommitted batch,
and the conflict clause turns the re-read into no new rows: no tick lost, none
duplicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg

from finstream.codec import Codec, DecodeError
from finstream.domain.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.time import utcnow
from finstream.runtime.consumer import BatchConsumer
from finstream.runtime.kafka import DeadLetters
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.sinks.postgres import create_pool

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


async def decode_ticks(
    records: Sequence[Any], codec: Codec, dead_letters: DeadLetters, max_future: timedelta
) -> list[Tick]:
    """Valid ticks of a batch; the rest become dead letters with their reason."""
    now = utcnow()
    ticks: list[Tick] = []
    for r in records:
        try:
            tick = Tick.from_record(codec.decode(r.value, "Tick"))
            ticks.append(validate_tick(tick, now, max_future))
        except (DecodeError, TickValidationError) as exc:
            await dead_letters.send_message(r, exc)
    return ticks


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    pool = await create_pool(settings)
    writer = TickWriter(pool)
    dead_letters = await ctx.dead_letters()
    max_future = timedelta(seconds=settings.tick_max_future_seconds)

    async def handle(records: Sequence[Any]) -> None:
        ticks = await decode_ticks(records, ctx.codec, dead_letters, max_future)
        inserted = await writer.write(ticks)
        log.debug("batch stored", received=len(records), inserted=inserted)

    consumer = BatchConsumer(
        settings,
        ctx.role,
        [settings.topic("md.ticks")],
        handle,
        publisher=await ctx.publisher(),
        batch_size=settings.history_batch_size,
        batch_ms=settings.history_batch_ms,
        on_ready=lambda ready: ctx.health.set_ready(ready, "" if ready else "no partitions"),
    )
    try:
        await consumer.run(ctx.stop)
    finally:
        await pool.close()
