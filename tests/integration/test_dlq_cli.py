"""`finstream dlq redrive`: keys land on their home partition; letters from outside
Kafka (webhooks) are refused instead of producing to a topic that is not one."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

from finstream.domain.deadletter import DeadLetter
from finstream.domain.partitioning import key_partition
from tests.support.services import TestEnv


def _letter(env: TestEnv, source: str, key: bytes, value: bytes, offset: int) -> None:
    letter = DeadLetter(
        source_topic=source,
        source_partition=0,
        source_offset=offset,
        error_class="Boom",
        reason="test",
        role="test",
        at=datetime.now(UTC),
        key=key,
        value=value,
    )
    p = env.producer()
    p.produce(env.topic("dlq"), key=key, value=value, headers=letter.headers(), partition=0)
    assert p.flush(10) == 0


def test_redrive_keeps_co_partitioning_and_refuses_non_topics(env: TestEnv) -> None:
    keys = [f"user-{n}".encode() for n in range(12)]
    for n, key in enumerate(keys):
        _letter(env, env.topic("notify.requests"), key, b"payload-%d" % n, n)
    _letter(env, "webhook:twilio", b"SM123", b"{}", 99)

    result = subprocess.run(
        [sys.executable, "-m", "finstream.cli", "dlq", "redrive", "--all"],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "webhook:twilio is not a topic of the catalogue" in result.stdout
    assert "12 redriven, 1 skipped" in result.stdout

    partitions = list(range(6))
    expected = {key: key_partition(key, len(partitions)) for key in keys}
    redriven = env.consume_all("notify.requests", min_count=12, timeout=30)
    assert {m.key(): m.partition() for m in redriven} == expected
    # Each redrive changes a message's fate: audited, naming the letter and where it went.
    audits = [
        e
        for e in env.decode_all("audit.events", "AuditEvent", min_count=12, timeout=60)
        if e["action"] == "redriven"
    ]
    assert len(audits) == 12
    assert {a["details"]["to"] for a in audits} == {env.topic("notify.requests")}
    assert all(a["details"]["dead_letter"].startswith("dlq:") for a in audits)
