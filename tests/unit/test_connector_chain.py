"""The chain runner against the fakes, in process (Kafka replaced by a list)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from finstream.connectors.alphavantage import AlphaVantageConnector
from finstream.connectors.base import Connector
from finstream.connectors.finnhub import FinnhubStreamConnector
from finstream.connectors.polygon import PolygonConnector
from finstream.connectors.publish import TickSink
from finstream.connectors.registry import PROVIDERS, ChainSpec, ConfigError, build, chain_specs
from finstream.connectors.runner import ChainRunner
from finstream.connectors.yahoo import YahooConnector
from finstream.domain.marketdata_dedupe import Gap
from finstream.domain.marketdata_failover import ProviderGate
from finstream.domain.ticks import Tick
from finstream.settings import Settings
from tests.fakes.marketdata.alphavantage import FakeAlphaVantage
from tests.fakes.marketdata.finnhub import FakeFinnhub
from tests.fakes.marketdata.helpers import gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.polygon import FakePolygon
from tests.fakes.marketdata.server import serve
from tests.fakes.marketdata.yahoo import FakeYahoo

SYMS = ("AAPL", "MSFT", "IBM")
POLL = 0.1


class ListOutput:
    def __init__(self) -> None:
        self.ticks: list[Tick] = []
        self.flushes = 0

    async def publish(self, tick: Tick) -> None:
        self.ticks.append(tick)

    async def flush(self) -> None:
        self.flushes += 1


def runner_for(
    connectors: dict[str, Connector], providers: tuple[str, ...], out: ListOutput, **kw: object
) -> ChainRunner:
    gates: dict[str, ProviderGate] = {name: c.gate for name, c in connectors.items()}
    return ChainRunner(
        [ChainSpec("test", SYMS, providers)],
        connectors,
        gates,
        TickSink(out),
        poll_interval=POLL,
        throttle_pause=0.3,
        **kw,  # type: ignore[arg-type]
    )


def assert_no_duplicates(ticks: list[Tick], market: FakeMarket) -> None:
    ids = [t.tick_id for t in ticks]
    assert len(ids) == len(set(ids)), "a tick id was published twice"
    steps = [
        (t.symbol, market.step_of(t.symbol, t.price, t.size)) for t in ticks if t.size is not None
    ]
    assert None not in {s for _, s in steps}
    assert len(steps) == len(set(steps)), "a market step was published twice"


def max_gap(ticks: list[Tick], symbol: str) -> float:
    times = sorted(t.received_at for t in ticks if t.symbol == symbol)
    return max((b - a).total_seconds() for a, b in itertools.pairwise(times))


async def test_throttled_primary_fails_over_and_back_without_gap_or_duplicate() -> None:
    market = FakeMarket(list(SYMS), step=POLL / 2)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), options(max_wait=POLL / 4), av_url, av.api_key
            ),
            "yahoo": YahooConnector(
                gate("yahoo"), options(max_wait=POLL / 4), y_url, f"{y_url}/fc"
            ),
        }
        out = ListOutput()
        runner = runner_for(connectors, ("alphavantage", "yahoo"), out)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0.6)
        av.mode = "note"
        await asyncio.sleep(0.8)
        av.mode = "ok"
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(task, 5)
    kinds = [(t.kind, t.from_provider, t.to_provider) for t in runner.transitions]
    assert ("failover", "alphavantage", "yahoo") in kinds
    assert kinds[-1] == ("failback", "yahoo", "alphavantage")
    sources = [t.source for t in out.ticks if t.symbol == "AAPL"]
    assert sources[0] == "alphavantage"
    assert "yahoo" in sources
    assert sources[-1] == "alphavantage"
    assert_no_duplicates(out.ticks, market)
    for sym in SYMS:
        assert max_gap(out.ticks, sym) <= 2 * POLL + 0.05, sym


async def test_a_quote_seen_from_two_providers_is_published_once() -> None:
    # A market that does not move: every poll of every provider sees the same quote.
    market = FakeMarket(list(SYMS), step=3600)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), options(), av_url, av.api_key
            ),
            "yahoo": YahooConnector(gate("yahoo"), options(), y_url, f"{y_url}/fc"),
        }
        out = ListOutput()
        runner = runner_for(connectors, ("alphavantage", "yahoo"), out)
        chain = runner.chains[0]
        await runner.run_cycle(chain)
        av.mode = "note"
        await runner.run_cycle(chain)  # Yahoo serves the same quotes: nothing new
        await runner.run_cycle(chain)
        await runner.close()
    assert [t.source for t in out.ticks] == ["alphavantage"] * 3
    assert yahoo.served["AAPL"] == 2
    assert runner.sink.suppressed == 6


async def test_stream_primary_publishes_resent_trades_once_and_fails_over_when_silent() -> None:
    market = FakeMarket(list(SYMS), step=0.05)
    fh, pg = FakeFinnhub(market), FakePolygon(market)
    fh.ws_mode = "resend"
    async with serve(fh) as fh_url, serve(pg) as pg_url:
        connectors: dict[str, Connector] = {
            "finnhub-ws": FinnhubStreamConnector(
                gate("finnhub-ws"),
                options(silence_timeout=0.3),
                fh_url.replace("http", "ws") + "/ws",
                fh.token,
            ),
            "polygon": PolygonConnector(
                gate("polygon"),
                options(silence_timeout=0.3),
                pg_url.replace("http", "ws") + "/stocks",
                pg.api_key,
            ),
        }
        out = ListOutput()
        runner = runner_for(connectors, ("finnhub-ws", "polygon"), out)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0.8)
        from_finnhub = len(out.ticks)
        # The live connection stops carrying trades (only the 0.5 s keepalive, slower
        # than the 0.3 s silence timeout) and every new connection says nothing at all.
        fh.ws_mode = "silent"
        for live in fh.subscriptions:
            live.clear()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert from_finnhub > 5
    ids = [t.tick_id for t in out.ticks]
    assert len(ids) == len(set(ids))
    assert runner.sink.suppressed > 0  # the resent copies
    assert any(t.source == "polygon" for t in out.ticks)
    assert ("failover", "finnhub-ws", "polygon") in [
        (t.kind, t.from_provider, t.to_provider) for t in runner.transitions
    ]


async def test_standby_stream_is_started_on_failover_and_released_on_failback() -> None:
    market = FakeMarket(list(SYMS), step=POLL / 2)
    yahoo, fh = FakeYahoo(market), FakeFinnhub(market)
    async with serve(yahoo) as y_url, serve(fh) as fh_url:
        ws = FinnhubStreamConnector(
            gate("finnhub-ws"), options(), fh_url.replace("http", "ws") + "/ws", fh.token
        )
        connectors: dict[str, Connector] = {
            "yahoo": YahooConnector(
                gate("yahoo"), options(max_wait=POLL / 4), y_url, f"{y_url}/fc"
            ),
            "finnhub-ws": ws,
        }
        out = ListOutput()
        runner = runner_for(connectors, ("yahoo", "finnhub-ws"), out)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0.4)
        assert fh.connections == 0  # not needed while the primary serves
        yahoo.mode = "throttle"
        await asyncio.sleep(0.8)
        assert fh.connections == 1
        trades = [t for t in out.ticks if t.source == "finnhub"]
        assert trades
        yahoo.mode = "ok"
        await asyncio.sleep(1.2)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert ws.want == frozenset()  # released
    assert out.ticks[-1].source == "yahoo"
    # A cold stream may need a cycle to deliver its first trade: an outage of one
    # cycle then a recovery, or a failover straight away; either way within two polls.
    kinds = [t.kind for t in runner.transitions]
    assert kinds in (["failover", "failback"], ["outage", "recovered", "failback"]), kinds
    assert runner.transitions[-1].to_provider == "yahoo"
    assert max_gap(out.ticks, "AAPL") <= 2 * POLL + 0.05


async def test_gap_backfill_publishes_bars_once() -> None:
    market = FakeMarket(list(SYMS), step=1)
    av = FakeAlphaVantage(market)
    async with serve(av) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, av.api_key)
        out = ListOutput()
        runner = runner_for({"alphavantage": conn}, ("alphavantage",), out)
        end = datetime.now(UTC)
        gap = Gap("AAPL", end - timedelta(minutes=5), end)
        first = await runner.backfill(runner.chains[0], gap)
        second = await runner.backfill(runner.chains[0], gap)
        await runner.close()
    assert 4 <= first <= 5
    assert second == 0
    assert all(t.kind == "QUOTE" and gap.start < t.ts < gap.end for t in out.ticks)


async def test_readiness_follows_the_chains() -> None:
    market = FakeMarket(list(SYMS))
    av = FakeAlphaVantage(market)
    async with serve(av) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, av.api_key)
        runner = runner_for({"alphavantage": conn}, ("alphavantage",), ListOutput())
        assert runner.readiness_problem() == "first poll cycle not done"
        await runner.run_cycle(runner.chains[0])
        assert runner.readiness_problem() is None
        av.mode = "error500"
        await runner.run_cycle(runner.chains[0])
        assert "no provider" in (runner.readiness_problem() or "")
        await runner.close()


def build_all(settings: Settings) -> None:
    build(settings, [p for spec in chain_specs(settings) for p in spec.providers], ["AAPL"])


def test_chain_configuration() -> None:
    s = Settings(
        md_chain="alphavantage, Yahoo", md_symbols="aapl,msft", md_chains={"BTC-USD": "yahoo"}
    )
    specs = chain_specs(s)
    assert [(c.name, c.symbols, c.providers) for c in specs] == [
        ("default", ("AAPL", "MSFT"), ("alphavantage", "yahoo")),
        ("BTC-USD", ("BTC-USD",), ("yahoo",)),
    ]
    assert chain_specs(Settings())[0].providers == ("simulated",)
    for bad, match in (
        ({"md_chain": "bloomberg"}, "unknown providers"),
        ({"md_chain": "yahoo,yahoo"}, "twice"),
        ({"md_symbols": "AAPL", "md_chains": {"aapl": "yahoo"}}, "two symbol sets"),
        ({"md_symbols": "not a symbol!"}, "malformed"),
        ({"md_yahoo_limits": "lots"}, "MD_YAHOO_LIMITS"),
    ):
        settings = Settings(**{"md_chain": "yahoo", **bad})  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=match):
            build_all(settings)


async def test_every_registered_provider_builds_from_default_settings() -> None:
    connectors, gates = build(Settings(), list(PROVIDERS), ["AAPL"])
    try:
        assert set(connectors) == set(PROVIDERS)
        assert {c.kind for c in connectors.values()} == {"poll", "stream"}
        assert gates["alphavantage"].limiters[0].rate == pytest.approx(5 / 60)
        assert connectors["iex"].configuration_problem() is not None
    finally:
        for c in connectors.values():
            await c.aclose()


def test_prices_stay_decimal_end_to_end() -> None:
    tick = Tick("x", "AAPL", Decimal("1.10000000"), datetime.now(UTC), datetime.now(UTC), "t")
    assert isinstance(tick.to_record()["price"], Decimal)


async def test_a_failed_publish_is_reported_not_hidden() -> None:
    market = FakeMarket(list(SYMS))
    av = FakeAlphaVantage(market)

    class Flaky(ListOutput):
        broken = True

        async def flush(self) -> None:
            if self.broken:
                raise RuntimeError("KafkaTimeoutError: broker unreachable")

    out = Flaky()
    async with serve(av) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, av.api_key)
        runner = runner_for({"alphavantage": conn}, ("alphavantage",), out)
        with pytest.raises(RuntimeError):
            await runner.run_cycle(runner.chains[0])
        assert "publishing to Kafka failed" in (runner.readiness_problem() or "")
        out.broken = False
        market.step = 0.001  # a new quote for the next cycle
        await runner.run_cycle(runner.chains[0])
        assert runner.readiness_problem() is None
        await runner.close()
