"""Alert evaluation: one symbol's rules against its ticks, as a pure function.

``evaluate(state, book, tick)`` returns the symbol's next state and the
firings the tick caused. The live alerts agent and back-testing call exactly
this function with exactly these inputs, so both fire the same alerts for the
same ticks; the role only adds persistence (state stores) and publishing.

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

Most ticks meet no condition, and a tick that checks every rule to learn so
costs as much as the rules. After such a tick the state keeps a *quiet zone*
(:mod:`finstream.domain.alerts.zone`): the prices, within the same bar, that
cannot meet any of the symbol's conditions whatever comes between. A tick
inside it only updates the price and the forming bar; one outside it, or in a
new bar, is evaluated in full and leaves a new zone. Both paths give the same
states and firings (tests/unit/domain/alerts/test_engine.py checks it against
books built without zones).

Conditions and their windows: :mod:`finstream.domain.alerts.conditions`; rule
books: :mod:`finstream.domain.alerts.books`.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from finstream.domain.alerts.books import CompiledRule, RuleBook
from finstream.domain.alerts.conditions import BAND_STATE_CONDITIONS, EvalBar, View
from finstream.domain.alerts.firings import Firing, fired_id
from finstream.domain.alerts.zone import Zone, quiet_zone
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.time import from_micros, to_micros

MINUTE_US = 60_000_000


# -- state ---------------------------------------------------------------------------


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
    # Not part of the state proper: the book the rules were last checked
    # against (no pruning while it stays the same) and the rules' JSON.
    book: Any = field(default=None, compare=False, repr=False)
    rules_json: str | None = field(default=None, compare=False, repr=False)
    # Also not part of the state: where ``last_price`` sits among the book's
    # price thresholds, and which price-only state conditions held there (see
    # RuleBook.band_rules). Recomputed when missing, as after a restore.
    band: tuple[int, int] | None = field(default=None, compare=False, repr=False)
    band_true: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    # Also not part of the state: the quiet zone (see ``zone.quiet_zone``) the
    # last full evaluation left, and the history's JSON while it is unchanged.
    zone: Zone | None = field(default=None, compare=False, repr=False)
    history_raw: bytes | None = field(default=None, compare=False, repr=False)

    # The agent stores ``history`` apart from the rest: the core changes on
    # every tick, the history only when a bar closes.
    def core_json(self) -> bytes:
        rules = self.rules_json
        if rules is None:
            rules = json.dumps(
                {
                    rid: [s.version, s.done, s.last_fired_ts, s.last_fired_bar]
                    for rid, s in self.rules.items()
                },
                separators=(",", ":"),
            )
            # A cache of a pure function of ``rules``, which never changes.
            object.__setattr__(self, "rules_json", rules)
        doc = json.dumps(
            [
                str(self.last_price) if self.last_price is not None else None,
                self.last_ts,
                sorted(self.last_ids),
                str(self.prev_close) if self.prev_close is not None else None,
                self.bar.pack() if self.bar is not None else None,
            ],
            separators=(",", ":"),
        )
        return f'{{"s":{doc},"r":{rules}}}'.encode()

    def history_json(self) -> bytes:
        raw = self.history_raw
        if raw is None:
            raw = json.dumps([b.pack() for b in self.history], separators=(",", ":")).encode()
            # A cache of a pure function of ``history``, carried while it stays the same.
            object.__setattr__(self, "history_raw", raw)
        return raw

    def to_bytes(self) -> bytes:
        """Core and history in one document (the alerts role's state store value)."""
        return self.core_json()[:-1] + b',"h":' + self.history_json() + b"}"

    @classmethod
    def from_bytes(cls, raw: bytes) -> SymbolState:
        doc = json.loads(raw)
        return cls._from_docs(doc, doc.get("h") or [])

    @classmethod
    def from_json(cls, core: bytes | None, history: bytes | None) -> SymbolState:
        bars = json.loads(history) if history else []
        if not core:
            return cls(history=tuple(EvalBar.unpack(b) for b in bars))
        return cls._from_docs(json.loads(core), bars)

    @classmethod
    def _from_docs(cls, doc: dict[str, Any], packed_bars: list[Any]) -> SymbolState:
        bars = tuple(EvalBar.unpack(b) for b in packed_bars)
        price, last_ts, ids, prev_close, packed = doc["s"]
        bar = EvalBar.unpack(packed) if packed is not None else None
        if bar is not None:
            # A history written apart from its core may already hold the bar
            # the core still calls forming; replaying the tick that closed it
            # appends it again.
            bars = tuple(b for b in bars if b.start < bar.start)
        return cls(
            last_price=Decimal(price) if price is not None else None,
            last_ts=last_ts,
            last_ids=frozenset(ids),
            prev_close=Decimal(prev_close) if prev_close is not None else None,
            bar=bar,
            history=bars,
            rules={rid: RuleState(v[0], v[1], v[2], v[3]) for rid, v in doc["r"].items()},
        )


@dataclass(frozen=True, slots=True)
class Evaluation:
    state: SymbolState
    firings: tuple[Firing, ...] = ()
    stale: bool = False
    duplicate: bool = False
    history_changed: bool = False


# -- frequencies -------------------------------------------------------------------------


def _may_fire(c: CompiledRule, st: RuleState | None, ts: int, bar_start: int) -> bool:
    if st is None:
        return True
    f = c.frequency
    if f == "ONLY_ONCE":
        return not st.done
    if f in ("ONCE_PER_BAR", "ONCE_PER_BAR_CLOSE"):
        return st.last_fired_bar != bar_start
    if f == "ONCE_PER_MINUTE":
        return st.last_fired_ts is None or ts - st.last_fired_ts >= MINUTE_US
    return st.last_fired_ts is None or ts - st.last_fired_ts >= c.cooldown


def _armed(c: CompiledRule, ts: int, respect_created_at: bool) -> bool:
    if not c.rule.enabled:
        return False
    if c.expires is not None and ts >= c.expires:
        return False
    return not (respect_created_at and ts < c.created)


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
    last_ts = state.last_ts
    if last_ts is not None and ts <= last_ts:
        if ts < last_ts:
            return Evaluation(state, stale=True)
        if tick.tick_id in state.last_ids:
            return Evaluation(state, duplicate=True)
    interval = book.interval
    start = ts - ts % interval.micros
    zone = state.zone
    if zone is not None and state.book is book:
        quiet = _in_zone(state, zone, tick, ts, start)
        if quiet is not None:
            return quiet
    rule_states: Mapping[str, RuleState] = state.rules
    rules_json = state.rules_json
    if state.book is not book and rule_states:
        # The rules changed (or the state was just loaded): forget rules that
        # are gone and the memory of a rule's older version.
        versions = book.versions
        pruned = {rid: rs for rid, rs in rule_states.items() if versions.get(rid) == rs.version}
        if len(pruned) != len(rule_states):
            rule_states, rules_json = pruned, None
    fired: dict[str, RuleState] = {}
    firings: list[Firing] = []
    history = state.history
    bar = state.bar
    if bar is not None and bar.start < start:
        # The forming bar has closed: evaluate the bar-close rules on it.
        if book.close_rules:
            prev = history[-1].close if history else None
            view = View(bar.close, prev, bar.last_ts, bar, history, state.prev_close, interval)
            for c in book.close_rules:
                if not c.check(c.rule, view) or not _armed(c, bar.last_ts, respect_created_at):
                    continue
                if _may_fire(c, rule_states.get(c.rule_id), bar.last_ts, bar.start):
                    firings.append(
                        Firing(
                            fired_id(c.rule_id, bar.last_tick_id),
                            c.rule,
                            bar.close,
                            bar.last_tick_id,
                            from_micros(bar.last_ts),
                            at_bar_close=True,
                        )
                    )
                    fired[c.rule_id] = RuleState(c.version, True, bar.last_ts, bar.start)
        history = (*history, bar)
        bar = None
    keep = book.history_needed
    if len(history) > keep:
        history = history[len(history) - keep :] if keep else ()
    history_changed = history is not state.history and history != state.history
    bar = EvalBar.first(start, tick, ts) if bar is None else bar.add(tick, ts)
    prev_close = tick.prev_close if tick.prev_close is not None else state.prev_close
    price, prev = tick.price, state.last_price
    view = View(price, prev, ts, bar, history, prev_close, interval)
    met: list[CompiledRule] = []
    if book.levels and prev is not None and prev != price:
        lo, hi = (prev, price) if prev < price else (price, prev)
        # Only levels in (lo, hi] can have been crossed (up or down).
        first = bisect_right(book.levels, lo)
        last = bisect_right(book.levels, hi)
        met.extend(c for c in book.level_rules[first:last] if c.check(c.rule, view))
    band: tuple[int, int] | None = None
    band_true: tuple[CompiledRule, ...] = ()
    if book.band_rules:
        breaks = book.breaks
        band = (bisect_left(breaks, price), bisect_right(breaks, price))
        if band == state.band and state.book is book and prev is not None:
            band_true = state.band_true
            met.extend(band_true)
        else:
            true_now = [c for c in book.band_rules if c.check(c.rule, view)]
            met.extend(true_now)
            band_true = tuple(c for c in true_now if c.rule.condition in BAND_STATE_CONDITIONS)
    if book.tick_rules:
        met.extend(c for c in book.tick_rules if c.check(c.rule, view))
    if met:
        if len(met) > 1:
            met.sort(key=lambda c: c.rule_id)
        for c in met:
            if not _armed(c, ts, respect_created_at):
                continue
            rs = fired.get(c.rule_id) or rule_states.get(c.rule_id)
            if _may_fire(c, rs, ts, start):
                firings.append(
                    Firing(fired_id(c.rule_id, tick.tick_id), c.rule, price, tick.tick_id, tick.ts)
                )
                fired[c.rule_id] = RuleState(c.version, True, ts, start)
    if fired:
        rule_states = {**rule_states, **fired}
        rules_json = None
    zone = quiet_zone(book, view, band) if not met and book.zoned else None
    new_state = SymbolState(
        last_price=price,
        last_ts=ts,
        last_ids=_last_ids(state, tick.tick_id, ts),
        prev_close=prev_close,
        bar=bar,
        history=history,
        rules=rule_states,
        book=book,
        rules_json=rules_json,
        band=band,
        band_true=band_true,
        zone=zone,
        history_raw=state.history_raw if history is state.history else None,
    )
    return Evaluation(new_state, tuple(firings), history_changed=history_changed)


def _last_ids(state: SymbolState, tick_id: str, ts: int) -> frozenset[str]:
    """The ids of the ticks at the newest timestamp once ``tick_id`` (at ``ts``) is in:
    what tells a duplicate from a second tick of the same microsecond."""
    return state.last_ids | {tick_id} if ts == state.last_ts else frozenset((tick_id,))


def _in_zone(state: SymbolState, zone: Zone, tick: Tick, ts: int, start: int) -> Evaluation | None:
    """What a full evaluation gives for a tick inside the state's quiet zone, or None.

    Inside the zone no condition holds (:func:`quiet_zone`), so the tick only
    moves the price and the forming bar: no firing, and the rules' memory,
    the history, the band and the zone stay as they are.
    """
    price, close = tick.price, tick.prev_close
    if (
        start != zone.start
        or not zone.low < price < zone.high
        or (close is not None and close != state.prev_close)
    ):
        return None
    bar = state.bar
    assert bar is not None  # a zone is only left after a tick, in its bar
    bar = bar.add(tick, ts)
    if not bar.volume < zone.volume:
        return None
    return Evaluation(
        SymbolState(
            last_price=price,
            last_ts=ts,
            last_ids=_last_ids(state, tick.tick_id, ts),
            prev_close=state.prev_close,
            bar=bar,
            history=state.history,
            rules=state.rules,
            book=state.book,
            rules_json=state.rules_json,
            band=state.band,
            band_true=state.band_true,
            zone=zone,
            history_raw=state.history_raw,
        )
    )
