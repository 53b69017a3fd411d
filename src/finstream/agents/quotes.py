"""Quotes agent: md.ticks -> latest quote per symbol (faust table + Redis cache),
and OHLCV bars (md.bars.1m).

The table holds the latest tick per symbol (its Avro bytes), recovered from
its changelog after a restart; the Redis hash and channel serve readers. A
tick that does not decode or fails validation becomes a dead letter and the
partition keeps flowing.

Bars (:mod:`finstream.domain.bars`) are built per symbol and width on
exchange time in the ``bar-state`` table. Each stored state remembers the
md.ticks offset it includes, so ticks replayed after a crash are not counted
twice; a state that published bars is written only once the bars are
delivered, so none is lost either (see :mod:`finstream.agents.ordering`).
A tick too late for a bar goes to dlq with the reason.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, cast

import faust
from prometheus_client import Counter

from finstream.agents.gaps import GapGuard
from finstream.agents.ordering import EventAck, KeyedWrites, table_write
from finstream.app import RAW, AgentContext
from finstream.codec import DecodeError
from finstream.domain.bars import BarState, IntervalError, add_tick, parse_intervals
from finstream.domain.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import EVENTS_IN, EVENTS_OUT, PROCESSING_SECONDS
from finstream.sinks.quote_cache import CoalescingQuoteWriter, QuoteCache
from finstream.sinks.redis_client import connect
from finstream.topics import load_catalogue

log = get_logger(__name__)

BARS_PUBLISHED = Counter(
    "finstream_bars_published_total", "Bar publications (revisions included)", ["interval", "final"]
)


def register(app: faust.App, ctx: AgentContext) -> None:
    settings = ctx.settings
    source = settings.topic("md.ticks")
    partitions = load_catalogue().get("md.ticks").partitions
    ticks = app.topic(source, partitions=partitions, **RAW)
    latest = app.Table("latest-quote", partitions=partitions, key_type=bytes, value_type=bytes)
    max_future = timedelta(seconds=settings.tick_max_future_seconds)
    bars = BarBuilder(app, ctx, partitions)

    cache = QuoteCache(connect(settings), settings)
    writer = CoalescingQuoteWriter(cache)

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _resync(sender: Any, **_: Any) -> None:
        # The table (recovered from its changelog) is the truth; re-offering it
        # repairs cache writes lost in a crash. Monotonic writes make this safe.
        for value in list(latest.values()):
            try:
                writer.offer(Tick.from_record(ctx.codec.decode(value, "Tick")))
            except DecodeError:
                continue

    guard = GapGuard(settings, ctx.role)
    crashing: set[Any] = set()

    def failed(exc: BaseException) -> None:
        # A bar or state write the producer could not deliver: its tick is
        # never acked, and the worker restarts to process it again.
        log.error("delivery failed; restarting the worker", error=str(exc))
        crashing.add(asyncio.ensure_future(app.crash(exc)))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, revoked: Any, **_: Any) -> None:
        bars.forget({tp.partition for tp in revoked if tp.topic == source})

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _stop_guard(sender: Any, **_: Any) -> None:
        await guard.stop()

    async def process(msg: Any, ack: EventAck) -> None:
        started = time.perf_counter()
        EVENTS_IN.labels(ctx.role, msg.topic).inc()
        try:
            tick = validate_tick(
                Tick.from_record(ctx.codec.decode(msg.value, "Tick")), utcnow(), max_future
            )
        except (DecodeError, TickValidationError) as exc:
            await _dead_letter(ctx, msg, exc)
            return
        try:
            key = tick.symbol.encode()
            current = latest.get(key)
            if current is None or _newer(ctx, tick, current):
                ack.wait_for(table_write(latest, msg.partition, key, msg.value)())
            writer.offer(tick)
            await bars.on_tick(msg, tick, ack)
        except Exception as exc:  # never stall the partition
            log.exception("tick processing failed", offset=msg.offset)
            await _dead_letter(ctx, msg, exc, "UnexpectedError")
        PROCESSING_SECONDS.labels(ctx.role, "tick").observe(time.perf_counter() - started)

    @app.agent(ticks, name="quotes")
    async def quotes(stream: faust.StreamT[Any]) -> None:
        writer.start()
        # Manual acks: a tick is acked once its bars and state are durable
        # (see finstream.agents.ordering); skipped offsets first (GapGuard).
        async for event in cast(Any, stream).noack().events():
            msg = event.message
            ack = EventAck(event, failed)
            try:
                missed = await guard.missing(msg)
            except Exception:
                log.exception("could not read skipped offsets", partition=msg.partition)
                missed = []
            for record in missed:
                await process(record, ack)
            await process(msg, ack)
            ack.seal()


async def _dead_letter(
    ctx: AgentContext, msg: Any, error: BaseException, error_class: str | None = None
) -> None:
    await ctx.dead_letters.send_message(msg, error, error_class=error_class)


def _newer(ctx: AgentContext, tick: Tick, current: bytes) -> bool:
    try:
        return bool(tick.ts >= ctx.codec.decode(current, "Tick")["ts"])
    except DecodeError:
        return True


class BarBuilder:
    """Bars of every configured width for the ticks of this worker's partitions.

    A state that published bars is written once those bars are delivered
    (later states of the same symbol and width queue behind it), so a crash
    never leaves a state that forgot a bar nobody received.
    """

    def __init__(self, app: faust.App, ctx: AgentContext, partitions: int) -> None:
        settings = ctx.settings
        try:
            self.intervals = parse_intervals(settings.bar_intervals)
        except IntervalError as exc:
            raise SystemExit(f"FINSTREAM_BAR_INTERVALS: {exc}") from None
        self.lateness = timedelta(seconds=settings.bar_allowed_lateness)
        self.app = app
        self.ctx = ctx
        self.topic = settings.topic("md.bars.1m")
        self.table = app.Table("bar-state", partitions=partitions, key_type=bytes, value_type=bytes)
        # Decoded states, reused while the table still holds the same bytes.
        self._decoded: dict[bytes, tuple[bytes, tuple[int, int] | None, BarState]] = {}
        # States computed but held back until their bars are delivered.
        self._live: dict[bytes, tuple[tuple[int, int], BarState]] = {}
        self._held = KeyedWrites()

    def forget(self, partitions: set[int]) -> None:
        """Partitions revoked: drop what is held for them (their ticks will be replayed)."""
        for key in self._held.drop_partitions(partitions):
            self._live.pop(key, None)

    def _load(self, key: bytes) -> tuple[tuple[int, int] | None, BarState]:
        live = self._live.get(key)
        if live is not None:
            return live
        raw = self.table.get(key)
        if raw is None:
            return None, BarState()
        hit = self._decoded.get(key)
        if hit is not None and hit[0] is raw:
            return hit[1], hit[2]
        head, _, body = raw.partition(b"\n")
        part, _, offset = head.partition(b":")
        position = (int(part), int(offset))
        state = BarState.from_json(body)
        self._decoded[key] = (raw, position, state)
        return position, state

    async def on_tick(self, msg: Any, tick: Tick, ack: EventAck) -> None:
        ctx = self.ctx
        position = (msg.partition, msg.offset)
        late: list[str] = []
        for interval in self.intervals:
            key = f"{tick.symbol}|{interval.name}".encode()
            stored, state = self._load(key)
            if stored is not None and stored[0] == position[0] and stored[1] >= position[1]:
                continue  # replayed after a restart: already in this state
            update = add_tick(state, tick, interval, self.lateness)
            if update.late is not None:
                late.append(update.late)
                continue
            if update.duplicate:
                continue
            delivered = []
            for bar in update.publish:
                delivered.append(
                    await self.app.producer.send(
                        self.topic,
                        key=bar.symbol.encode(),
                        value=ctx.codec.encode("Bar", bar.to_record()),
                        partition=None,
                        timestamp=None,
                        headers=None,
                    )
                )
                EVENTS_OUT.labels(ctx.role, self.topic).inc()
                BARS_PUBLISHED.labels(bar.interval, str(bar.final).lower()).inc()
            raw = b"%d:%d\n" % position + update.state.to_json()
            write = table_write(self.table, msg.partition, key, raw)
            for fut in delivered:
                ack.wait_for(fut)
            if delivered or self._held.blocked(key):
                self._live[key] = (position, update.state)

                def applied(
                    key: bytes = key, raw: bytes = raw, state: BarState = update.state
                ) -> None:
                    self._decoded[key] = (raw, position, state)
                    if not self._held.blocked(key):
                        self._live.pop(key, None)

                self._held.hold(key, msg.partition, delivered, [write], ack, on_applied=applied)
            else:
                ack.wait_for(write())
                self._decoded[key] = (raw, position, update.state)
        if late:
            await ctx.dead_letters.send_message(msg, "; ".join(late), error_class="LateTick")
