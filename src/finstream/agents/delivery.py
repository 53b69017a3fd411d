"""Roles of the delivery workers: one per channel, the same delivery engine.

``finstream worker delivery-email`` (and ``delivery-push``, ``delivery-sms``,
``inapp``) consumes ``notify.outbound.<channel>`` on the stream engine, at
least once: each batch of decoded messages goes to the delivery engine's
intake, which claims new messages in PostgreSQL and queues them; the
dispatch, schedule and outbox loops run beside it until SIGTERM. Offsets are
committed after the claims are durable and the intake's records are flushed.
"""

from __future__ import annotations

import asyncio
import contextlib

from finstream.runtime.engine import StreamEngine
from finstream.runtime.kafka import KafkaPublisher
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.sinks.delivery.base import CHANNEL_TOPICS, build_chain
from finstream.sinks.delivery.engine import DeliveryEngine
from finstream.sinks.delivery.inapp import InboxProvider, InboxRepair
from finstream.stores.postgres import create_pool
from finstream.stores.postgres import probe as pg_probe
from finstream.stores.redis import connect
from finstream.stores.redis import probe as redis_probe

log = get_logger(__name__)


class Intake(Processor):
    def __init__(self, engine: DeliveryEngine, publisher: KafkaPublisher) -> None:
        self.engine = engine
        self.publisher = publisher

    async def process(self, events: list[Event], out: Output) -> None:
        await self.engine.intake(events)
        # Dead letters and duplicate records of the batch are durable before its commit.
        await self.publisher.flush()


async def run_channel(ctx: ServiceContext, channel: str) -> None:
    settings = ctx.settings
    if channel == "EMAIL":
        from finstream.privacy.kms import check_unsubscribe_url

        check_unsubscribe_url(settings)  # no placeholder link in production mail
    chain = build_chain(settings, channel, log=log.warning)
    log.info("provider chain", channel=channel, providers=[p.name for p in chain])
    pool = await create_pool(
        settings,
        min_size=2,
        max_size=settings.delivery_db_pool_max_size or settings.delivery_concurrency + 4,
    )
    redis = connect(settings)
    # Claims and records live in PostgreSQL; Redis is only the redelivery fast
    # path, except for in-app messages, whose inbox it is.
    ctx.health.add_dependency("postgresql", lambda: pg_probe(pool))
    if channel == "INAPP":
        ctx.health.add_dependency("redis", lambda: redis_probe(redis))
    publisher = await ctx.publisher()
    delivery = DeliveryEngine(
        settings=settings,
        codec=ctx.codec,
        channel=channel,
        role=ctx.role,
        chain=chain,
        pool=pool,
        redis=redis,
        publisher=publisher,
    )
    stream = StreamEngine(
        settings,
        ctx.role,
        [CHANNEL_TOPICS[channel]],
        Intake(delivery, publisher),
        ctx.health,
        guarantee="at_least_once",
        batch_size=settings.delivery_batch_size,
        batch_wait=settings.delivery_batch_ms / 1000,
    )
    delivery_stop = asyncio.Event()
    delivery_task = asyncio.create_task(delivery.run(delivery_stop), name="delivery-engine")
    repair_task = None
    inbox = next((p for p in chain if isinstance(p, InboxProvider)), None)
    if inbox is not None:
        repair = InboxRepair(pool, inbox.inbox, redis, settings, ctx.codec)
        repair_task = asyncio.create_task(repair.run(delivery_stop), name="inbox-repair")
    try:
        await stream.run(ctx.stop)
    finally:
        delivery_stop.set()
        with contextlib.suppress(Exception):
            await delivery_task
        if repair_task is not None:
            with contextlib.suppress(Exception):
                await repair_task
        await redis.aclose()
        await pool.close()


async def run_email(ctx: ServiceContext) -> None:
    await run_channel(ctx, "EMAIL")


async def run_push(ctx: ServiceContext) -> None:
    await run_channel(ctx, "PUSH")


async def run_sms(ctx: ServiceContext) -> None:
    await run_channel(ctx, "SMS")


async def run_inapp(ctx: ServiceContext) -> None:
    await run_channel(ctx, "INAPP")
