"""`finstream connect` and `finstream providers`, run as the command, against the fakes;
and credentials kept out of every log line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from finstream.connectors.alphavantage import AlphaVantageConnector
from finstream.connectors.publish import TickSink
from finstream.connectors.registry import ChainSpec
from finstream.connectors.runner import ChainRunner
from finstream.domain.marketdata.ticks import Tick
from tests.fakes.marketdata.alphavantage import FakeAlphaVantage
from tests.fakes.marketdata.finnhub import FakeFinnhub
from tests.fakes.marketdata.helpers import gate, options
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import FakeThread, serve
from tests.fakes.marketdata.yahoo import FakeYahoo

AV_KEY = "av-cli-secret-987654321"


def finstream(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FINSTREAM_")}
    full.update({f"FINSTREAM_{k.upper()}": v for k, v in env.items()})
    full["FINSTREAM_LOG_LEVEL"] = "WARNING"
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_connect_dry_run_prints_normalized_ticks() -> None:
    market = FakeMarket(["AAPL", "MSFT"], step=0.1)
    yahoo = FakeYahoo(market)
    with FakeThread(yahoo) as fakes:
        url = fakes.urls[0]
        done = finstream(
            "connect", "-p", "yahoo", "-s", "aapl,MSFT", "--dry-run", "--duration", "3", "--poll-interval", "0.2",
            md_yahoo_url=url, md_yahoo_cookie_url=f"{url}/fc",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["symbol"] for r in rows} == {"AAPL", "MSFT"}, done.stderr
    assert {r["source"] for r in rows} == {"yahoo"}
    assert len({r["tick_id"] for r in rows}) == len(rows)
    assert "(dry run)" in done.stderr


def test_connect_replays_a_whole_file_and_exits(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(
        "symbol,ts,price,size\n"
        + "".join(
            f"{s},2024-05-10T13:30:{i:02d}Z,{100 + i}.5,10\n"
            for i in range(20)
            for s in ("AAPL", "BTC-USD")
        )
    )
    done = finstream("connect", "-p", "replay", "--file", str(path), "--speed", "max", "--dry-run")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 40
    assert rows[0]["price"] == "100.50000000"
    assert "published 40 ticks" in done.stderr


def test_connect_refuses_a_bad_chain() -> None:
    done = finstream("connect", "-p", "bloomberg", "--dry-run")
    assert done.returncode != 0
    assert "unknown providers ['bloomberg']" in done.stderr


def test_providers_check_reports_each_provider() -> None:
    market = FakeMarket(["AAPL"])
    av, yahoo, fh = FakeAlphaVantage(market, api_key=AV_KEY), FakeYahoo(market), FakeFinnhub(market)
    with FakeThread(av, yahoo, fh) as fakes:
        av_url, y_url, fh_url = fakes.urls
        done = finstream(
            "providers", "check",
            md_chain="alphavantage,yahoo,finnhub,iex", md_symbols="AAPL",
            md_alphavantage_url=av_url, md_alphavantage_key=AV_KEY,
            md_yahoo_url=y_url, md_yahoo_cookie_url=f"{y_url}/fc",
            md_finnhub_url=fh_url, md_finnhub_key="not-the-right-token",
        )  # fmt: skip
    out = done.stdout
    assert done.returncode == 1  # finnhub and iex fail
    assert "alphavantage: OK" in out
    assert "ok: AAPL" in out
    assert "configured limits: 1/sec, 5/min, 25/day" in out
    assert "yahoo: OK" in out
    assert "finnhub: FAILED" in out
    assert "credentials rejected" in out
    assert "iex: FAILED" in out
    assert "retired on 2024-08-31" in out
    assert AV_KEY not in out + done.stderr
    assert "not-the-right-token" not in out + done.stderr


async def test_unexpected_errors_are_logged_without_credentials() -> None:
    market = FakeMarket(["AAPL"])
    av = FakeAlphaVantage(market, api_key=AV_KEY)
    async with serve(av) as url:
        conn = AlphaVantageConnector(gate("alphavantage"), options(), url, AV_KEY)

        def explode(method: str, target: str, params: dict[str, str] | None = None) -> None:
            query = httpx.QueryParams(params or {})
            raise RuntimeError(f"cannot {method} {target}?{query}")

        conn.client.stream = explode  # type: ignore[assignment,method-assign]

        class Out:
            async def publish(self, tick: Tick) -> None: ...

            async def flush(self) -> None: ...

        runner = ChainRunner(
            [ChainSpec("t", ("AAPL",), ("alphavantage",))],
            {"alphavantage": conn},
            {"alphavantage": conn.gate},
            TickSink(Out()),
            poll_interval=0.1,
        )
        with capture_logs() as logs:
            await runner.run_cycle(runner.chains[0])
        await runner.close()
    [event] = [e for e in logs if e["event"] == "connector raised"]
    assert "RuntimeError: cannot GET" in event["error"]
    assert "apikey=[redacted]" in event["traceback"]
    assert AV_KEY not in json.dumps(logs, default=str)


@pytest.mark.parametrize(
    "field", ["md_alphavantage_key", "md_finnhub_key", "md_polygon_key", "md_iex_key"]
)
def test_keys_are_secret_settings(field: str) -> None:
    from finstream.settings import Settings

    s = Settings(**{field: "abc-secret"})  # type: ignore[arg-type]
    assert "abc-secret" not in repr(s)
    assert "abc-secret" not in s.model_dump_json()
