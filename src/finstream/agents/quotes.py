"""Quotes agent: md.ticks -> latest quote per symbol (faust table + Redis cache).

The table holds the latest tick per symbol (its Avro bytes), recovered from
its changelog after a restart; the Redis hash and channel serve readers. A
tick that does not decode or fails validation becomes a dead letter and the
partition keeps flowing.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import faust

from finstream.app import RAW, AgentContext
from finstream.codec import DecodeError
from finstream.domain.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.time import utcnow
from finstream.runtime.faust_support import message_headers
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import EVENTS_IN, PROCESSING_SECONDS
from finstream.sinks.quote_cache import QuoteCache
from finstream.sinks.redis_client import connect
from finstream.topics import load_catalogue

log = get_logger(__name__)


def register(app: faust.App, ctx: AgentContext) -> None:
    settings = ctx.settings
    source = settings.topic("md.ticks")
    partitions = load_catalogue().get("md.ticks").partitions
    ticks = app.topic(source, partitions=partitions, **RAW)
    latest = app.Table("latest-quote", partitions=partitions, key_type=bytes, value_type=bytes)
    max_future = timedelta(seconds=settings.tick_max_future_seconds)

    @app.agent(ticks, name="quotes")
    async def quotes(stream: faust.StreamT[Any]) -> None:
        cache = QuoteCache(connect(settings), settings)
        async for event in stream.events():
            started = time.perf_counter()
            msg = event.message
            EVENTS_IN.labels(ctx.role, msg.topic).inc()
            try:
                tick = validate_tick(
                    Tick.from_record(ctx.codec.decode(msg.value, "Tick")), utcnow(), max_future
                )
            except (DecodeError, TickValidationError) as exc:
                await ctx.dead_letters.send(
                    source_topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    key=msg.key,
                    value=msg.value,
                    error=exc,
                    headers=message_headers(msg),
                )
                continue
            key = tick.symbol.encode()
            current = latest.get(key)
            if current is None or _newer(ctx, tick, current):
                latest[key] = msg.value
            await cache.update(tick)
            PROCESSING_SECONDS.labels(ctx.role, "tick").observe(time.perf_counter() - started)


def _newer(ctx: AgentContext, tick: Tick, current: bytes) -> bool:
    try:
        return bool(tick.ts >= ctx.codec.decode(current, "Tick")["ts"])
    except DecodeError:
        return True
