"""Notification routing: requests routed per second with 100,000 users' preferences
loaded, and routing latency p50/p99, each beside a baseline measured in the same run.

1. 100,000 users' preferences (email, push token, a quiet window for a tenth of
   them, caps for another tenth) go to notify.preferences; the router loads
   them into its changelog-backed store and the Redis read model.
2. Baseline: a plain aiokafka loop over the same requests: consume, decode,
   encode one OutboundMessage, produce, wait for the broker (the least any
   router must do, with no preferences, templates, state or audit).
3. The router (a real worker process) routes the same requests: each one a
   price alert to a random user, rendered for in-app and push (two outbound
   messages) plus an audit event, with dedupe, caps and quiet hours checked.
4. Latency: requests offered at a fixed rate; time from a request's
   created_at to its in-app message arriving on notify.outbound.inapp, for the
   router and for the baseline loop.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as CTopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from tests.support.services import TestEnv, WorkerProcess, create_env, destroy_env

from finstream.codec import Codec
from finstream.domain.notifications import outbound_message_id
from finstream.domain.preferences import parse_preferences
from finstream.domain.time import to_micros
from finstream.settings import Settings
from finstream.stack import Stack

USERS = 100_000
COUNT = 20_000
LATENCY_RATE = 300  # requests per second offered for the latency figures
LATENCY_SECONDS = 10
PARTITIONS = 6


def _producer(env: TestEnv) -> Producer:
    # murmur2: the partitioner of Kafka's Java clients and of aiokafka, so that
    # keys land where the router's tables expect them.
    return Producer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            "log_level": 3,
        }
    )


def _produce(env: TestEnv, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    p = _producer(env)
    for key, value in items:
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(120) == 0


def _preferences(codec: Codec, now: datetime) -> list[tuple[bytes, bytes]]:
    rng = random.Random(5)
    out = []
    for i in range(USERS):
        user = f"user-{i}"
        data: dict[str, Any] = {
            "user_id": user,
            "emails": [{"address": f"{user}@example.com", "verified": True}],
            "push_tokens": [{"platform": "FCM", "token": f"tok-{i}"}],
        }
        if i % 10 == 1:
            data["timezone"] = rng.choice(["Europe/Berlin", "America/New_York", "Asia/Tokyo"])
            data["quiet_hours"] = [{"start": "23:00", "end": "06:00", "days": [1, 2, 3, 4, 5]}]
        if i % 10 == 2:
            data["caps"] = [{"channel": "push", "limit": 50, "window_seconds": 3600}]
        record = parse_preferences(data, now=now)
        out.append((user.encode(), codec.encode("UserPreferences", record)))
    return out


def _request(codec: Codec, run: str, n: int, user: int, now: datetime) -> tuple[bytes, bytes]:
    record = {
        "request_id": f"{run}-{n}",
        "user_id": f"user-{user}",
        "category": "price_alert",
        "priority": "HIGH",
        "template": "price_alert",
        "data": {
            "symbol": "AAPL",
            "price": f"{190 + n % 50}.25",
            "description": "AAPL crossed above 190.00",
        },
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": now,
        "source": "bench",
        "correlation_id": None,
    }
    return record["user_id"].encode(), codec.encode("NotificationRequest", record)


def _requests(codec: Codec, run: str, count: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(run)
    now = datetime.now(UTC)
    return [_request(codec, run, n, rng.randrange(USERS), now) for n in range(count)]


def _lag(env: TestEnv, group: str, topic: str) -> int:
    c = Consumer(
        {"bootstrap.servers": env.settings.kafka_bootstrap, "group.id": group, "log_level": 3}
    )
    try:
        committed = c.committed([CTopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        lag = 0
        for tp in committed:
            high = c.get_watermark_offsets(tp, timeout=10)[1]
            lag += high - max(tp.offset, 0)
        return lag
    finally:
        c.close()


def _percentiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100)
    return q[49], q[98]


# -- the baseline: consume, decode, encode, produce ----------------------------------------


async def _baseline_loop(
    env: TestEnv,
    codec: Codec,
    source: str,
    target: str,
    count: int,
    arrivals: list[float] | None = None,
) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=env.settings.kafka_bootstrap, acks="all", linger_ms=5
    )
    await consumer.start()
    await producer.start()
    tps = [TopicPartition(source, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    done = 0
    started = None
    try:
        while done < count:
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            futures = []
            for records in batches.values():
                for r in records:
                    if started is None:
                        started = time.perf_counter()
                    req = codec.decode(r.value, "NotificationRequest")
                    out = {
                        "message_id": outbound_message_id(
                            req["request_id"], "INAPP", req["user_id"]
                        ),
                        "request_id": req["request_id"],
                        "user_id": req["user_id"],
                        "channel": "INAPP",
                        "category": req["category"],
                        "priority": req["priority"],
                        "recipient": req["user_id"],
                        "platform": None,
                        "locale": "en",
                        "subject": req["data"].get("symbol"),
                        "body_text": req["data"].get("description", ""),
                        "body_html": None,
                        "data": req["data"],
                        "transactional": True,
                        "created_at": req["created_at"],
                        "expires_at": None,
                        "attempt": 0,
                        "correlation_id": None,
                    }
                    futures.append(
                        await producer.send(
                            target, key=r.key, value=codec.encode("OutboundMessage", out)
                        )
                    )
                    done += 1
            if futures:
                await asyncio.gather(*futures)
                if arrivals is not None:
                    arrivals.append(time.time())
        return time.perf_counter() - (started or time.perf_counter())
    finally:
        await consumer.stop()
        await producer.stop()


# -- reading what came out -----------------------------------------------------------------


async def _collect(
    env: TestEnv, topic: str, run: str, count: int, within: float
) -> list[tuple[float, datetime]]:
    """(arrival time, created_at) of the first ``count`` messages of ``run`` on ``topic``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        group_id=None,
    )
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    codec = Codec()
    seen: dict[str, tuple[float, datetime]] = {}
    deadline = time.monotonic() + within
    try:
        while len(seen) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            now = time.time()
            for records in batches.values():
                for r in records:
                    msg = codec.decode(r.value, "OutboundMessage")
                    if msg["request_id"].startswith(run) and msg["request_id"] not in seen:
                        seen[msg["request_id"]] = (now, msg["created_at"])
    finally:
        await consumer.stop()
    return list(seen.values())


