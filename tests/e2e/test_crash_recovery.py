"""SIGKILL a worker mid-run: after a restart no tick is lost and none is duplicated."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from finstream.domain.marketdata.simulation import GbmMarket
from tests.support.services import TestEnv, WorkerProcess, group_caught_up, wait_until

TOTAL = 30_000


def test_history_sink_killed_mid_run_loses_and_duplicates_nothing(
    env: TestEnv, log_dir: Path
) -> None:
    market = GbmMarket(["AAPL", "MSFT", "NVDA", "TSLA", "JPM", "META"], seed=42, run_id="crash")
    start = datetime.now(UTC) - timedelta(hours=1)
    ticks = list(itertools.islice(market.ticks(start, timedelta(milliseconds=1)), TOTAL))
    # The rest is produced after the kill, so the kill falls mid-run however
    # fast the sink drains.
    before_kill = TOTAL // 3
    env.produce_records(
        "md.ticks", "Tick", [(t.symbol, t.to_record()) for t in ticks[:before_kill]]
    )

    def count() -> int:
        return int(env.sql("SELECT count(*) AS n FROM ticks")[0]["n"])

    # Small batches so the kill lands between a write and its commit; a short
    # session so the restarted member gets the partitions without a 30 s wait.
    settings = {
        "history_batch_size": "200",
        "history_batch_ms": "20",
        "consumer_session_timeout": "6",
    }
    first = WorkerProcess(env, "history", log_dir, **settings).start()
    wait_until(lambda: count() > 3_000, timeout=90, message="sink progress")
    first.kill()
    env.produce_records(
        "md.ticks", "Tick", [(t.symbol, t.to_record()) for t in ticks[before_kill:]]
    )

    second = WorkerProcess(env, "history", log_dir, **settings).start()
    try:
        wait_until(lambda: count() >= TOTAL, timeout=120, message=f"{TOTAL} rows")
        # Offsets are committed after the rows: once the group has committed
        # everything, no write of either worker is still to land.
        wait_until(
            lambda: group_caught_up(env, env.settings.group("history"), ["md.ticks"]),
            timeout=60,
            message="history caught up with md.ticks",
        )
        rows = env.sql(
            "SELECT count(*) AS n, count(DISTINCT tick_id) AS ids, min(ts) AS first, max(ts) AS last FROM ticks"
        )[0]
        assert rows["n"] == TOTAL
        assert rows["ids"] == TOTAL
        assert rows["first"] == ticks[0].ts
        assert rows["last"] == ticks[-1].ts
    finally:
        second.stop()
