"""Alert evaluation: one symbol's rules against its ticks, as a pure function.

``evaluate(state, book, tick)`` returns the symbol's next state and the
firings the tick caused. The live alerts agent and back-testing call exactly
this function with exactly these inputs, so both fire the same alerts for the
same ticks; the agent only adds persistence (faust tables) and publishing.

What the state holds, per symbol:

* the last evaluated price and event time, and the previous close;
* the forming evaluation bar (``interval``, 1 minute by default) and a
  history of completed bars, as long as the symbol's rules need (moving
  windows, volume averages);
* per rule, only once it has fired: when and in which bar (frequencies).

Event time rules everything: bars, minutes, cooldowns and expiry are measured
on tick timestamps, never on the wall clock, which is what makes a back-test
repeatable. A tick older than the last one evaluated for its symbol is
*stale* (a price from the past is not the current price), and a tick seen
again is a *duplicate*: either changes nothing and fires nothing; the caller
counts them. That also makes replaying already evaluated ticks after a
restart harmless.

Frequencies: ONLY_ONCE fires the first time the condition holds, then never
again until the rule changes (a new ``updated_at`` re-arms it). ONCE_PER_BAR
fires at most once per evaluation bar. ONCE_PER_MINUTE at most once per 60
seconds of event time. EVERY_TIME on every tick that meets the condition,
at least ``cooldown_seconds`` apart. ONCE_PER_BAR_CLOSE evaluates the
condition only on closed bars, with the bar's close as the price and the
previous bar's close as the previous price; a bar closes when the first tick
of a later bar arrives, and the firing names the tick that made the close.

Windows (moving conditions, volume spike) have the resolution of one bar:
``bars=N`` covers the current bar and the N-1 completed bars before it;
``window_seconds=W`` covers the current bar and every completed bar that ended
less than W seconds before the tick.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from finstream.domain.alerts import (
    CHANNEL_CONDITIONS,
    EDGE_CONDITIONS,
    MOVING_CONDITIONS,
    AlertRule,
)
from finstream.domain.bars import Interval, decimal_text
from finstream.domain.ticks import Tick
from finstream.domain.time import from_micros, to_micros

MINUTE_US = 60_000_000
_HUNDRED = Decimal(100)


# -- state ---------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class RuleState:
    """Firing memory of one rule; ``version`` is the rule's updated_at (micros)."""

    version: int
    done: bool = False
    last_fired_ts: int | None = None
    last_fired_bar: int | None = None


@dataclass(frozen=True, slots=True)
class SymbolState:
    last_price: Decimal | None = None
    last_ts: int | None = None
    # Ids of the ticks evaluated at ``last_ts``: a tick seen again (a replay
    # after a crash, a provider resending) is recognised, not evaluated twice.
    last_ids: frozenset[str] = frozenset()
    prev_close: Decimal | None = None
    bar: EvalBar | None = None
    history: tuple[EvalBar, ...] = ()
    rules: Mapping[str, RuleState] = field(default_factory=dict)

    # The agent stores ``history`` apart from the rest: the core changes on
    # every tick, the history only when a bar closes.
    def core_json(self) -> bytes:
        return json.dumps(
            {
                "p": str(self.last_price) if self.last_price is not None else None,
                "t": self.last_ts,
                "i": sorted(self.last_ids),
                "c": str(self.prev_close) if self.prev_close is not None else None,
                "b": self.bar.pack() if self.bar is not None else None,
                "r": {
                    rid: [s.version, s.done, s.last_fired_ts, s.last_fired_bar]
                    for rid, s in self.rules.items()
                },
            },
            separators=(",", ":"),
        ).encode()

    def history_json(self) -> bytes:
        return json.dumps([b.pack() for b in self.history], separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, core: bytes | None, history: bytes | None) -> SymbolState:
        bars = tuple(EvalBar.unpack(b) for b in json.loads(history)) if history else ()
        if not core:
            return cls(history=bars)
        doc = json.loads(core)
        bar = EvalBar.unpack(doc["b"]) if doc["b"] is not None else None
        if bar is not None:
            # Killed between storing the history and the core: the history may
            # already hold the bar the core still calls forming. Replaying the
            # tick that closed it appends it again.
            bars = tuple(b for b in bars if b.start < bar.start)
        return cls(
            last_price=Decimal(doc["p"]) if doc["p"] is not None else None,
            last_ts=doc["t"],
            last_ids=frozenset(doc["i"]),
            prev_close=Decimal(doc["c"]) if doc["c"] is not None else None,
            bar=bar,
            history=bars,
            rules={rid: RuleState(v[0], v[1], v[2], v[3]) for rid, v in doc["r"].items()},
        )


