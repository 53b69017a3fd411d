"""The audit sink against real Kafka and PostgreSQL: hash chain, idempotence, concurrent
replicas, and tamper detection by `finstream audit verify`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from finstream.sinks.audit import AuditWriter, canonical, chain_hash, normalize, verify
from tests.support.services import TestEnv, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def event(i: int, user: str = "u1", **fields: Any) -> dict[str, Any]:
    record = {
        "event_id": f"ev-{i}",
        "at": T0 + timedelta(milliseconds=i),
        "actor": "router",
        "action": "routed",
        "subject_type": "request",
        "subject_id": f"r-{i}",
        "user_id": user,
        "reason": None,
        "details": {"channels": "email,inapp", "phase": "intake"},
        "correlation_id": None,
    }
    record.update(fields)
    return record


def test_canonical_form_is_stable_and_covers_every_field() -> None:
    e = normalize(event(1))
    assert canonical(1, e) == canonical(1, normalize(dict(reversed(list(event(1).items())))))
    base = chain_hash("0" * 64, 1, e)
    assert chain_hash("0" * 64, 2, e) != base
    assert chain_hash("1" * 64, 1, e) != base
    for name, value in [
        ("reason", "x"),
        ("details", {"channels": "email"}),
        ("at", T0),
        ("user_id", None),
        ("action", "suppressed"),
    ]:
        assert chain_hash("0" * 64, 1, normalize({**event(1), name: value})) != base
    # Text PostgreSQL cannot hold is replaced before hashing: the hash is of what is stored.
    assert normalize(event(1, reason="a\x00b"))["reason"] == "a\ufffdb"


async def _conn(env: TestEnv) -> asyncpg.Connection:
    return await asyncpg.connect(env.settings.database_url.get_secret_value())


async def _reset(env: TestEnv) -> None:
    conn = await _conn(env)
    try:
        await conn.execute("TRUNCATE audit_events")
        await conn.execute("UPDATE audit_chain_head SET seq = 0, hash = repeat('0', 64)")
    finally:
        await conn.close()


async def test_concurrent_writers_never_fork_the_chain(env: TestEnv) -> None:
    await _reset(env)
    dsn = env.settings.database_url.get_secret_value()
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=2) for _ in range(4)]
    try:
        writers = [AuditWriter(p) for p in pools]

        async def write(w: AuditWriter, offset: int) -> int:
            n = 0
            for b in range(10):
                # Overlapping ids across writers: redeliveries seen by two replicas.
                batch = [event(offset * 5 + b * 20 + k) for k in range(20)]
                n += await w.append(batch)
            return n

        stored = await asyncio.gather(*(write(w, i) for i, w in enumerate(writers)))
        conn = await _conn(env)
        try:
            ids = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM audit_events")}
            expected = {
                f"ev-{i * 5 + b * 20 + k}" for i in range(4) for b in range(10) for k in range(20)
            }
            assert ids == expected
            assert sum(stored) == len(expected)
            result = await verify(conn, page=37)
            assert result.ok, result.render()
            assert result.checked == len(expected)
            seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM audit_events ORDER BY seq")]
            assert seqs == list(range(1, len(expected) + 1))
        finally:
            await conn.close()
    finally:
        for p in pools:
            await p.close()


async def test_verify_names_the_first_tampered_row(env: TestEnv) -> None:
    await _reset(env)
    pool = await asyncpg.create_pool(
        env.settings.database_url.get_secret_value(), min_size=1, max_size=2
    )
    try:
        await AuditWriter(pool).append([event(i) for i in range(1, 11)])
    finally:
        await pool.close()
    conn = await _conn(env)
    try:
        assert (await verify(conn)).ok

        original = await conn.fetchrow("SELECT * FROM audit_events WHERE seq = 4")
        await conn.execute("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 4")
        broken = await verify(conn)
        assert not broken.ok
        assert broken.seq == 4
        assert "does not match its hash" in (broken.problem or "")
        await conn.execute("UPDATE audit_events SET reason = $1 WHERE seq = 4", original["reason"])
        await conn.execute(
            'UPDATE audit_events SET details = details || \'{"x": "1"}\'::jsonb WHERE seq = 6'
        )
        assert (await verify(conn)).seq == 6
        await conn.execute("UPDATE audit_events SET details = details - 'x' WHERE seq = 6")
        assert (await verify(conn)).ok

        # A removed row in the middle.
        row = await conn.fetchrow("SELECT * FROM audit_events WHERE seq = 7")
        await conn.execute("DELETE FROM audit_events WHERE seq = 7")
        gap = await verify(conn)
        assert gap.seq == 7
        assert "missing" in (gap.problem or "")
        cols = list(row.keys())
        await conn.execute(
            f"INSERT INTO audit_events ({', '.join(cols)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))})",
            *row.values(),
        )
        assert (await verify(conn)).ok

        # A row rewritten with a hash recomputed over the edit still breaks its successor.
        edited = {**event(5), "reason": "forged"}
        prev = await conn.fetchval("SELECT prev_hash FROM audit_events WHERE seq = 5")
        await conn.execute(
            "UPDATE audit_events SET reason = 'forged', hash = $1 WHERE seq = 5",
            chain_hash(prev, 5, normalize(edited)),
        )
        assert (await verify(conn)).seq == 6
    finally:
        await conn.close()


async def test_truncated_tail_is_detected(env: TestEnv) -> None:
    await _reset(env)
    pool = await asyncpg.create_pool(
        env.settings.database_url.get_secret_value(), min_size=1, max_size=2
    )
    try:
        await AuditWriter(pool).append([event(i) for i in range(1, 6)])
    finally:
        await pool.close()
    conn = await _conn(env)
    try:
        await conn.execute("DELETE FROM audit_events WHERE seq >= 4")
        result = await verify(conn)
        assert not result.ok
        assert "removed at the end" in (result.problem or "")
    finally:
        await conn.close()


def _audit_records(n: int, run: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"user-{i % 7}", event(i, user=f"user-{i % 7}", event_id=f"{run}-{i}")) for i in range(n)
    ]


def _caught_up(env: TestEnv) -> bool:
    from confluent_kafka import Consumer, TopicPartition

    topic = env.topic("audit.events")
    c = Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": env.settings.group("audit"),
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        committed = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        # A partition nothing was written to has no committed offset at all.
        highs = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in committed]
        return all(
            high == 0 or tp.offset == high for tp, high in zip(committed, highs, strict=True)
        )
    finally:
        c.close()


def test_sink_replicas_store_each_event_once_in_one_chain(env: TestEnv, log_dir: Path) -> None:
    asyncio.run(_reset(env))
    run = uuid.uuid4().hex[:6]
    records = _audit_records(400, run)
    a = WorkerProcess(env, "audit", log_dir, audit_batch_size="50", audit_batch_ms="20")
    b = WorkerProcess(env, "audit", log_dir, audit_batch_size="50", audit_batch_ms="20")
    a.start(wait_ready=False)
    b.start(wait_ready=False)
    try:
        a.wait_ready()
        b.wait_ready()
        env.produce_records("audit.events", "AuditEvent", records)
        # Redelivered copies (a producer retry, a replayed batch) and garbage.
        env.produce_records("audit.events", "AuditEvent", records[:50])
        env.produce("audit.events", [(b"user-1", b"\xc3\x01garbage")])

        def stored() -> int:
            return int(env.sql("SELECT count(*) AS n FROM audit_events")[0]["n"])

        wait_until(lambda: stored() >= 400, timeout=60, message="400 audit rows")
        # Everything consumed and committed (the replays too), and nothing more stored.
        wait_until(lambda: _caught_up(env), timeout=60, message="audit group caught up")
        assert len(env.consume_all("dlq", min_count=1)) == 1
        assert stored() == 400
        rows = env.sql("SELECT event_id, details FROM audit_events ORDER BY seq")
        assert len({r["event_id"] for r in rows}) == 400
        assert json.loads(rows[0]["details"])["phase"] == "intake"
        check = subprocess.run(
            [sys.executable, "-m", "finstream.cli", "audit", "verify"],
            check=False,
            env=env.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        assert "intact: 400 events" in check.stdout
        env.sql("UPDATE audit_events SET action = 'suppressed' WHERE seq = 200")
        check = subprocess.run(
            [sys.executable, "-m", "finstream.cli", "audit", "verify"],
            check=False,
            env=env.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 1
        assert "BROKEN at seq 200" in check.stdout
    finally:
        assert a.stop() == 0, a.log_tail()
        assert b.stop() == 0, b.log_tail()