async def _offer(
    env: TestEnv, topic: str, run: str, rate: int, seconds: int, codec: Codec
) -> list[datetime]:
    """Produce requests at a steady rate; created_at is the send time."""
    p = _producer(env)
    rng = random.Random(run)
    sent: list[datetime] = []
    interval = 1.0 / rate
    start = time.perf_counter()
    for n in range(rate * seconds):
        target = start + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        now = datetime.now(UTC)
        key, value = _request(codec, run, n, rng.randrange(USERS), now)
        p.produce(topic, key=key, value=value)
        p.poll(0)
        sent.append(now)
    p.flush(30)
    return sent


async def _latency(
    env: TestEnv, codec: Codec, source: str, out_topic: str, run: str, baseline: bool
) -> tuple[float, float, int]:
    total = LATENCY_RATE * LATENCY_SECONDS
    collect = asyncio.create_task(_collect(env, out_topic, run, total, LATENCY_SECONDS + 60))
    await asyncio.sleep(2.0)  # the collector is positioned at the end
    loop = None
    if baseline:
        loop = asyncio.create_task(_baseline_loop(env, codec, source, out_topic, total))
    await _offer(env, source, run, LATENCY_RATE, LATENCY_SECONDS, codec)
    got = await collect
    if loop is not None:
        loop.cancel()
    latencies = [(arrived - to_micros(created) / 1e6) * 1000 for arrived, created in got]
    p50, p99 = _percentiles(latencies)
    return p50, p99, len(got)


