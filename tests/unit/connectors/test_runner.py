"""The chain runner against the fakes, in process (Kafka replaced by a list).

Polling chains run cycle by cycle on a :class:`FakeClock` (rate limits,
pauses, cool-downs and the fake market all read it), so the assertions are
about cycles, never about how long a loaded machine took. Streams are real
connections, so their tests wait on conditions.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from finstream.connectors.alphavantage import AlphaVantageConnector
from finstream.connectors.base import Connector, ConnectorOptions
from finstream.connectors.finnhub import FinnhubStreamConnector
from finstream.connectors.polygon import PolygonConnector
from finstream.connectors.publish import TickSink
from finstream.connectors.registry import PROVIDERS, ChainSpec, ConfigError, build, chain_specs
from finstream.connectors.runner import ChainRunner
from finstream.connectors.yahoo import YahooConnector
from finstream.domain.marketdata.dedupe import Gap
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import CircuitState
from finstream.settings import Settings
from tests.fakes.marketdata.alphavantage import FakeAlphaVantage
from tests.fakes.marketdata.finnhub import FakeFinnhub
from tests.fakes.marketdata.helpers import gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.polygon import FakePolygon
from tests.fakes.marketdata.server import serve
from tests.fakes.marketdata.yahoo import FakeYahoo
from tests.support.clock import FakeClock
from tests.support.waiting import until

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
    connectors: dict[str, Connector],
    providers: tuple[str, ...],
    out: ListOutput,
    symbols: tuple[str, ...] = SYMS,
    **kw: Any,
) -> ChainRunner:
    gates: dict[str, ProviderGate] = {name: c.gate for name, c in connectors.items()}
    kw.setdefault("poll_interval", POLL)
    kw.setdefault("throttle_pause", 0.3)
    return ChainRunner(
        [ChainSpec("test", symbols, providers)], connectors, gates, TickSink(out), **kw
    )


def on_clock(clock: FakeClock, **kw: Any) -> ConnectorOptions:
    return options(clock=clock, sleep=clock.sleep, wall=clock.utc, **kw)


async def run_cycles(runner: ChainRunner, clock: FakeClock, n: int, every: float = POLL) -> None:
    for _ in range(n):
        await runner.run_cycle(runner.chains[0])
        clock.advance(every)


def assert_no_duplicates(ticks: list[Tick], market: FakeMarket) -> None:
    ids = [t.tick_id for t in ticks]
    assert len(ids) == len(set(ids)), "a tick id was published twice"
    steps = [
        (t.symbol, market.step_of(t.symbol, t.price, t.size)) for t in ticks if t.size is not None
    ]
    assert None not in {s for _, s in steps}
    assert len(steps) == len(set(steps)), "a market step was published twice"


def runs(ticks: list[Tick], symbol: str) -> list[str]:
    """The providers that served ``symbol``, one entry per uninterrupted run."""
    out: list[str] = []
    for t in ticks:
        if t.symbol == symbol and (not out or out[-1] != t.source):
            out.append(t.source)
    return out


async def test_throttled_primary_fails_over_and_back_without_gap_or_duplicate() -> None:
    clock = FakeClock()
    # The market moves every half poll: every cycle sees a new quote of every symbol.
    market = FakeMarket(list(SYMS), step=POLL / 2, now=clock.wall)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), on_clock(clock, max_wait=POLL / 4), av_url, av.api_key
            ),
            "yahoo": YahooConnector(
                gate("yahoo"), on_clock(clock, max_wait=POLL / 4), y_url, f"{y_url}/fc"
            ),
        }
        out = ListOutput()
        runner = runner_for(connectors, ("alphavantage", "yahoo"), out, clock=clock)
        await run_cycles(runner, clock, 6)
        av.mode = "note"
        await run_cycles(runner, clock, 8)
        av.mode = "ok"
        await run_cycles(runner, clock, 16)
        await runner.close()
    kinds = [(t.kind, t.from_provider, t.to_provider) for t in runner.transitions]
    assert kinds == [("failover", "alphavantage", "yahoo"), ("failback", "yahoo", "alphavantage")]
    for sym in SYMS:
        assert runs(out.ticks, sym) == ["alphavantage", "yahoo", "alphavantage"], sym
        # No gap: one new quote of every symbol in every one of the 30 cycles.
        assert sum(1 for t in out.ticks if t.symbol == sym) == 30, sym
    assert runner.unserved == Counter()
    assert_no_duplicates(out.ticks, market)


async def test_a_quote_seen_from_two_providers_is_published_once() -> None:
    clock = FakeClock()
    # A market that does not move: every poll of every provider sees the same quote.
    market = FakeMarket(list(SYMS), step=3600, now=clock.wall)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), on_clock(clock), av_url, av.api_key
            ),
            "yahoo": YahooConnector(gate("yahoo"), on_clock(clock), y_url, f"{y_url}/fc"),
        }
        out = ListOutput()
        runner = runner_for(connectors, ("alphavantage", "yahoo"), out, clock=clock)
        await run_cycles(runner, clock, 1)
        av.mode = "note"
        await run_cycles(runner, clock, 2)  # Yahoo serves the same quotes: nothing new
        await runner.close()
    assert [t.source for t in out.ticks] == ["alphavantage"] * 3
    assert yahoo.served["AAPL"] == 2
    assert runner.sink.suppressed == 6


# -- issue 12: failover defects found by running the chain as a user would ---------------

SIX = ("AAPL", "MSFT", "IBM", "GOOG", "AMZN", "NVDA")


async def test_the_primary_is_not_locked_out_after_a_probe_meets_its_own_rate_limit() -> None:
    """Alpha Vantage at 5 calls a minute for 6 symbols: its half-open probe serves five and
    then meets our own bucket. It used to stay half-open, unused, for the rest of the hour."""
    clock = FakeClock()
    market = FakeMarket(list(SIX), step=1, now=clock.wall)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    poll = 15.0
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage", "5/min", reset=30),
                on_clock(clock, max_wait=poll / 4),
                av_url,
                av.api_key,
            ),
            "yahoo": YahooConnector(
                gate("yahoo", reset=30), on_clock(clock, max_wait=poll / 4), y_url, f"{y_url}/fc"
            ),
        }
        out = ListOutput()
        runner = runner_for(
            connectors, ("alphavantage", "yahoo"), out, SIX, poll_interval=poll, clock=clock
        )
        av.mode = "error500"
        await run_cycles(runner, clock, 3, poll)
        av_gate = connectors["alphavantage"].gate
        assert av_gate.circuit(clock()) is CircuitState.OPEN
        av.mode = "ok"
        served_before = sum(av.served.values())
        await run_cycles(runner, clock, 2, poll)  # the cool-down ends: the probe goes out
        assert sum(av.served.values()) == served_before + 5  # five served, the sixth refused
        assert av_gate.circuit(clock()) is CircuitState.CLOSED
        # The rest of the simulated hour: Alpha Vantage keeps serving what its limit allows.
        for _ in range(12):
            before = sum(av.served.values())
            await run_cycles(runner, clock, 4, poll)  # a minute
            assert sum(av.served.values()) - before >= 4
        await runner.close()
    assert runner.chains[0].active == "alphavantage"
    assert runner.unserved == Counter()  # Yahoo took what Alpha Vantage could not


async def test_the_daily_limit_pauses_until_the_reset_not_for_an_hour() -> None:
    clock = FakeClock()  # 2024-05-10 18:00 UTC: midnight UTC is 6 hours away
    market = FakeMarket(list(SYMS), step=1, now=clock.wall)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    av.mode = "information"  # {"Information": "... 25 requests per day ..."}
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage", reset=30), on_clock(clock), av_url, av.api_key
            ),
            "yahoo": YahooConnector(gate("yahoo"), on_clock(clock), y_url, f"{y_url}/fc"),
        }
        out = ListOutput()
        runner = runner_for(
            connectors, ("alphavantage", "yahoo"), out, poll_interval=300.0, clock=clock
        )
        asked_at: list[float] = []
        start = clock()
        for _ in range(8 * 12):  # eight hours, a cycle every five minutes
            before = av.calls["GLOBAL_QUOTE"]
            await run_cycles(runner, clock, 1, 300.0)
            if av.calls["GLOBAL_QUOTE"] > before:
                asked_at.append(clock() - 300.0 - start)
        await runner.close()
    # Asked once, then not again until midnight UTC (the first candidate reset).
    assert asked_at == [0.0, 6 * 3600.0]
    assert runner.unserved == Counter()


async def test_a_per_second_burst_message_pauses_a_second_not_an_hour() -> None:
    clock = FakeClock()
    market = FakeMarket(list(SYMS), step=1, now=clock.wall)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    av.mode = "burst"
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage", threshold=10), on_clock(clock), av_url, av.api_key
            ),
            "yahoo": YahooConnector(gate("yahoo"), on_clock(clock), y_url, f"{y_url}/fc"),
        }
        out = ListOutput()
        runner = runner_for(
            connectors, ("alphavantage", "yahoo"), out, poll_interval=5.0, clock=clock
        )
        await run_cycles(runner, clock, 3, 5.0)
        assert av.calls["GLOBAL_QUOTE"] == 3  # asked again every cycle, one second later
        av.mode = "ok"
        await run_cycles(runner, clock, 1, 5.0)
        await runner.close()
    assert runner.chains[0].active == "alphavantage"
    assert [t.source for t in out.ticks[-3:]] == ["alphavantage"] * 3


async def test_one_invalid_symbol_neither_aborts_the_request_nor_counts_against_the_provider() -> (
    None
):
    clock = FakeClock()
    market = FakeMarket(list(SYMS), step=1, now=clock.wall)
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    av.invalid_symbols.add("AAPL")  # "Invalid API call" for AAPL only
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), on_clock(clock), av_url, av.api_key
            ),
            "yahoo": YahooConnector(gate("yahoo"), on_clock(clock), y_url, f"{y_url}/fc"),
        }
        out = ListOutput()
        runner = runner_for(
            connectors, ("alphavantage", "yahoo"), out, poll_interval=5.0, clock=clock
        )
        await run_cycles(runner, clock, 5, 5.0)
        await runner.close()
    assert av.served["MSFT"] == av.served["IBM"] == 5
    assert av.calls["GLOBAL_QUOTE"] == 2 * 5 + 1  # AAPL asked once, then parked
    assert yahoo.served["AAPL"] == 5
    assert connectors["alphavantage"].gate.circuit(clock()) is CircuitState.CLOSED
    assert runner.chains[0].active == "alphavantage"
    assert runner.unserved == Counter()


async def test_a_delisted_symbol_is_parked_at_yahoo_and_yahoo_stays_ready_to_take_over() -> None:
    clock = FakeClock()
    market = FakeMarket([*SYMS, "GONE"], step=1, now=clock.wall)
    market.bases.pop("GONE")  # nobody quotes it any more
    av, yahoo = FakeAlphaVantage(market), FakeYahoo(market)
    yahoo.delisted.add("GONE")
    symbols = (*SYMS, "GONE")
    async with serve(av) as av_url, serve(yahoo) as y_url:
        connectors: dict[str, Connector] = {
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), on_clock(clock), av_url, av.api_key
            ),
            "yahoo": YahooConnector(gate("yahoo"), on_clock(clock), y_url, f"{y_url}/fc"),
        }
        out = ListOutput()
        runner = runner_for(
            connectors, ("alphavantage", "yahoo"), out, symbols, poll_interval=5.0, clock=clock
        )
        await run_cycles(runner, clock, 5, 5.0)
        # Alpha Vantage serves the rest; GONE reached Yahoo alone once (a 404) and is parked.
        assert yahoo.calls["quote"] == 1
        assert connectors["yahoo"].gate.circuit(clock()) is CircuitState.CLOSED
        assert runner.chains[0].unknown_everywhere(clock()) == ["GONE"]
        # So when the primary fails, Yahoo takes over in the same cycle.
        av.mode = "error500"
        await run_cycles(runner, clock, 1, 5.0)
        await runner.close()
    assert runner.transitions[-1].kind == "failover"
    assert [t.source for t in out.ticks[-3:]] == ["yahoo"] * 3
    assert runner.unserved == Counter({"GONE": 6})


async def test_a_throttle_page_as_the_crumb_pauses_yahoo_instead_of_asking_again() -> None:
    clock = FakeClock()
    market = FakeMarket(list(SYMS), step=1, now=clock.wall)
    yahoo, av = FakeYahoo(market), FakeAlphaVantage(market)
    yahoo.mode = "crumb_throttled"  # getcrumb answers "Too Many Requests" with HTTP 200
    async with serve(yahoo) as y_url, serve(av) as av_url:
        connectors: dict[str, Connector] = {
            "yahoo": YahooConnector(gate("yahoo"), on_clock(clock), y_url, f"{y_url}/fc"),
            "alphavantage": AlphaVantageConnector(
                gate("alphavantage"), on_clock(clock), av_url, av.api_key
            ),
        }
        out = ListOutput()
        runner = runner_for(
            connectors,
            ("yahoo", "alphavantage"),
            out,
            poll_interval=5.0,
            throttle_pause=60.0,
            clock=clock,
        )
        await run_cycles(runner, clock, 12, 5.0)  # the minute of the pause
        assert (yahoo.calls["fc"], yahoo.calls["getcrumb"]) == (1, 1)
        assert av.served["AAPL"] == 12  # the secondary served meanwhile
        yahoo.mode = "ok"
        await run_cycles(runner, clock, 1, 5.0)
        await runner.close()
    assert (yahoo.calls["fc"], yahoo.calls["getcrumb"]) == (2, 2)
    assert runner.chains[0].active == "yahoo"
    assert runner.unserved == Counter()


# -- streams: real connections, waited on -------------------------------------------------------


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
        # On a loaded machine a pause of the fake's trades longer than the 0.3 s
        # silence timeout is a silence too: the chain may fail over and back before
        # the test silences finnhub. What is proved starts with finnhub serving.
        await until(
            lambda: (
                len(out.ticks) > 5
                and runner.sink.suppressed > 0
                and out.ticks[-1].source == "finnhub"
                and (not runner.transitions or runner.transitions[-1].to_provider == "finnhub-ws")
            ),
            "finnhub serving, its resent trades suppressed",
        )
        before = len(runner.transitions)
        # The live connection stops carrying trades (only the 0.5 s keepalive, slower
        # than the 0.3 s silence timeout) and every new connection says nothing at all.
        fh.ws_mode = "silent"
        for live in fh.subscriptions:
            live.clear()
        await until(
            lambda: (
                any(t.source == "polygon" for t in out.ticks)
                and any(t.to_provider == "polygon" for t in runner.transitions[before:])
            ),
            "polygon taking over",
        )
        stop.set()
        await asyncio.wait_for(task, 10)
    # The standby stream starts cold: it takes over at once (a failover), or after a
    # cycle that nobody served (an outage, then a recovery). What follows may flap: the
    # old connection's keepalives can make it look alive for a moment.
    kinds = [(t.kind, t.from_provider, t.to_provider) for t in runner.transitions[before:]]
    assert kinds[:1] == [("failover", "finnhub-ws", "polygon")] or kinds[:2] == [
        ("outage", "finnhub-ws", None),
        ("recovered", None, "polygon"),
    ], kinds
    assert any(t.source == "finnhub" for t in out.ticks)
    ids = [t.tick_id for t in out.ticks]
    assert len(ids) == len(set(ids))
    assert runner.sink.suppressed > 0  # the resent copies


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
        await until(lambda: runner.cycles >= 3 and yahoo.served["AAPL"] >= 3, "yahoo serving")
        assert fh.connections == 0  # not needed while the primary serves
        yahoo.mode = "throttle"
        await until(lambda: any(t.source == "finnhub" for t in out.ticks), "finnhub trades")
        assert fh.connections >= 1
        yahoo.mode = "ok"
        await until(
            lambda: (
                runner.transitions
                and runner.transitions[-1].to_provider == "yahoo"
                and ws.want == frozenset()
            ),
            "failback and release",
        )
        stop.set()
        await asyncio.wait_for(task, 10)
    assert out.ticks[-1].source == "yahoo"
    # A cold stream may need a cycle or more to deliver its first trade: an outage then
    # a recovery, or a failover straight away; the primary takes over again at the end.
    kinds = [t.kind for t in runner.transitions]
    assert kinds[:1] == ["failover"] or kinds[:2] == ["outage", "recovered"], kinds
    assert kinds[-1] == "failback"


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
        assert [lim.rate for lim in gates["alphavantage"].limiters] == pytest.approx(
            [1, 5 / 60, 25 / 86400]
        )
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
