"""IEX Cloud: retired on 2024-08-31. Legacy parser, disabled by default, failing clearly."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from finstream.connectors.iex import RETIRED, IexConnector, parse_legacy_quote
from finstream.domain.resilience import ErrorClass, ProviderError
from tests.fakes.marketdata.helpers import RECEIVED, gate, options
from tests.fakes.marketdata.iex import FakeIex
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import serve

LEGACY = {
    "symbol": "AAPL",
    "calculationPrice": "tops",
    "latestPrice": 183.05,
    "latestTime": "3:59:59 PM",
    "latestUpdate": 1715371199000,
    "latestVolume": 50759496,
    "iexBidPrice": 0,
    "iexAskPrice": 183.1,
    "previousClose": 182.4,
    "change": 0.65,
    "changePercent": 0.00356,
}


def test_legacy_format() -> None:
    tick = parse_legacy_quote(json.dumps(LEGACY), "AAPL", RECEIVED)
    assert tick.price == Decimal("183.05")
    assert tick.ts == datetime.fromtimestamp(1715371199, UTC)
    assert tick.bid is None  # 0 meant no IEX bid
    assert tick.ask == Decimal("183.1")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"latestPrice": 0}, "zero"),
        ({"latestUpdate": None}, "missing_field"),
        ({"symbol": "MSFT"}, "symbol_mismatch"),
    ],
)
def test_legacy_odd_bodies(change: dict[str, object], code: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_legacy_quote(json.dumps({**LEGACY, **change}), "AAPL", RECEIVED)
    assert info.value.code == code


async def test_disabled_by_default_and_says_why() -> None:
    conn = IexConnector(gate("iex"), options(), "https://cloud.iexapis.com", "t")
    try:
        result = await conn.fetch(["AAPL"])
    finally:
        await conn.aclose()
    assert result.error is not None
    assert result.error.error_class is ErrorClass.PERMANENT
    assert RETIRED in str(result.error)
    assert RETIRED in (conn.configuration_problem() or "")


async def test_enabled_against_nothing_reports_retirement() -> None:
    conn = IexConnector(gate("iex"), options(timeout=0.5), "http://127.0.0.1:9", "t", enabled=True)
    try:
        result = await conn.fetch(["AAPL"])
    finally:
        await conn.aclose()
    assert result.error is not None
    assert result.error.code == "retired"
    assert RETIRED in str(result.error)


async def test_enabled_against_a_legacy_mirror() -> None:
    market = FakeMarket(["AAPL"])
    fake = FakeIex(market)
    async with serve(fake) as url:
        conn = IexConnector(gate("iex"), options(), url, fake.token, enabled=True)
        try:
            ok = await conn.fetch(["AAPL", "NOPE"])
            fake.mode = "gone"
            gone = await conn.fetch(["AAPL"])
        finally:
            await conn.aclose()
    assert ok.served == {"AAPL"}
    assert ok.unknown == {"NOPE"}
    assert gone.error is not None
    assert RETIRED in str(gone.error)
