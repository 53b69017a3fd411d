"""Finnhub: REST quotes and the WebSocket trade stream, on recorded bodies and against the fake."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from finstream.connectors.finnhub import (
    FinnhubConnector,
    FinnhubStreamConnector,
    parse_quote,
    parse_ws_message,
)
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import CircuitState, ErrorClass, ProviderError
from tests.fakes.marketdata.finnhub import FakeFinnhub
from tests.fakes.marketdata.helpers import RECEIVED, gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import serve
from tests.support.waiting import until

QUOTE = (
    b'{"c":183.05,"d":0.65,"dp":0.3564,"h":184.9,"l":182.73,"o":184.9,"pc":182.4,"t":1715371201}'
)


def test_quote_body() -> None:
    tick = parse_quote(QUOTE, "AAPL", RECEIVED)
    assert tick.price == Decimal("183.05")
    assert tick.prev_close == Decimal("182.4")
    assert tick.ts == datetime.fromtimestamp(1715371201, UTC)
    assert tick.kind == "QUOTE"


@pytest.mark.parametrize(
    ("raw", "cls", "code"),
    [
        (
            b'{"c":0,"d":null,"dp":null,"h":0,"l":0,"o":0,"pc":0,"t":0}',
            ErrorClass.MALFORMED,
            "zero_filled",
        ),
        (b'{"c":0,"h":0,"l":0,"o":0,"pc":0,"t":1715371201}', ErrorClass.MALFORMED, "zero"),
        (b'{"c":183.05,"pc":182.4,"t":0}', ErrorClass.MALFORMED, "bad_time"),
        (
            b'{"error":"API limit reached. Please try again later. Remaining Limit: 0"}',
            ErrorClass.THROTTLED,
            "error_body",
        ),
        (b'{"error":"Invalid API key"}', ErrorClass.AUTH, "error_body"),
        (
            b'{"error":"You don\'t have access to this resource."}',
            ErrorClass.UNKNOWN_SYMBOL,
            "no_access",
        ),
        (b"<html>", ErrorClass.MALFORMED, "html"),
        (b'{"c":183.05,"t":17153', ErrorClass.MALFORMED, "bad_json"),
    ],
)
def test_odd_quote_bodies(raw: bytes, cls: ErrorClass, code: str) -> None:
    with pytest.raises(ProviderError) as info:
        parse_quote(raw, "AAPL", RECEIVED)
    assert (info.value.error_class, info.value.code) == (cls, code)


def test_ws_trades_ping_and_errors() -> None:
    ticks, errors = parse_ws_message(
        '{"type":"trade","data":[{"s":"AAPL","p":183.05,"t":1715371201123,"v":100,"c":["1"]},'
        '{"s":"BINANCE:BTCUSDT","p":61000.5,"t":1715371201124,"v":0.0012}]}',
        RECEIVED,
    )
    assert errors == []
    assert [t.symbol for t in ticks] == ["AAPL", "BINANCE:BTCUSDT"]
    assert ticks[0].kind == "TRADE"
    assert ticks[0].ts == datetime(2024, 5, 10, 20, 0, 1, 123000, tzinfo=UTC)
    assert ticks[1].size == Decimal("0.0012")
    assert parse_ws_message('{"type":"ping"}', RECEIVED) == ([], [])
    _, errors = parse_ws_message(
        '{"type":"error","msg":"Subscribing to too many symbols"}', RECEIVED
    )
    assert errors[0].error_class is ErrorClass.PERMANENT
    with pytest.raises(ProviderError) as info:
        parse_ws_message('{"type":"error","msg":"Invalid token"}', RECEIVED)
    assert info.value.error_class is ErrorClass.AUTH


def test_a_bad_trade_does_not_take_the_good_ones_down() -> None:
    ticks, errors = parse_ws_message(
        '{"type":"trade","data":[{"s":"AAPL","p":0,"t":1715371201123},{"s":"AAPL","p":1.5,"t":1715371201123,"v":1},{"p":1}]}',
        RECEIVED,
    )
    assert len(ticks) == 1
    assert [e.code for e in errors] == ["zero", "missing_field"]


@pytest.fixture
def market() -> FakeMarket:
    return FakeMarket(["AAPL", "MSFT"], step=0.1)


async def test_rest_against_the_fake(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    async with serve(fake) as url:
        conn = FinnhubConnector(gate("finnhub"), options(), url, fake.token)
        try:
            ok = await conn.fetch(["AAPL", "NOPE"])
            fake.mode = "throttle"
            throttled = await conn.fetch(["AAPL"])
            fake.mode = "ok"
            bad = FinnhubConnector(gate("finnhub"), options(), url, "wrong-token-value")
            denied = await bad.fetch(["AAPL"])
            await bad.aclose()
        finally:
            await conn.aclose()
    assert ok.served == {"AAPL"}
    assert ok.symbol_errors["NOPE"].code == "zero_filled"
    assert throttled.error is not None
    assert throttled.error.error_class is ErrorClass.THROTTLED
    assert throttled.error.retry_after is not None
    assert 0 <= throttled.error.retry_after <= 2  # from X-Ratelimit-Reset
    assert denied.error is not None
    assert denied.error.error_class is ErrorClass.AUTH
    assert "wrong-token-value" not in str(denied.error)


async def _stream(
    conn: FinnhubStreamConnector,
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


def ws_connector(url: str, token: str, **kw: object) -> FinnhubStreamConnector:
    return FinnhubStreamConnector(
        gate("finnhub-ws"), options(**kw), url.replace("http", "ws") + "/ws", token
    )


async def test_stream_subscribes_and_answers_protocol_pings(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    async with serve(fake) as url:
        conn = ws_connector(url, fake.token)
        got = await _stream(
            conn, {"AAPL"}, lambda got: fake.pongs_seen >= 3 and len(got) >= 3, "pongs and trades"
        )
    assert fake.subscriptions[0] == {"AAPL"}
    assert {t.symbol for t in got} == {"AAPL"}


async def test_stream_follows_the_wanted_symbols(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    async with serve(fake) as url:
        conn = ws_connector(url, fake.token)
        got: list[Tick] = []

        async def emit(_: str, tick: Tick) -> None:
            got.append(tick)

        stop = asyncio.Event()
        conn.set_symbols({"AAPL"})
        task = asyncio.create_task(conn.run(emit, stop))
        await until(lambda: conn.healthy(time.monotonic()), "healthy")
        conn.set_symbols({"MSFT"})
        await until(lambda: fake.subscriptions[-1] == {"MSFT"}, "resubscribed")
        conn.set_symbols(set())
        await until(lambda: not conn.healthy(time.monotonic()), "released")
        stop.set()
        await asyncio.wait_for(task, 10)
    # Re-subscribed in place: no reconnection was needed for it (only a machine stalled
    # past the silence timeout could have caused one).
    assert set(conn.disconnects) <= {"silent"}


async def test_resent_trades_carry_the_same_id(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    fake.ws_mode = "resend"
    async with serve(fake) as url:
        got = await _stream(
            ws_connector(url, fake.token),
            {"AAPL"},
            lambda got: len({t.tick_id for t in got}) >= 3,
            "three trades",
        )
    ids = [t.tick_id for t in got]
    counts = Counter(ids)
    # Every trade came twice with the same id (the stop may cut the last pair).
    assert all(n == 2 for tid, n in counts.items() if tid != ids[-1])


async def test_a_silent_connection_is_detected_and_replaced(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    fake.ws_mode = "silent"
    async with serve(fake) as url:
        conn = ws_connector(url, fake.token, silence_timeout=0.3)
        got: list[Tick] = []

        async def emit(_: str, tick: Tick) -> None:
            got.append(tick)

        stop = asyncio.Event()
        conn.set_symbols({"AAPL"})
        task = asyncio.create_task(conn.run(emit, stop))
        await until(lambda: conn.disconnects["silent"] >= 1, "the silence noticed")
        fake.ws_mode = "ok"  # the next connection is a good one
        await until(lambda: got, "trades on a new connection")
        stop.set()
        await asyncio.wait_for(task, 10)
    assert fake.connections >= 2


async def test_dropped_connections_reconnect_and_resubscribe(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    fake.ws_mode = "drop"
    fake.drop_after = 2
    async with serve(fake) as url:
        got = await _stream(
            ws_connector(url, fake.token),
            {"AAPL", "MSFT"},
            lambda got: (
                len(fake.subscriptions) >= 3
                and all(s == {"AAPL", "MSFT"} for s in fake.subscriptions[:3])
                and {t.symbol for t in got} == {"AAPL", "MSFT"}
            ),
            "three connections, each resubscribed",
        )
    # (A fourth connection may have been opening when the test stopped.)
    assert all(s == {"AAPL", "MSFT"} for s in fake.subscriptions[:3])
    assert {t.symbol for t in got} == {"AAPL", "MSFT"}


async def test_garbage_messages_are_counted_not_fatal(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    fake.ws_mode = "garbage"
    async with serve(fake) as url:
        conn = ws_connector(url, fake.token)
        got = await _stream(conn, {"AAPL"}, lambda got: len(got) >= 3, "good trades")
    assert set(conn.disconnects) <= {"silent"}  # never dropped for what it said
    assert all(t.price > 0 for t in got)


async def test_a_bad_token_is_refused_at_the_handshake_and_opens_the_circuit(
    market: FakeMarket,
) -> None:
    fake = FakeFinnhub(market)
    async with serve(fake) as url:
        conn = ws_connector(url, "bad-token-123456")
        await _stream(
            conn,
            {"AAPL"},
            lambda _: conn.gate.circuit(time.monotonic()) is CircuitState.OPEN,
            "the circuit open",
        )
    assert conn.last_error is not None
    assert conn.last_error.error_class is ErrorClass.AUTH
    assert "bad-token-123456" not in str(conn.last_error)
    assert fake.connections == 0


async def test_stream_check_for_providers_check(market: FakeMarket) -> None:
    fake = FakeFinnhub(market)
    async with serve(fake) as url:
        line = await ws_connector(url, fake.token).check("AAPL")
    assert line.startswith("ok: connected and subscribed to AAPL")


def test_subscription_messages() -> None:
    conn = FinnhubStreamConnector(gate("finnhub-ws"), options(), "wss://ws.finnhub.io", "k")
    assert [json.loads(m) for m in conn.subscribe_messages(["AAPL"])] == [
        {"type": "subscribe", "symbol": "AAPL"}
    ]
    assert conn.connect_url() == "wss://ws.finnhub.io?token=k"