def _create_topics(env: TestEnv, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": env.settings.kafka_bootstrap, "log_level": 3})
    for fut in admin.create_topics(
        [NewTopic(n, num_partitions=PARTITIONS, replication_factor=1) for n in names]
    ).values():
        fut.result()


def main() -> None:
    settings = Settings()
    Stack(settings).up(log=lambda _m: None)
    env = create_env(settings, "benchroute")
    codec = Codec()
    log_dir = settings.stack_dir / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    router: WorkerProcess | None = None
    try:
        base_in, base_in2, base_out = (
            env.topic("bench.requests"),
            env.topic("bench.requests.live"),
            env.topic("bench.outbound"),
        )
        _create_topics(env, base_in, base_in2, base_out)
        prefs = _preferences(codec, datetime.now(UTC))
        run_a, run_b, run_c, run_d = (uuid.uuid4().hex[:6] for _ in range(4))
        requests = _requests(codec, run_a, COUNT)

        # Baseline throughput over the same requests (a copy in a topic of its own).
        _produce(env, base_in, requests)
        base_seconds = asyncio.run(_baseline_loop(env, codec, base_in, base_out, COUNT))
        base_rate = COUNT / base_seconds
        print(
            f"baseline (aiokafka consume, decode, encode, produce, ack): {base_rate:,.0f} requests/s"
        )

        # The router, with 100,000 users' preferences loaded.
        router = WorkerProcess(
            env,
            "router",
            log_dir,
            router_batch_size="1000",
            router_batch_ms="20",
            log_level="WARNING",
        ).start()
        started = time.perf_counter()
        _produce(env, env.topic("notify.preferences"), prefs)
        group = env.settings.group("router")
        while _lag(env, group, env.topic("notify.preferences")) > 0:
            time.sleep(0.5)
        load = time.perf_counter() - started
        print(
            f"router: {USERS:,} users' preferences loaded (changelog store + Redis read model) in {load:.1f}s ({USERS / load:,.0f}/s)"
        )

        # Throughput: the same requests (new ids) into notify.requests while the router runs.
        requests = [
            _request(codec, run_b, n, int(k.decode().split("-")[1]), datetime.now(UTC))
            for n, (k, _v) in enumerate(requests)
        ]
        collector = asyncio.new_event_loop()
        collect = collector.create_task(
            _collect(env, env.topic("notify.outbound.inapp"), run_b, COUNT, 600)
        )
        collector.run_until_complete(asyncio.sleep(2.0))
        started_wall = time.time()
        _produce(env, env.topic("notify.requests"), requests)
        got = collector.run_until_complete(collect)
        collector.close()
        assert len(got) == COUNT, f"only {len(got)} of {COUNT} routed"
        elapsed = max(a for a, _ in got) - started_wall
        rate = COUNT / elapsed
        print(
            f"router: {rate:,.0f} requests/s routed (in-app + push + audit each), "
            f"{rate / base_rate:.2f}x the baseline, {USERS:,} users' preferences loaded"
        )

        # Latency at a fixed offered rate, router then baseline.
        p50, p99, n = asyncio.run(
            _latency(
                env,
                codec,
                env.topic("notify.requests"),
                env.topic("notify.outbound.inapp"),
                run_c,
                False,
            )
        )
        print(
            f"router latency at {LATENCY_RATE} requests/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({n} requests)"
        )
        b50, b99, n = asyncio.run(_latency(env, codec, base_in2, base_out, run_d, True))
        print(
            f"baseline latency at {LATENCY_RATE} requests/s: p50 {b50:.1f} ms, p99 {b99:.1f} ms ({n} requests)"
        )
    finally:
        if router is not None:
            router.stop()
        destroy_env(env, settings)


if __name__ == "__main__":
    main()
