"""The alerts role against real Kafka: rules in, firings out, and the same firings
from a back-test over the same ticks (from Kafka, through the CLI)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from finstream.codec import Codec
from finstream.domain.alerts.rules import AlertRule, parse_rule
from finstream.domain.deadletter import H_ERROR_CLASS, H_ERROR_MESSAGE, parse_headers
from finstream.domain.marketdata.ticks import make_tick
from finstream.domain.partitioning import key_partition
from tests.support.services import TestEnv, WorkerProcess, metric_value, wait_until

NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(minutes=10)
T0 = T0 - timedelta(seconds=T0.second)  # on a minute boundary
CREATED = NOW - timedelta(hours=1)
PARTITIONS = 6
CODEC = Codec()


def kafka_producer(env: TestEnv) -> Producer:
    # Kafka's default (Java client's) partitioner; librdkafka's default differs.
    return Producer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "linger.ms": 5,
            "log_level": 3,
        }
    )


def send(
    env: TestEnv, topic: str, items: list[tuple[bytes, bytes | None]], partition: int | None = None
) -> None:
    p = kafka_producer(env)
    for key, value in items:
        if partition is None:
            p.produce(env.topic(topic), key=key, value=value)
        else:
            p.produce(env.topic(topic), key=key, value=value, partition=partition)
    assert p.flush(30) == 0


def make_rule(
    rule_id: str, symbol: str, condition: str, frequency: str, **params: Any
) -> AlertRule:
    return parse_rule(
        {
            "rule_id": rule_id,
            "user_id": f"user-{rule_id[:1]}",
            "symbol": symbol,
            "condition": condition,
            "frequency": frequency,
            "created_at": CREATED,
            **params,
        },
        now=CREATED,
    )


def put_rules(env: TestEnv, rules: list[AlertRule]) -> None:
    send(
        env,
        "alerts.rules",
        [(r.rule_id.encode(), env.codec.encode("AlertRule", r.to_record())) for r in rules],
    )


def ticks_for(
    symbol: str, prices: list[str], start: datetime, step: float, prefix: str
) -> list[tuple[bytes, bytes, str]]:
    out = []
    for i, p in enumerate(prices):
        at = start + timedelta(seconds=step * i)
        t = make_tick(
            tick_id=f"{prefix}-{symbol}-{i}",
            symbol=symbol,
            price=p,
            size=10 * (i % 5 + 1),
            prev_close="10",
            ts=at,
            received_at=at,
            source="test",
        )
        out.append((symbol.encode(), CODEC.encode("Tick", t.to_record()), t.tick_id))
    return out


def rulebook(env: TestEnv) -> dict[str, set[str]]:
    """The rule ids per symbol on the rulebook's changelog (latest record wins)."""
    latest: dict[str, set[str]] = {}
    for m in env.consume_all("finstream-alerts-alert-rules-changelog", timeout=5):
        symbol = m.key().decode()
        latest[symbol] = set(json.loads(m.value())) if m.value() else set()
    return latest


def rules_loaded(env: TestEnv, expected: dict[str, set[str]]) -> bool:
    """The rulebook's changelog shows exactly these rule ids per symbol."""
    latest = rulebook(env)
    return all(latest.get(s, set()) == ids for s, ids in expected.items())


