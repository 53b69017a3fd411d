"""Alert evaluation: conditions fire exactly where they should, frequencies hold,
and a restart from stored state changes nothing."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.domain.alerts.books import RuleBook
from finstream.domain.alerts.conditions import CHECKS
from finstream.domain.alerts.engine import SymbolState, evaluate
from finstream.domain.alerts.firings import Firing, fired_id
from finstream.domain.alerts.rules import CONDITIONS, AlertRule, parse_rule
from finstream.domain.marketdata.bars import parse_interval
from finstream.domain.marketdata.ticks import Tick, make_tick

T0 = datetime(2025, 3, 3, 14, 30, tzinfo=UTC)
MINUTE = parse_interval("1m")


def rule(
    condition: str, frequency: str = "EVERY_TIME", rule_id: str = "r1", **params: Any
) -> AlertRule:
    return parse_rule(
        {
            "rule_id": rule_id,
            "user_id": "u1",
            "symbol": "AAPL",
            "condition": condition,
            "frequency": frequency,
            "created_at": T0 - timedelta(days=1),
            **params,
        },
        now=T0 - timedelta(days=1),
    )


def tick(i: int, price: Any, at: datetime, size: Any = 10, prev_close: Any = None) -> Tick:
    return make_tick(
        tick_id=f"t{i}",
        symbol="AAPL",
        price=price,
        size=size,
        prev_close=prev_close,
        ts=at,
        received_at=at,
        source="test",
    )


def run(
    rules: Sequence[AlertRule], ticks: Sequence[Tick], state: SymbolState | None = None
) -> tuple[list[Firing], SymbolState]:
    book = RuleBook.build(rules, MINUTE)
    state = state or SymbolState()
    firings: list[Firing] = []
    for t in ticks:
        ev = evaluate(state, book, t)
        state = ev.state
        firings.extend(ev.firings)
    return firings, state


def series(prices: Sequence[Any], gaps: Sequence[int] | None = None) -> list[Tick]:
    """Ticks at T0 + cumulative gaps (seconds), default one second apart."""
    at = T0
    out = []
    for i, p in enumerate(prices):
        if i:
            at += timedelta(seconds=gaps[i - 1] if gaps else 1)
        out.append(tick(i, p, at))
    return out


def indices(firings: Sequence[Firing]) -> list[int]:
    return [int(f.tick_id[1:]) for f in firings]


# -- crossing conditions fire exactly at crossings ------------------------------------

PRICES = st.lists(st.integers(1, 9), min_size=1, max_size=60)
LEVEL = st.integers(1, 9)


@given(PRICES, LEVEL)
def test_crossing_up_fires_exactly_when_price_reaches_the_level_from_below(
    prices: list[int], level: int
) -> None:
    fired, _ = run([rule("CROSSING_UP", value=level)], series(prices))
    expected = [i for i in range(1, len(prices)) if prices[i - 1] < level <= prices[i]]
    assert indices(fired) == expected


@given(PRICES, LEVEL)
def test_crossing_down_fires_exactly_when_price_leaves_the_level_downwards(
    prices: list[int], level: int
) -> None:
    fired, _ = run([rule("CROSSING_DOWN", value=level)], series(prices))
    expected = [i for i in range(1, len(prices)) if prices[i - 1] >= level > prices[i]]
    assert indices(fired) == expected


@given(PRICES, LEVEL)
def test_crossing_fires_at_every_side_change_and_alternates(prices: list[int], level: int) -> None:
    fired, _ = run([rule("CROSSING", value=level)], series(prices))
    side = [p >= level for p in prices]
    expected = [i for i in range(1, len(prices)) if side[i] != side[i - 1]]
    assert indices(fired) == expected
    # Consecutive crossings go in opposite directions.
    for a, b in itertools.pairwise(fired):
        assert (a.price >= level) != (b.price >= level)


@given(PRICES, st.integers(1, 8), st.integers(1, 4))
def test_channel_entering_and_exiting_fire_at_transitions(
    prices: list[int], lower: int, width: int
) -> None:
    upper = lower + width
    inside = [lower <= p <= upper for p in prices]
    entering, _ = run([rule("ENTERING_CHANNEL", lower=lower, upper=upper)], series(prices))
    exiting, _ = run([rule("EXITING_CHANNEL", lower=lower, upper=upper)], series(prices))
    n = range(1, len(prices))
    assert indices(entering) == [i for i in n if inside[i] and not inside[i - 1]]
    assert indices(exiting) == [i for i in n if inside[i - 1] and not inside[i]]
    inside_rule, _ = run([rule("INSIDE_CHANNEL", lower=lower, upper=upper)], series(prices))
    outside_rule, _ = run([rule("OUTSIDE_CHANNEL", lower=lower, upper=upper)], series(prices))
    assert indices(inside_rule) == [i for i in range(len(prices)) if inside[i]]
    assert indices(outside_rule) == [i for i in range(len(prices)) if not inside[i]]


# -- frequencies hold for arbitrary tick sequences --------------------------------------

GAPS = st.integers(0, 100)


@st.composite
def tape(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    prices = draw(st.lists(st.integers(1, 9), min_size=1, max_size=50))
    gaps = draw(st.lists(GAPS, min_size=len(prices) - 1, max_size=len(prices) - 1))
    return prices, gaps


def times(gaps: Sequence[int]) -> list[datetime]:
    at, out = T0, [T0]
    for g in gaps:
        at += timedelta(seconds=g)
        out.append(at)
    return out


def greedy(cond: list[bool], ts: list[datetime], gap: timedelta) -> list[int]:
    """Reference model: fire when the condition holds and the last firing is >= gap ago."""
    out: list[int] = []
    for i, c in enumerate(cond):
        if c and (not out or ts[i] - ts[out[-1]] >= gap):
            out.append(i)
    return out


@settings(max_examples=150)
@given(
    tape(),
    LEVEL,
    st.sampled_from(["ONLY_ONCE", "ONCE_PER_BAR", "ONCE_PER_MINUTE", "EVERY_TIME"]),
    st.integers(0, 120),
)
def test_frequencies_hold_for_arbitrary_ticks(
    tp: tuple[list[int], list[int]], level: int, frequency: str, cooldown: int
) -> None:
    prices, gaps = tp
    ts = times(gaps)
    extra = {"cooldown_seconds": cooldown} if frequency == "EVERY_TIME" else {}
    fired, _ = run([rule("GREATER_THAN", frequency, value=level, **extra)], series(prices, gaps))
    cond = [p > level for p in prices]
    got = indices(fired)
    if frequency == "ONLY_ONCE":
        assert got == ([cond.index(True)] if any(cond) else [])
    elif frequency == "ONCE_PER_BAR":
        seen: set[datetime] = set()
        expected = []
        for i, c in enumerate(cond):
            bar = MINUTE.start_of(ts[i])
            if c and bar not in seen:
                seen.add(bar)
                expected.append(i)
        assert got == expected
    elif frequency == "ONCE_PER_MINUTE":
        assert got == greedy(cond, ts, timedelta(minutes=1))
    else:
        assert got == greedy(cond, ts, timedelta(seconds=cooldown))
    assert all(cond[i] for i in got)


@settings(max_examples=150)
@given(tape(), LEVEL)
def test_once_per_bar_close_fires_on_closes_above_the_level(
    tp: tuple[list[int], list[int]], level: int
) -> None:
    prices, gaps = tp
    ts = times(gaps)
    fired, _ = run([rule("GREATER_THAN", "ONCE_PER_BAR_CLOSE", value=level)], series(prices, gaps))
    # The last tick of each bar that has been followed by a later bar is a close.
    closes = [
        i for i in range(len(prices) - 1) if MINUTE.start_of(ts[i]) != MINUTE.start_of(ts[i + 1])
    ]
    assert indices(fired) == [i for i in closes if prices[i] > level]
    assert all(f.at_bar_close for f in fired)


@settings(max_examples=100)
@given(tape(), LEVEL)
def test_crossing_at_bar_close_uses_the_close_series(
    tp: tuple[list[int], list[int]], level: int
) -> None:
    prices, gaps = tp
    ts = times(gaps)
    fired, _ = run([rule("CROSSING_UP", "ONCE_PER_BAR_CLOSE", value=level)], series(prices, gaps))
    closes = [
        i for i in range(len(prices) - 1) if MINUTE.start_of(ts[i]) != MINUTE.start_of(ts[i + 1])
    ]
    expected = [b for a, b in itertools.pairwise(closes) if prices[a] < level <= prices[b]]
    assert indices(fired) == expected


# -- restarts: stored state gives the same firings ------------------------------------------


def all_rules() -> list[AlertRule]:
    return [
        rule("CROSSING", "EVERY_TIME", "a", value=5),
        rule("CROSSING_UP", "ONLY_ONCE", "b", value=6),
        rule("GREATER_THAN", "ONCE_PER_MINUTE", "c", value=4),
        rule("LESS_THAN", "ONCE_PER_BAR", "d", value=3),
        rule("EXITING_CHANNEL", "ONCE_PER_BAR_CLOSE", "e", lower=3, upper=6),
        rule("MOVING_UP_PERCENT", "EVERY_TIME", "f", percent=50, bars=3, cooldown_seconds=30),
        rule("MOVING_DOWN_PERCENT", "ONCE_PER_BAR", "g", percent=40, window_seconds=120),
        rule("CHANGE_FROM_PREV_CLOSE_PERCENT", "ONCE_PER_MINUTE", "h", percent=30),
        rule("VOLUME_SPIKE", "ONCE_PER_BAR", "i", bars=2, multiplier=2),
    ]


@settings(max_examples=100)
@given(tape(), st.data())
def test_restart_from_stored_state_and_replay_change_nothing(
    tp: tuple[list[int], list[int]], data: st.DataObject
) -> None:
    prices, gaps = tp
    ticks = [
        tick(i, p, t, size=(i % 7) * 10, prev_close=5)
        for i, (p, t) in enumerate(zip(prices, times(gaps), strict=True))
    ]
    rules = all_rules()
    book = RuleBook.build(rules, MINUTE)
    whole, _ = run(rules, ticks)
    cut = data.draw(st.integers(0, len(ticks)))
    replay_from = data.draw(st.integers(0, cut))
    state = SymbolState()
    firings: list[Firing] = []
    for t in ticks[:cut]:
        ev = evaluate(state, book, t)
        state, firings = ev.state, firings + list(ev.firings)
    # What a restarted worker sees: the state as stored, then the ticks again
    # from an earlier committed offset (already evaluated ones are stale).
    restored = SymbolState.from_json(state.core_json(), state.history_json())
    assert restored == state
    for t in ticks[replay_from:]:
        ev = evaluate(restored, book, t)
        restored = ev.state
        firings.extend(ev.firings)
    assert [f.fired_id for f in firings] == [f.fired_id for f in whole]


BAND_KINDS = [
    ("GREATER_THAN", {"value": "v"}),
    ("LESS_THAN", {"value": "v"}),
    ("INSIDE_CHANNEL", {"lower": "lo", "upper": "hi"}),
    ("OUTSIDE_CHANNEL", {"lower": "lo", "upper": "hi"}),
    ("ENTERING_CHANNEL", {"lower": "lo", "upper": "hi"}),
    ("EXITING_CHANNEL", {"lower": "lo", "upper": "hi"}),
]
FREQUENCIES = ["EVERY_TIME", "ONLY_ONCE", "ONCE_PER_BAR", "ONCE_PER_MINUTE"]


@st.composite
def band_rules(draw: st.DrawFn) -> list[AlertRule]:
    out = []
    for n in range(draw(st.integers(1, 8))):
        condition, params = draw(st.sampled_from(BAND_KINDS))
        lo = draw(st.integers(1, 8))
        values = {"v": draw(st.integers(1, 9)), "lo": lo, "hi": draw(st.integers(lo + 1, 9))}
        out.append(
            rule(
                condition,
                draw(st.sampled_from(FREQUENCIES)),
                f"b{n}",
                **{k: values[v] for k, v in params.items()},
            )
        )
    return out


@settings(max_examples=150)
@given(tape(), band_rules())
def test_the_price_band_index_fires_exactly_what_checking_every_rule_fires(
    tp: tuple[list[int], list[int]], rules: list[AlertRule]
) -> None:
    prices, gaps = tp
    ticks = [tick(i, p, t) for i, (p, t) in enumerate(zip(prices, times(gaps), strict=True))]
    indexed = RuleBook.build(rules, MINUTE)
    plain = RuleBook.build(rules, MINUTE, band_index=False)
    assert indexed.band_rules
    assert not plain.band_rules
    a, b = SymbolState(), SymbolState()
    for t in ticks:
        ea, eb = evaluate(a, indexed, t), evaluate(b, plain, t)
        assert [f.fired_id for f in ea.firings] == [f.fired_id for f in eb.firings]
        assert ea.state == eb.state
        # A restored state (no band cache) gives the same answer as well.
        a = ea.state if t.tick_id[-1] != "3" else SymbolState.from_bytes(ea.state.to_bytes())
        b = eb.state


def test_history_stored_ahead_of_the_core_is_trimmed_on_load() -> None:
    rules = [rule("VOLUME_SPIKE", "EVERY_TIME", bars=2, multiplier=2)]
    ticks = series([5, 5, 5, 5], gaps=[60, 60, 60])
    _, before = run(rules, ticks[:2])
    _, after = run(rules, ticks[:3])
    # History of "after" (includes bar 2) with the core of "before" (bar 2 forming).
    mixed = SymbolState.from_json(before.core_json(), after.history_json())
    assert mixed == before


# -- other conditions by example ----------------------------------------------------------------


def test_moving_up_percent_within_bars() -> None:
    # 100 -> 104 within the same bar: +4%; then a new bar whose low is 104.
    ticks = series([100, 102, 104, 104, 106], gaps=[10, 10, 60, 10])
    fired, _ = run([rule("MOVING_UP_PERCENT", "EVERY_TIME", percent=4, bars=1)], ticks)
    assert indices(fired) == [2]
    fired, _ = run([rule("MOVING_UP_PERCENT", "EVERY_TIME", percent=4, bars=2)], ticks)
    assert indices(fired) == [2, 3, 4]


def test_moving_down_percent_within_a_time_span() -> None:
    ticks = series([100, 99, 97, 96], gaps=[60, 60, 180])
    fired, _ = run(
        [rule("MOVING_DOWN_PERCENT", "EVERY_TIME", percent=3, window_seconds=120)], ticks
    )
    # Tick 3 is 4 minutes after the 100 bar: the window no longer reaches it.
    assert indices(fired) == [2]


def test_change_from_previous_close() -> None:
    ticks = [tick(0, 100, T0, prev_close=100), tick(1, 103, T0 + timedelta(seconds=1))]
    ticks.append(tick(2, "96.9", T0 + timedelta(seconds=2)))
    fired, _ = run([rule("CHANGE_FROM_PREV_CLOSE_PERCENT", "EVERY_TIME", percent=3)], ticks)
    assert indices(fired) == [1, 2]


def test_volume_spike_against_the_average_of_completed_bars() -> None:
    at = [
        T0,
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=2),
        T0 + timedelta(minutes=2, seconds=1),
    ]
    sizes = [100, 300, 300, 300]
    ticks = [tick(i, 10, at[i], size=sizes[i]) for i in range(4)]
    fired, _ = run([rule("VOLUME_SPIKE", "ONCE_PER_BAR", bars=2, multiplier=3)], ticks)
    # Average of the two completed bars is 200; the forming bar reaches 600 at tick 3.
    assert indices(fired) == [3]


def test_stale_ticks_change_nothing() -> None:
    book = RuleBook.build([rule("CROSSING", value=5)], MINUTE)
    state = evaluate(SymbolState(), book, tick(0, 4, T0)).state
    ev = evaluate(state, book, tick(1, 6, T0 - timedelta(seconds=1)))
    assert ev.stale
    assert ev.state is state
    assert not ev.firings


def test_expired_disabled_and_future_rules_do_not_fire() -> None:
    base = {"value": 5}
    expiring = parse_rule(
        {
            "user_id": "u",
            "symbol": "AAPL",
            "condition": "GREATER_THAN",
            "frequency": "EVERY_TIME",
            "expires_at": T0 + timedelta(seconds=2),
            "created_at": T0 - timedelta(days=1),
            **base,
        },
        now=T0 - timedelta(days=1),
    )
    fired, _ = run([expiring], series([6, 6, 6, 6]))
    assert indices(fired) == [0, 1]
    disabled = parse_rule(
        {"user_id": "u", "symbol": "AAPL", "condition": "GREATER_THAN", "enabled": False, **base},
        now=T0,
    )
    assert run([disabled], series([6, 6]))[0] == []
    later = parse_rule(
        {
            "user_id": "u",
            "symbol": "AAPL",
            "condition": "GREATER_THAN",
            "frequency": "EVERY_TIME",
            **base,
        },
        now=T0 + timedelta(seconds=1),
    )
    assert indices(run([later], series([6, 6, 6]))[0]) == [1, 2]
    book = RuleBook.build([later], MINUTE)
    ev = evaluate(SymbolState(), book, tick(0, 6, T0), respect_created_at=False)
    assert len(ev.firings) == 1


def test_an_edited_rule_is_armed_again_and_removed_rules_are_forgotten() -> None:
    r = rule("GREATER_THAN", "ONLY_ONCE", value=5)
    fired, state = run([r], series([6, 7]))
    assert indices(fired) == [0]
    assert "r1" in state.rules
    from dataclasses import replace

    edited = replace(r, updated_at=r.updated_at + timedelta(seconds=1))
    book = RuleBook.build([edited], MINUTE)
    ev = evaluate(state, book, tick(5, 8, T0 + timedelta(seconds=5)))
    assert [f.tick_id for f in ev.firings] == ["t5"]
    ev = evaluate(ev.state, RuleBook.build([], MINUTE), tick(6, 8, T0 + timedelta(seconds=6)))
    assert ev.state.rules == {}


def test_firing_ids_and_records_are_deterministic() -> None:
    r = rule("CROSSING_UP", value=5, message="Take profit")
    fired, _ = run([r], series([4, 6]))
    (f,) = fired
    assert f.fired_id == fired_id("r1", "t1")
    request = f.notification_request(T0)
    assert request["request_id"] == f.request_id
    assert request["category"] == "price_alert"
    assert request["template"] == "price_alert"
    data = request["data"]
    assert data["symbol"] == "AAPL"
    assert data["price"] == "6"
    assert data["condition"] == "CROSSING_UP"
    assert data["rule_id"] == "r1"
    assert data["title"] == "AAPL alert: crossing up 5"
    assert "AAPL traded at 6" in data["body"]
    assert "Take profit" in data["body"]
    from finstream.codec import Codec

    codec = Codec()
    codec.encode("NotificationRequest", request)
    codec.encode("AlertFired", f.alert_fired(T0))
    again, _ = run([r], series([4, 6]))
    assert again[0].request_id == f.request_id


@pytest.mark.parametrize("price", ["5", "5.00000001"])
def test_crossing_up_counts_reaching_the_level(price: str) -> None:
    fired, _ = run([rule("CROSSING_UP", value=5)], series([Decimal("4.99999999"), price]))
    assert indices(fired) == [1]


# -- the quiet zone ---------------------------------------------------------------------


@st.composite
def near_rules(draw: st.DrawFn) -> list[AlertRule]:
    """Rules of every kind with thresholds close to 100, where the walk below goes."""
    cents = st.integers(9_000, 11_000).map(lambda c: Decimal(c) / 100)
    percent = st.integers(1, 400).map(lambda p: Decimal(p) / 100)
    window = st.one_of(
        st.fixed_dictionaries({"bars": st.integers(1, 4)}),
        st.fixed_dictionaries({"window_seconds": st.integers(1, 400)}),
    )
    out = []
    for n in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(CONDITIONS))
        params: dict[str, Any]
        if kind.endswith("CHANNEL"):
            lo, hi = sorted(draw(st.lists(cents, min_size=2, max_size=2, unique=True)))
            params = {"lower": lo, "upper": hi}
        elif kind.startswith("MOVING"):
            params = {"percent": draw(percent), **draw(window)}
        elif kind == "CHANGE_FROM_PREV_CLOSE_PERCENT":
            params = {"percent": draw(percent)}
        elif kind == "VOLUME_SPIKE":
            params = {
                "bars": draw(st.integers(1, 3)),
                "multiplier": draw(st.integers(11, 40).map(lambda m: Decimal(m) / 10)),
            }
        else:
            params = {"value": draw(cents)}
        frequency = draw(st.sampled_from([*FREQUENCIES, "ONCE_PER_BAR_CLOSE"]))
        out.append(rule(kind, frequency, f"z{n}", **params))
    return out


@st.composite
def walk(draw: st.DrawFn) -> list[Tick]:
    """A price walk around 100 in cents, with bar-crossing gaps and changing closes."""
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(-40, 40),
                st.sampled_from([0, 1, 1, 2, 2, 5, 30, 61, 200]),
                st.integers(0, 60),
                st.sampled_from([*[None] * 8, 99, "100.5"]),
            ),
            min_size=30,
            max_size=150,
        )
    )
    price, at, out = Decimal(100), T0, []
    for i, (step, gap, size, close) in enumerate(steps):
        price = max(Decimal("0.01"), price + Decimal(step) / 100)
        at += timedelta(seconds=gap)
        out.append(tick(i, price, at, size=size, prev_close=close))
    return out


@settings(max_examples=300)
@given(walk(), near_rules(), st.data())
def test_the_quiet_zone_fires_exactly_what_checking_every_rule_fires(
    ticks: list[Tick], rules: list[AlertRule], data: st.DataObject
) -> None:
    zoned = RuleBook.build(rules, MINUTE)
    plain = RuleBook.build(rules, MINUTE, quiet_zone=False)
    assert zoned.zoned
    assert not plain.zoned
    restore_at = data.draw(st.sets(st.integers(0, len(ticks))))
    a, b = SymbolState(), SymbolState()
    for i, t in enumerate(ticks):
        ea, eb = evaluate(a, zoned, t), evaluate(b, plain, t)
        assert [f.fired_id for f in ea.firings] == [f.fired_id for f in eb.firings]
        assert ea.state == eb.state
        assert ea.history_changed == eb.history_changed
        assert ea.state.history_json() == eb.state.history_json()
        assert eb.state.zone is None
        # A restored state (no zone, no caches) gives the same answers too.
        a = SymbolState.from_bytes(ea.state.to_bytes()) if i in restore_at else ea.state
        b = eb.state


def test_a_tick_inside_the_quiet_zone_keeps_it_and_one_beyond_a_threshold_fires() -> None:
    rules = [
        rule("CROSSING_UP", "EVERY_TIME", "a", value=101),
        rule("MOVING_DOWN_PERCENT", "EVERY_TIME", "b", percent=2, bars=2),
    ]
    book = RuleBook.build(rules, MINUTE)
    prices = ["100", "100.3", "99.8", "100.4", "101.2"]
    state = SymbolState()
    zones = []
    fired = []
    for i, p in enumerate(prices):
        ev = evaluate(state, book, tick(i, p, T0 + timedelta(seconds=i)))
        state = ev.state
        zones.append(state.zone)
        fired.append([f.rule.rule_id for f in ev.firings])
    assert fired == [[], [], [], [], ["a"]]
    first = zones[0]
    assert first is not None
    # The moving rule's 2% keeps the zone within about 0.5% of the first
    # price, below the level: the next three ticks stay in it and keep it.
    assert Decimal("99.49") < first.low < Decimal(100) < first.high < Decimal("100.51")
    assert all(z is first for z in zones[1:4])
    # A tick that meets a condition leaves no zone: the next one is checked in full.
    assert zones[4] is None


# (condition, parameters, prices, previous closes): the last tick meets the
# condition; every tick before it leaves a quiet zone.
BEYOND_THE_ZONE: list[tuple[str, dict[str, Any], list[str], list[Any]]] = [
    ("CROSSING_UP", {"value": 101}, ["100", "100.5", "101.1"], []),
    ("CROSSING_DOWN", {"value": 99}, ["100", "99.5", "98.9"], []),
    ("CROSSING", {"value": 99}, ["100", "99.5", "98.9"], []),
    ("GREATER_THAN", {"value": 101}, ["100", "100.5", "101.5"], []),
    ("LESS_THAN", {"value": 99}, ["100", "99.5", "98.5"], []),
    ("ENTERING_CHANNEL", {"lower": 101, "upper": 102}, ["100", "100.5", "101.5"], []),
    ("EXITING_CHANNEL", {"lower": 99, "upper": 101}, ["100", "100.5", "101.5"], []),
    ("INSIDE_CHANNEL", {"lower": 98, "upper": 99}, ["100", "99.5", "98.5"], []),
    ("OUTSIDE_CHANNEL", {"lower": 99, "upper": 101}, ["100", "99.5", "98.5"], []),
    # A new extreme inside the zone would move the threshold toward the price:
    # the zone is too narrow for 99.1 (about 0.25% wide for 1%), so 100.2 is
    # checked against 1% above 99.1 (100.091); the same downward.
    ("MOVING_UP_PERCENT", {"percent": 1, "bars": 1}, ["100", "99.1", "100.2"], []),
    ("MOVING_DOWN_PERCENT", {"percent": 1, "window_seconds": 60}, ["100", "100.9", "99.85"], []),
    # Well inside the spread, the window's extreme bounds the zone: 1% off 99
    # (99.99) and 1% off 101 (also 99.99).
    ("MOVING_UP_PERCENT", {"percent": 1, "bars": 2}, ["100", "99", "99.8", "99.995"], []),
    ("MOVING_DOWN_PERCENT", {"percent": 1, "bars": 2}, ["100", "101", "100.2", "99.97"], []),
    ("CHANGE_FROM_PREV_CLOSE_PERCENT", {"percent": 1}, ["100", "99.5", "98.9"], [100]),
    ("CHANGE_FROM_PREV_CLOSE_PERCENT", {"percent": 1}, ["100", "100.5", "101.1"], [100]),
    # The previous close moves, the price does not.
    ("CHANGE_FROM_PREV_CLOSE_PERCENT", {"percent": 1}, ["100", "100.2", "100.2"], [100, 100, 99]),
]


@pytest.mark.parametrize(("condition", "params", "prices", "closes"), BEYOND_THE_ZONE)
def test_a_tick_beyond_each_bound_of_the_quiet_zone_fires(
    condition: str, params: dict[str, Any], prices: list[str], closes: list[Any]
) -> None:
    book = RuleBook.build([rule(condition, "EVERY_TIME", "a", **params)], MINUTE)
    state = SymbolState()
    fired = []
    for i, p in enumerate(prices):
        close = closes[i] if i < len(closes) else None
        ev = evaluate(state, book, tick(i, p, T0 + timedelta(seconds=i), prev_close=close))
        if i < len(prices) - 1:
            assert ev.state.zone is not None
        state = ev.state
        fired.append(len(ev.firings))
    assert fired == [0] * (len(prices) - 1) + [1]


def test_a_volume_spike_inside_the_price_zone_fires() -> None:
    book = RuleBook.build([rule("VOLUME_SPIKE", "EVERY_TIME", "a", bars=1, multiplier=2)], MINUTE)
    minute = T0 + timedelta(minutes=1)
    ticks = [
        tick(0, "100", T0, size=10),
        tick(1, "100", minute, size=5),
        tick(2, "100.1", minute + timedelta(seconds=1), size=5),
        tick(3, "100", minute + timedelta(seconds=2), size=15),
    ]
    state = SymbolState()
    fired = []
    for t in ticks:
        ev = evaluate(state, book, t)
        state = ev.state
        fired.append(len(ev.firings))
    assert fired == [0, 0, 0, 1]
    assert state.zone is None


def test_every_condition_a_rule_may_name_has_a_check() -> None:
    assert set(CHECKS) == set(CONDITIONS)
