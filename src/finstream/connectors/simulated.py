"""Simulated market feed: geometric Brownian motion ticks published to md.ticks.

Symbols, rate and seed come from settings (FINSTREAM_SIM_SYMBOLS, _SIM_RATE,
_SIM_SEED); FINSTREAM_SIM_COUNT stops the feed after that many ticks. Pacing
is by schedule, not by sleeping a fixed gap after each send, so the offered
rate holds even when a send is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from finstream.connectors.publish import TickPublisher
from finstream.domain.simulation import GbmMarket
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext

log = get_logger(__name__)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    seed = settings.sim_seed
    market = GbmMarket(
        settings.symbols,
        seed=seed,
        run_id=f"sim{seed}" if seed is not None else f"sim-{uuid.uuid4().hex[:8]}",
    )
    publisher = await ctx.publisher()
    out = TickPublisher(ctx.codec, publisher, settings.topic("md.ticks"))
    ctx.health.set_ready(True)
    rate = settings.sim_rate
    limit = settings.sim_count
    sent = 0
    started = time.monotonic()
    log.info("simulated feed started", symbols=settings.symbols, rate=rate, limit=limit)
    while not ctx.stop.is_set() and (limit is None or sent < limit):
        due = int((time.monotonic() - started) * rate) + 1
        if limit is not None:
            due = min(due, limit)
        while sent < due:
            await out.publish(market.next_tick(utcnow()))
            sent += 1
        await publisher.flush()
        next_at = started + sent / rate
        delay = next_at - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stop.wait(), timeout=delay)
    await publisher.flush()
    log.info("simulated feed stopped", sent=sent)