@pytest.fixture(scope="module")
def alerts_worker(env: TestEnv, log_dir: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(env, "alerts", log_dir).start()
    try:
        yield worker
    finally:
        worker.stop()


RULES = [
    make_rule("a-up", "AAA", "CROSSING_UP", "EVERY_TIME", value="10"),
    make_rule("a-down", "AAA", "CROSSING_DOWN", "ONCE_PER_MINUTE", value="10"),
    make_rule("a-gt", "AAA", "GREATER_THAN", "ONCE_PER_BAR", value="11"),
    make_rule("a-chan", "AAA", "ENTERING_CHANNEL", "ONLY_ONCE", lower="9.5", upper="10.5"),
    make_rule("a-close", "AAA", "MOVING_UP_PERCENT", "ONCE_PER_BAR_CLOSE", percent="5", bars=2),
    make_rule(
        "b-cross",
        "BBB",
        "CROSSING",
        "EVERY_TIME",
        value="20",
        cooldown_seconds=20,
        message="Rebalance",
    ),
    make_rule("b-prev", "BBB", "CHANGE_FROM_PREV_CLOSE_PERCENT", "ONCE_PER_MINUTE", percent="100"),
    make_rule("b-vol", "BBB", "VOLUME_SPIKE", "ONCE_PER_BAR", bars=1, multiplier="1.1"),
]
AAA = ["9", "9.8", "10.2", "11.5", "10.9", "9.7", "10.1", "11.2", "12", "9.9", "10.4", "11.8"] * 2
BBB = ["19", "21", "19.5", "20.5", "21", "19", "24", "19", "22", "25", "18", "21"] * 2


def test_rules_ticks_firings_and_the_same_firings_from_a_backtest(
    env: TestEnv, alerts_worker: WorkerProcess, tmp_path: Path
) -> None:
    put_rules(env, RULES)
    # A rule that moves symbol, and one that is deleted, before any tick.
    put_rules(env, [make_rule("c-gone", "CCC", "GREATER_THAN", "EVERY_TIME", value="1")])
    put_rules(env, [make_rule("b-moved", "CCC", "LESS_THAN", "EVERY_TIME", value="1000")])
    put_rules(env, [make_rule("b-moved", "BBB", "LESS_THAN", "ONLY_ONCE", value="19.2")])
    send(env, "alerts.rules", [(b"c-gone", None)])
    wait_until(
        lambda: rules_loaded(
            env,
            {
                "AAA": {r.rule_id for r in RULES if r.symbol == "AAA"},
                "BBB": {r.rule_id for r in RULES if r.symbol == "BBB"} | {"b-moved"},
                "CCC": set(),
            },
        ),
        timeout=90,
        message="rules loaded by the alerts worker",
    )

    # Two minutes of ticks per symbol, five seconds apart, ending well in the past.
    aaa = ticks_for("AAA", AAA, T0, 5, "x")
    bbb = ticks_for("BBB", BBB, T0, 5, "x")
    ccc = ticks_for("CCC", ["5", "6"], T0, 5, "x")
    send(env, "md.ticks", [(k, v) for k, v, _ in aaa + bbb + ccc])
    # Bad input must not stall anything: garbage, and a tick on the wrong partition.
    wrong = (key_partition(b"AAA", PARTITIONS) + 1) % PARTITIONS
    stray = ticks_for("AAA", ["50"], T0 + timedelta(minutes=3), 1, "stray")
    send(env, "md.ticks", [(b"AAA", b"\xc3\x01garbage")])
    send(env, "md.ticks", [(k, v) for k, v, _ in stray], partition=wrong)

    # What the back-test (the same evaluation, off Kafka) says must happen:
    rules_file = tmp_path / "rules.jsonl"
    live_rules = [*RULES, make_rule("b-moved", "BBB", "LESS_THAN", "ONLY_ONCE", value="19.2")]
    rules_file.write_text("\n".join(json.dumps(r.to_json()) for r in live_rules) + "\n")
    out = tmp_path / "firings.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finstream.cli",
            "alerts",
            "backtest",
            "--rules",
            str(rules_file),
            "--from",
            (T0 - timedelta(minutes=1)).isoformat(),
            "--to",
            NOW.isoformat(),
            "--output",
            str(out),
            "--quiet",
        ],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1 tick(s) on the wrong partition" in result.stderr
    expected = list(csv.DictReader(out.open()))
    expected_ids = {row["fired_id"] for row in expected}
    by_rule: dict[str, list[str]] = {}
    for row in expected:
        by_rule.setdefault(row["rule_id"], []).append(row["tick_id"])

    # Hand-checked expectations, so that "equal" cannot mean "both empty".
    assert by_rule["a-up"] == ["x-AAA-2", "x-AAA-6", "x-AAA-10", "x-AAA-14", "x-AAA-18", "x-AAA-22"]
    assert by_rule["a-chan"] == ["x-AAA-1"]
    # Crossings down at 25, 45, 60, 85 and 105 s; once per minute keeps 25 and 85.
    assert by_rule["a-down"] == ["x-AAA-5", "x-AAA-17"]
    assert by_rule["b-moved"] == ["x-BBB-0"]
    assert by_rule["b-vol"] == ["x-BBB-23"]  # 370 >= 1.1 x 330 on the bar's last tick
    assert "c-gone" not in by_rule
    assert set(by_rule) >= {
        "a-up",
        "a-down",
        "a-gt",
        "a-chan",
        "a-close",
        "b-cross",
        "b-prev",
        "b-vol",
        "b-moved",
    }
    assert all(row["at_bar_close"] == "True" for row in expected if row["rule_id"] == "a-close")

    def live_firings() -> list[dict[str, Any]] | None:
        msgs = env.decode_all("alerts.fired", "AlertFired", timeout=5)
        return msgs if {m["fired_id"] for m in msgs} >= expected_ids else None

    fired = wait_until(live_firings, timeout=90, message="live firings")
    # Identical: the same firings, each exactly once.
    assert sorted(m["fired_id"] for m in fired) == sorted(expected_ids)
    live = {m["fired_id"]: m for m in fired}
    for row in expected:
        m = live[row["fired_id"]]
        assert (m["rule_id"], m["tick_id"], m["symbol"]) == (
            row["rule_id"],
            row["tick_id"],
            row["symbol"],
        )
        assert m["price"] == Decimal(row["price"])
        assert m["tick_ts"].isoformat() == row["tick_ts"]

    requests = env.decode_all("notify.requests", "NotificationRequest", min_count=len(fired))
    assert len(requests) == len(fired)
    assert {r["request_id"] for r in requests} == {"alert-" + f[2:] for f in expected_ids}
    for r in requests:
        assert r["category"] == "price_alert"
        assert r["template"] == "price_alert"
        assert {"symbol", "price", "condition", "rule_id", "title", "body"} <= set(r["data"])
    rebalance = [r for r in requests if r["data"]["rule_id"] == "b-cross"]
    assert all("Rebalance" in r["data"]["body"] for r in rebalance)
    keys = {m.key() for m in env.consume_all("alerts.fired")}
    assert keys <= {b"user-a", b"user-b"}

    letters = [
        parse_headers(m.headers() or []) for m in env.consume_all("dlq", min_count=2, timeout=30)
    ]
    assert any("murmur2" in h[H_ERROR_MESSAGE] and "AAA" in h[H_ERROR_MESSAGE] for h in letters), (
        letters
    )
    assert any(h[H_ERROR_CLASS] == "DecodeError" for h in letters), letters


