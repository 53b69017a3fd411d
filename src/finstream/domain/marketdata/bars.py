"""OHLCV bars on exchange (event) time, with allowed lateness and revisions.

A bar covers ``[start, end)`` of one interval (``1m``, ``5m``, ``1h``...),
aligned to the UTC epoch. Each symbol has its own event-time watermark: the
latest tick time seen for it. Because all ticks of a symbol share one
``md.ticks`` partition, the watermark needs no coordination between workers.

Life of a bar with allowed lateness ``L``:

* the watermark reaches ``end``: the bar is published (``revision`` 0,
  ``final`` false);
* a late tick with a time inside the bar arrives while the watermark is
  before ``end + L``: the bar is corrected and republished with the next
  revision;
* the watermark reaches ``end + L``: the bar is published once more with
  ``final`` true and the next revision, and forgotten. A tick for it after
  that is *too late*: :class:`BarUpdate` carries the reason and the caller
  dead-letters the tick.

With ``L = 0`` every bar is published exactly once, final, revision 0.
Every publication of a bar has a higher revision than the one before, so
consumers keep the highest revision and can ignore everything else.

Prices of every tick set open/high/low/close (open is the earliest tick by
event time, close the latest; ties go to the tick that arrived first for
open and last for close). Only TRADE ticks count as trades, and only their
sizes make volume and VWAP: a QUOTE's size is not traded volume. A bar with
no sized trades has volume 0 and no VWAP.

A tick seen twice (same ``tick_id``) counts once if it comes back within the
last ``DEDUPE_WINDOW`` ticks of its bar: an upstream producer's retry or a
provider's re-send. The window keeps the state of a busy symbol small (it is
written to the quotes role's changelog at every commit); re-sends further
apart are the connectors' deduper's job (``FINSTREAM_MD_DEDUPE_WINDOW``), and
replays after a crash cannot happen (the quotes role is exactly-once).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from finstream.domain.marketdata.ticks import PRICE_SCALE, Tick
from finstream.domain.time import from_micros, to_micros

_QUANTUM = Decimal(1).scaleb(-PRICE_SCALE)
_INTERVAL_RE = re.compile(r"^(\d{1,4})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
DAY_SECONDS = 86_400


class IntervalError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Interval:
    """A bar width; ``name`` is its canonical text (``1m``, ``5m``, ``1h``)."""

    name: str
    seconds: int

    @property
    def micros(self) -> int:
        return self.seconds * 1_000_000

    def start_of(self, ts: datetime) -> datetime:
        micros = to_micros(ts)
        return from_micros(micros - micros % self.micros)

    def start_micros(self, ts: datetime) -> int:
        micros = to_micros(ts)
        return micros - micros % self.micros


def parse_interval(text: str) -> Interval:
    """``1m``, ``5m``, ``15m``, ``1h``, ``1d``...; widths divide a day so bars align to midnight UTC."""
    match = _INTERVAL_RE.match(text.strip().lower())
    if not match:
        raise IntervalError(f"bar interval {text!r} is not like 1m, 5m or 1h")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0 or seconds > DAY_SECONDS or DAY_SECONDS % seconds:
        raise IntervalError(
            f"bar interval {text!r} must divide a day evenly (1m, 5m, 15m, 1h, ...)"
        )
    return Interval(f"{match.group(1).lstrip('0') or '0'}{match.group(2)}", seconds)


def parse_intervals(text: str) -> list[Interval]:
    intervals = [parse_interval(part) for part in text.split(",") if part.strip()]
    if not intervals:
        raise IntervalError("at least one bar interval is needed")
    names = [i.name for i in intervals]
    if len(set(names)) != len(names):
        raise IntervalError(f"bar intervals listed twice: {text!r}")
    return intervals


def decimal_text(value: Decimal) -> str:
    """Plain notation without trailing zeros: 189.12300000 -> 189.123, 1E+2 -> 100."""
    return f"{value.normalize():f}"


@dataclass(frozen=True, slots=True)
class Bar:
    symbol: str
    interval: str
    start: datetime
    end: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    vwap: Decimal | None
    trades: int
    final: bool
    revision: int

    def to_record(self) -> dict[str, Any]:
        return {
            "symbol": self.symbol,
            "interval": self.interval,
            "start": self.start,
            "end": self.end,
            "open": self.open,
            "high": self.high,
            "low": self.low,
            "close": self.close,
            "volume": self.volume,
            "vwap": self.vwap,
            "trades": self.trades,
            "final": self.final,
            "revision": self.revision,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Bar:
        return cls(**{name: record[name] for name in _BAR_FIELDS})

    def to_json(self) -> dict[str, Any]:
        """The JSON form in Redis and on the pub/sub channel (decimal strings, ISO 8601)."""
        return {
            "symbol": self.symbol,
            "interval": self.interval,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "open": decimal_text(self.open),
            "high": decimal_text(self.high),
            "low": decimal_text(self.low),
            "close": decimal_text(self.close),
            "volume": decimal_text(self.volume),
            "vwap": decimal_text(self.vwap) if self.vwap is not None else None,
            "trades": self.trades,
            "final": self.final,
            "revision": self.revision,
        }


_BAR_FIELDS = (
    "symbol",
    "interval",
    "start",
    "end",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "vwap",
    "trades",
    "final",
    "revision",
)


class BarValidationError(ValueError):
    pass


def validate_bar(bar: Bar) -> Bar:
    """Checks a bar read from md.bars.1m before it is stored."""
    try:
        interval = parse_interval(bar.interval)
    except IntervalError as exc:
        raise BarValidationError(str(exc)) from None
    if bar.interval != interval.name:
        raise BarValidationError(f"interval {bar.interval!r} is not canonical ({interval.name})")
    if bar.end - bar.start != timedelta(seconds=interval.seconds):
        raise BarValidationError(f"end - start is not {interval.name}")
    if interval.start_of(bar.start) != bar.start:
        raise BarValidationError(f"start {bar.start.isoformat()} is not aligned to {interval.name}")
    if not (bar.low <= min(bar.open, bar.close) and max(bar.open, bar.close) <= bar.high):
        raise BarValidationError("open/close are not within low..high")
    if bar.low <= 0 or bar.volume < 0 or bar.trades < 0 or bar.revision < 0:
        raise BarValidationError("negative or zero price, volume, trades or revision")
    return bar


DEDUPE_WINDOW = 128


def tick_fingerprint(tick_id: str) -> int:
    """A stable 32-bit fingerprint of a tick id (for duplicate detection in bar state).

    Within a window of 128 ticks two different ids share one with a chance
    of about 2e-6, which would drop a tick from its bar's counters.
    """
    return int.from_bytes(hashlib.blake2b(tick_id.encode(), digest_size=4).digest(), "big")


@dataclass(frozen=True, slots=True)
class OpenBar:
    """A bar still accepting ticks. Times in epoch microseconds to keep state small."""

    start: int
    open: Decimal
    open_ts: int
    high: Decimal
    low: Decimal
    close: Decimal
    close_ts: int
    volume: Decimal = Decimal(0)
    pv: Decimal = Decimal(0)
    trades: int = 0
    # -1: never published; otherwise the revision last published.
    revision: int = -1
    dirty: bool = False
    # Fingerprints of the bar's most recent ticks, oldest first (DEDUPE_WINDOW at most).
    seen: tuple[int, ...] = ()

    def add(self, tick: Tick, ts: int, fingerprint: int) -> OpenBar:
        price = tick.price
        volume, pv, trades = self.volume, self.pv, self.trades
        if tick.kind == "TRADE":
            trades += 1
            size = tick.size
            if size is not None:
                volume += size
                pv += price * size
        # The constructor, not dataclasses.replace: this runs once per tick.
        return OpenBar(
            self.start,
            price if ts < self.open_ts else self.open,
            ts if ts < self.open_ts else self.open_ts,
            price if price > self.high else self.high,
            price if price < self.low else self.low,
            price if ts >= self.close_ts else self.close,
            ts if ts >= self.close_ts else self.close_ts,
            volume,
            pv,
            trades,
            self.revision,
            self.revision >= 0,
            (*self.seen[1 - DEDUPE_WINDOW :], fingerprint),
        )

    def to_bar(self, symbol: str, interval: Interval, *, final: bool, revision: int) -> Bar:
        vwap = (
            (self.pv / self.volume).quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)
            if self.volume > 0
            else None
        )
        return Bar(
            symbol=symbol,
            interval=interval.name,
            start=from_micros(self.start),
            end=from_micros(self.start + interval.micros),
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume.quantize(_QUANTUM),
            vwap=vwap,
            trades=self.trades,
            final=final,
            revision=revision,
        )


def _new_bar(start: int, tick: Tick, ts: int, fingerprint: int) -> OpenBar:
    bar = OpenBar(
        start=start,
        open=tick.price,
        open_ts=ts,
        high=tick.price,
        low=tick.price,
        close=tick.price,
        close_ts=ts,
    )
    # Prices are already set from this tick; add() contributes its counters.
    return bar.add(tick, ts, fingerprint)


@dataclass(frozen=True, slots=True)
class BarState:
    """Open bars of one symbol and interval, and the symbol's watermark (micros)."""

    watermark: int | None = None
    bars: tuple[OpenBar, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "w": self.watermark,
                "b": [
                    [
                        b.start,
                        str(b.open),
                        b.open_ts,
                        str(b.high),
                        str(b.low),
                        str(b.close),
                        b.close_ts,
                        str(b.volume),
                        str(b.pv),
                        b.trades,
                        b.revision,
                        b.dirty,
                        list(b.seen),
                    ]
                    for b in self.bars
                ],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BarState:
        doc = json.loads(raw)
        bars = tuple(
            OpenBar(
                start=b[0],
                open=Decimal(b[1]),
                open_ts=b[2],
                high=Decimal(b[3]),
                low=Decimal(b[4]),
                close=Decimal(b[5]),
                close_ts=b[6],
                volume=Decimal(b[7]),
                pv=Decimal(b[8]),
                trades=b[9],
                revision=b[10],
                dirty=b[11],
                seen=tuple(b[12][-DEDUPE_WINDOW:]),
            )
            for b in doc["b"]
        )
        return cls(watermark=doc["w"], bars=bars)


@dataclass(frozen=True, slots=True)
class BarUpdate:
    state: BarState
    publish: tuple[Bar, ...] = ()
    late: str | None = None  # why the tick was refused as too late
    duplicate: bool = False


def add_tick(state: BarState, tick: Tick, interval: Interval, lateness: timedelta) -> BarUpdate:
    """Fold one tick into a symbol's bars; say what to publish and whether it was too late."""
    ts = to_micros(tick.ts)
    width = interval.micros
    start = ts - ts % width
    lateness_us = _micros(lateness)
    wm = state.watermark
    if wm is not None and start + width + lateness_us <= wm:
        return BarUpdate(
            state,
            late=(
                f"late tick: {tick.ts.isoformat()} falls in the {interval.name} bar "
                f"{from_micros(start).isoformat()}, final since the {tick.symbol} watermark "
                f"{from_micros(wm).isoformat()} passed its end plus the allowed lateness "
                f"of {lateness.total_seconds():g}s"
            ),
        )
    fingerprint = tick_fingerprint(tick.tick_id)
    bars = list(state.bars)
    for i, bar in enumerate(bars):
        if bar.start == start:
            if fingerprint in bar.seen:
                return BarUpdate(state, duplicate=True)
            bars[i] = bar.add(tick, ts, fingerprint)
            break
    else:
        bars.append(_new_bar(start, tick, ts, fingerprint))
        if len(bars) > 1:
            bars.sort(key=_bar_start)
    watermark = ts if wm is None or ts > wm else wm
    if watermark < bars[0].start + width:
        # Nothing has closed (the usual case): no bar to publish.
        return BarUpdate(BarState(watermark, tuple(bars)))
    return _emit(tick.symbol, interval, lateness_us, watermark, bars)


def _bar_start(bar: OpenBar) -> int:
    return bar.start


@functools.lru_cache(maxsize=64)
def _micros(span: timedelta) -> int:
    return int(span.total_seconds() * 1_000_000)


def _emit(
    symbol: str, interval: Interval, lateness_us: int, watermark: int, bars: list[OpenBar]
) -> BarUpdate:
    keep: list[OpenBar] = []
    out: list[Bar] = []
    for bar in bars:
        end = bar.start + interval.micros
        final = end + lateness_us <= watermark
        closed = end <= watermark
        if final:
            # Published even when unchanged since its last revision: consumers
            # that want only settled bars wait for final=true.
            out.append(bar.to_bar(symbol, interval, final=True, revision=bar.revision + 1))
            continue
        if closed and (bar.revision < 0 or bar.dirty):
            out.append(bar.to_bar(symbol, interval, final=False, revision=bar.revision + 1))
            keep.append(replace(bar, revision=bar.revision + 1, dirty=False))
        else:
            keep.append(bar)
    return BarUpdate(BarState(watermark=watermark, bars=tuple(keep)), publish=tuple(out))
