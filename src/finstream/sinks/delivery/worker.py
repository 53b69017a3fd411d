"""Service roles of the delivery workers: one per channel, the same engine.

``finstream worker delivery-email`` (and ``delivery-push``, ``delivery-sms``,
``inapp``) consumes ``notify.outbound.<channel>`` with a BatchConsumer whose
handler is the engine's intake, and runs the engine's dispatch, schedule and
outbox loops beside it until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib

from finstream.runtime.consumer import BatchConsumer
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.sinks.delivery.base import CHANNEL_TOPICS, build_chain
from finstream.sinks.delivery.engine import DeliveryEngine
from finstream.sinks.postgres import create_pool
from finstream.sinks.redis_client import connect

log = get_logger(__name__)


async def run_channel(ctx: ServiceContext, channel: str) -> None:
    settings = ctx.settings
    chain = build_chain(settings, channel, log=log.warning)
    log.info("provider chain", channel=channel, providers=[p.name for p in chain])
    pool = await create_pool(
        settings,
        min_size=2,
        max_size=settings.delivery_db_pool_max_size or settings.delivery_concurrency + 4,
    )
    redis = connect(settings)
    publisher = await ctx.publisher()
    engine = DeliveryEngine(
        settings=settings,
        codec=ctx.codec,
        channel=channel,
        role=ctx.role,
        chain=chain,
        pool=pool,
        redis=redis,
        publisher=publisher,
    )
    consumer = BatchConsumer(
        settings,
        ctx.role,
        [settings.topic(CHANNEL_TOPICS[channel])],
        engine.intake,
        publisher=publisher,
        batch_size=settings.delivery_batch_size,
        batch_ms=settings.delivery_batch_ms,
        on_ready=lambda ready: ctx.health.set_ready(ready, "" if ready else "no partitions"),
    )
    engine_stop = asyncio.Event()
    engine_task = asyncio.create_task(engine.run(engine_stop), name="delivery-engine")
    try:
        await consumer.run(ctx.stop)
    finally:
        engine_stop.set()
        with contextlib.suppress(Exception):
            await engine_task
        await redis.aclose()
        await pool.close()


async def run_email(ctx: ServiceContext) -> None:
    await run_channel(ctx, "EMAIL")


async def run_push(ctx: ServiceContext) -> None:
    await run_channel(ctx, "PUSH")


async def run_sms(ctx: ServiceContext) -> None:
    await run_channel(ctx, "SMS")
