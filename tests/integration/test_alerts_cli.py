"""`finstream alerts` against real Kafka and PostgreSQL: add, list, show, rm, and a
back-test over the ticks table."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from finstream.cli.backtest import Backtest
from finstream.domain.alerts.rules import parse_rule
from finstream.domain.marketdata.bars import parse_interval
from finstream.domain.marketdata.ticks import make_tick
from tests.support.services import TestEnv


def cli(env: TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "alerts", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_add_list_show_rm(env: TestEnv, tmp_path: Path) -> None:
    added = cli(
        env,
        "add",
        "--id",
        "cli-1",
        "--user",
        "u-cli",
        "--symbol",
        "aapl",
        "--condition",
        "crossing-up",
        "--value",
        "190.5",
        "--frequency",
        "every-time",
        "--cooldown",
        "60",
        "--expires",
        "+7d",
        "--message",
        "Trim the position",
    )
    assert added.returncode == 0, added.stderr
    assert "added cli-1: AAPL crossing up 190.5" in added.stdout

    refused = cli(
        env,
        "add",
        "--user",
        "u-cli",
        "--symbol",
        "AAPL",
        "--condition",
        "inside-channel",
        "--lower",
        "20",
        "--upper",
        "10",
    )
    assert refused.returncode == 1
    assert "lower: must be below upper" in refused.stderr
    assert "--lower" in refused.stderr
    refused = cli(
        env,
        "add",
        "--user",
        "u-cli",
        "--symbol",
        "AAPL",
        "--condition",
        "crossing",
        "--value",
        "1",
        "--cooldown",
        "5",
    )
    assert refused.returncode == 1
    assert "cooldown_seconds: only applies to frequency EVERY_TIME" in refused.stderr

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        "- {rule_id: cli-2, user_id: u-cli, symbol: MSFT, condition: less-than, value: 300}\n"
        "- {rule_id: cli-3, user_id: u-other, symbol: TSLA, condition: volume-spike, bars: 5, multiplier: 3}\n"
    )
    assert cli(env, "add", "--file", str(rules_file)).returncode == 0

    listed = cli(env, "list", "--user", "u-cli", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["rule_id"] for r in rows} == {"cli-1", "cli-2"}
    human = cli(env, "list")
    assert "3 rule(s)" in human.stderr
    assert "TSLA volume spike 3x the 5-bar average" in human.stdout

    shown = cli(env, "show", "cli-1")
    rule = json.loads(shown.stdout)
    assert rule["value"] == "190.5"
    assert rule["cooldown_seconds"] == 60
    assert rule["message"] == "Trim the position"
    assert datetime.fromisoformat(rule["expires_at"]) > datetime.now(UTC) + timedelta(days=6)

    assert cli(env, "rm", "nope").returncode == 1
    removed = cli(env, "rm", "cli-1")
    assert removed.returncode == 0, removed.stderr
    assert cli(env, "show", "cli-1").returncode == 1
    assert {json.loads(x)["rule_id"] for x in cli(env, "list", "--json").stdout.splitlines()} == {
        "cli-2",
        "cli-3",
    }
    # The tombstone is on the topic for the alerts role to see.
    tombstones = [m for m in env.consume_all("alerts.rules") if m.value() is None]
    assert [m.key() for m in tombstones] == [b"cli-1"]


def test_backtest_from_postgres(env: TestEnv, tmp_path: Path) -> None:
    t0 = datetime(2025, 3, 3, 14, 30, tzinfo=UTC)
    prices = ["99", "101", "100.5", "99.5", "102", "98", "103"]
    ticks = [
        make_tick(
            tick_id=f"pg-{i}",
            symbol="IBM",
            price=p,
            size=5,
            ts=t0 + timedelta(seconds=20 * i),
            received_at=t0,
            source="test",
        )
        for i, p in enumerate(prices)
    ]
    env.sql(
        "INSERT INTO ticks (symbol, tick_id, ts, kind, price, size, source, received_at) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::numeric[], $6::numeric[], $7::text[], $8::timestamptz[])",
        [t.symbol for t in ticks],
        [t.tick_id for t in ticks],
        [t.ts for t in ticks],
        [t.kind for t in ticks],
        [t.price for t in ticks],
        [t.size for t in ticks],
        [t.source for t in ticks],
        [t.received_at for t in ticks],
    )
    spec = [
        {
            "rule_id": "pg-cross",
            "symbol": "IBM",
            "condition": "crossing",
            "value": "100",
            "frequency": "every_time",
        },
        {
            "rule_id": "pg-close",
            "symbol": "IBM",
            "condition": "greater_than",
            "value": "100",
            "frequency": "once_per_bar_close",
        },
    ]
    rules_file = tmp_path / "rules.json"
    rules_file.write_text(json.dumps({"rules": spec}))
    out = tmp_path / "firings.json"
    result = cli(
        env,
        "backtest",
        "--rules",
        str(rules_file),
        "--from",
        t0.isoformat(),
        "--to",
        (t0 + timedelta(hours=1)).isoformat(),
        "--source",
        "postgres",
        "-o",
        str(out),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())

    rules = [parse_rule({"user_id": "backtest", **r}, now=t0) for r in spec]
    bt = Backtest(rules, parse_interval("1m"), t0, t0 + timedelta(hours=1))
    for t in ticks:
        bt.feed(t)
    assert [(g["rule_id"], g["tick_id"]) for g in got] == sorted(
        ((f.rule.rule_id, f.tick_id) for f in bt.firings),
        key=lambda x: (int(x[1].split("-")[1]), x[0]),
    )
    crossings = [g["tick_id"] for g in got if g["rule_id"] == "pg-cross"]
    assert crossings == ["pg-1", "pg-3", "pg-4", "pg-5", "pg-6"]
    # Bars close at 14:31 (close 100.5, tick pg-2) and 14:32 (close 98: no firing).
    assert [g["tick_id"] for g in got if g["rule_id"] == "pg-close"] == ["pg-2"]
    assert "2 rule(s), 6 firing(s) from 7 tick(s)" in result.stderr