# -- rule books ------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleBook:
    """One symbol's rules, prepared for evaluation (ordered by rule id, so firings are too)."""

    interval: Interval
    tick_rules: tuple[AlertRule, ...]
    close_rules: tuple[AlertRule, ...]
    history_needed: int
    versions: Mapping[str, int]  # rule id -> updated_at in micros

    @classmethod
    def build(cls, rules: Iterable[AlertRule], interval: Interval) -> RuleBook:
        ordered = sorted(rules, key=lambda r: r.rule_id)
        need = 0
        for r in ordered:
            if r.condition == "VOLUME_SPIKE" and r.bars is not None:
                need = max(need, r.bars)
            elif r.condition in MOVING_CONDITIONS:
                if r.bars is not None:
                    need = max(need, r.bars - 1)
                elif r.window_seconds is not None:
                    need = max(need, -(-r.window_seconds // interval.seconds) + 1)
        close_rules = tuple(r for r in ordered if r.frequency == "ONCE_PER_BAR_CLOSE")
        if close_rules:
            need = max(need, 1)  # the previous bar's close is the previous price
        return cls(
            interval=interval,
            tick_rules=tuple(r for r in ordered if r.frequency != "ONCE_PER_BAR_CLOSE"),
            close_rules=close_rules,
            history_needed=need,
            versions={r.rule_id: to_micros(r.updated_at) for r in ordered},
        )

    @property
    def empty(self) -> bool:
        return not self.tick_rules and not self.close_rules


# -- firings ---------------------------------------------------------------------------


def fired_id(rule_id: str, tick_id: str) -> str:
    """Deterministic: the same rule fired by the same tick always has the same id."""
    digest = hashlib.sha256(f"{rule_id}\x1f{tick_id}".encode()).hexdigest()
    return f"f-{digest[:40]}"


@dataclass(frozen=True, slots=True)
class Firing:
    fired_id: str
    rule: AlertRule
    price: Decimal
    tick_id: str
    tick_ts: datetime
    at_bar_close: bool = False

    @property
    def request_id(self) -> str:
        """The NotificationRequest's idempotency key, derived from the firing."""
        return f"alert-{self.fired_id[2:]}"

    def title(self) -> str:
        what = self.rule.describe().split(" ", 1)[1]
        return f"{self.rule.symbol} alert: {what}"

    def body(self) -> str:
        when = self.tick_ts.strftime("%Y-%m-%d %H:%M:%S UTC")
        close = " at the bar close" if self.at_bar_close else ""
        text = f"{self.rule.symbol} traded at {decimal_text(self.price)}{close} ({when})."
        if self.rule.message:
            text += f" {self.rule.message}"
        return text

    def alert_fired(self, fired_at: datetime) -> dict[str, Any]:
        return {
            "fired_id": self.fired_id,
            "rule_id": self.rule.rule_id,
            "user_id": self.rule.user_id,
            "symbol": self.rule.symbol,
            "condition": self.rule.condition,
            "price": self.price,
            "tick_id": self.tick_id,
            "tick_ts": self.tick_ts,
            "fired_at": fired_at,
            "message": self.rule.message,
        }

    def notification_request(self, created_at: datetime) -> dict[str, Any]:
        rule = self.rule
        data = {
            "symbol": rule.symbol,
            "price": decimal_text(self.price),
            "condition": rule.condition,
            "rule_id": rule.rule_id,
            "fired_id": self.fired_id,
            "frequency": rule.frequency,
            "tick_id": self.tick_id,
            "tick_ts": self.tick_ts.isoformat(),
            "description": rule.describe(),
            "title": self.title(),
            "body": self.body(),
        }
        if rule.message:
            data["message"] = rule.message
        return {
            "request_id": self.request_id,
            "user_id": rule.user_id,
            "category": "price_alert",
            "priority": "HIGH",
            "template": "price_alert",
            "data": data,
            "channels": [],
            "deliver_at": None,
            "expires_at": None,
            # Repeated firings of one rule replace each other on a device.
            "collapse_key": f"price_alert:{rule.rule_id}",
            "created_at": created_at,
            "source": "alerts",
            "correlation_id": self.fired_id,
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    state: SymbolState
    firings: tuple[Firing, ...] = ()
    stale: bool = False
    duplicate: bool = False
    history_changed: bool = False


# -- conditions ------------------------------------------------------------------------


def _inside(rule: AlertRule, price: Decimal) -> bool:
    assert rule.lower is not None
    assert rule.upper is not None
    return rule.lower <= price <= rule.upper


@dataclass(frozen=True, slots=True)
class _View:
    """What a condition looks at: the price, the one before, and the bars around it."""

    price: Decimal
    prev: Decimal | None
    ts: int
    current: EvalBar  # the forming bar (tick mode) or the closing bar (close mode)
    history: tuple[EvalBar, ...]  # completed bars before ``current``, oldest first
    prev_close: Decimal | None
    interval: Interval


def condition_met(rule: AlertRule, v: _View) -> bool:
    c = rule.condition
    price = v.price
    if c in EDGE_CONDITIONS:
        if v.prev is None:
            return False
        if c in CHANNEL_CONDITIONS:
            was, now = _inside(rule, v.prev), _inside(rule, price)
            return (not was and now) if c == "ENTERING_CHANNEL" else (was and not now)
        level = rule.value
        assert level is not None
        up = v.prev < level <= price
        down = v.prev >= level > price
        if c == "CROSSING_UP":
            return up
        if c == "CROSSING_DOWN":
            return down
        return up or down
    if c == "GREATER_THAN":
        assert rule.value is not None
        return price > rule.value
    if c == "LESS_THAN":
        assert rule.value is not None
        return price < rule.value
    if c == "INSIDE_CHANNEL":
        return _inside(rule, price)
    if c == "OUTSIDE_CHANNEL":
        return not _inside(rule, price)
    if c in MOVING_CONDITIONS:
        return _moved(rule, v)
    if c == "CHANGE_FROM_PREV_CLOSE_PERCENT":
        pc = v.prev_close
        assert rule.percent is not None
        return pc is not None and abs(price - pc) * _HUNDRED >= rule.percent * pc
    if c == "VOLUME_SPIKE":
        assert rule.bars is not None
        assert rule.multiplier is not None
        if len(v.history) < rule.bars:
            return False
        window = v.history[-rule.bars :]
        total = sum((b.volume for b in window), Decimal(0))
        # current >= multiplier x (total / bars), without dividing.
        return total > 0 and v.current.volume * rule.bars >= rule.multiplier * total
    raise ValueError(f"unknown condition {c}")


def _window(rule: AlertRule, v: _View) -> list[EvalBar]:
    if rule.bars is not None:
        earlier = list(v.history[-(rule.bars - 1) :]) if rule.bars > 1 else []
    else:
        assert rule.window_seconds is not None
        since = v.ts - rule.window_seconds * 1_000_000
        width = v.interval.micros
        earlier = [b for b in v.history if b.start + width > since]
    return [*earlier, v.current]


def _moved(rule: AlertRule, v: _View) -> bool:
    assert rule.percent is not None
    bars = _window(rule, v)
    if rule.condition == "MOVING_UP_PERCENT":
        low = min(b.low for b in bars)
        return (v.price - low) * _HUNDRED >= rule.percent * low
    high = max(b.high for b in bars)
    return (high - v.price) * _HUNDRED >= rule.percent * high


# -- frequencies -------------------------------------------------------------------------


def _may_fire(rule: AlertRule, st: RuleState | None, ts: int, bar_start: int) -> bool:
    if st is None:
        return True
    f = rule.frequency
    if f == "ONLY_ONCE":
        return not st.done
    if f in ("ONCE_PER_BAR", "ONCE_PER_BAR_CLOSE"):
        return st.last_fired_bar != bar_start
    if f == "ONCE_PER_MINUTE":
        return st.last_fired_ts is None or ts - st.last_fired_ts >= MINUTE_US
    cooldown = (rule.cooldown_seconds or 0) * 1_000_000
    return st.last_fired_ts is None or ts - st.last_fired_ts >= cooldown


def _armed(rule: AlertRule, ts: int, respect_created_at: bool) -> bool:
    if not rule.enabled:
        return False
    if rule.expires_at is not None and ts >= to_micros(rule.expires_at):
        return False
    return not (respect_created_at and ts < to_micros(rule.created_at))


# -- evaluation --------------------------------------------------------------------------


def evaluate(
    state: SymbolState, book: RuleBook, tick: Tick, *, respect_created_at: bool = True
) -> Evaluation:
    """The next state of ``tick.symbol`` and the alerts ``tick`` fires.

    ``respect_created_at``: live evaluation does not fire a rule for ticks
    from before the rule existed (a lagging worker catching up); back-testing
    turns this off to ask what the rule would have done.
    """
    ts = to_micros(tick.ts)
    if state.last_ts is not None and ts <= state.last_ts:
        if ts < state.last_ts:
            return Evaluation(state, stale=True)
        if tick.tick_id in state.last_ids:
            return Evaluation(state, duplicate=True)
    interval = book.interval
    start = ts - ts % interval.micros
    versions = book.versions
    # Forget rules that are gone, and the memory of a rule's older version.
    rule_states = {rid: rs for rid, rs in state.rules.items() if versions.get(rid) == rs.version}
    firings: list[Firing] = []
    history = state.history
    bar = state.bar
    if bar is not None and bar.start < start:
        # The forming bar has closed: evaluate the bar-close rules on it.
        for rule in book.close_rules:
            if not _armed(rule, bar.last_ts, respect_created_at):
                continue
            prev = history[-1].close if history else None
            view = _View(bar.close, prev, bar.last_ts, bar, history, state.prev_close, interval)
            rs = rule_states.get(rule.rule_id)
            if _may_fire(rule, rs, bar.last_ts, bar.start) and condition_met(rule, view):
                firings.append(
                    Firing(
                        fired_id(rule.rule_id, bar.last_tick_id),
                        rule,
                        bar.close,
                        bar.last_tick_id,
                        from_micros(bar.last_ts),
                        at_bar_close=True,
                    )
                )
                rule_states[rule.rule_id] = RuleState(
                    versions[rule.rule_id], True, bar.last_ts, bar.start
                )
        history = (*history, bar)
        bar = None
    keep = book.history_needed
    if len(history) > keep:
        history = history[len(history) - keep :] if keep else ()
    history_changed = history is not state.history and history != state.history
    bar = EvalBar.first(start, tick, ts) if bar is None else bar.add(tick, ts)
    prev_close = tick.prev_close if tick.prev_close is not None else state.prev_close
    if book.tick_rules:
        view = _View(tick.price, state.last_price, ts, bar, history, prev_close, interval)
        for rule in book.tick_rules:
            if not _armed(rule, ts, respect_created_at):
                continue
            rs = rule_states.get(rule.rule_id)
            if _may_fire(rule, rs, ts, start) and condition_met(rule, view):
                firings.append(
                    Firing(
                        fired_id(rule.rule_id, tick.tick_id),
                        rule,
                        tick.price,
                        tick.tick_id,
                        tick.ts,
                    )
                )
                rule_states[rule.rule_id] = RuleState(versions[rule.rule_id], True, ts, start)
    new_state = SymbolState(
        last_price=tick.price,
        last_ts=ts,
        last_ids=state.last_ids | {tick.tick_id}
        if ts == state.last_ts
        else frozenset((tick.tick_id,)),
        prev_close=prev_close,
        bar=bar,
        history=history,
        rules=rule_states,
    )
    return Evaluation(new_state, tuple(firings), history_changed=history_changed)
