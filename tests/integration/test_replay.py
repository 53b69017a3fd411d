"""`finstream topics tail` and `topics replay` over a time range."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from finstream.domain.marketdata.ticks import make_tick
from finstream.topics import describe
from tests.support.services import TestEnv

# Recent times: the broker deletes records older than md.ticks' 7-day retention,
# which would make the test depend on when its retention check runs.
BASE = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)


def _cli(env: TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "topics", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_replay_a_time_range_to_a_file_and_a_sandbox_topic(env: TestEnv, tmp_path: Path) -> None:
    p = env.producer()
    for minute in range(60):
        ts = BASE + timedelta(minutes=minute)
        t = make_tick(
            symbol=["IBM", "MSFT"][minute % 2],
            price=f"100.{minute:02d}",
            ts=ts,
            received_at=ts,
            source="test",
            tick_id=f"r{minute}",
        )
        p.produce(
            env.topic("md.ticks"),
            key=t.symbol.encode(),
            value=env.codec.encode("Tick", t.to_record()),
            timestamp=int(ts.timestamp() * 1000),
        )
    assert p.flush(10) == 0

    out = tmp_path / "ticks.jsonl"
    result = _cli(
        env,
        "replay",
        "md.ticks",
        "--from",
        (BASE + timedelta(minutes=10)).isoformat(),
        "--to",
        (BASE + timedelta(minutes=20)).isoformat(),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["value"]["tick_id"] for x in lines) == sorted(f"r{m}" for m in range(10, 20))
    first = next(x for x in lines if x["value"]["tick_id"] == "r10")
    assert first["value"]["price"] == "100.1"  # decimal text, not a float
    assert first["key"] == "IBM"
    assert "replayed 10 message(s)" in result.stderr

    sandbox = _cli(
        env, "replay", "md.ticks", "--from", BASE.isoformat(), "--to-topic", "sandbox.ticks"
    )
    assert sandbox.returncode == 0, sandbox.stderr
    copied = env.consume_all("sandbox.ticks", min_count=60)
    sandbox_configs = describe(env.settings.kafka_bootstrap, [env.topic("sandbox.ticks")])
    assert sandbox_configs[env.topic("sandbox.ticks")].configs["retention.ms"] == "-1"
    original = env.consume_all("md.ticks", min_count=60)
    assert sorted((m.partition(), m.key(), m.value()) for m in copied) == sorted(
        (m.partition(), m.key(), m.value()) for m in original
    )

    refused = _cli(env, "replay", "md.ticks", "--from", "-1d", "--to-topic", "md.bars.1m")
    assert refused.returncode == 1
    assert "is a catalogue topic" in refused.stderr

    naive = BASE.replace(tzinfo=None).isoformat()
    bad = _cli(env, "replay", "md.ticks", "--from", naive, "--out", str(out))
    assert bad.returncode == 2
    assert "no time zone" in bad.stderr

    tail = _cli(env, "tail", "md.ticks", "-n", "1")
    assert tail.returncode == 0, tail.stderr
    tails = [json.loads(line) for line in tail.stdout.splitlines()]
    assert {x["value"]["tick_id"] for x in tails} <= {f"r{m}" for m in range(60)}
    assert 1 <= len(tails) <= 6
