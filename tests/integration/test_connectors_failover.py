"""The `connector` worker against real Kafka: the primary starts throttling mid-run,
the chain fails over to the secondary, fails back when the primary recovers, no
poll cycle leaves a symbol unserved (the failover happens within the cycle), and
md.ticks has no duplicate.

Coverage is counted in cycles (finstream_md_unserved_total), not in seconds
between ticks: on a loaded machine a cycle may take longer than the poll
interval without anything being missed."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from pathlib import Path

import pytest

from tests.fakes.marketdata.alphavantage import FakeAlphaVantage
from tests.fakes.marketdata.market import FakeMarket
from tests.fakes.marketdata.server import FakeThread
from tests.fakes.marketdata.yahoo import FakeYahoo
from tests.support.services import TestEnv, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

SYMBOLS = ["AAPL", "MSFT", "IBM"]
POLL = 0.2
SECRET = "av-secret-key-0123456789"


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_throttled_primary_fails_over_and_back_with_no_gap_and_no_duplicate(
    env: TestEnv, log_dir: Path
) -> None:
    # The market moves every half poll, so every poll of any provider sees a new quote.
    market = FakeMarket(SYMBOLS, step=POLL / 2)
    av = FakeAlphaVantage(market, api_key=SECRET)
    yahoo = FakeYahoo(market)
    with FakeThread(av, yahoo) as fakes:
        av_url, yahoo_url = fakes.urls
        worker = WorkerProcess(
            env,
            "connector",
            log_dir,
            md_chain="alphavantage,yahoo",
            md_symbols=",".join(SYMBOLS),
            md_poll_interval=str(POLL),
            md_alphavantage_url=av_url,
            md_alphavantage_key=SECRET,
            md_alphavantage_limits="50/sec",
            md_yahoo_url=yahoo_url,
            md_yahoo_cookie_url=f"{yahoo_url}/fc",
            md_throttle_pause="0.5",
            md_failure_threshold="2",
            md_circuit_reset="0.5",
            md_backfill_gaps="false",
        )
        worker.start()
        try:
            wait_until(lambda: av.served["AAPL"] >= 10, timeout=30, message="primary serving")
            av.mode = "note"  # HTTP 200 {"Note": ...}: Alpha Vantage's throttling
            wait_until(lambda: yahoo.served["AAPL"] >= 10, timeout=30, message="secondary serving")
            av.mode = "ok"
            resumed = av.served["AAPL"]
            wait_until(
                lambda: av.served["AAPL"] >= resumed + 10, timeout=30, message="primary back"
            )
            metrics = worker.metrics()
        finally:
            assert worker.stop() == 0
    ticks = env.decode_all("md.ticks", "Tick", min_count=30)
    log = worker.log_path.read_text()

    # No duplicate: every id once, and every market step once per symbol.
    ids = [t["tick_id"] for t in ticks]
    assert len(ids) == len(set(ids))
    steps = [(t["symbol"], market.step_of(t["symbol"], t["price"], t["size"])) for t in ticks]
    assert all(step is not None for _, step in steps), "a tick that the market never quoted"
    assert len(steps) == len(set(steps))

    by_symbol: dict[str, list[dict[str, object]]] = defaultdict(list)
    for t in ticks:
        by_symbol[str(t["symbol"])].append(t)
    assert set(by_symbol) == set(SYMBOLS)
    for symbol, rows in by_symbol.items():
        rows.sort(key=lambda r: r["received_at"])  # type: ignore[arg-type,return-value]
        # Primary, then the secondary while throttled, then the primary again.
        runs = [k for k, _ in itertools.groupby(r["source"] for r in rows)]
        assert runs == ["alphavantage", "yahoo", "alphavantage"], (symbol, runs)
    # No gap: every cycle served every symbol, failovers included.
    assert metric(metrics, "finstream_md_unserved_total", chain="default") == 0

    assert (
        metric(
            metrics,
            "finstream_md_failovers_total",
            kind="failover",
            from_provider="alphavantage",
            to_provider="yahoo",
        )
        == 1
    )
    assert (
        metric(
            metrics,
            "finstream_md_failovers_total",
            kind="failback",
            from_provider="yahoo",
            to_provider="alphavantage",
        )
        == 1
    )
    assert (
        metric(
            metrics,
            "finstream_md_provider_errors_total",
            provider="alphavantage",
            error_class="throttled",
        )
        >= 1
    )
    assert metric(metrics, "finstream_md_ticks_published_total", provider="yahoo") >= 10
    assert metric(metrics, "finstream_md_circuit_state", provider="alphavantage") == 0
    assert re.search(
        r"finstream_md_provider_to_publish_seconds_count\{provider=\"alphavantage\"\} [1-9]",
        metrics,
    )
    # The key went out in every request and never into a log line.
    assert "failover" in log
    assert SECRET not in log
