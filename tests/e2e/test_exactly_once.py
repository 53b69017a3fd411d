"""Exactly once under SIGKILL: the quotes role killed mid-load (twice) and restarted,
and two router replicas of which one is killed.

A read_committed consumer of the outputs must see every expected record once:
exact counts, no repeats tolerated. Redis and PostgreSQL must hold exactly the
expected state. A read_uncommitted consumer sees, besides, only records of
aborted transactions (never a second copy inside committed ones).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from finstream.domain.marketdata.bars import Bar, BarState, add_tick, parse_interval
from finstream.domain.marketdata.simulation import GbmMarket
from finstream.domain.marketdata.ticks import Tick
from finstream.stores.quotes import decimal_text
from tests.support.services import (
    TestEnv,
    WorkerProcess,
    committed_count,
    group_caught_up,
    metric_value,
    wait_until,
)

pytestmark = pytest.mark.e2e

SYMBOLS = ["AAPL", "MSFT", "NVDA", "TSLA", "JPM", "META", "AMZN", "GOOG"]
TICKS = 24_000
LATENESS = timedelta(seconds=5)


def expected_bars(ticks: list[Tick]) -> list[Bar]:
    """What the quotes role must publish, by the pure domain code, tick by tick."""
    interval = parse_interval("1m")
    states: dict[str, BarState] = collections.defaultdict(BarState)
    out: list[Bar] = []
    for t in ticks:
        update = add_tick(states[t.symbol], t, interval, LATENESS)
        assert update.late is None
        assert not update.duplicate
        states[t.symbol] = update.state
        out.extend(update.publish)
    return out


def bar_key(b: dict[str, Any]) -> tuple[Any, ...]:
    return (b["symbol"], b["interval"], b["start"], b["revision"])


def test_quotes_killed_twice_mid_load_publishes_every_bar_once(env: TestEnv, log_dir: Path) -> None:
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    market = GbmMarket(SYMBOLS, seed=5, run_id="eos")
    # 24,000 ticks 25 ms apart: 10 minutes of bars for 8 symbols.
    ticks = list(itertools.islice(market.ticks(start, timedelta(milliseconds=25)), TICKS))
    expected = expected_bars(ticks)
    assert len(expected) >= 100

    # Short transactions, so that a kill lands between many commits.
    quotes_settings = {"commit_interval": "0.05", "consumer_session_timeout": "6"}
    quotes = WorkerProcess(env, "quotes", log_dir, instance_id="q0", **quotes_settings).start()
    bars_sink = WorkerProcess(env, "bars", log_dir).start()

    def produce() -> None:
        # About 4,000 ticks a second for 6 seconds: the kills land mid-stream.
        for i in range(0, TICKS, 200):
            env.produce_records(
                "md.ticks", "Tick", [(t.symbol, t.to_record()) for t in ticks[i : i + 200]]
            )
            time.sleep(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        group = env.settings.group("quotes")
        for fraction in (0.3, 0.6):

            def progressed(fraction: float = fraction) -> bool:
                return committed_count(env, group, "md.ticks") >= TICKS * fraction

            wait_until(progressed, timeout=120, interval=0.05, message="quotes progress")
            quotes.kill()
            quotes = WorkerProcess(
                env, "quotes", log_dir, instance_id="q0", **quotes_settings
            ).start()
        producer.join()
        wait_until(
            lambda: group_caught_up(env, env.settings.group("quotes"), ["md.ticks"]),
            timeout=120,
            message="quotes caught up with md.ticks",
        )
    finally:
        producer.join()
        assert quotes.stop() == 0, quotes.log_tail()

    # Exactly the expected bar publications, each once, with the expected values.
    committed = env.consume_all("md.bars.1m", isolation="read_committed")
    got = [env.codec.decode(m.value(), "Bar") for m in committed]
    counts = collections.Counter(bar_key(b) for b in got)
    repeats = {k: n for k, n in counts.items() if n > 1}
    assert not repeats, f"{len(repeats)} bars published more than once: {list(repeats)[:5]}"
    want = {bar_key(b.to_record()): b.to_record() for b in expected}
    assert set(counts) == set(want)
    for b in got:
        assert b == want[bar_key(b)]

    # A read_uncommitted consumer also sees the aborted transactions' records,
    # and only those: every record a read_committed consumer does not see.
    uncommitted = env.consume_all("md.bars.1m", isolation="read_uncommitted")
    committed_at = {(m.partition(), m.offset()) for m in committed}
    assert committed_at <= {(m.partition(), m.offset()) for m in uncommitted}

    # The quote cache holds each symbol's last tick; PostgreSQL the final bars.
    r = redis.Redis.from_url(env.settings.redis_url.get_secret_value(), decode_responses=True)
    try:
        last = {t.symbol: t for t in ticks}
        for symbol, t in last.items():
            quote = r.hgetall(env.settings.redis_key(f"quote:{symbol}"))
            assert quote["tick_id"] == t.tick_id
            assert quote["price"] == decimal_text(t.price)
    finally:
        r.close()
    finals = {(b.symbol, b.start): b for b in expected if b.final}
    try:
        wait_until(
            lambda: env.sql("SELECT count(*) AS n FROM bars WHERE final")[0]["n"] == len(finals),
            timeout=60,
            message="final bars in PostgreSQL",
        )
        rows = env.sql("SELECT symbol, start, close, volume, trades, revision FROM bars")
        assert len(rows) == len({(b.symbol, b.start) for b in expected})
        for row in rows:
            bar = finals.get((row["symbol"], row["start"]))
            if bar is not None:
                assert (row["close"], row["volume"], row["trades"], row["revision"]) == (
                    bar.close,
                    bar.volume,
                    bar.trades,
                    bar.revision,
                )
    finally:
        bars_sink.stop()


def _request(user: str, rid: str) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": user,
        "category": "account",
        "priority": "NORMAL",
        "template": "welcome",
        "data": {"title": rid, "body": "replicas test"},
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": datetime.now(UTC),
        "source": "test",
        "correlation_id": None,
    }


def test_two_router_replicas_one_killed_the_other_routes_everything_once(
    env: TestEnv, log_dir: Path
) -> None:
    users, total = 120, 3000
    settings = {
        "consumer_session_timeout": "6",
        "router_batch_size": "50",
        "commit_interval": "0.05",
    }
    a = WorkerProcess(env, "router", log_dir, instance_id="r-a", **settings).start()
    b = WorkerProcess(env, "router", log_dir, instance_id="r-b", **settings).start()
    wait_until(
        lambda: (
            metric_value(a, "finstream_stream_assigned_partitions") > 0
            and metric_value(b, "finstream_stream_assigned_partitions") > 0
        ),
        timeout=60,
        message="both replicas own partitions",
    )
    requests = [
        (f"user-{i % users}", _request(f"user-{i % users}", f"req-{i}")) for i in range(total)
    ]

    def produce() -> None:
        for i in range(0, total, 100):
            env.produce_records("notify.requests", "NotificationRequest", requests[i : i + 100])
            time.sleep(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(
            lambda: metric_value(a, "finstream_router_messages_total") >= 300,
            timeout=60,
            interval=0.05,
            message="replica a routing",
        )
        a.kill()
        producer.join()
        wait_until(
            lambda: metric_value(b, "finstream_stream_assigned_partitions") == 6,
            timeout=60,
            message="the survivor owns every partition",
        )
        wait_until(
            lambda: group_caught_up(env, env.settings.group("router"), ["notify.requests"]),
            timeout=120,
            message="router caught up",
        )
        expected = {f"req-{i}" for i in range(total)}

        def visible(name: str, schema: str, id_of: Callable[[dict[str, Any]], str | None]) -> Any:
            # Some of b's outputs sit behind a's open transaction on the same
            # partitions: a read_committed reader sees them once the broker has
            # aborted it (transaction.timeout.ms, checked every 10 s), which may
            # be after b has committed everything.
            records = [env.codec.decode(m.value(), schema) for m in env.consume_all(name)]
            seen = collections.Counter(i for i in map(id_of, records) if i is not None)
            return seen if set(seen) >= expected else None

        per_request = wait_until(
            lambda: visible("notify.outbound.inapp", "OutboundMessage", lambda m: m["request_id"]),
            timeout=90,
            interval=1,
            message="every request's message visible to a read_committed reader",
        )
        assert set(per_request) == expected
        assert set(per_request.values()) == {1}
        routed = wait_until(
            lambda: visible(
                "audit.events",
                "AuditEvent",
                lambda e: e["subject_id"] if e["action"] == "routed" else None,
            ),
            timeout=90,
            interval=1,
            message="every request's audit event visible to a read_committed reader",
        )
        assert set(routed) == expected
        assert set(routed.values()) == {1}
    finally:
        producer.join()
        a.kill()
        assert b.stop() == 0, b.log_tail()
