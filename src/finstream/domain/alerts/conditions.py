"""Alert conditions: what a rule looks at (a :class:`View` of the price, the
previous price and the bars around them) and each condition as a check on it.

Windows (moving conditions, volume spike) have the resolution of one bar:
``bars=N`` covers the current bar and the N-1 completed bars before it;
``window_seconds=W`` covers the current bar and every completed bar that ended
less than W seconds before the tick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from finstream.domain.alerts.rules import (
    AlertRule,
)
from finstream.domain.marketdata.bars import Interval
from finstream.domain.marketdata.ticks import Tick

HUNDRED = Decimal(100)

Check = Callable[[AlertRule, "View"], bool]


@dataclass(frozen=True, slots=True)
class EvalBar:
    """A bar of the evaluation interval (forming or completed). Times in micros."""

    start: int
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    last_tick_id: str
    last_ts: int

    def add(self, tick: Tick, ts: int) -> EvalBar:
        volume = self.volume
        if tick.kind == "TRADE" and tick.size is not None:
            volume += tick.size
        return EvalBar(
            start=self.start,
            high=max(self.high, tick.price),
            low=min(self.low, tick.price),
            close=tick.price,
            volume=volume,
            last_tick_id=tick.tick_id,
            last_ts=ts,
        )

    @classmethod
    def first(cls, start: int, tick: Tick, ts: int) -> EvalBar:
        volume = tick.size if tick.kind == "TRADE" and tick.size is not None else Decimal(0)
        return cls(start, tick.price, tick.price, tick.price, volume, tick.tick_id, ts)

    def pack(self) -> list[Any]:
        return [
            self.start,
            str(self.high),
            str(self.low),
            str(self.close),
            str(self.volume),
            self.last_tick_id,
            self.last_ts,
        ]

    @classmethod
    def unpack(cls, raw: list[Any]) -> EvalBar:
        return cls(
            raw[0],
            Decimal(raw[1]),
            Decimal(raw[2]),
            Decimal(raw[3]),
            Decimal(raw[4]),
            raw[5],
            raw[6],
        )


LEVEL_EDGE_CONDITIONS = frozenset({"CROSSING", "CROSSING_UP", "CROSSING_DOWN"})
# True while the price is on one side of their thresholds.
BAND_STATE_CONDITIONS = frozenset(
    {"GREATER_THAN", "LESS_THAN", "INSIDE_CHANNEL", "OUTSIDE_CHANNEL"}
)
# True only when the price moves across a threshold since the previous tick.
BAND_EDGE_CONDITIONS = frozenset({"ENTERING_CHANNEL", "EXITING_CHANNEL"})
BAND_CONDITIONS = BAND_STATE_CONDITIONS | BAND_EDGE_CONDITIONS


@dataclass(slots=True)
class View:
    """What a condition looks at: the price, the one before, and the bars around it."""

    price: Decimal
    prev: Decimal | None
    ts: int
    current: EvalBar  # the forming bar (tick mode) or the closing bar (close mode)
    history: tuple[EvalBar, ...]  # completed bars before ``current``, oldest first
    prev_close: Decimal | None
    interval: Interval
    # Window extremes and volume sums, computed once per view for all rules.
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def window(self, bars: int | None, seconds: int | None) -> tuple[Decimal, Decimal]:
        """(lowest low, highest high) over the window, the current bar included."""
        key = ("w", bars, seconds)
        hit = self.memo.get(key)
        if hit is None:
            if bars is not None:
                earlier: Sequence[EvalBar] = self.history[-(bars - 1) :] if bars > 1 else ()
            else:
                assert seconds is not None
                since = self.ts - seconds * 1_000_000
                width = self.interval.micros
                earlier = [b for b in self.history if b.start + width > since]
            low, high = self.current.low, self.current.high
            for b in earlier:
                low = min(low, b.low)
                high = max(high, b.high)
            hit = self.memo[key] = (low, high)
        return hit

    def volume_total(self, bars: int) -> Decimal | None:
        """Total volume of the last ``bars`` completed bars, or None without that many."""
        key = ("v", bars)
        if key not in self.memo:
            window = self.history[-bars:] if len(self.history) >= bars else None
            self.memo[key] = (
                sum((b.volume for b in window), Decimal(0)) if window is not None else None
            )
        return self.memo[key]  # type: ignore[no-any-return]


# One function per condition, shared by every rule of it: a rule's check is
# (function, rule), not a closure. 100,000 rules made 245,000 closures and
# cells that the garbage collector walked until they were frozen (about a
# quarter of a second once books were built, bench/RESULTS.md).


def _crossing_up(r: AlertRule, v: View) -> bool:
    level = r.value
    assert level is not None  # validate_rule guarantees the condition's parameters
    return v.prev is not None and v.prev < level <= v.price


def _crossing_down(r: AlertRule, v: View) -> bool:
    level = r.value
    assert level is not None
    return v.prev is not None and v.prev >= level > v.price


def _crossing(r: AlertRule, v: View) -> bool:
    level = r.value
    assert level is not None
    return v.prev is not None and (v.prev < level <= v.price or v.prev >= level > v.price)


def _greater_than(r: AlertRule, v: View) -> bool:
    assert r.value is not None
    return v.price > r.value


def _less_than(r: AlertRule, v: View) -> bool:
    assert r.value is not None
    return v.price < r.value


def _channel(r: AlertRule) -> tuple[Decimal, Decimal]:
    assert r.lower is not None
    assert r.upper is not None
    return r.lower, r.upper


def _entering(r: AlertRule, v: View) -> bool:
    lo, hi = _channel(r)
    return v.prev is not None and not lo <= v.prev <= hi and lo <= v.price <= hi


def _exiting(r: AlertRule, v: View) -> bool:
    lo, hi = _channel(r)
    return v.prev is not None and lo <= v.prev <= hi and not lo <= v.price <= hi


def _inside(r: AlertRule, v: View) -> bool:
    lo, hi = _channel(r)
    return lo <= v.price <= hi


def _outside(r: AlertRule, v: View) -> bool:
    lo, hi = _channel(r)
    return not lo <= v.price <= hi


def _moving_up(r: AlertRule, v: View) -> bool:
    assert r.percent is not None
    low = v.window(r.bars, r.window_seconds)[0]
    return (v.price - low) * HUNDRED >= r.percent * low


def _moving_down(r: AlertRule, v: View) -> bool:
    assert r.percent is not None
    high = v.window(r.bars, r.window_seconds)[1]
    return (high - v.price) * HUNDRED >= r.percent * high


def _change_from_close(r: AlertRule, v: View) -> bool:
    assert r.percent is not None
    close = v.prev_close
    return close is not None and abs(v.price - close) * HUNDRED >= r.percent * close


def _volume_spike(r: AlertRule, v: View) -> bool:
    n, mult = r.bars, r.multiplier
    assert n is not None
    assert mult is not None
    total = v.volume_total(n)
    # current >= multiplier x (total / n), without dividing.
    return total is not None and total > 0 and v.current.volume * n >= mult * total


CHECKS: dict[str, Check] = {
    "CROSSING_UP": _crossing_up,
    "CROSSING_DOWN": _crossing_down,
    "CROSSING": _crossing,
    "GREATER_THAN": _greater_than,
    "LESS_THAN": _less_than,
    "ENTERING_CHANNEL": _entering,
    "EXITING_CHANNEL": _exiting,
    "INSIDE_CHANNEL": _inside,
    "OUTSIDE_CHANNEL": _outside,
    "MOVING_UP_PERCENT": _moving_up,
    "MOVING_DOWN_PERCENT": _moving_down,
    "CHANGE_FROM_PREV_CLOSE_PERCENT": _change_from_close,
    "VOLUME_SPIKE": _volume_spike,
}


def check_of(rule: AlertRule) -> Check:
    """The function that checks ``rule``'s condition: ``check(rule, view)``."""
    try:
        return CHECKS[rule.condition]
    except KeyError:
        raise ValueError(f"unknown condition {rule.condition}") from None


def condition_met(rule: AlertRule, view: View) -> bool:
    """Whether ``rule``'s condition holds for ``view``."""
    return check_of(rule)(rule, view)
