"""Partitions, retention, least privilege and health against the real PostgreSQL.

Each test works in the module's own database: migrating an existing
unpartitioned ticks table keeps every row; retention drops whole partitions
past their policy, moves the audit chain's anchor so `finstream audit
verify` still passes, purges final delivery rows but never ones that can
still be redriven or reconciled, and audits all of it on audit.events; a
worker role's login cannot write outside its grant; `finstream db health`
and `db stats` answer, and `db slow-queries` says in one line what an
external server lacks.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY, generate_latest

from finstream.db.grants import provision_dev_logins, role_database_url
from finstream.db.partitions import BY_NAME, create_partition, list_partitions, use_owner_role
from finstream.db.retention import run_pass
from finstream.domain.retention import floor, partition_name, step
from finstream.settings import Settings
from finstream.sinks.audit import AuditWriter, verify
from finstream.sinks.history import TickWriter
from finstream.stores.postgres import create_pool, load_migrations, migrate
from tests.support.services import TestEnv, _db_url

NOW = datetime.now(UTC)


def _tick_row(i: int, ts: datetime) -> tuple[Any, ...]:
    return (
        "AAPL",
        f"t{i}",
        ts,
        "trade",
        Decimal("190.5"),
        Decimal(1),
        None,
        None,
        None,
        "USD",
        "test",
        ts,
    )


async def _scratch_db(base: Settings) -> tuple[str, str]:
    name = f"fs_part_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(base.database_url.get_secret_value())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name, _db_url(base.database_url.get_secret_value(), name)


async def _drop_db(base: Settings, name: str) -> None:
    admin = await asyncpg.connect(base.database_url.get_secret_value())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_migrating_an_unpartitioned_ticks_table_keeps_its_rows(stack: Settings) -> None:
    name, url = await _scratch_db(stack)
    try:
        conn = await asyncpg.connect(url)
        try:
            before = [m for m in load_migrations() if m.version < 40]
            await migrate(conn, before)
            assert (
                await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'ticks'")
                == "r"
            )
            rows = [_tick_row(i, NOW - timedelta(days=400 - i)) for i in range(400)]
            await conn.copy_records_to_table(
                "ticks",
                records=rows,
                columns=[
                    "symbol",
                    "tick_id",
                    "ts",
                    "kind",
                    "price",
                    "size",
                    "bid",
                    "ask",
                    "prev_close",
                    "currency",
                    "source",
                    "received_at",
                ],
            )
            await migrate(conn)
            assert (
                await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'ticks'")
                == "p"
            )
            assert await conn.fetchval("SELECT count(*) FROM ticks") == 400
            assert await conn.fetchval("SELECT count(*) FROM ONLY ticks_legacy") == 400
            stored = await conn.fetchrow("SELECT price, ts FROM ticks WHERE tick_id = 't7'")
            assert stored["price"] == Decimal("190.5")
            assert stored["ts"] == rows[7][2]
            parts = await list_partitions(conn, "ticks")
            assert parts[0].name == "ticks_legacy"
            assert parts[0].start is None
            # The legacy range ends after today; the days ahead follow it without a gap.
            assert parts[0].end == step(floor(NOW, "day"), "day")
            assert parts[1].start == parts[0].end
            ends = sorted((p.start, p.end) for p in parts[1:])
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))
            # The history sink's idempotent insert works on the partitioned table.
            pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
            try:
                from finstream.domain.marketdata.ticks import Tick

                tick = Tick(
                    symbol="MSFT",
                    tick_id="new1",
                    ts=NOW,
                    kind="trade",
                    price=Decimal("400"),
                    size=None,
                    bid=None,
                    ask=None,
                    prev_close=None,
                    currency="USD",
                    source="test",
                    received_at=NOW,
                )
                writer = TickWriter(pool)
                assert await writer.write([tick]) == 1
                assert await writer.write([tick]) == 0
            finally:
                await pool.close()
            # Migrating again is a no-op.
            assert await migrate(conn) == []
        finally:
            await conn.close()
    finally:
        await _drop_db(stack, name)


def _audit_event(i: int) -> dict[str, Any]:
    return {
        "event_id": f"ret-{i}",
        "at": NOW,
        "actor": "router",
        "action": "routed",
        "subject_type": "request",
        "subject_id": f"r{i}",
        "user_id": "u1",
        "reason": None,
        "details": {"phase": "intake"},
        "correlation_id": None,
    }


def test_retention_drops_expired_partitions_keeps_the_chain_and_audits(env: TestEnv) -> None:
    asyncio.run(_retention_scenario(env))


async def _retention_scenario(env: TestEnv) -> None:
    settings = env.settings.model_copy(
        update={
            "db_retention_ticks": "30d",
            "db_retention_audit": "1y",
            "db_retention_deliveries": "13mo",
        }
    )
    url = settings.database_url.get_secret_value()
    conn = await asyncpg.connect(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        await conn.execute("SET TIME ZONE 'UTC'")
        # As partition maintenance does: partitions belong to the owner role.
        assert await use_owner_role(conn)
        # Ticks 90 days old land in the default partition; a partition made for
        # their day takes them out of it, and retention drops it as a whole.
        old_day = floor(NOW - timedelta(days=90), "day")
        await conn.copy_records_to_table(
            "ticks",
            records=[_tick_row(i, old_day + timedelta(minutes=i)) for i in range(50)],
            columns=[
                "symbol",
                "tick_id",
                "ts",
                "kind",
                "price",
                "size",
                "bid",
                "ask",
                "prev_close",
                "currency",
                "source",
                "received_at",
            ],
        )
        await conn.copy_records_to_table(
            "ticks",
            records=[_tick_row(1000 + i, NOW - timedelta(minutes=i)) for i in range(5)],
            columns=[
                "symbol",
                "tick_id",
                "ts",
                "kind",
                "price",
                "size",
                "bid",
                "ask",
                "prev_close",
                "currency",
                "source",
                "received_at",
            ],
        )
        assert await conn.fetchval("SELECT count(*) FROM ticks_default") == 50
        old_part = partition_name("ticks", old_day, "day")
        moved = await create_partition(
            conn, BY_NAME["ticks"], old_part, old_day, step(old_day, "day")
        )
        assert moved == 50
        assert await conn.fetchval("SELECT count(*) FROM ticks_default") == 0
        # A stray old tick in the default partition is deleted row by row.
        await conn.copy_records_to_table(
            "ticks",
            records=[_tick_row(2000, NOW - timedelta(days=200))],
            columns=[
                "symbol",
                "tick_id",
                "ts",
                "kind",
                "price",
                "size",
                "bid",
                "ask",
                "prev_close",
                "currency",
                "source",
                "received_at",
            ],
        )

        # Audit: 10 events; the first 4 recorded two years ago in their own partition.
        await conn.execute("TRUNCATE audit_events")
        await conn.execute(
            "UPDATE audit_chain_head SET seq = 0, hash = repeat('0', 64), base_seq = 0, base_hash = repeat('0', 64)"
        )
        await AuditWriter(pool).append([_audit_event(i) for i in range(1, 11)])
        old_month = floor(NOW - timedelta(days=730), "month")
        await conn.execute(
            "UPDATE audit_events SET recorded_at = $1 WHERE seq <= 4",
            old_month + timedelta(hours=1),
        )
        audit_part = partition_name("audit_events", old_month, "month")
        assert (
            await create_partition(
                conn, BY_NAME["audit_events"], audit_part, old_month, step(old_month, "month")
            )
            == 4
        )

        # Deliveries: final ones finished long ago go; a retry (reconcilable) and
        # a recent dead letter (redrivable from dlq) stay.
        long_ago = NOW - timedelta(days=500)
        for mid, state, finished in (
            ("old-sent", "sent", long_ago),
            ("old-retry", "retry", None),
            ("recent-failed", "failed", NOW - timedelta(days=2)),
        ):
            await conn.execute(
                """INSERT INTO deliveries (message_id, channel, user_id, request_id, state, deadline,
                       source_topic, source_partition, source_offset, message, created_at, finished_at)
                   VALUES ($1, 'email', 'u1', $1, $2, now(), 't', 0, 0, 'body', $3, $4)""",
                mid,
                state,
                long_ago,
                finished,
            )

        report = await run_pass(conn, settings, NOW, lambda events: _publish(settings, events))
    finally:
        await pool.close()
        await conn.close()

    await asyncio.to_thread(_check_retention, env, report, url, (old_part, audit_part))


def _check_retention(env: TestEnv, report: Any, url: str, parts: tuple[str, str]) -> None:
    old_part, audit_part = parts
    removed = {(r["table"], r["what"]) for r in report.removed}
    assert ("ticks", old_part) in removed
    assert ("audit_events", audit_part) in removed
    assert ("deliveries", "1 final rows") in removed
    assert any(t == "ticks" and "1 rows of ticks_default" in w for t, w in removed)
    assert env.sql("SELECT count(*) AS n FROM ticks")[0]["n"] == 5
    assert {r["message_id"] for r in env.sql("SELECT message_id FROM deliveries")} == {
        "old-retry",
        "recent-failed",
    }
    head = env.sql("SELECT base_seq FROM audit_chain_head")[0]
    assert head["base_seq"] == 4

    async def check_chain() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await verify(conn)
        finally:
            await conn.close()

    result = asyncio.run(check_chain())
    assert result.ok, result.render()
    assert result.checked == 6
    # Partitions ahead exist for every table.
    for table, grain in (("ticks", "day"), ("bars", "month"), ("audit_events", "month")):
        ahead = partition_name(table, step(floor(NOW, grain), grain, 3), grain)  # type: ignore[arg-type]
        assert env.sql("SELECT to_regclass($1) IS NOT NULL AS ok", ahead)[0]["ok"], ahead
    # What was removed is on audit.events, and recorded as a run.
    events = env.decode_all("audit.events", "AuditEvent", min_count=4, timeout=20)
    actions = {(e["action"], e["subject_id"]) for e in events if e["actor"] == "retention"}
    assert {
        ("partition_dropped", "ticks"),
        ("partition_dropped", "audit_events"),
        ("rows_purged", "deliveries"),
        ("rows_purged", "ticks"),
    } <= actions
    dropped_audit = next(e for e in events if e["subject_id"] == "audit_events")
    assert dropped_audit["details"]["anchor_seq"] == "4"
    runs = env.sql("SELECT ok FROM db_maintenance_runs WHERE kind = 'retention'")
    assert [r["ok"] for r in runs] == [True]


async def _publish(settings: Settings, events: list[dict[str, Any]]) -> None:
    from finstream.db.retention import publish_to_audit_topic

    await publish_to_audit_topic(settings, events)


async def test_a_worker_role_cannot_write_outside_its_grant(env: TestEnv) -> None:
    owner = env.settings.database_url.get_secret_value()
    conn = await asyncpg.connect(owner)
    try:
        await provision_dev_logins(conn)
    finally:
        await conn.close()
    history = await asyncpg.connect(role_database_url(owner, "finstream_history"))
    try:
        await history.execute(
            "INSERT INTO ticks (symbol, tick_id, ts, kind, price, source, received_at) "
            "VALUES ('AAPL', $1, now(), 'trade', 1, 'grant-test', now())",
            f"g-{uuid.uuid4().hex}",
        )
        for statement in (
            "INSERT INTO deliveries (message_id, channel, user_id, request_id, state, deadline, "
            "source_topic, source_partition, source_offset, message) "
            "VALUES ('x', 'email', 'u', 'r', 'queued', now(), 't', 0, 0, 'b')",
            "UPDATE audit_chain_head SET seq = 0",
            "DELETE FROM ticks",
            "DROP TABLE ticks",
            "SELECT message FROM deliveries",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await history.execute(statement)
    finally:
        await history.close()
    api = await asyncpg.connect(role_database_url(owner, "finstream_api"))
    try:
        await api.fetch("SELECT message_id, attempts FROM deliveries LIMIT 1")
        await api.fetch("SELECT * FROM bars LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await api.fetch("SELECT message FROM deliveries LIMIT 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await api.execute("DELETE FROM bars")
    finally:
        await api.close()
    audit = await asyncpg.connect(role_database_url(owner, "finstream_audit"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await audit.execute("DELETE FROM audit_events")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await audit.execute("UPDATE audit_events SET reason = 'edited'")
    finally:
        await audit.close()


def _cli(env: TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_health_and_stats_report_on_the_database(env: TestEnv) -> None:
    health = _cli(env, "db", "health")
    assert health.returncode == 0, health.stderr
    lines = health.stdout.splitlines()
    assert lines[0].startswith("database health: ")
    score = int(lines[0].split(": ")[1].split("/")[0])
    assert 0 <= score <= 100
    text = health.stdout
    for check in (
        "connections",
        "long-running queries",
        "idle in transaction",
        "locks",
        "cache hit ratio",
        "dead tuples",
        "autovacuum",
        "replication",
        "WAL archive",
        "backup",
    ):
        assert f"{check}:" in text, check
    # No backup was ever recorded here: that is critical, and lowers the score.
    assert "[CRITICAL] backup: no full backup recorded" in text
    assert score <= 70
    failing = _cli(env, "db", "health", "--fail-under", "100")
    assert failing.returncode == 2
    stats = _cli(env, "db", "stats")
    assert stats.returncode == 0, stats.stderr
    assert any(line.startswith("ticks ") for line in stats.stdout.splitlines())
    assert "unused indexes" in stats.stdout


def test_slow_queries_on_a_server_without_pg_stat_statements_is_one_line(env: TestEnv) -> None:
    preload = env.sql("SELECT current_setting('shared_preload_libraries') AS p")[0]["p"]
    if "pg_stat_statements" in preload:
        pytest.skip("this PostgreSQL preloads pg_stat_statements (the drill tests that case)")
    result = _cli(env, "db", "slow-queries")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pg_stat_statements is not loaded" in result.stderr


def test_backup_on_an_unconfigured_server_is_one_line(env: TestEnv, tmp_path: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finstream.cli", "db", "backup"],
        env=env.env(stack_dir=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pgBackRest is not configured" in result.stderr or "not installed" in result.stderr


async def test_pool_reports_size_use_and_waits(env: TestEnv) -> None:
    settings = env.settings.model_copy(update={"db_pool_max_size": 2, "db_pool_min_size": 1})
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as c1, pool.acquire() as c2:
            await c1.fetchval("SELECT 1")
            await c2.fetchval("SELECT 1")
            exposition = generate_latest(REGISTRY).decode()
            assert 'finstream_db_pool_in_use{role="cli"} 2.0' in exposition
            assert 'finstream_db_pool_max{role="cli"} 2.0' in exposition
        exposition = generate_latest(REGISTRY).decode()
        assert 'finstream_db_pool_acquire_seconds_count{role="cli"}' in exposition
    finally:
        await pool.close()


def test_retention_policy_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="not a retention policy"):
        Settings(db_retention_ticks="forever")


def test_reset_refuses_outside_development(env: TestEnv) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finstream.cli", "db", "reset", "--confirm", env.database],
        env=env.env(env="production"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "refuses" in result.stderr
    wrong = _cli(env, "db", "reset", "--confirm", "not-the-name")
    assert wrong.returncode == 1
    assert "nothing dropped" in wrong.stderr
    assert env.sql("SELECT to_regclass('ticks') IS NOT NULL AS ok")[0]["ok"]
