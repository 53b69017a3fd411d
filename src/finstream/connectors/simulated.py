"""Simulated market feed: geometric Brownian motion ticks published to md.ticks.

Two ways to run it:

* the ``simulator`` role (:func:`run`): symbols, rate and seed from settings
  (FINSTREAM_SIM_SYMBOLS, _SIM_RATE, _SIM_SEED); FINSTREAM_SIM_COUNT stops the
  feed after that many ticks;
* the provider ``simulated`` (:class:`SimulatedConnector`) of a failover
  chain, which is what the ``connector`` role runs by default
  (FINSTREAM_MD_CHAIN=simulated): the same market, as an always-healthy stream.

Pacing is by schedule, not by sleeping a fixed gap after each send, so the
offered rate holds even when a send is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import ClassVar

from finstream.connectors.base import ConnectorOptions, Emit, StreamConnector, sleep_or_stop
from finstream.connectors.publish import TickPublisher
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.simulation import GbmMarket
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.topics import contract

log = get_logger(__name__)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    refusal = settings.synthetic_market_refusal({"simulated"})
    if refusal is not None:
        log.error("simulated feed refused", reason=refusal)
        raise SystemExit(f"error: {refusal}")
    seed = settings.sim_seed
    market = GbmMarket(
        settings.symbols,
        seed=seed,
        run_id=f"sim{seed}" if seed is not None else f"sim-{uuid.uuid4().hex[:8]}",
    )
    publisher = await ctx.publisher()
    out = TickPublisher(publisher, contract("md.ticks", settings.namespace, ctx.codec))
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


class SimulatedConnector(StreamConnector):
    """The simulated market as a chain provider: ``rate`` ticks per second over the wanted symbols."""

    name: ClassVar[str] = "simulated"
    description: ClassVar[str] = "Simulated market (geometric Brownian motion), no network"
    documented_limits: ClassVar[str] = "none (local)"

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        symbols: Sequence[str],
        rate: float,
        seed: int | None = None,
    ) -> None:
        super().__init__(gate, options)
        self.market = GbmMarket(
            list(symbols),
            seed=seed,
            run_id=f"sim{seed}" if seed is not None else f"sim-{uuid.uuid4().hex[:8]}",
        )
        self.universe = frozenset(symbols)
        self.rate = rate
        self.running = False

    def healthy(self, now: float) -> bool:
        return self.running and bool(self.want & self.universe)

    async def run(self, emit: Emit, stop: asyncio.Event) -> None:
        self.running = True
        try:
            sent = 0
            started = time.monotonic()
            while not stop.is_set():
                if not self.want & self.universe:
                    self._changed.clear()
                    waiter = asyncio.create_task(self._changed.wait())
                    stopper = asyncio.create_task(stop.wait())
                    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    stopper.cancel()
                    sent, started = 0, time.monotonic()
                    continue
                # The first tick one period in: by then the chain has assigned the symbols.
                due = int((time.monotonic() - started) * self.rate)
                while sent < due:
                    # Round-robin over the whole universe keeps each symbol's path the
                    # same whatever subset is wanted; unwanted symbols are skipped.
                    for _ in range(len(self.universe)):
                        tick = self.market.next_tick(utcnow())
                        if tick.symbol in self.want:
                            await emit(self.name, tick)
                            break
                    sent += 1
                if await sleep_or_stop(stop, started + (sent + 1) / self.rate - time.monotonic()):
                    return
        finally:
            self.running = False
