"""Network faults between the market-data chain and the provider fakes, through Toxiproxy.

The primary (Yahoo) is reached through a private Toxiproxy; the secondary
(Alpha Vantage) directly. For each fault -- latency beyond the timeout, a
half-open connection (bytes stop, the socket stays open), a reset, a
bandwidth limit, a trickle of tiny slices, a connection cut mid-answer --
every cycle still serves every symbol (the secondary takes over within the
cycle), no request waits past its deadline, the primary's circuit opens, and
once the network heals the half-open probe closes it and the chain fails
back. The chain's breakers and pauses run on a fake clock; the network
timeouts are real.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finstream.connectors.alphavantage import AlphaVantageConnector
from finstream.connectors.base import Connector
from finstream.connectors.finnhub import FinnhubStreamConnector
from finstream.connectors.publish import TickSink
from finstream.connectors.registry import ChainSpec
from finstream.connectors.runner import ChainRunner
from finstream.connectors.yahoo import YahooConnector
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import CircuitState
from tests.fakes.marketdata.alphavantage import FakeAlphaVantage
from tests.fakes.marketdata.finnhub import FakeFinnhub
from tests.fakes.marketdata.helpers import gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import serve
from tests.fakes.marketdata.yahoo import FakeYahoo
from tests.support.clock import FakeClock
from tests.support.toxiproxy import Toxiproxy
from tests.support.waiting import until

pytestmark = pytest.mark.integration

SYMBOLS = ("AAPL", "MSFT", "IBM", "GOOG", "AMZN", "NVDA")
TIMEOUT = 1.0  # the connectors' request timeout (real seconds)
POLL = 5.0  # fake seconds between cycles
RESET = 30.0  # fake seconds of circuit cool-down
NO_HANG = 30.0  # a cycle that takes this long (real) is a hang


class ListOutput:
    def __init__(self) -> None:
        self.ticks: list[Tick] = []

    async def publish(self, tick: Tick) -> None:
        self.ticks.append(tick)

    async def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def toxiproxy(log_dir: Path) -> Iterator[Toxiproxy]:
    with Toxiproxy(log_dir) as proxy:
        yield proxy


# (toxic, its attributes, the error code the primary's failure is reported with)
FAULTS = [
    pytest.param("latency", {"latency": 3000}, "timeout", id="latency"),
    pytest.param("timeout", {"timeout": 0}, "timeout", id="half-open"),
    pytest.param("reset_peer", {"timeout": 0}, "connect", id="reset"),
    pytest.param("bandwidth", {"rate": 1}, "timeout", id="bandwidth"),
    pytest.param("slicer", {"average_size": 8, "delay": 100_000}, "timeout", id="trickle"),
    pytest.param("limit_data", {"bytes": 200}, "connect", id="cut-mid-answer"),
]


@pytest.mark.parametrize(("kind", "attributes", "code"), FAULTS)
async def test_a_network_fault_to_the_primary_costs_no_cycle_and_heals(
    toxiproxy: Toxiproxy, kind: str, attributes: dict[str, Any], code: str
) -> None:
    clock = FakeClock()
    market = FakeMarket(list(SYMBOLS), step=1, now=clock.wall)
    yahoo, av = FakeYahoo(market), FakeAlphaVantage(market)
    async with serve(yahoo) as y_url, serve(av) as av_url:
        proxy = toxiproxy.proxy(f"yahoo-{kind}", y_url.removeprefix("http://"))
        opts = options(timeout=TIMEOUT, clock=clock, sleep=clock.sleep, wall=clock.utc)
        primary = YahooConnector(
            gate("yahoo", threshold=3, reset=RESET), opts, proxy.url, f"{proxy.url}/fc"
        )
        connectors: dict[str, Connector] = {
            "yahoo": primary,
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage", reset=RESET), opts, av_url, av.api_key
            ),
        }
        out = ListOutput()
        runner = ChainRunner(
            [ChainSpec("faults", SYMBOLS, ("yahoo", "alphavantage"))],
            connectors,
            {name: c.gate for name, c in connectors.items()},
            TickSink(out),
            poll_interval=POLL,
            clock=clock,
        )
        chain = runner.chains[0]
        yahoo_gate = primary.gate

        async def cycle() -> None:
            started = time.monotonic()
            await asyncio.wait_for(runner.run_cycle(chain), NO_HANG)
            clock.advance(POLL)
            assert time.monotonic() - started < NO_HANG

        try:
            await cycle()  # a clean start: cookie, crumb, quotes
            assert chain.active == "yahoo"
            proxy.add(kind, **attributes)
            # What the primary reports under this fault, within its deadline:
            alone = await asyncio.wait_for(primary.fetch(SYMBOLS), NO_HANG)
            assert alone.error is not None
            assert (alone.error.error_class.value, alone.error.code) == ("transient", code)
            errors_before = len(runner.transitions)
            for _ in range(3):
                await cycle()
            assert yahoo_gate.circuit(clock()) is CircuitState.OPEN
            assert [t.kind for t in runner.transitions[errors_before:]] == ["failover"]
            assert sum(av.served.values()) == 3 * len(SYMBOLS)
            proxy.clear()
            clock.advance(RESET)
            await cycle()  # the half-open probe goes through a healed network
            assert yahoo_gate.circuit(clock()) is CircuitState.CLOSED
            assert chain.active == "yahoo"
        finally:
            await runner.close()
            toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert [t.kind for t in runner.transitions] == ["failover", "failback"]
    assert runner.unserved == Counter(), "a cycle left symbols unserved"
    # Each symbol: one tick per cycle (five), never twice.
    counts = Counter(t.symbol for t in out.ticks)
    assert counts == dict.fromkeys(SYMBOLS, 5)


async def test_a_half_open_websocket_is_noticed_and_replaced_when_the_network_heals(
    toxiproxy: Toxiproxy,
) -> None:
    market = FakeMarket(["AAPL"], step=0.05)
    fh = FakeFinnhub(market)
    got: list[Tick] = []

    async def emit(_: str, tick: Tick) -> None:
        got.append(tick)

    async with serve(fh) as url:
        proxy = toxiproxy.proxy("finnhub-ws", url.removeprefix("http://"))
        conn = FinnhubStreamConnector(
            gate("finnhub-ws", threshold=2, reset=1.0),
            options(timeout=1.0, silence_timeout=0.5),
            f"ws://{proxy.listen}/ws",
            fh.token,
        )
        conn.set_symbols({"AAPL"})
        stop = asyncio.Event()
        task = asyncio.create_task(conn.run(emit, stop))
        try:
            await until(lambda: conn.healthy(time.monotonic()) and got, "streaming")
            # Bytes stop in both directions; the sockets stay open.
            proxy.add("timeout", stream="downstream", timeout=0)
            proxy.add("timeout", stream="upstream", timeout=0)
            await until(lambda: conn.disconnects["silent"] >= 1, "the silence noticed")
            await until(
                lambda: conn.gate.circuit(time.monotonic()) is not CircuitState.CLOSED,
                "reconnects failing into an open circuit",
            )
            assert not conn.healthy(time.monotonic())
            proxy.clear()
            before = len(got)
            await until(
                lambda: conn.healthy(time.monotonic()) and len(got) > before,
                "streaming again",
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, NO_HANG)
            toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert conn.gate.circuit(time.monotonic()) is CircuitState.CLOSED
    assert fh.connections >= 2
    assert len({t.tick_id for t in got}) == len(got), "a trade was emitted twice"
