"""Publishing each observation once, and accounting for coverage gaps (pure).

:class:`TickDeduper` decides whether a normalized tick is new:

* **same id** — every connector derives tick ids from content (symbol, event
  time, price, size), so a re-sent WebSocket trade, a re-polled unchanged
  quote, or the same timed quote from two providers has an id already seen;
* **same quote from another provider** — a quote snapshot whose price (and
  size, when both sides give one) equals the last quote seen for the symbol
  from a *different* provider is the same quote seen twice around a failover,
  even when the providers stamp it differently (Alpha Vantage has no time);
* **stale quote** — a quote snapshot older than the last one the same
  provider published for the symbol (load-balanced backends answer out of
  order) would move the price backwards. Times are only compared within a
  provider: providers stamp differently (seconds, milliseconds, or no time
  at all), so across providers only content is compared.

Trades are only deduplicated by id: an older trade is still a trade, and bar
builders want it.

:class:`GapTracker` measures coverage: the time between successive
observations of a symbol (published or recognized as duplicate). A gap longer
than the threshold (two poll intervals) is reported once when it closes.

:class:`SnapshotClock` gives an event time to snapshots whose provider has
none: the time their content was first seen, kept while it does not change.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from finstream.domain.marketdata.ticks import Tick

DuplicateReason = Literal["same_id", "same_quote", "stale_quote"]


@dataclass
class _QuoteState:
    price: Decimal
    size: Decimal | None
    ts: datetime
    source: str


@dataclass
class _SymbolMemory:
    ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    last_seen_quote: _QuoteState | None = None
    last_published_quote_ts: dict[str, datetime] = field(default_factory=dict)


class TickDeduper:
    """Per-symbol memory of recent tick ids and the last quote; bounded by ``window``."""

    def __init__(self, window: int = 4096) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._symbols: dict[str, _SymbolMemory] = {}

    def check(self, tick: Tick, historical: bool = False) -> DuplicateReason | None:
        """Why ``tick`` is a duplicate, or None when it is new. Does not record it.

        ``historical`` ticks (backfilled bars) are only checked by id: they are
        older than the live quotes by design.
        """
        mem = self._symbols.get(tick.symbol)
        if mem is None:
            return None
        if tick.tick_id in mem.ids:
            return "same_id"
        if tick.kind == "QUOTE" and not historical:
            last = mem.last_seen_quote
            if (
                last is not None
                and last.source != tick.source
                and last.price == tick.price
                and (last.size is None or tick.size is None or last.size == tick.size)
            ):
                return "same_quote"
            published = mem.last_published_quote_ts.get(tick.source)
            if published is not None and tick.ts < published:
                return "stale_quote"
        return None

    def offer(self, tick: Tick, historical: bool = False) -> DuplicateReason | None:
        """Check and remember ``tick``; None means: publish it."""
        reason = self.check(tick, historical)
        mem = self._symbols.setdefault(tick.symbol, _SymbolMemory())
        if historical:
            self._remember(mem, tick.tick_id)
            return reason
        if reason != "stale_quote":
            # A cross-provider duplicate becomes the reference for that provider's
            # next quote, so a flat price is not suppressed forever after a failover.
            if tick.kind == "QUOTE":
                mem.last_seen_quote = _QuoteState(tick.price, tick.size, tick.ts, tick.source)
            self._remember(mem, tick.tick_id)
        if reason is None and tick.kind == "QUOTE":
            prev = mem.last_published_quote_ts.get(tick.source)
            mem.last_published_quote_ts[tick.source] = (
                tick.ts if prev is None else max(prev, tick.ts)
            )
        return reason

    def _remember(self, mem: _SymbolMemory, tick_id: str) -> None:
        mem.ids[tick_id] = None
        mem.ids.move_to_end(tick_id)
        while len(mem.ids) > self.window:
            mem.ids.popitem(last=False)


@dataclass(frozen=True)
class Gap:
    symbol: str
    start: datetime  # last observation before the gap
    end: datetime  # first observation after it

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


class GapTracker:
    """Coverage per symbol; a gap longer than ``threshold`` is reported when it closes."""

    def __init__(self, threshold: timedelta) -> None:
        self.threshold = threshold
        self._last: dict[str, datetime] = {}
        self.max_gap: dict[str, timedelta] = {}

    def observe(self, symbol: str, now: datetime) -> Gap | None:
        last = self._last.get(symbol)
        if last is not None and now <= last:
            return None
        self._last[symbol] = now
        if last is None:
            return None
        gap = now - last
        if gap > self.max_gap.get(symbol, timedelta(0)):
            self.max_gap[symbol] = gap
        return Gap(symbol, last, now) if gap > self.threshold else None

    def staleness(self, symbol: str, now: datetime) -> float | None:
        """Seconds since the symbol was last observed (None: never)."""
        last = self._last.get(symbol)
        return None if last is None else max((now - last).total_seconds(), 0.0)

    def open_gaps(self, now: datetime) -> list[tuple[str, float]]:
        """Symbols whose coverage is currently older than the threshold."""
        limit = self.threshold.total_seconds()
        return [
            (sym, age)
            for sym, last in self._last.items()
            if (age := (now - last).total_seconds()) > limit
        ]


class SnapshotClock:
    """Event time for content-identified snapshots without one: first seen, kept while unchanged."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, datetime]] = {}

    def stamp(self, symbol: str, content: str, now: datetime) -> datetime:
        current = self._seen.get(symbol)
        if current is not None and current[0] == content:
            return current[1]
        self._seen[symbol] = (content, now)
        return now
