"""The retention role walks the audit chain on a schedule and says on /metrics
whether it is intact (finstream_audit_chain_ok, read by FinstreamAuditChainBroken)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from finstream.sinks.audit import AuditWriter
from tests.support.services import TestEnv, WorkerProcess, metric_value, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def event(i: int) -> dict[str, Any]:
    return {
        "event_id": f"chk-{i}",
        "at": T0 + timedelta(milliseconds=i),
        "actor": "router",
        "action": "routed",
        "subject_type": "request",
        "subject_id": f"r-{i}",
        "user_id": "u-chk",
        "reason": None,
        "details": {"channels": "inapp"},
        "correlation_id": None,
    }


def test_a_tampered_row_turns_the_chain_gauge_to_zero(env: TestEnv, log_dir: Path) -> None:
    async def write() -> None:
        pool = await asyncpg.create_pool(
            env.settings.database_url.get_secret_value(), min_size=1, max_size=2
        )
        try:
            await AuditWriter(pool).append([event(i) for i in range(1, 21)])
        finally:
            await pool.close()

    asyncio.run(write())
    role = WorkerProcess(
        env, "retention", log_dir, audit_verify_interval="0.5", db_monitor_interval="0.5"
    ).start()
    try:
        wait_until(
            lambda: metric_value(role, "finstream_audit_chain_events") >= 20,
            timeout=30,
            message="a first walk of the chain",
        )
        assert metric_value(role, "finstream_audit_chain_ok") == 1.0
        first = metric_value(role, "finstream_audit_chain_checked_timestamp_seconds")
        env.sql("UPDATE audit_events SET reason = 'edited' WHERE event_id = 'chk-7'")
        wait_until(
            lambda: metric_value(role, "finstream_audit_chain_ok") == 0.0,
            timeout=30,
            message="the broken chain on /metrics",
        )
        assert metric_value(role, "finstream_audit_chain_checked_timestamp_seconds") > first
        assert "audit chain broken" in role.log_path.read_text()
    finally:
        assert role.stop() == 0, role.log_tail()
