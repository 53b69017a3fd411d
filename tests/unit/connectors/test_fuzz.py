"""Every parser, fed documented shapes with arbitrary values: a valid tick or a
classified ProviderError, never a crash and never garbage as a price."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finstream.connectors.alphavantage import parse_global_quote, parse_intraday
from finstream.connectors.file_feed import row_to_tick
from finstream.connectors.finnhub import parse_quote, parse_ws_message
from finstream.connectors.iex import parse_legacy_quote
from finstream.connectors.polygon import parse_message
from finstream.connectors.yahoo import parse_chart, parse_quote_response
from finstream.domain.marketdata.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.resilience import ProviderError
from tests.fakes.marketdata.helpers import RECEIVED

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "0",
            "0.0000",
            "-1",
            "183.05",
            "1715371201",
            "2024-05-10",
            "2024-03-10 02:30:00",
            "AAPL",
            "",
        ]
    )
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def fill(template: dict[str, Any], draw: Callable[[st.SearchStrategy[Any]], Any]) -> dict[str, Any]:
    """The template with some of its values replaced by arbitrary ones, some keys dropped."""
    out: dict[str, Any] = {}
    for key, value in template.items():
        choice = draw(st.integers(0, 3))
        if choice == 0:
            continue
        out[key] = draw(values) if choice == 1 else value
    return out


def check(parse: Callable[[], Any]) -> None:
    try:
        result = parse()
    except ProviderError:
        return
    for tick in _ticks(result):
        assert isinstance(tick.price, Decimal)
        assert tick.price > 0
        assert tick.ts.tzinfo is not None
        try:
            validate_tick(tick, RECEIVED + timedelta(days=36500), timedelta(0))
        except TickValidationError as exc:  # pragma: no cover - the assertion message
            raise AssertionError(
                f"a tick that fails validation escaped the parser: {exc}"
            ) from None


def _ticks(result: Any) -> list[Tick]:
    if isinstance(result, Tick):
        return [result]
    if isinstance(result, tuple) and isinstance(result[0], dict):
        return list(result[0].values())
    if isinstance(result, tuple):
        return list(result[0])
    return list(result)


AV = {
    "01. symbol": "IBM",
    "05. price": "167.1500",
    "06. volume": "2882337",
    "07. latest trading day": "2024-05-10",
    "08. previous close": "167.3400",
}
YAHOO = {
    "symbol": "AAPL",
    "regularMarketPrice": 183.05,
    "regularMarketTime": 1715371201,
    "regularMarketVolume": 5,
    "bid": 1.0,
    "ask": 0,
    "currency": "USD",
    "regularMarketPreviousClose": 182.4,
}
FINNHUB = {"c": 183.05, "pc": 182.4, "t": 1715371201, "h": 1, "l": 1, "o": 1}
TRADE = {"s": "AAPL", "p": 183.05, "t": 1715371201123, "v": 100}
POLY = {"ev": "T", "sym": "MSFT", "p": 114.125, "s": 100, "t": 1536036818784}
POLY_AM = {"ev": "AM", "sym": "MSFT", "c": 1.5, "v": 10, "s": 1610144640000, "e": 1610144700000}
IEX = {
    "symbol": "AAPL",
    "latestPrice": 183.05,
    "latestUpdate": 1715371199000,
    "latestVolume": 1,
    "iexBidPrice": 0,
    "iexAskPrice": 1,
    "previousClose": 1,
}
ROW = {
    "symbol": "AAPL",
    "ts": "2024-05-10T13:30:00Z",
    "price": "183.05",
    "size": "1",
    "close": "1",
    "bid": "1",
}

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.data())
def test_alphavantage(data: st.DataObject) -> None:
    body = json.dumps({"Global Quote": fill(AV, data.draw)}, default=str)
    check(lambda: parse_global_quote(body, "IBM", RECEIVED))
    bar = fill({"4. close": "1.5", "5. volume": "10"}, data.draw)
    stamp = data.draw(st.sampled_from(["2024-05-10 09:30:00", "2024-03-10 02:30:00", "x"]))
    series = json.dumps(
        {
            "Meta Data": fill({"2. Symbol": "IBM", "6. Time Zone": "US/Eastern"}, data.draw),
            "Time Series (1min)": {stamp: bar},
        },
        default=str,
    )
    check(lambda: parse_intraday(series, "IBM", "1min", RECEIVED))


@fuzz
@given(st.data())
def test_yahoo(data: st.DataObject) -> None:
    body = json.dumps(
        {"quoteResponse": {"result": [fill(YAHOO, data.draw)], "error": None}}, default=str
    )
    check(lambda: parse_quote_response(body, ["AAPL"], RECEIVED))
    quote = fill({"close": [1.5, None], "volume": [1, 2]}, data.draw)
    chart = {
        "chart": {
            "result": [
                {
                    "meta": fill({"symbol": "AAPL", "dataGranularity": "1m"}, data.draw),
                    "timestamp": data.draw(st.sampled_from([[1715347800, 1715347860], [0, 1], []])),
                    "indicators": {"quote": [quote]},
                }
            ],
            "error": None,
        }
    }
    check(lambda: parse_chart(json.dumps(chart, default=str), "AAPL", RECEIVED))


@fuzz
@given(st.data())
def test_finnhub(data: st.DataObject) -> None:
    check(lambda: parse_quote(json.dumps(fill(FINNHUB, data.draw), default=str), "AAPL", RECEIVED))
    message = json.dumps({"type": "trade", "data": [fill(TRADE, data.draw), TRADE]}, default=str)
    check(lambda: parse_ws_message(message, RECEIVED))


@fuzz
@given(st.data())
def test_polygon(data: st.DataObject) -> None:
    message = json.dumps(
        [fill(POLY, data.draw), fill(POLY_AM, data.draw), data.draw(values)], default=str
    )
    check(lambda: parse_message(message, RECEIVED))


@fuzz
@given(st.data())
def test_iex_and_replay(data: st.DataObject) -> None:
    check(
        lambda: parse_legacy_quote(json.dumps(fill(IEX, data.draw), default=str), "AAPL", RECEIVED)
    )
    check(lambda: row_to_tick(fill(ROW, data.draw), RECEIVED))
