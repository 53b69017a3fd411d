"""Bars: OHLCV on exchange time, lateness, revisions, duplicates, validation."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.codec import Codec
from finstream.domain.marketdata.bars import (
    Bar,
    BarState,
    BarValidationError,
    IntervalError,
    add_tick,
    parse_interval,
    parse_intervals,
    validate_bar,
)
from finstream.domain.marketdata.ticks import Tick, make_tick

T0 = datetime(2025, 3, 3, 14, 30, tzinfo=UTC)
M1 = parse_interval("1m")


def tick(i: int, price: Any, at: datetime, size: Any = 1, kind: str = "TRADE") -> Tick:
    return make_tick(
        tick_id=f"t{i}",
        symbol="AAPL",
        price=price,
        size=size,
        kind=kind,
        ts=at,
        received_at=at,
        source="test",
    )


def feed(
    ticks: list[Tick], lateness: float = 0.0, interval: str = "1m"
) -> tuple[list[Bar], list[int], BarState]:
    state = BarState()
    published: list[Bar] = []
    late: list[int] = []
    iv = parse_interval(interval)
    for t in ticks:
        up = add_tick(state, t, iv, timedelta(seconds=lateness))
        if up.late:
            late.append(int(t.tick_id[1:]))
        state = up.state
        published.extend(up.publish)
    return published, late, state


def test_intervals() -> None:
    assert parse_interval("1m").seconds == 60
    assert parse_interval(" 5M ").name == "5m"
    assert parse_interval("1h").seconds == 3600
    assert [i.name for i in parse_intervals("1m,5m,1h")] == ["1m", "5m", "1h"]
    for bad in ("7m", "0m", "1w", "m", "25h", ""):
        with pytest.raises(IntervalError):
            parse_interval(bad)
    with pytest.raises(IntervalError, match="twice"):
        parse_intervals("1m,1m")


def test_a_minute_of_trades_makes_one_bar_with_vwap() -> None:
    ticks = [
        tick(0, "10", T0 + timedelta(seconds=1), size=100),
        tick(1, "12", T0 + timedelta(seconds=20), size=50),
        tick(2, "9", T0 + timedelta(seconds=40), size=50),
        tick(3, "11", T0 + timedelta(seconds=59), size=None),
        tick(4, "50", T0 + timedelta(seconds=30), size=1000, kind="QUOTE"),
        tick(5, "11.5", T0 + timedelta(seconds=61), size=1),
    ]
    published, late, _ = feed(ticks)
    assert late == []
    (bar,) = published
    assert (bar.open, bar.high, bar.low, bar.close) == (
        Decimal("10"),
        Decimal("50"),
        Decimal("9"),
        Decimal("11"),
    )
    # The QUOTE moves prices but is not a trade; the unsized trade counts as a trade only.
    assert bar.trades == 4
    assert bar.volume == Decimal("200")
    assert bar.vwap == Decimal("10.25000000")  # (1000 + 600 + 450) / 200
    assert (bar.start, bar.end) == (T0, T0 + timedelta(minutes=1))
    assert (bar.final, bar.revision) == (True, 0)
    Codec().encode("Bar", bar.to_record())
    assert bar.to_json()["vwap"] == "10.25"
    assert bar.to_json()["start"] == "2025-03-03T14:30:00+00:00"


def test_late_ticks_correct_the_bar_with_higher_revisions_until_final() -> None:
    ticks = [
        tick(0, "10", T0 + timedelta(seconds=10)),
        tick(1, "11", T0 + timedelta(seconds=62)),  # closes bar 0 (not final: lateness 5s)
        tick(2, "20", T0 + timedelta(seconds=30)),  # late, inside lateness: correction
        tick(3, "12", T0 + timedelta(seconds=66)),  # watermark passes end + 5s: final
        tick(4, "30", T0 + timedelta(seconds=50)),  # too late
    ]
    published, late, _ = feed(ticks, lateness=5)
    assert late == [4]
    assert [(b.start, b.revision, b.final, b.high, b.trades) for b in published] == [
        (T0, 0, False, Decimal("10"), 1),
        (T0, 1, False, Decimal("20"), 2),
        (T0, 2, True, Decimal("20"), 2),
    ]


def test_duplicates_count_once_and_late_reason_is_clear() -> None:
    t = tick(0, "10", T0)
    state = add_tick(BarState(), t, M1, timedelta(0)).state
    assert add_tick(state, t, M1, timedelta(0)).duplicate
    state = add_tick(state, tick(1, "10", T0 + timedelta(minutes=2)), M1, timedelta(0)).state
    up = add_tick(state, tick(2, "10", T0 + timedelta(seconds=3)), M1, timedelta(0))
    assert up.late is not None
    assert "14:30:00" in up.late
    assert "allowed lateness of 0s" in up.late


@st.composite
def tick_tape(draw: st.DrawFn) -> list[Tick]:
    n = draw(st.integers(1, 60))
    out = []
    at = T0
    for i in range(n):
        at += timedelta(seconds=draw(st.integers(0, 40)))
        # Some ticks arrive up to 30 s late (their time is before the previous ones).
        skew = timedelta(seconds=draw(st.integers(0, 30))) if draw(st.booleans()) else timedelta(0)
        price = draw(st.integers(1, 50))
        size = draw(st.sampled_from([None, 1, 5, 100]))
        out.append(tick(i, price, at - skew, size=size))
    return out


@settings(max_examples=200)
@given(tick_tape(), st.sampled_from([0, 5, 20]), st.sampled_from(["1m", "5m"]))
def test_final_bars_equal_the_bars_of_the_accepted_ticks(
    ticks: list[Tick], lateness: int, interval: str
) -> None:
    published, late, state = feed(ticks, lateness, interval)
    iv = parse_interval(interval)
    accepted = [t for t in ticks if int(t.tick_id[1:]) not in late]
    by_bar: dict[datetime, list[Tick]] = defaultdict(list)
    for t in accepted:
        by_bar[iv.start_of(t.ts)].append(t)
    finals = {b.start: b for b in published if b.final}
    open_starts = {b.start for b in state.bars}
    assert set(finals) | {datetime.fromtimestamp(s / 1e6, UTC) for s in open_starts} == set(by_bar)
    for start, bar in finals.items():
        group = by_bar[start]
        earliest = min(group, key=lambda t: t.ts)  # min() keeps the first of equal times
        latest = max(reversed(group), key=lambda t: t.ts)  # the last of equal times
        assert bar.open == earliest.price
        assert bar.close == latest.price
        assert bar.high == max(t.price for t in group)
        assert bar.low == min(t.price for t in group)
        assert bar.trades == len(group)
        sized = [t for t in group if t.size is not None]
        assert bar.volume == sum((t.size for t in sized if t.size), Decimal(0))
        validate_bar(bar)
    # Every publication of a bar has a higher revision than the one before; final is last.
    revisions: dict[datetime, list[Bar]] = defaultdict(list)
    for b in published:
        revisions[b.start].append(b)
    for pubs in revisions.values():
        assert [b.revision for b in pubs] == list(range(len(pubs)))
        assert [b.final for b in pubs].count(True) <= 1
        assert not any(b.final for b in pubs[:-1])
    # A tick is refused exactly when its bar was finalised (or would have been:
    # the watermark already passed its end plus the lateness) before it came.
    watermark: datetime | None = None
    for i, t in enumerate(ticks):
        too_late = (
            watermark is not None
            and iv.start_of(t.ts) + timedelta(seconds=iv.seconds + lateness) <= watermark
        )
        assert (i in late) == too_late
        if not too_late:
            watermark = t.ts if watermark is None else max(watermark, t.ts)


@settings(max_examples=100)
@given(tick_tape())
def test_state_survives_serialization(ticks: list[Tick]) -> None:
    state = BarState()
    for t in ticks:
        state = add_tick(state, t, M1, timedelta(seconds=5)).state
        assert BarState.from_json(state.to_json()) == state


def test_validate_bar_refuses_inconsistent_bars() -> None:
    good = feed([tick(0, "10", T0), tick(1, "10", T0 + timedelta(minutes=1))])[0][0]
    from dataclasses import replace

    validate_bar(good)
    for bad in (
        replace(good, interval="2x"),
        replace(good, end=good.end + timedelta(seconds=1)),
        replace(good, start=good.start + timedelta(seconds=1), end=good.end + timedelta(seconds=1)),
        replace(good, high=Decimal("9")),
        replace(good, revision=-1),
    ):
        with pytest.raises(BarValidationError):
            validate_bar(bad)


def test_a_tick_resent_within_the_window_counts_once_and_beyond_it_again() -> None:
    from finstream.domain.marketdata.bars import DEDUPE_WINDOW

    first = tick(0, "10", T0)
    state = add_tick(BarState(), first, M1, timedelta(0)).state
    for i in range(1, DEDUPE_WINDOW):
        state = add_tick(
            state, tick(i, "10", T0 + timedelta(milliseconds=i)), M1, timedelta(0)
        ).state
    assert add_tick(state, first, M1, timedelta(0)).duplicate
    state = add_tick(
        state, tick(DEDUPE_WINDOW, "10", T0 + timedelta(seconds=1)), M1, timedelta(0)
    ).state
    # 128 newer ticks since: the first one's fingerprint has left the window.
    again = add_tick(state, first, M1, timedelta(0))
    assert not again.duplicate
    assert again.state.bars[0].trades == DEDUPE_WINDOW + 2