def test_invalid_rules_and_tombstones(env: TestEnv, alerts_worker: WorkerProcess) -> None:
    from dataclasses import replace

    good = make_rule("d-good", "DDD", "CROSSING_UP", "EVERY_TIME", value="5")
    bad = replace(
        make_rule("d-bad", "DDD", "INSIDE_CHANNEL", "EVERY_TIME", lower="1", upper="2"),
        lower=Decimal("3"),
    )
    put_rules(env, [good])
    send(env, "alerts.rules", [(b"d-bad", env.codec.encode("AlertRule", bad.to_record()))])
    send(env, "alerts.rules", [(b"d-other-key", env.codec.encode("AlertRule", good.to_record()))])
    wait_until(lambda: rules_loaded(env, {"DDD": {"d-good"}}), timeout=60, message="d-good loaded")

    def bad_rule_letters() -> list[str] | None:
        found = [
            parse_headers(m.headers() or [])[H_ERROR_MESSAGE]
            for m in env.consume_all("dlq", timeout=5)
            if m.key() in (b"d-bad", b"d-other-key")
        ]
        return found if len(found) >= 2 else None

    letters = wait_until(bad_rule_letters, timeout=60, message="dead letters for bad rules")
    assert any(r.startswith("lower: must be below upper") for r in letters), letters
    assert any("is not the rule's rule_id" in r for r in letters), letters

    # Deleting stops the firing; a control rule on the same symbol proves ticks flowed.
    control = make_rule("d-control", "DDD", "CROSSING_UP", "EVERY_TIME", value="5.5")
    put_rules(env, [control])
    send(env, "alerts.rules", [(b"d-good", None)])
    wait_until(
        lambda: rules_loaded(env, {"DDD": {"d-control"}}), timeout=60, message="d-good deleted"
    )
    # The rules gauge counts what the worker holds, deletions included.
    held = sum(len(ids) for ids in rulebook(env).values())
    wait_until(
        lambda: metric_value(alerts_worker, "finstream_alerts_rules") == held,
        timeout=30,
        message=f"finstream_alerts_rules at {held}",
    )
    ticks = ticks_for("DDD", ["4", "6"], NOW - timedelta(seconds=30), 1, "y")
    send(env, "md.ticks", [(k, v) for k, v, _ in ticks])
    fired = wait_until(
        lambda: (
            [
                m
                for m in env.decode_all("alerts.fired", "AlertFired", timeout=5)
                if m["symbol"] == "DDD"
            ]
            or None
        ),
        timeout=60,
        message="control firing",
    )
    assert [m["rule_id"] for m in fired] == ["d-control"]
