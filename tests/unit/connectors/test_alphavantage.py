"""Alpha Vantage: recorded bodies through the parsers, and the connector against the fake."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.connectors.alphavantage import (
    AlphaVantageConnector,
    parse_global_quote,
    parse_intraday,
)
from finstream.domain.marketdata.dedupe import SnapshotClock
from finstream.domain.marketdata.normalize import parse_daily_resets, seconds_until_reset
from finstream.domain.resilience import ErrorClass, ProviderError
from tests.fakes.marketdata.alphavantage import (
    BAD_KEY,
    BURST,
    DAILY,
    NOTE,
    PREMIUM,
    FakeAlphaVantage,
)
from tests.fakes.marketdata.helpers import RECEIVED, gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import serve

# As documented (every value a string), IBM on 2024-05-10.
IBM = {
    "Global Quote": {
        "01. symbol": "IBM",
        "02. open": "167.5000",
        "03. high": "168.0800",
        "04. low": "166.1000",
        "05. price": "167.1500",
        "06. volume": "2882337",
        "07. latest trading day": "2024-05-10",
        "08. previous close": "167.3400",
        "09. change": "-0.1900",
        "10. change percent": "-0.1135%",
    }
}


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_global_quote_becomes_a_quote_tick() -> None:
    tick = parse_global_quote(body(IBM), "IBM", RECEIVED)
    assert tick.kind == "QUOTE"
    assert tick.price == Decimal("167.15000000")
    assert tick.size == Decimal("2882337")
    assert tick.prev_close == Decimal("167.34")
    assert tick.source == "alphavantage"
    assert tick.ts == RECEIVED  # no time of day in GLOBAL_QUOTE: first seen
    assert tick.tick_id == "IBM:Q:d2024-05-10:167.15:2882337"


def test_an_unchanged_quote_keeps_its_time_and_id() -> None:
    clock = SnapshotClock()
    a = parse_global_quote(body(IBM), "IBM", RECEIVED, clock)
    b = parse_global_quote(body(IBM), "IBM", RECEIVED + timedelta(seconds=30), clock)
    assert (a.ts, a.tick_id) == (b.ts, b.tick_id)
    moved = json.loads(json.dumps(IBM))
    moved["Global Quote"]["05. price"] = "167.2000"
    c = parse_global_quote(body(moved), "IBM", RECEIVED + timedelta(seconds=60), clock)
    assert c.ts == RECEIVED + timedelta(seconds=60)
    assert c.tick_id != a.tick_id


@pytest.mark.parametrize(
    ("payload", "cls", "code"),
    [
        ({"Note": NOTE}, ErrorClass.THROTTLED, "frequency"),
        ({"Information": DAILY}, ErrorClass.THROTTLED, "daily_limit"),
        ({"Information": BURST}, ErrorClass.THROTTLED, "burst"),
        ({"Information": PREMIUM}, ErrorClass.PERMANENT, "premium"),
        ({"Error Message": BAD_KEY}, ErrorClass.AUTH, "apikey"),
        (
            {
                "Information": "The **demo** API key is for demo purposes only. Please claim your free API key at (https://www.alphavantage.co/support/#api-key) to explore our full API offerings."
            },
            ErrorClass.AUTH,
            "apikey",
        ),
        (
            {"Error Message": "Invalid API call. Please retry or visit the documentation."},
            ErrorClass.UNKNOWN_SYMBOL,
            "invalid_call",
        ),
        (
            {"Error Message": "This API function (GLOBAL_QUOTES) does not exist."},
            ErrorClass.PERMANENT,
            "message",
        ),
        ({"Global Quote": {}}, ErrorClass.UNKNOWN_SYMBOL, "empty"),
        ({"Global Quote": "IBM"}, ErrorClass.MALFORMED, "shape"),
        ({"Meta Data": {}}, ErrorClass.MALFORMED, "shape"),
        ([], ErrorClass.MALFORMED, "shape"),
    ],
)
def test_messages_instead_of_data(payload: object, cls: ErrorClass, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body(payload), "IBM", RECEIVED)
    assert (info.value.error_class, info.value.code) == (cls, code)
    assert info.value.provider == "alphavantage"


def test_the_daily_limit_waits_for_the_reset_not_an_hour() -> None:
    # RECEIVED is 18:00 UTC on Friday 2024-05-10 (14:00 in New York, EDT).
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body({"Information": DAILY}), "IBM", RECEIVED)
    assert info.value.retry_after == 6 * 3600  # midnight UTC comes before midnight New York
    new_york = parse_daily_resets("00:00 America/New_York")
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body({"Information": DAILY}), "IBM", RECEIVED, daily_resets=new_york)
    assert info.value.retry_after == 10 * 3600
    # In winter New York is UTC-5: 23:30 UTC on 2024-01-15 is 18:30 there.
    winter = datetime(2024, 1, 15, 23, 30, tzinfo=UTC)
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body({"Information": DAILY}), "IBM", winter, daily_resets=new_york)
    assert info.value.retry_after == 5.5 * 3600


def test_a_per_second_burst_pauses_a_second_though_it_mentions_the_daily_limit() -> None:
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body({"Information": BURST}), "IBM", RECEIVED)
    assert (info.value.code, info.value.retry_after) == ("burst", 1.0)
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body({"Note": NOTE}), "IBM", RECEIVED)  # per minute (and per day)
    assert (info.value.code, info.value.retry_after) == ("frequency", None)


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.sampled_from(
        ["00:00 UTC", "00:00 America/New_York", "03:30 Asia/Kolkata", "02:30 Europe/Berlin"]
    ),
)
def test_the_reset_is_the_next_wall_clock_occurrence(now: datetime, spec: str) -> None:
    [reset] = parse_daily_resets(spec)
    wait = seconds_until_reset(now, [reset])
    at = (now + timedelta(seconds=wait)).astimezone(reset.zone)
    assert 0 < wait <= 25 * 3600  # a day, one DST hour longer at most
    # The moment reached is the reset time (a time skipped by DST moves to the first
    # wall time after the gap), and no earlier moment was one.
    if at.replace(tzinfo=None).time() != reset.at:
        assert at.dst() != (at - timedelta(hours=1)).dst()


def test_daily_reset_settings_are_checked() -> None:
    assert [r.render() for r in parse_daily_resets("00:00 UTC, 19:00 America/New_York")] == [
        "00:00 UTC",
        "19:00 America/New_York",
    ]
    for bad in ("", "25:00 UTC", "00:00 Mars/Olympus", "midnight"):
        with pytest.raises(ValueError, match="reset"):
            parse_daily_resets(bad)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"05. price": "0.0000"}, "zero"),
        ({"05. price": "-1.0000"}, "zero"),
        ({"05. price": "n/a"}, "bad_number"),
        ({"05. price": None}, "missing_field"),
        ({"01. symbol": "MSFT"}, "symbol_mismatch"),
        ({"07. latest trading day": "yesterday"}, "bad_time"),
        ({"06. volume": "-5"}, "bad_number"),
    ],
)
def test_suspicious_quotes_never_become_ticks(change: dict[str, object], code: str) -> None:
    quote = {**IBM["Global Quote"], **change}
    with pytest.raises(ProviderError) as info:
        parse_global_quote(body({"Global Quote": quote}), "IBM", RECEIVED)
    assert info.value.error_class is ErrorClass.MALFORMED
    assert info.value.code == code


def test_html_and_truncated_bodies() -> None:
    for raw, code in (
        (b"<html><body>Bad Gateway</body></html>", "html"),
        (body(IBM)[:-20], "bad_json"),
    ):
        with pytest.raises(ProviderError) as info:
            parse_global_quote(raw, "IBM", RECEIVED)
        assert info.value.code == code


INTRADAY = {
    "Meta Data": {
        "1. Information": "Intraday (5min) open, high, low, close prices and volume",
        "2. Symbol": "IBM",
        "3. Last Refreshed": "2024-03-11 09:35:00",
        "4. Interval": "5min",
        "5. Output Size": "Compact",
        "6. Time Zone": "US/Eastern",
    },
    "Time Series (5min)": {
        "2024-03-11 09:35:00": {
            "1. open": "191.0",
            "2. high": "191.5",
            "3. low": "190.9",
            "4. close": "191.2500",
            "5. volume": "1200",
        },
        "2024-03-08 15:55:00": {
            "1. open": "195.0",
            "2. high": "195.1",
            "3. low": "194.9",
            "4. close": "195.0500",
            "5. volume": "3400",
        },
    },
}


def test_intraday_times_are_eastern_and_dst_correct() -> None:
    ticks = parse_intraday(body(INTRADAY), "IBM", "5min", datetime(2024, 3, 12, tzinfo=UTC))
    # Friday 8 March is still standard time (UTC-5); Monday 11 March daylight time (UTC-4).
    assert [t.ts for t in ticks] == [
        datetime(2024, 3, 8, 21, 0, tzinfo=UTC),
        datetime(2024, 3, 11, 13, 40, tzinfo=UTC),
    ]
    assert [t.price for t in ticks] == [Decimal("195.05"), Decimal("191.25")]
    assert ticks[0].tick_id != ticks[1].tick_id


def test_intraday_errors() -> None:
    with pytest.raises(ProviderError) as info:
        parse_intraday(
            body({"Error Message": "Invalid API call. Please retry."}), "XX", "5min", RECEIVED
        )
    assert info.value.error_class is ErrorClass.UNKNOWN_SYMBOL
    bad = json.loads(json.dumps(INTRADAY))
    bad["Time Series (5min)"]["2024-03-10 02:30:00"] = {"4. close": "1"}
    with pytest.raises(ProviderError, match="does not exist"):
        parse_intraday(body(bad), "IBM", "5min", RECEIVED)
    with pytest.raises(ProviderError, match="no 'Time Series"):
        parse_intraday(body(INTRADAY), "IBM", "1min", RECEIVED)


@pytest.fixture
def market() -> FakeMarket:
    return FakeMarket(["AAPL", "MSFT"], step=0.1)


async def test_connector_polls_each_symbol_and_reports_unknown_ones(market: FakeMarket) -> None:
    fake = FakeAlphaVantage(market)
    async with serve(fake) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, fake.api_key)
        try:
            result = await conn.fetch(["AAPL", "MSFT", "NOPE"])
        finally:
            await conn.aclose()
    assert result.error is None
    assert result.served == {"AAPL", "MSFT"}
    assert result.unknown == {"NOPE"}
    assert fake.calls["GLOBAL_QUOTE"] == 3
    for tick in result.ticks:
        assert market.step_of(tick.symbol, tick.price, tick.size) is not None


async def test_one_invalid_symbol_is_parked_and_the_others_are_still_asked(
    market: FakeMarket,
) -> None:
    fake = FakeAlphaVantage(market)
    fake.invalid_symbols.add("AAPL")
    async with serve(fake) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, fake.api_key)
        try:
            result = await conn.fetch(["AAPL", "MSFT"])
        finally:
            await conn.aclose()
    assert result.error is None
    assert result.served == {"MSFT"}
    assert result.unknown == {"AAPL"}
    assert fake.calls["GLOBAL_QUOTE"] == 2


@pytest.mark.parametrize(
    ("mode", "cls"),
    [
        ("note", ErrorClass.THROTTLED),
        ("burst", ErrorClass.THROTTLED),
        ("information", ErrorClass.THROTTLED),
        ("premium", ErrorClass.PERMANENT),
        ("html", ErrorClass.MALFORMED),
        ("error500", ErrorClass.TRANSIENT),
    ],
)
async def test_connector_stops_at_a_provider_level_error(
    market: FakeMarket, mode: str, cls: ErrorClass
) -> None:
    fake = FakeAlphaVantage(market)
    fake.mode = mode
    async with serve(fake) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, fake.api_key)
        try:
            result = await conn.fetch(["AAPL", "MSFT"])
        finally:
            await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is cls
    assert not result.ticks
    assert fake.calls["GLOBAL_QUOTE"] == 1  # no point asking again in the same cycle


@pytest.mark.parametrize("mode", ["zero", "truncated"])
async def test_connector_files_bad_quotes_per_symbol(market: FakeMarket, mode: str) -> None:
    fake = FakeAlphaVantage(market)
    fake.mode = mode
    async with serve(fake) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, fake.api_key)
        try:
            result = await conn.fetch(["AAPL", "MSFT"])
        finally:
            await conn.aclose()
    assert not result.ticks
    assert set(result.symbol_errors) == {"AAPL", "MSFT"}
    assert all(e.error_class is ErrorClass.MALFORMED for e in result.symbol_errors.values())


async def test_wrong_key_is_auth_and_never_shown(market: FakeMarket) -> None:
    fake = FakeAlphaVantage(market)
    async with serve(fake) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, "WRONG-SECRET-KEY")
        try:
            result = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is ErrorClass.AUTH
    assert "WRONG-SECRET-KEY" not in str(result.error)


async def test_no_key_is_an_auth_error_without_a_request(market: FakeMarket) -> None:
    conn = AlphaVantageConnector(gate("alphavantage"), options(), "http://127.0.0.1:9", None)
    try:
        result = await conn.fetch(["AAPL"])
    finally:
        await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is ErrorClass.AUTH
    assert conn.configuration_problem() is not None


async def test_rate_limit_tokens_are_spent_per_request(market: FakeMarket) -> None:
    fake = FakeAlphaVantage(market)
    async with serve(fake) as url:
        conn = AlphaVantageConnector(
            gate("alphavantage", "1/min"), options(max_wait=0.01), url, fake.api_key
        )
        try:
            result = await conn.fetch(["AAPL", "MSFT"])
        finally:
            await conn.aclose()
    assert result.served == {"AAPL"}
    assert result.error is not None
    assert result.error.code == "local_rate_limit"
    assert fake.calls["GLOBAL_QUOTE"] == 1


async def test_unreachable_provider_is_transient() -> None:
    conn = AlphaVantageConnector(
        gate("alphavantage"), options(timeout=0.5), "http://127.0.0.1:9", "k"
    )
    try:
        result = await conn.fetch(["AAPL"])
    finally:
        await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is ErrorClass.TRANSIENT


async def test_backfill_from_intraday_bars(market: FakeMarket) -> None:
    fake = FakeAlphaVantage(market)
    async with serve(fake) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, fake.api_key)
        try:
            end = datetime.now(UTC)
            ticks = await conn.backfill("AAPL", end - timedelta(minutes=10), end)
            with pytest.raises(ProviderError) as info:
                await conn.backfill("NOPE", end - timedelta(minutes=10), end)
        finally:
            await conn.aclose()
    assert 8 <= len(ticks) <= 10
    assert all(end - timedelta(minutes=10) < t.ts < end for t in ticks)
    assert ticks == sorted(ticks, key=lambda t: t.ts)
    assert info.value.error_class is ErrorClass.UNKNOWN_SYMBOL
