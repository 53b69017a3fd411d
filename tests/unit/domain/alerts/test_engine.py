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

from finstream.domain.alerts.engine import RuleBook, SymbolState, evaluate
from finstream.domain.alerts.firings import Firing, fired_id
from finstream.domain.alerts.rules import AlertRule, parse_rule
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
