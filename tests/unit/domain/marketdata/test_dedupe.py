"""Publishing each observation once, coverage gaps, and snapshot clocks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from finstream.domain.marketdata.dedupe import GapTracker, SnapshotClock, TickDeduper
from finstream.domain.marketdata.normalize import quote_id, quote_marker, trade_id
from finstream.domain.marketdata.ticks import Tick, make_tick

T0 = datetime(2024, 5, 10, 14, 0, tzinfo=UTC)


def quote(
    source: str, price: str, ts: datetime = T0, size: str | None = "1000", marker: str | None = None
) -> Tick:
    p = Decimal(price)
    s = Decimal(size) if size is not None else None
    return make_tick(
        tick_id=quote_id("AAPL", marker or quote_marker(ts), p, s),
        symbol="AAPL",
        kind="QUOTE",
        price=p,
        size=s,
        ts=ts,
        received_at=ts,
        source=source,
    )


def trade(price: str, ts: datetime, size: str = "100", source: str = "finnhub") -> Tick:
    return make_tick(
        tick_id=trade_id("AAPL", ts, Decimal(price), Decimal(size)),
        symbol="AAPL",
        price=price,
        size=size,
        ts=ts,
        received_at=ts,
        source=source,
    )


def test_a_resent_trade_is_published_once() -> None:
    d = TickDeduper()
    t = trade("187.43", T0)
    assert d.offer(t) is None
    assert d.offer(trade("187.43", T0)) == "same_id"
    # Same trade through another provider: same content, same id.
    assert d.offer(trade("187.43", T0, source="polygon")) == "same_id"
    # An older trade is still a trade (bars want it).
    assert d.offer(trade("187.40", T0 - timedelta(seconds=5))) is None


def test_same_timed_quote_from_two_providers_is_one() -> None:
    d = TickDeduper()
    assert d.offer(quote("yahoo", "187.43")) is None
    assert d.offer(quote("finnhub", "187.43", size=None)) == "same_quote"


def test_untimed_quote_equal_to_the_other_providers_last_is_a_duplicate() -> None:
    d = TickDeduper()
    assert d.offer(quote("alphavantage", "187.43", marker="d2024-05-10")) is None
    # Yahoo sees the same quote with its own time stamp.
    assert d.offer(quote("yahoo", "187.43", ts=T0 + timedelta(seconds=1))) == "same_quote"
    # The next Yahoo quote with a new price is new.
    assert d.offer(quote("yahoo", "187.45", ts=T0 + timedelta(seconds=2))) is None


def test_a_flat_price_is_not_suppressed_forever_after_a_failover() -> None:
    d = TickDeduper()
    assert d.offer(quote("yahoo", "100", size=None)) is None
    assert d.offer(quote("finnhub", "100", ts=T0 + timedelta(seconds=1), size=None)) == "same_quote"
    # Finnhub now the reference: its next quote (new time, same price) is its own news.
    assert d.offer(quote("finnhub", "100", ts=T0 + timedelta(seconds=2), size=None)) is None


def test_different_sizes_are_different_quotes() -> None:
    d = TickDeduper()
    assert d.offer(quote("alphavantage", "100", size="1000", marker="d1")) is None
    assert d.offer(quote("yahoo", "100", size="1010")) is None


def test_a_stale_quote_from_the_same_provider_is_dropped() -> None:
    d = TickDeduper()
    assert d.offer(quote("yahoo", "101", ts=T0 + timedelta(seconds=10))) is None
    assert d.offer(quote("yahoo", "100", ts=T0)) == "stale_quote"
    # Another provider's clock is not compared.
    assert d.offer(quote("finnhub", "99", ts=T0, size=None)) is None


def test_historical_ticks_are_only_checked_by_id() -> None:
    d = TickDeduper()
    assert d.offer(quote("yahoo", "101", ts=T0 + timedelta(minutes=5))) is None
    bar = quote("yahoo", "100", ts=T0, marker="bar1m:1")
    assert d.offer(bar, historical=True) is None
    assert d.offer(bar, historical=True) == "same_id"


def test_window_bounds_memory() -> None:
    d = TickDeduper(window=3)
    ticks = [trade("1", T0 + timedelta(seconds=i)) for i in range(5)]
    for t in ticks:
        assert d.offer(t) is None
    assert d.offer(ticks[4]) == "same_id"
    assert d.offer(ticks[0]) is None  # forgotten: the window is per symbol and bounded


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["yahoo", "finnhub", "alphavantage"]),
            st.integers(0, 20),
            st.integers(0, 5),
        ),
        max_size=80,
    )
)
def test_no_id_is_ever_published_twice(events: list[tuple[str, int, int]]) -> None:
    d = TickDeduper()
    published: set[str] = set()
    for source, second, cents in events:
        t = quote(source, f"100.{cents:02d}", ts=T0 + timedelta(seconds=second))
        if d.offer(t) is None:
            assert t.tick_id not in published
            published.add(t.tick_id)


def test_gaps_are_reported_when_they_close() -> None:
    g = GapTracker(timedelta(seconds=1))
    assert g.observe("AAPL", T0) is None
    assert g.observe("AAPL", T0 + timedelta(seconds=0.5)) is None
    assert g.open_gaps(T0 + timedelta(seconds=1)) == []
    assert g.open_gaps(T0 + timedelta(seconds=2)) == [("AAPL", 1.5)]
    gap = g.observe("AAPL", T0 + timedelta(seconds=3))
    assert gap is not None
    assert gap.seconds == 2.5
    assert g.max_gap["AAPL"] == timedelta(seconds=2.5)
    assert g.staleness("AAPL", T0 + timedelta(seconds=4)) == 1.0
    assert g.staleness("MSFT", T0) is None
    assert g.observe("AAPL", T0) is None  # a clock going backwards is ignored


def test_snapshot_clock_keeps_the_first_seen_time_while_content_holds() -> None:
    c = SnapshotClock()
    assert c.stamp("IBM", "a", T0) == T0
    assert c.stamp("IBM", "a", T0 + timedelta(seconds=5)) == T0
    assert c.stamp("IBM", "b", T0 + timedelta(seconds=6)) == T0 + timedelta(seconds=6)
    assert c.stamp("MSFT", "a", T0 + timedelta(seconds=7)) == T0 + timedelta(seconds=7)
