"""Foundation pipeline: how fast the quotes agent and the history sink drain md.ticks.

1. Baseline: a plain aiokafka consumer that decodes and validates the same
   200,000 ticks (the least any consumer of md.ticks must do).
2. The quotes agent (faust table + Redis cache) and the history sink
   (PostgreSQL batches) as real worker processes, draining the same ticks
   produced while they run: time until the quotes group has no lag and every
   row is in PostgreSQL.
3. Tick-to-cache latency (publish to the Redis quote channel) at a fixed
   offered rate.

Prints ticks/s for each and the ratios to the baseline.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as CTopicPartition
from tests.support.services import TestEnv, WorkerProcess, create_env, destroy_env

from finstream.codec import Codec
from finstream.domain.simulation import GbmMarket
from finstream.domain.ticks import Tick, validate_tick
from finstream.settings import Settings
from finstream.stack import Stack
from finstream.topics import load_catalogue

COUNT = 200_000
LATENCY_RATE = 1_000  # ticks per second offered for the latency figure
LATENCY_SECONDS = 10
SYMBOLS = [f"S{i:03d}" for i in range(200)]


def _encoded(codec: Codec, count: int, start: datetime) -> list[tuple[bytes, bytes]]:
    market = GbmMarket(SYMBOLS, seed=11, run_id="bench")
    ticks = itertools.islice(market.ticks(start, timedelta(microseconds=200)), count)
    return [(t.symbol.encode(), codec.encode("Tick", t.to_record())) for t in ticks]


def _produce(env: TestEnv, messages: list[tuple[bytes, bytes]]) -> float:
    p = env.producer()
    topic = env.topic("md.ticks")
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    p.flush(60)
    return time.perf_counter() - started


async def _baseline(env: TestEnv, codec: Codec) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    topic = env.topic("md.ticks")
    partitions = load_catalogue().get("md.ticks").partitions
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    now = datetime.now(UTC)
    limit = timedelta(minutes=5)
    seen = 0
    started = time.perf_counter()
    while seen < COUNT:
        batches = await consumer.getmany(timeout_ms=500, max_records=5000)
        for records in batches.values():
            for r in records:
                validate_tick(Tick.from_record(codec.decode(r.value, "Tick")), now, limit)
                seen += 1
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return COUNT / elapsed


def _group_lag(env: TestEnv, group: str) -> int:
    c = Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    topic = env.topic("md.ticks")
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    tps = [CTopicPartition(topic, p) for p in parts]
    committed = c.committed(tps, timeout=10)
    lag = 0
    for tp in committed:
        _low, high = c.get_watermark_offsets(tp, timeout=10)
        lag += high - max(tp.offset, 0)
    c.close()
    return lag


async def _latency(env: TestEnv, codec: Codec) -> tuple[float, float, int]:
    r = aioredis.from_url(env.settings.redis_url.get_secret_value())
    pubsub = r.pubsub()
    await pubsub.psubscribe(env.settings.redis_key("quotes:*"))
    latencies: list[float] = []

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] != "pmessage":
                continue
            body = json.loads(msg["data"])
            if body["source"] != "latency":
                continue
            sent = int(body["ts_us"]) / 1e6
            latencies.append(time.time() - sent)

    listener = asyncio.create_task(listen())
    market = GbmMarket(SYMBOLS, seed=3, run_id="lat")
    p = env.producer()
    topic = env.topic("md.ticks")
    interval = 1 / LATENCY_RATE
    started = time.perf_counter()
    for n in range(LATENCY_RATE * LATENCY_SECONDS):
        target = started + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = datetime.now(UTC)
        tick = market.next_tick(now)
        record = {**tick.to_record(), "source": "latency"}
        p.produce(topic, key=tick.symbol.encode(), value=codec.encode("Tick", record))
        p.poll(0)
    p.flush(30)
    await asyncio.sleep(3)
    listener.cancel()
    await pubsub.aclose()
    await r.aclose()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 100 else [float("nan")] * 99
    return q[49] * 1000, q[98] * 1000, len(latencies)


def main() -> None:
    base = Settings()
    Stack(base).up(log=lambda _m: None)
    env = create_env(base, "bench")
    log_dir = base.stack_dir / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    codec = Codec()
    try:
        messages = _encoded(codec, COUNT, datetime.now(UTC) - timedelta(hours=2))
        quotes = WorkerProcess(env, "quotes", log_dir, log_level="WARNING").start()
        history = WorkerProcess(env, "history", log_dir, log_level="WARNING").start()
        started = time.perf_counter()
        produce_s = _produce(env, messages)
        quotes_done = history_done = None
        while quotes_done is None or history_done is None:
            elapsed = time.perf_counter() - started
            if elapsed > 900:
                raise SystemExit("pipeline did not drain 200,000 ticks in 15 minutes")
            if quotes_done is None and _group_lag(env, env.settings.group("quotes")) == 0:
                quotes_done = elapsed
            if history_done is None and env.sql("SELECT count(*) AS n FROM ticks")[0]["n"] >= COUNT:
                history_done = elapsed
            time.sleep(0.25)
        baseline = asyncio.run(_baseline(env, codec))
        p50, p99, samples = asyncio.run(_latency(env, codec))
        quotes.stop()
        history.stop()
        quotes_tps = COUNT / quotes_done
        history_tps = COUNT / history_done
        print(f"ticks: {COUNT:,} produced in {produce_s:.1f}s")
        print(f"baseline aiokafka consume+decode+validate: {baseline:,.0f} ticks/s")
        print(
            f"quotes agent (faust table + Redis) drain:   {quotes_tps:,.0f} ticks/s  ratio {quotes_tps / baseline:.3f}"
        )
        print(
            f"history sink (PostgreSQL batches) drain:    {history_tps:,.0f} ticks/s  ratio {history_tps / baseline:.3f}"
        )
        print(
            f"tick-to-cache latency at {LATENCY_RATE}/s offered: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({samples} samples)"
        )
    finally:
        destroy_env(env, base)


if __name__ == "__main__":
    main()
