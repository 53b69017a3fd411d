"""SIGKILL the alerts worker mid-stream: after a restart every expected alert has
fired exactly once (read_committed), under its one deterministic id, and
nothing else has."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer

from finstream.cli.backtest import Backtest
from finstream.domain.alerts.rules import AlertRule, parse_rule
from finstream.domain.marketdata.bars import parse_interval
from finstream.domain.marketdata.simulation import GbmMarket
from finstream.domain.marketdata.ticks import Tick
from tests.support.services import TestEnv, WorkerProcess, group_caught_up, wait_until

SYMBOLS = ["AAPL", "MSFT", "NVDA", "TSLA", "JPM", "META"]
TOTAL = 24_000
START = (datetime.now(UTC) - timedelta(hours=3)).replace(microsecond=0)
CREATED = START - timedelta(days=1)


def rules_for(symbol: str, prices: list[Decimal]) -> list[AlertRule]:
    mid = sorted(prices)[len(prices) // 2]
    low = sorted(prices)[len(prices) // 10]
    spec: list[dict[str, Any]] = [
        {"condition": "CROSSING", "frequency": "EVERY_TIME", "value": mid},
        {
            "condition": "CROSSING_UP",
            "frequency": "EVERY_TIME",
            "value": mid,
            "cooldown_seconds": 30,
        },
        {"condition": "GREATER_THAN", "frequency": "ONCE_PER_MINUTE", "value": mid},
        {"condition": "LESS_THAN", "frequency": "ONLY_ONCE", "value": low},
        {"condition": "CROSSING_DOWN", "frequency": "ONCE_PER_BAR_CLOSE", "value": mid},
        {
            "condition": "MOVING_UP_PERCENT",
            "frequency": "ONCE_PER_BAR",
            "percent": "0.05",
            "bars": 2,
        },
        {"condition": "OUTSIDE_CHANNEL", "frequency": "ONCE_PER_BAR", "lower": low, "upper": mid},
    ]
    return [
        parse_rule(
            {
                "rule_id": f"k-{symbol}-{i}",
                "user_id": f"user-{i % 3}",
                "symbol": symbol,
                "created_at": CREATED,
                **s,
            },
            now=CREATED,
        )
        for i, s in enumerate(spec)
    ]


def producer(env: TestEnv) -> Producer:
    # Kafka's default partitioner, as every finstream producer uses.
    return Producer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "linger.ms": 20,
            "log_level": 3,
        }
    )


def fired_so_far(worker: WorkerProcess) -> int:
    try:
        text = httpx.get(f"http://127.0.0.1:{worker.port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    return int(
        sum(
            float(v)
            for v in re.findall(r"^finstream_alerts_fired_total\{[^}]*\} (\S+)$", text, re.M)
        )
    )


def rules_loaded(env: TestEnv, expected: int) -> bool:
    latest: dict[str, int] = {}
    for m in env.consume_all("finstream-alerts-alert-rules-changelog", timeout=5):
        latest[m.key().decode()] = len(json.loads(m.value())) if m.value() else 0
    return sum(latest.values()) == expected


def test_alerts_worker_killed_mid_stream_fires_each_alert_exactly_once(
    env: TestEnv, log_dir: Path
) -> None:
    # consumer_session_timeout=8: the restarted worker takes the dead one's
    # partitions in seconds rather than after the default 30.
    market = GbmMarket(SYMBOLS, seed=7, run_id="kill")
    ticks = list(itertools.islice(market.ticks(START, timedelta(milliseconds=50)), TOTAL))
    rules = [r for s in SYMBOLS for r in rules_for(s, [t.price for t in ticks if t.symbol == s])]
    half = TOTAL // 2

    def firings(upto: int) -> set[str]:
        backtest = Backtest(
            rules, parse_interval("1m"), START - timedelta(minutes=1), datetime.now(UTC)
        )
        for t in ticks[:upto]:
            backtest.feed(t)
        return {f.fired_id for f in backtest.firings}

    expected = Counter(firings(TOTAL))
    assert len(expected) >= 300, "too few firings to kill the worker in the middle"
    # The second half of the ticks is produced after the kill, so the kill falls
    # mid-stream however fast the worker runs: what the first half can fire is
    # at least what the kill waits for, and less than everything.
    first_half = firings(half)
    assert len(expected) // 3 <= len(first_half) < len(expected), len(first_half)

    p = producer(env)
    for r in rules:
        p.produce(
            env.topic("alerts.rules"),
            key=r.rule_id.encode(),
            value=env.codec.encode("AlertRule", r.to_record()),
        )
    assert p.flush(30) == 0
    settings = {"consumer_session_timeout": "8", "instance_id": "alerts-0"}
    first = WorkerProcess(env, "alerts", log_dir, **settings).start()
    wait_until(lambda: rules_loaded(env, len(rules)), timeout=90, message="rules loaded")

    def produce(part: list[Tick]) -> None:
        for t in part:
            p.produce(
                env.topic("md.ticks"),
                key=t.symbol.encode(),
                value=env.codec.encode("Tick", t.to_record()),
            )
            p.poll(0)
        assert p.flush(60) == 0

    produce(ticks[:half])
    wait_until(
        lambda: fired_so_far(first) >= len(expected) // 3,
        timeout=120,
        interval=0.05,
        message="firings under way",
    )
    first.kill()
    at_kill = len(env.consume_all("alerts.fired", timeout=10))
    assert at_kill <= len(first_half) < len(expected)
    produce(ticks[half:])

    second = WorkerProcess(env, "alerts", log_dir, **settings).start()
    try:
        wait_until(
            lambda: group_caught_up(env, env.settings.group("alerts"), ["md.ticks"]),
            timeout=180,
            interval=1.0,
            message="alerts caught up with md.ticks",
        )
    finally:
        second.stop()

    fired = env.decode_all("alerts.fired", "AlertFired", timeout=10)
    got = Counter(m["fired_id"] for m in fired)
    # Exactly the expected alerts, each once: none missing, none extra, none repeated.
    assert set(got) == set(expected)
    assert set(got.values()) == {1}
    requests = env.decode_all("notify.requests", "NotificationRequest", timeout=10)
    per_request = Counter(r["request_id"] for r in requests)
    assert set(per_request) == {"alert-" + f[2:] for f in expected}
    assert set(per_request.values()) == {1}
