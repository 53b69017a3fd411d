"""Polygon.io / Massive WebSocket: event arrays, status handshake, and the fake server."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from finstream.connectors.polygon import PolygonConnector, parse_message
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import CircuitState, ErrorClass, ProviderError
from tests.fakes.marketdata.helpers import RECEIVED, gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.polygon import FakePolygon
from tests.fakes.marketdata.server import serve
from tests.support.waiting import until

TRADE = {
    "ev": "T",
    "sym": "MSFT",
    "x": 4,
    "i": "12345",
    "z": 3,
    "p": 114.125,
    "s": 100,
    "c": [0, 12],
    "t": 1536036818784,
    "q": 3681328,
}
AGG = {
    "ev": "AM",
    "sym": "GTE",
    "v": 4110,
    "av": 9470157,
    "op": 0.4372,
    "vw": 0.4488,
    "o": 0.4488,
    "c": 0.4486,
    "h": 0.4489,
    "l": 0.4486,
    "a": 0.4352,
    "z": 685,
    "s": 1610144640000,
    "e": 1610144700000,
}


def test_trades_and_minute_aggregates() -> None:
    ticks, errors = parse_message(
        json.dumps(
            [TRADE, AGG, {"ev": "status", "status": "success", "message": "subscribed to: T.MSFT"}]
        ),
        RECEIVED,
    )
    assert errors == []
    trade, agg = ticks
    assert (trade.kind, trade.price, trade.size) == ("TRADE", Decimal("114.125"), Decimal(100))
    assert trade.ts == datetime(2018, 9, 4, 4, 53, 38, 784000, tzinfo=UTC)
    assert (agg.kind, agg.price, agg.size) == ("QUOTE", Decimal("0.4486"), Decimal(4110))
    assert agg.ts == datetime.fromtimestamp(1610144700, UTC)  # the bar's end


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        ("auth_failed", ErrorClass.AUTH),
        ("max_connections", ErrorClass.THROTTLED),
        ("error", ErrorClass.PERMANENT),
    ],
)
def test_status_events_that_end_a_session(status: str, cls: ErrorClass) -> None:
    with pytest.raises(ProviderError) as info:
        parse_message(json.dumps([{"ev": "status", "status": status, "message": "..."}]), RECEIVED)
    assert info.value.error_class is cls


def test_bad_events_are_errors_not_ticks() -> None:
    ticks, errors = parse_message(
        json.dumps(
            [
                {**TRADE, "p": 0},
                {**TRADE, "t": 0},
                {"ev": "Q", "sym": "MSFT"},
                {**TRADE, "sym": None},
                TRADE,
            ]
        ),
        RECEIVED,
    )
    assert len(ticks) == 1
    assert [e.code for e in errors] == ["zero", "bad_time", "shape", "missing_field"]
    with pytest.raises(ProviderError) as info:
        parse_message('[{"ev":"T",', RECEIVED)
    assert info.value.error_class is ErrorClass.MALFORMED


@pytest.fixture
def market() -> FakeMarket:
    return FakeMarket(["AAPL", "MSFT"], step=0.1)


async def run_until(
    conn: PolygonConnector,
    symbols: set[str],
    done: Callable[[list[Tick]], object],
    what: str,
) -> list[Tick]:
    """Run the stream until ``done(ticks so far)`` holds."""
    got: list[Tick] = []

    async def emit(_: str, tick: Tick) -> None:
        got.append(tick)

    stop = asyncio.Event()
    conn.set_symbols(symbols)
    task = asyncio.create_task(conn.run(emit, stop))
    try:
        await until(lambda: done(got), what)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return got


def connector(
    url: str, key: str, channels: tuple[str, ...] = ("T",), **kw: object
) -> PolygonConnector:
    return PolygonConnector(
        gate("polygon"), options(**kw), url.replace("http", "ws") + "/stocks", key, channels
    )


async def test_auth_subscribe_and_stream(market: FakeMarket) -> None:
    fake = FakePolygon(market)
    wanted = {("AAPL", "TRADE"), ("MSFT", "TRADE"), ("AAPL", "QUOTE")}
    async with serve(fake) as url:
        conn = connector(url, fake.api_key, ("T", "AM"))
        got = await run_until(
            conn,
            {"AAPL", "MSFT"},
            lambda got: wanted <= {(t.symbol, t.kind) for t in got},
            "trades and a minute bar",
        )
    assert fake.subscribed == {"T.AAPL", "AM.AAPL", "T.MSFT", "AM.MSFT"}
    assert {(t.symbol, t.kind) for t in got} <= wanted | {("MSFT", "QUOTE")}
    assert set(conn.disconnects) <= {"silent"}


async def test_auth_failure_is_not_retried_in_a_tight_loop(market: FakeMarket) -> None:
    fake = FakePolygon(market)
    got: list[Tick] = []

    async def emit(_: str, tick: Tick) -> None:
        got.append(tick)

    async with serve(fake) as url:
        conn = connector(url, "wrong-polygon-key")
        conn.set_symbols({"AAPL"})
        stop = asyncio.Event()
        started = time.monotonic()
        task = asyncio.create_task(conn.run(emit, stop))
        await until(lambda: conn.gate.circuit(time.monotonic()) is CircuitState.OPEN, "open")
        await asyncio.sleep(1.0)  # two cool-downs of 0.5 s: a window to count attempts in
        stop.set()
        await asyncio.wait_for(task, 10)
        elapsed = time.monotonic() - started
    assert got == []
    assert conn.last_error is not None
    assert conn.last_error.error_class is ErrorClass.AUTH
    assert "wrong-polygon-key" not in str(conn.last_error)
    # Three failures open the circuit (threshold 3); after that one probe per 0.5 s
    # cool-down at most: a bound that grows with the time a loaded machine took.
    assert 3 <= fake.auth_attempts <= 3 + int(elapsed / 0.5) + 1


async def test_max_connections_status(market: FakeMarket) -> None:
    fake = FakePolygon(market)
    fake.mode = "max_connections"
    # The connector clears last_error at its next successful handshake, which may
    # come before the test looks again: keep the error seen at a refusal.
    seen: list[ProviderError] = []

    def refused(_: list[Tick]) -> bool:
        if conn.disconnects["max_connections"] >= 1 and conn.last_error is not None:
            seen.append(conn.last_error)
        return bool(seen)

    async with serve(fake) as url:
        conn = connector(url, fake.api_key)
        await run_until(conn, {"AAPL"}, refused, "the refusal")
    assert seen[0].error_class is ErrorClass.THROTTLED


async def test_silent_after_auth_reconnects(market: FakeMarket) -> None:
    fake = FakePolygon(market)
    fake.mode = "silent"
    async with serve(fake) as url:
        conn = connector(url, fake.api_key, silence_timeout=0.2)
        await run_until(
            conn,
            {"AAPL"},
            lambda _: conn.disconnects["silent"] >= 2 and fake.connections >= 2,
            "two silent connections replaced",
        )
    assert not conn.healthy(time.monotonic())


async def test_resent_events_have_the_same_ids(market: FakeMarket) -> None:
    fake = FakePolygon(market)
    fake.mode = "resend"
    async with serve(fake) as url:
        got = await run_until(
            connector(url, fake.api_key),
            {"AAPL"},
            lambda got: len({t.tick_id for t in got}) >= 3,
            "three trades",
        )
    ids = [t.tick_id for t in got]
    counts = Counter(ids)
    # Every event came twice with the same id (the stop may cut the last pair).
    assert all(n == 2 for tid, n in counts.items() if tid != ids[-1])


def test_channels_are_checked() -> None:
    with pytest.raises(ValueError, match="channels"):
        PolygonConnector(gate("polygon"), options(), "ws://x", "k", ("Q",))
