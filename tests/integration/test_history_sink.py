"""History sink against real Kafka and PostgreSQL: batches, idempotence, dead letters."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from finstream.domain.deadletter import parse_headers
from finstream.domain.marketdata.simulation import GbmMarket
from tests.support.services import TestEnv, WorkerProcess, wait_until


def _ticks(count: int, seed: int) -> list[tuple[str, dict]]:
    market = GbmMarket(["AAPL", "MSFT", "BRK.B", "BTC-USD"], seed=seed, run_id=f"h{seed}")
    start = datetime.now(UTC) - timedelta(minutes=10)
    return [
        (t.symbol, t.to_record())
        for t in itertools.islice(market.ticks(start, timedelta(milliseconds=5)), count)
    ]


def test_ticks_land_once_and_bad_ones_become_dead_letters(env: TestEnv, log_dir: Path) -> None:
    good = _ticks(400, seed=1)
    now = datetime.now(UTC)
    base = dict(good[0][1])
    bad_records = [
        ("AAPL", {**base, "tick_id": "neg", "price": Decimal("-1.00000000")}),
        ("AAPL", {**base, "tick_id": "future", "ts": now + timedelta(days=1)}),
        ("bad sym", {**base, "tick_id": "sym", "symbol": "bad sym"}),
    ]
    worker = WorkerProcess(env, "history", log_dir, history_batch_ms="50").start()
    try:
        env.produce_records("md.ticks", "Tick", good[:200])
        env.produce("md.ticks", [(b"AAPL", b"not avro at all"), (b"AAPL", None)])
        env.produce_records("md.ticks", "Tick", bad_records)
        env.produce_records("md.ticks", "Tick", good[200:])
        count = lambda: env.sql("SELECT count(*) AS n FROM ticks")[0]["n"]  # noqa: E731
        wait_until(lambda: count() == 400, timeout=60, message="400 rows")

        # Replaying the whole history (a reprocessing, a second producer) adds nothing.
        env.produce_records("md.ticks", "Tick", good)
        wait_until(lambda: "finstream_events_in_total" in worker.metrics(), timeout=10)
        wait_until(
            lambda: _consumed(worker.metrics()) >= 2 * 400 + 5,
            timeout=60,
            message="replay consumed",
        )
        assert count() == 400
        rows = env.sql("SELECT count(DISTINCT (symbol, tick_id)) AS n, min(price) AS p FROM ticks")
        assert rows[0]["n"] == 400
        assert rows[0]["p"] > 0

        # Prices are stored exactly (numeric, not float).
        sample = good[7][1]
        stored = env.sql("SELECT price, ts FROM ticks WHERE tick_id = $1", sample["tick_id"])[0]
        assert stored["price"] == sample["price"]
        assert stored["ts"] == sample["ts"]

        letters = env.consume_all("dlq", min_count=5, timeout=20)
        assert len(letters) == 5
        found = sorted(
            (
                parse_headers(m.headers())["dlq.error.class"],
                parse_headers(m.headers())["dlq.error.message"],
            )
            for m in letters
        )
        assert [cls for cls, _ in found] == ["DecodeError"] * 2 + ["TickValidationError"] * 3
        messages = " | ".join(msg for _, msg in found)
        for reason in (
            "unknown framing",
            "no value",
            "non_positive_price",
            "future_timestamp",
            "bad_symbol",
        ):
            assert reason in messages
        for m in letters:
            h = parse_headers(m.headers())
            assert h["dlq.source.topic"] == env.topic("md.ticks")
            assert int(h["dlq.source.offset"]) >= 0
            assert h["dlq.role"] == "history"
        assert (
            'finstream_dead_letters_total{error_class="TickValidationError"'
            in worker.metrics().replace(
                'role="history",source_topic="' + env.topic("md.ticks") + '",', ""
            )
        )
    finally:
        worker.stop()


def _consumed(metrics: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("finstream_events_in_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_batch_partly_stored_adds_only_its_new_ticks(env: TestEnv) -> None:
    """A batch re-read after a crash overlaps what was stored: the fast COPY path
    collides, and the merge keeps exactly the ticks not stored yet."""
    import asyncio

    import asyncpg

    from finstream.domain.marketdata.ticks import Tick
    from finstream.sinks.history import TickWriter

    ticks = [Tick.from_record(r) for _, r in _ticks(150, seed=3)]

    async def go() -> tuple[int, int, int]:
        pool = await asyncpg.create_pool(
            env.settings.database_url.get_secret_value(), min_size=1, max_size=1
        )
        try:
            writer = TickWriter(pool)
            first = await writer.write(ticks[:100])
            second = await writer.write(ticks)  # 100 stored, 50 new, plus in-batch repeats
            again = await writer.write(ticks[:10] + ticks[:10])
            return first, second, again
        finally:
            await pool.close()

    first, second, again = asyncio.run(go())
    assert (first, second, again) == (100, 50, 0)
    rows = env.sql(
        "SELECT count(*) AS n, count(DISTINCT (symbol, tick_id)) AS d FROM ticks"
        " WHERE tick_id = ANY($1::text[])",
        [t.tick_id for t in ticks],
    )
    assert (rows[0]["n"], rows[0]["d"]) == (150, 150)


def test_an_aborted_transaction_upstream_leaves_no_lag(env: TestEnv, log_dir: Path) -> None:
    """A read_committed consumer skips an aborted transaction's records and its
    marker without handing anything to the role; the engine still commits the
    position past them, so the group catches up to the end of the topic."""
    import uuid

    from confluent_kafka import Producer

    from finstream.codec import Codec
    from tests.support.services import group_caught_up

    codec = Codec()
    worker = WorkerProcess(env, "history", log_dir).start()
    try:
        stored = _ticks(20, seed=7)
        env.produce_records("md.ticks", "Tick", stored)
        group = env.settings.group("history")
        wait_until(lambda: group_caught_up(env, group, ["md.ticks"]), message="first ticks")

        producer = Producer(
            {**env.kafka_config(), "transactional.id": f"aborting-{uuid.uuid4().hex}"}
        )
        producer.init_transactions(30)
        producer.begin_transaction()
        for key, record in _ticks(10, seed=8):
            producer.produce(
                env.topic("md.ticks"), key=key.encode(), value=codec.encode("Tick", record)
            )
        producer.flush(30)
        producer.abort_transaction(30)

        wait_until(
            lambda: group_caught_up(env, group, ["md.ticks"]),
            message="the history group's offsets past the aborted transaction",
        )
        ids = [r["tick_id"] for _, r in stored]
        rows = env.sql("SELECT count(*) AS n FROM ticks WHERE tick_id = ANY($1::text[])", ids)
        assert rows[0]["n"] == 20
        aborted = [r["tick_id"] for _, r in _ticks(10, seed=8)]
        rows = env.sql("SELECT count(*) AS n FROM ticks WHERE tick_id = ANY($1::text[])", aborted)
        assert rows[0]["n"] == 0
    finally:
        worker.stop()


def test_ticks_and_their_partitions_keep_one_index_led_by_symbol_and_time(env: TestEnv) -> None:
    def indexes(table: str) -> list[str]:
        rows = env.sql("SELECT indexdef FROM pg_indexes WHERE tablename = $1", table)
        return [r["indexdef"].split(" USING ")[1] for r in rows]

    # The primary key is the idempotency key and serves reads by symbol and time range.
    assert indexes("ticks") == ["btree (symbol, ts, tick_id)"]
    assert indexes("ticks_default") == ["btree (symbol, ts, tick_id)"]
