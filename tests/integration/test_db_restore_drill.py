"""The restore drill: backup, point-in-time restore, and workers resuming from Kafka.

It runs against a PRIVATE PostgreSQL cluster that `finstream stack`'s own
code starts on a free port under the test-log folder (WAL archived by
pgBackRest into a repository there), never the shared one, since the drill
destroys a data directory:

1. ticks (history worker, from Kafka), deliveries and audit rows (audit
   worker, from Kafka) are written;
2. a full backup is taken and more is written;
3. time T is noted and more is written (and its WAL archived);
4. the data directory is deleted;
5. `finstream db restore --to-time T` restores it.

Then exactly the rows written before T are back, `finstream audit verify`
passes on the restored chain, and once the workers restart (their consumer
groups rewound by the restore) every row written after T comes back from
Kafka too. The drill prints its RPO and RTO figures.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from finstream.domain.marketdata.simulation import GbmMarket
from finstream.settings import Settings
from finstream.sinks.delivery.store import DeliveryStore, NewDelivery
from finstream.stack import Stack
from finstream.stores.postgres import migrate
from tests.support.services import TestEnv, WorkerProcess, free_port, wait_until

pytestmark = pytest.mark.timeout(900)


def _ticks(count: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    market = GbmMarket(["AAPL", "MSFT"], seed=seed, run_id=f"drill{seed}")
    start = datetime.now(UTC) - timedelta(minutes=5)
    return [
        (t.symbol, t.to_record())
        for t in itertools.islice(market.ticks(start, timedelta(milliseconds=3)), count)
    ]


def _audit(prefix: str, n: int) -> list[tuple[str, dict[str, Any]]]:
    now = datetime.now(UTC)
    return [
        (
            "u1",
            {
                "event_id": f"{prefix}-{i}",
                "at": now,
                "actor": "drill",
                "action": "routed",
                "subject_type": "request",
                "subject_id": f"{prefix}-r{i}",
                "user_id": "u1",
                "reason": None,
                "details": {"phase": prefix},
                "correlation_id": None,
            },
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def private_pg(log_dir: Path, stack: Settings) -> Any:
    # Under the repository (the postgres user must reach it), never /tmp/pytest-of-root.
    where = log_dir / f"drill-{uuid.uuid4().hex[:8]}"
    port = free_port()
    settings = Settings(
        stack_dir=where,
        database_url=f"postgresql://finstream:drill@127.0.0.1:{port}/finstream",  # type: ignore[arg-type]
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
    )
    s = Stack(settings)
    s.postgres_up(log=lambda _m: None)
    try:
        yield settings
    finally:
        s.postgres_stop()
        shutil.rmtree(where, ignore_errors=True)


def _cli(
    settings: Settings, env: TestEnv, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    cmd_env = env.env(
        stack_dir=str(settings.stack_dir),
        database_url=settings.database_url.get_secret_value(),
    )
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", *args],
        env=cmd_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _sql(url: str, query: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


async def _deliveries(url: str, prefix: str, n: int) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        store = DeliveryStore(pool, 30.0)
        rows = [
            NewDelivery(
                message_id=f"{prefix}-m{i}",
                channel="email",
                user_id="u1",
                request_id=f"{prefix}-r{i}",
                deadline=datetime.now(UTC) + timedelta(days=1),
                correlation_id=None,
                source_topic="notify.outbound.email",
                source_partition=0,
                source_offset=i,
                raw=b"body",
            )
            for i in range(n)
        ]
        await store.claim_new(rows, uuid.uuid4())
    finally:
        await pool.close()


def test_restore_drill_to_a_point_in_time(
    private_pg: Settings, env: TestEnv, log_dir: Path
) -> None:
    settings = private_pg
    url = settings.database_url.get_secret_value()

    async def prepare() -> None:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(prepare())
    overrides = {"database_url": url, "history_batch_ms": "50", "audit_batch_ms": "50"}
    ticks = _ticks(900, seed=7)
    count = lambda table: _sql(url, f"SELECT count(*) AS n FROM {table}")[0]["n"]  # noqa: E731

    def start_workers() -> list[WorkerProcess]:
        return [
            WorkerProcess(env, role, log_dir, **overrides).start() for role in ("history", "audit")
        ]

    workers = start_workers()
    try:
        # 1. rows before the backup
        env.produce_records("md.ticks", "Tick", ticks[:300])
        env.produce_records("audit.events", "AuditEvent", _audit("a", 20))
        asyncio.run(_deliveries(url, "a", 10))
        wait_until(lambda: count("ticks") == 300 and count("audit_events") == 20, timeout=60)

        # 2. a full backup, then more rows
        backup = _cli(settings, env, "db", "backup", "--type", "full")
        assert backup.returncode == 0, backup.stdout + backup.stderr
        assert "backup:" in backup.stdout
        assert "(full) done" in backup.stdout
        env.produce_records("md.ticks", "Tick", ticks[300:600])
        env.produce_records("audit.events", "AuditEvent", _audit("b", 20))
        asyncio.run(_deliveries(url, "b", 10))
        wait_until(lambda: count("ticks") == 600 and count("audit_events") == 40, timeout=60)

        # 3. T, then more rows, their WAL archived
        time.sleep(1.0)  # T must fall strictly between two commits, not on one
        t_mark = datetime.now(UTC)
        time.sleep(1.0)
        env.produce_records("md.ticks", "Tick", ticks[600:])
        env.produce_records("audit.events", "AuditEvent", _audit("c", 20))
        asyncio.run(_deliveries(url, "c", 10))
        wait_until(lambda: count("ticks") == 900 and count("audit_events") == 60, timeout=60)
        before_t = {
            "ticks": {
                r["tick_id"]
                for r in _sql(url, "SELECT tick_id FROM ticks WHERE inserted_at < $1", t_mark)
            },
            "deliveries": {
                r["message_id"]
                for r in _sql(
                    url, "SELECT message_id FROM deliveries WHERE created_at < $1", t_mark
                )
            },
            "audit": {
                r["event_id"]
                for r in _sql(
                    url, "SELECT event_id FROM audit_events WHERE recorded_at < $1", t_mark
                )
            },
        }
        assert len(before_t["ticks"]) == 600
        assert len(before_t["audit"]) == 40
        assert len(before_t["deliveries"]) == 20
        segment = _sql(url, "SELECT pg_walfile_name(pg_switch_wal()) AS w")[0]["w"]
        wait_until(
            lambda: (
                (_sql(url, "SELECT last_archived_wal AS w FROM pg_stat_archiver")[0]["w"] or "")
                >= segment
            ),
            timeout=60,
            message="WAL archived",
        )
        unarchived = _sql(
            url, "SELECT extract(epoch FROM now() - last_archived_time) AS s FROM pg_stat_archiver"
        )[0]["s"]
    finally:
        for w in workers:
            w.stop()

    # 4. the data directory is lost
    stack = Stack(settings)
    stack.postgres_stop()
    shutil.rmtree(stack.pg_data)
    assert not stack.pg_data.exists()

    # 5. restore to T
    started = time.monotonic()
    restored = _cli(settings, env, "db", "restore", "--to-time", t_mark.isoformat())
    rto = time.monotonic() - started
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restore: done" in restored.stdout
    assert "rewound" in restored.stdout

    after = {
        "ticks": {r["tick_id"] for r in _sql(url, "SELECT tick_id FROM ticks")},
        "deliveries": {r["message_id"] for r in _sql(url, "SELECT message_id FROM deliveries")},
        "audit": {r["event_id"] for r in _sql(url, "SELECT event_id FROM audit_events")},
    }
    assert after == before_t, "exactly the rows written before T are back"
    verify = _cli(settings, env, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit chain intact: 40 events" in verify.stdout

    # Workers resume from Kafka: what was written after T comes back, once.
    workers = start_workers()
    try:
        wait_until(lambda: count("ticks") == 900 and count("audit_events") == 60, timeout=90)
        assert len({r["tick_id"] for r in _sql(url, "SELECT tick_id FROM ticks")}) == 900
        verify = _cli(settings, env, "audit", "verify")
        assert verify.returncode == 0
        assert "audit chain intact: 60 events" in verify.stdout
    finally:
        for w in workers:
            w.stop()

    listing = _cli(settings, env, "db", "backups")
    assert listing.returncode == 0, listing.stderr
    assert "full" in listing.stdout
    assert "WAL archive" in listing.stdout
    print(
        f"\nRESTORE DRILL: RPO {unarchived:.1f}s of WAL not yet archived at the failure "
        f"(bound: archive_timeout 60s); RTO {rto:.1f}s from `finstream db restore` to a "
        f"server accepting writes ({os.cpu_count()} cores)"
    )


def test_slow_queries_and_health_on_a_cluster_finstream_configured(
    private_pg: Settings, env: TestEnv
) -> None:
    url = private_pg.database_url.get_secret_value()
    _sql(url, "SELECT count(*) FROM pg_class")
    slow = _cli(private_pg, env, "db", "slow-queries", "-n", "5")
    assert slow.returncode == 0, slow.stdout + slow.stderr
    assert "calls" in slow.stdout.splitlines()[0]
    assert len(slow.stdout.splitlines()) >= 2
    health = _cli(private_pg, env, "db", "health")
    assert health.returncode == 0, health.stderr
    assert "WAL archive:" in health.stdout
    assert "archive_mode is off" not in health.stdout
