"""The ``audit`` role: audit.events -> the hash-chained ``audit_events`` table
(the writer and the chain: :mod:`finstream.sinks.audit`).

At least once on the stream engine: each batch is appended in one PostgreSQL
transaction before the engine commits its offsets; event ids make a re-read
batch store nothing twice.
"""

from __future__ import annotations

from finstream.runtime.engine import StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.sinks.audit import AuditWriter
from finstream.stores.postgres import create_pool
from finstream.stores.postgres import probe as pg_probe

log = get_logger(__name__)


class AuditSink(Processor):
    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer

    async def process(self, events: list[Event], out: Output) -> None:
        stored = await self.writer.append([ev.item for ev in events])
        log.debug("audit batch stored", received=len(events), stored=stored)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    pool = await create_pool(settings)
    ctx.health.add_dependency("postgresql", lambda: pg_probe(pool))
    engine = StreamEngine(
        settings,
        ctx.role,
        ["audit.events"],
        AuditSink(AuditWriter(pool)),
        ctx.health,
        guarantee="at_least_once",
        batch_size=settings.audit_batch_size,
        batch_wait=settings.audit_batch_ms / 1000,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await pool.close()
