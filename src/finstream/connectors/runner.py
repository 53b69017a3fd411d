"""The ``connector`` role: every configured failover chain, publishing to md.ticks.

Each chain (see :mod:`finstream.domain.marketdata.failover`) runs a poll cycle
every ``FINSTREAM_MD_POLL_INTERVAL`` seconds. Polling providers are asked in
chain order within the cycle, so a failing primary is replaced in the same
cycle rather than after a missed one. Streaming providers (WebSocket feeds,
the simulated market, a replay) run as background tasks while the chain
needs them: a stream serves a chain's symbols in a cycle when it is healthy,
and its ticks are published only for the symbols it is currently assigned,
so a standby stream never doubles a poller's data.

Everything goes through one :class:`~finstream.connectors.publish.TickSink`
(deduplication by content-derived tick ids), and coverage is accounted per
symbol: a symbol left unobserved for more than two poll intervals counts as
a gap, and with ``FINSTREAM_MD_BACKFILL_GAPS`` a gap of a minute or more is
filled from the first provider in the chain that has intraday bars.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta

from finstream.connectors.base import (
    Connector,
    PollingConnector,
    PollResult,
    StreamConnector,
    sleep_or_stop,
)
from finstream.connectors.metrics import (
    ACTIVE,
    BACKFILLED,
    FAILOVERS,
    GAP_SECONDS,
    GAPS,
    PROVIDER_ERRORS,
    STALENESS,
    UNSERVED,
    set_circuit,
)
from finstream.connectors.publish import TickPublisher, TickSink
from finstream.connectors.registry import ChainSpec, ConfigError, build, chain_specs
from finstream.domain.marketdata.dedupe import Gap, GapTracker
from finstream.domain.marketdata.failover import (
    Attempt,
    FailoverChain,
    Outcome,
    ProviderGate,
    Transition,
)
from finstream.domain.marketdata.normalize import LOCAL_RATE_LIMIT, STREAM_NOT_READY, scrub
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import ErrorClass, ProviderError
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.settings import Settings
from finstream.topics import contract

log = get_logger(__name__)

FLUSH_EVERY = 0.05  # stream ticks are acknowledged within this, not at the next poll
MIN_BACKFILL_GAP = timedelta(minutes=1)  # intraday bars are a minute wide


class ChainRunner:
    def __init__(
        self,
        specs: Sequence[ChainSpec],
        connectors: dict[str, Connector],
        gates: dict[str, ProviderGate],
        sink: TickSink,
        *,
        poll_interval: float,
        unknown_retry: float = 600.0,
        throttle_pause: float = 60.0,
        backfill_gaps: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Circuit breakers, rate limits and pauses run on `clock` (tests: a fake one).
        self.clock = clock
        self.connectors = connectors
        self.gates = gates
        self.sink = sink
        self.poll_interval = poll_interval
        self.backfill_gaps = backfill_gaps
        self.specs = {s.name: s for s in specs}
        self.chains = [
            FailoverChain(
                spec.name,
                spec.providers,
                gates,
                max_wait=poll_interval / 4,
                unknown_retry=unknown_retry,
                throttle_pause=throttle_pause,
            )
            for spec in specs
        ]
        self.chain_of: dict[str, FailoverChain] = {
            sym: chain
            for chain, spec in zip(self.chains, specs, strict=True)
            for sym in spec.symbols
        }
        self.gaps = {spec.name: GapTracker(timedelta(seconds=2 * poll_interval)) for spec in specs}
        self.cycles = 0
        # Per symbol, cycles that ended without it: coverage counted in cycles, not seconds.
        self.unserved: Counter[str] = Counter()
        self.transitions: list[Transition] = []
        self._stream_tasks: dict[str, asyncio.Task[None]] = {}
        self._streams_stop = asyncio.Event()
        self._background: set[asyncio.Task[int]] = set()

    def scrub(self, text: str) -> str:
        """``text`` without any connector's credentials (exception texts may quote URLs)."""
        return scrub(text, [s for c in self.connectors.values() for s in c.secrets])

    # -- running -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        loops = [asyncio.create_task(self._chain_loop(c, stop)) for c in self.chains]
        flusher = asyncio.create_task(self._flush_loop(stop))
        try:
            await stop.wait()
        finally:
            for task in [*loops, flusher]:
                task.cancel()
            await asyncio.gather(*loops, flusher, return_exceptions=True)
            await self.close()

    async def close(self) -> None:
        self._streams_stop.set()
        tasks = [*self._stream_tasks.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._stream_tasks.clear()
        with contextlib.suppress(Exception):
            await self.sink.flush()
        for conn in self.connectors.values():
            with contextlib.suppress(Exception):
                await conn.aclose()

    async def _chain_loop(self, chain: FailoverChain, stop: asyncio.Event) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                await self.run_cycle(chain)
            except Exception as exc:
                # A bug in one cycle must not end the feed; the next cycle starts clean.
                log.error(
                    "market-data cycle failed",
                    chain=chain.name,
                    error=self.scrub(f"{type(exc).__name__}: {exc}"),
                    traceback=self.scrub("".join(traceback.format_exception(exc))),
                )
            next_at += self.poll_interval
            now = time.monotonic()
            next_at = max(next_at, now)  # after an overrun, no burst of catch-up cycles
            if await sleep_or_stop(stop, next_at - now):
                return

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.sink.pending:
                try:
                    await self.sink.flush()
                except Exception as exc:
                    log.error("publishing ticks failed", error=str(exc))
            await sleep_or_stop(stop, FLUSH_EVERY)

    # -- one cycle --------------------------------------------------------------------------
    async def run_cycle(self, chain: FailoverChain) -> list[Transition]:
        spec = self.specs[chain.name]
        cycle = chain.start_cycle(spec.symbols)
        while (attempt := chain.next_attempt(cycle, self.clock())) is not None:
            conn = self.connectors[attempt.provider]
            if isinstance(conn, PollingConnector):
                outcome: Outcome = await self._poll(conn, attempt)
            elif isinstance(conn, StreamConnector):
                outcome = await self._stream_attempt(conn, attempt)
            else:  # pragma: no cover - the registry only builds those two kinds
                raise TypeError(f"{conn!r} is neither polling nor streaming")
            chain.record(cycle, attempt, outcome, self.clock())
        transitions = chain.finish(cycle, self.clock())
        self.cycles += 1
        self._report(chain, cycle.errors, transitions)
        self._update_streams()
        await self.sink.flush()
        self._account(chain, set(cycle.served), cycle.pending)
        return transitions

    async def _poll(self, conn: PollingConnector, attempt: Attempt) -> PollResult:
        try:
            result = await conn.fetch(attempt.symbols)
        except ProviderError as exc:  # connectors report in the result; be safe anyway
            result = PollResult(error=exc)
        except Exception as exc:
            # A bug, not provider trouble: keep the traceback, minus any credential.
            log.error(
                "connector raised",
                provider=conn.name,
                error=self.scrub(f"{type(exc).__name__}: {exc}"),
                traceback=self.scrub("".join(traceback.format_exception(exc))),
            )
            result = PollResult(
                error=ProviderError(
                    ErrorClass.TRANSIENT, f"unexpected {type(exc).__name__}", provider=conn.name
                )
            )
        for tick in result.ticks:
            if tick.symbol in result.served:
                await self.sink.offer(conn.name, tick)
        for symbol in sorted(result.unknown):
            PROVIDER_ERRORS.labels(conn.name, ErrorClass.UNKNOWN_SYMBOL.value).inc()
            log.warning("symbol unknown to provider", provider=conn.name, symbol=symbol)
        return result

    async def _stream_attempt(self, conn: StreamConnector, attempt: Attempt) -> Outcome:
        conn.set_symbols(conn.want | set(attempt.symbols))
        started = self._ensure_stream(conn)
        if started:
            # A cold stream gets most of a poll interval to connect and deliver: nothing
            # else is left in the chain to serve these symbols this cycle.
            deadline = time.monotonic() + self.poll_interval * 0.75
            while not conn.healthy(time.monotonic()) and time.monotonic() < deadline:
                if self._stream_tasks[conn.name].done():
                    break
                await asyncio.sleep(0.01)
        if conn.healthy(time.monotonic()):
            return Outcome(served=set(attempt.symbols))
        return Outcome(
            error=ProviderError(
                ErrorClass.TRANSIENT,
                f"stream not ready: {conn.status(time.monotonic())}",
                provider=conn.name,
                code=STREAM_NOT_READY,
            )
        )

    def _ensure_stream(self, conn: StreamConnector) -> bool:
        task = self._stream_tasks.get(conn.name)
        if task is not None and not task.done():
            return False
        if conn.finished:
            return False
        task = asyncio.create_task(conn.run(self.on_stream_tick, self._streams_stop))
        task.add_done_callback(functools.partial(self._stream_ended, conn.name))
        self._stream_tasks[conn.name] = task
        return True

    def _stream_ended(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error(
                "stream ended with an error; it restarts when next needed",
                provider=name,
                error=self.scrub(f"{type(exc).__name__}: {exc}"),
                traceback=self.scrub("".join(traceback.format_exception(exc))),
            )

    def _update_streams(self) -> None:
        """Give each stream the symbols of the chains that still need it."""
        for name, conn in self.connectors.items():
            if not isinstance(conn, StreamConnector):
                continue
            wanted: set[str] = set()
            for chain in self.chains:
                if name in chain.needed():
                    wanted.update(self.specs[chain.name].symbols)
            # Streams only start on a chain's request; later they follow its needs.
            if conn.name in self._stream_tasks:
                conn.set_symbols(wanted)

    async def on_stream_tick(self, provider: str, tick: Tick) -> None:
        chain = self.chain_of.get(tick.symbol)
        if chain is None:
            self.sink.suppress(provider, "unrequested")
        elif chain.assignment.get(tick.symbol) != provider:
            self.sink.suppress(provider, "standby")
        else:
            await self.sink.offer(provider, tick)

    # -- reporting ------------------------------------------------------------------------------
    def _report(
        self,
        chain: FailoverChain,
        errors: list[tuple[str, ProviderError]],
        transitions: list[Transition],
    ) -> None:
        for provider, error in errors:
            if error.code in (LOCAL_RATE_LIMIT, STREAM_NOT_READY):
                continue
            PROVIDER_ERRORS.labels(provider, error.error_class.value).inc()
            log.warning(
                "provider error",
                chain=chain.name,
                provider=provider,
                error_class=error.error_class.value,
                error=str(error),
            )
        now = self.clock()
        for name in chain.providers:
            set_circuit(name, self.gates[name].circuit(now))
            ACTIVE.labels(chain.name, name).set(1 if chain.active == name else 0)
        for t in transitions:
            self.transitions.append(t)
            FAILOVERS.labels(chain.name, t.kind, t.from_provider or "-", t.to_provider or "-").inc()
            cause = next((str(e) for p, e in reversed(errors) if p == t.from_provider), None)
            log.warning(
                f"market data {t.kind}",
                chain=chain.name,
                from_provider=t.from_provider,
                to_provider=t.to_provider,
                cause=cause,
            )

    def _account(self, chain: FailoverChain, served: set[str], unserved: Sequence[str]) -> None:
        for sym in unserved:
            self.unserved[sym] += 1
        if unserved:
            UNSERVED.labels(chain.name).inc(len(unserved))
        now = utcnow()
        tracker = self.gaps[chain.name]
        for sym in served:
            gap = tracker.observe(sym, now)
            if gap is not None:
                GAPS.labels(chain.name).inc()
                GAP_SECONDS.labels(chain.name).observe(gap.seconds)
                log.warning(
                    "coverage gap", chain=chain.name, symbol=sym, seconds=round(gap.seconds, 3)
                )
                if self.backfill_gaps and gap.end - gap.start >= MIN_BACKFILL_GAP:
                    task = asyncio.create_task(self.backfill(chain, gap))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
        for sym in (*served, *unserved):
            age = tracker.staleness(sym, now)
            if age is not None:
                STALENESS.labels(sym).set(age)

    async def backfill(self, chain: FailoverChain, gap: Gap) -> int:
        """Fill ``gap`` from the first provider of the chain with intraday bars."""
        for name in chain.providers:
            conn = self.connectors[name]
            if not (isinstance(conn, PollingConnector) and conn.supports_backfill):
                continue
            try:
                ticks = await conn.backfill(gap.symbol, gap.start, gap.end)
            except ProviderError as exc:
                PROVIDER_ERRORS.labels(name, exc.error_class.value).inc()
                log.warning("backfill failed", provider=name, symbol=gap.symbol, error=str(exc))
                continue
            published = 0
            for tick in ticks:
                published += await self.sink.offer(name, tick, historical=True)
            BACKFILLED.labels(name).inc(published)
            log.info("gap backfilled", provider=name, symbol=gap.symbol, ticks=published)
            return published
        return 0

    def readiness_problem(self) -> str | None:
        if self.cycles == 0:
            return "first poll cycle not done"
        if self.sink.last_error is not None:
            return f"publishing to Kafka failed: {self.sink.last_error}"
        down = [c.name for c in self.chains if c.active is None]
        return f"no provider serving chain(s) {down}" if down else None


def build_runner(settings: Settings, sink: TickSink) -> tuple[ChainRunner, dict[str, Connector]]:
    specs = chain_specs(settings)
    names = list(dict.fromkeys(p for spec in specs for p in spec.providers))
    universe = [sym for spec in specs for sym in spec.symbols]
    connectors, gates = build(settings, names, universe)
    for name, conn in connectors.items():
        problem = conn.configuration_problem()
        if problem:
            log.warning("provider may not work", provider=name, problem=problem)
    runner = ChainRunner(
        specs,
        connectors,
        gates,
        sink,
        poll_interval=settings.md_poll_interval,
        unknown_retry=settings.md_unknown_symbol_retry,
        throttle_pause=settings.md_throttle_pause,
        backfill_gaps=settings.md_backfill_gaps,
    )
    return runner, connectors


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    publisher = await ctx.publisher()
    sink = TickSink(
        TickPublisher(publisher, contract("md.ticks", settings.namespace, ctx.codec)),
        settings.md_dedupe_window,
    )
    try:
        runner, _ = build_runner(settings, sink)
    except ConfigError as exc:
        log.error("market-data configuration is invalid", error=str(exc))
        raise SystemExit(f"error: {exc}") from None
    ctx.health.add_check(runner.readiness_problem)
    ctx.health.set_ready(True)
    log.info(
        "market-data connector started",
        chains={name: list(spec.providers) for name, spec in runner.specs.items()},
        poll_interval=settings.md_poll_interval,
    )
    await runner.run(ctx.stop)
    log.info("market-data connector stopped", published=sink.published, suppressed=sink.suppressed)
