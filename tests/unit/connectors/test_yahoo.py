"""Yahoo Finance: v7/v8 bodies through the parsers; cookie, crumb and throttling against the fake."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from finstream.connectors.yahoo import (
    YahooConnector,
    check_crumb,
    finance_error,
    parse_chart,
    parse_quote_response,
)
from finstream.domain.resilience import ErrorClass, ProviderError
from tests.fakes.marketdata.helpers import RECEIVED, gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import serve
from tests.fakes.marketdata.yahoo import INVALID_CRUMB, FakeYahoo

AAPL = {
    "symbol": "AAPL",
    "currency": "USD",
    "marketState": "REGULAR",
    "shortName": "Apple Inc.",
    "regularMarketPrice": 183.05,
    "regularMarketChange": 0.65,
    "regularMarketChangePercent": 0.356,
    "regularMarketTime": 1715371201,
    "regularMarketDayHigh": 184.9,
    "regularMarketDayLow": 182.73,
    "regularMarketVolume": 50759496,
    "regularMarketPreviousClose": 182.4,
    "bid": 182.91,
    "ask": 0,
}


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def quote_body(*items: dict[str, object]) -> bytes:
    return body({"quoteResponse": {"result": list(items), "error": None}})


def test_quote_response_becomes_quote_ticks() -> None:
    ticks, errors, unknown = parse_quote_response(quote_body(AAPL), ["AAPL", "ZZZZ"], RECEIVED)
    tick = ticks["AAPL"]
    assert tick.price == Decimal("183.05")  # from the JSON text, never through a float
    assert tick.ts == datetime.fromtimestamp(1715371201, UTC)
    assert tick.size == Decimal(50759496)
    assert tick.bid == Decimal("182.91")
    assert tick.ask is None  # Yahoo's 0 means "no ask"
    assert tick.currency == "USD"
    assert errors == {}
    assert unknown == {"ZZZZ"}  # Yahoo silently leaves unknown symbols out


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"regularMarketPrice": 0}, "zero"),
        ({"regularMarketPrice": None}, "missing_field"),
        ({"regularMarketTime": 0}, "bad_time"),
        ({"regularMarketTime": 1715371201000}, "bad_time"),
        ({"regularMarketVolume": -1}, "bad_number"),
    ],
)
def test_a_bad_entry_is_an_error_for_that_symbol_only(change: dict[str, object], code: str) -> None:
    msft = {**AAPL, "symbol": "MSFT"}
    ticks, errors, unknown = parse_quote_response(
        quote_body({**AAPL, **change}, msft), ["AAPL", "MSFT"], RECEIVED
    )
    assert set(ticks) == {"MSFT"}
    assert errors["AAPL"].code == code
    assert unknown == set()


@pytest.mark.parametrize(
    ("raw", "cls"),
    [
        (
            body(
                {
                    "quoteResponse": {
                        "result": None,
                        "error": {"code": "Bad Request", "description": "Missing value"},
                    }
                }
            ),
            ErrorClass.PERMANENT,
        ),
        (
            body(
                {
                    "finance": {
                        "result": None,
                        "error": {"code": "Unauthorized", "description": "Invalid Crumb"},
                    }
                }
            ),
            ErrorClass.MALFORMED,
        ),
        (b"<!doctype html><html></html>", ErrorClass.MALFORMED),
        (quote_body(AAPL)[:-9], ErrorClass.MALFORMED),
        (body({"quoteResponse": {"result": "AAPL"}}), ErrorClass.MALFORMED),
        (body({"quoteResponse": {"result": [42]}}), ErrorClass.MALFORMED),
    ],
)
def test_bodies_without_the_documented_shape(raw: bytes, cls: ErrorClass) -> None:
    with pytest.raises(ProviderError) as info:
        parse_quote_response(raw, ["AAPL"], RECEIVED)
    assert info.value.error_class is cls


def test_finance_error_description() -> None:
    assert finance_error(body(INVALID_CRUMB)) == "Unauthorized: Invalid Crumb"
    assert finance_error(b"Too Many Requests") is None


def test_crumbs_that_are_not_crumbs() -> None:
    assert check_crumb(b"Phb0wzVdPs6\n") == "Phb0wzVdPs6"
    for raw in (b"<html>", b"", b"x" * 200):
        with pytest.raises(ProviderError) as info:
            check_crumb(raw)
        assert info.value.code == "bad_crumb"


def test_a_throttle_page_where_the_crumb_should_be_is_throttling() -> None:
    for raw in (
        b"Too Many Requests",
        b"Edge: Too Many Requests\r\n",
        b"<html><body><h1>429 Too Many Requests</h1></body></html>",
    ):
        with pytest.raises(ProviderError) as info:
            check_crumb(raw, retry_after=5.0)
        assert (info.value.error_class, info.value.code) == (
            ErrorClass.THROTTLED,
            "crumb_throttled",
        )
        assert info.value.retry_after == 5.0


CHART = {
    "chart": {
        "result": [
            {
                "meta": {"currency": "USD", "symbol": "AAPL", "dataGranularity": "1m"},
                "timestamp": [1715347800, 1715347860, 1715347920],
                "indicators": {
                    "quote": [{"close": [183.1, None, 183.2], "volume": [1000, 0, 900]}]
                },
            }
        ],
        "error": None,
    }
}


def test_chart_bars_skip_nulls_and_end_their_minute() -> None:
    ticks = parse_chart(body(CHART), "AAPL", datetime(2024, 5, 11, tzinfo=UTC))
    assert [t.ts for t in ticks] == [
        datetime.fromtimestamp(1715347860, UTC),
        datetime.fromtimestamp(1715347980, UTC),
    ]
    assert [t.price for t in ticks] == [Decimal("183.1"), Decimal("183.2")]


def test_chart_errors() -> None:
    not_found = {
        "chart": {
            "result": None,
            "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"},
        }
    }
    with pytest.raises(ProviderError) as info:
        parse_chart(body(not_found), "XX", RECEIVED)
    assert info.value.error_class is ErrorClass.UNKNOWN_SYMBOL
    uneven = json.loads(json.dumps(CHART))
    uneven["chart"]["result"][0]["indicators"]["quote"][0]["close"] = [1.0]
    with pytest.raises(ProviderError, match="timestamps"):
        parse_chart(body(uneven), "AAPL", RECEIVED)


@pytest.fixture
def market() -> FakeMarket:
    return FakeMarket(["AAPL", "MSFT"], step=0.1)


def connector(url: str) -> YahooConnector:
    return YahooConnector(gate("yahoo"), options(), url, f"{url}/fc")


async def test_cookie_then_crumb_then_one_request_for_all_symbols(market: FakeMarket) -> None:
    fake = FakeYahoo(market)
    async with serve(fake) as url:
        conn = connector(url)
        try:
            result = await conn.fetch(["AAPL", "MSFT", "NOPE"])
            again = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.error is None
    assert result.served == {"AAPL", "MSFT"}
    assert result.unknown == {"NOPE"}
    assert again.served == {"AAPL"}
    assert (fake.calls["fc"], fake.calls["getcrumb"], fake.calls["quote"]) == (1, 1, 2)


async def test_a_stale_crumb_is_renewed_once(market: FakeMarket) -> None:
    fake = FakeYahoo(market)
    async with serve(fake) as url:
        conn = connector(url)
        try:
            await conn.fetch(["AAPL"])
            fake.expire_crumb()
            result = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.served == {"AAPL"}
    assert conn.sessions == 2
    assert fake.calls["quote"] == 3  # ok, 401, ok


async def test_a_crumb_that_keeps_failing_is_an_auth_error(market: FakeMarket) -> None:
    fake = FakeYahoo(market)
    async with serve(fake) as url:
        conn = connector(url)
        try:
            await conn.fetch(["AAPL"])

            async def rotate_every_time() -> None:
                await original()
                fake.expire_crumb()

            original = conn.new_session
            conn.new_session = rotate_every_time  # type: ignore[method-assign]
            fake.expire_crumb()
            result = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is ErrorClass.AUTH
    assert "Invalid Crumb" in str(result.error)


@pytest.mark.parametrize(
    ("mode", "cls", "code"),
    [
        ("throttle", ErrorClass.THROTTLED, None),
        ("crumb_throttled", ErrorClass.THROTTLED, "crumb_throttled"),
        ("html", ErrorClass.MALFORMED, "html"),
        ("truncated", ErrorClass.MALFORMED, "bad_json"),
        ("quote_error", ErrorClass.PERMANENT, "quote_error"),
        ("error500", ErrorClass.TRANSIENT, None),
    ],
)
async def test_provider_level_failures(
    market: FakeMarket, mode: str, cls: ErrorClass, code: str | None
) -> None:
    fake = FakeYahoo(market)
    fake.mode = mode
    async with serve(fake) as url:
        conn = connector(url)
        try:
            result = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is cls
    if code:
        assert result.error.code == code
    assert not result.ticks


@pytest.mark.parametrize("answer", ["alone", "any", "unnamed"])
async def test_a_delisted_symbols_404_parks_it_and_the_others_are_served(
    market: FakeMarket, answer: str
) -> None:
    fake = FakeYahoo(market)
    fake.delisted.add("GONE")
    fake.delisted_404 = answer
    async with serve(fake) as url:
        conn = connector(url)
        try:
            alone = await conn.fetch(["GONE"])
            mixed = await conn.fetch(["AAPL", "GONE", "MSFT"])
        finally:
            await conn.aclose()
    assert (alone.error, alone.unknown, alone.served) == (None, {"GONE"}, set())
    assert (mixed.error, mixed.unknown, mixed.served) == (None, {"GONE"}, {"AAPL", "MSFT"})
    # A 404 that names the symbol costs one more request; one that does not, one per symbol.
    assert fake.calls["quote"] == {"alone": 2, "any": 3, "unnamed": 5}[answer]


async def test_a_404_that_is_not_about_symbols_stays_a_provider_error(
    market: FakeMarket,
) -> None:
    fake = FakeYahoo(market)
    async with serve(fake) as url:
        conn = YahooConnector(gate("yahoo"), options(), f"{url}/wrong", f"{url}/fc")
        try:
            result = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is ErrorClass.PERMANENT


async def test_429_retry_after_is_passed_on(market: FakeMarket) -> None:
    fake = FakeYahoo(market)
    async with serve(fake) as url:
        conn = connector(url)
        try:
            await conn.fetch(["AAPL"])
            fake.mode, fake.retry_after = "throttle", "7"
            result = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert result.error is not None
    assert result.error.retry_after == 7.0
    assert conn.crumb is not None  # throttling is not a reason to drop the session


async def test_backfill_from_the_chart(market: FakeMarket) -> None:
    fake = FakeYahoo(market)
    async with serve(fake) as url:
        conn = connector(url)
        try:
            end = datetime.now(UTC)
            ticks = await conn.backfill("AAPL", end - timedelta(minutes=20), end)
            with pytest.raises(ProviderError) as info:
                await conn.backfill("NOPE", end - timedelta(minutes=20), end)
        finally:
            await conn.aclose()
    assert 15 <= len(ticks) <= 20
    assert info.value.error_class is ErrorClass.UNKNOWN_SYMBOL
