"""The router: requests routed per second with 100,000 users' preferences loaded,
beside a raw baseline and a Quix Streams anchor, and routing latency.

1. 100,000 users' preferences (email, push token, a quiet window for a tenth
   of them, caps for another tenth) go to notify.preferences as finstream's
   writers store them: each user's data key created and the contact points
   sealed under it (``Sealer``, what the API does), the key tables analyzed as
   autovacuum would be by the time such a load is routed; the router loads
   them into its changelog-backed store. Its key cache starts
   cold: each user's key is read (and unwrapped) once, on their first request.
   A user's first key is created once in their lifetime, where their contacts
   are first written, so the drain does not pay for creating keys.
2. baseline: a raw confluent-kafka consume + decode + validate loop over the
   requests (warm, its own process);
3. the router drains 40,000 price-alert requests to random users: each
   rendered for in-app and push (the users' channels), plus audit events,
   with dedupe, caps and quiet hours checked, exactly-once;
4. anchor: a Quix Streams application doing the same work with finstream's
   pure routing code (bench/anchor/quix_router.py): the same decisions, the
   users' contacts opened and each message sealed as the router does, with
   every user's keys in memory from the start;
5. a new replica restoring the router's state from its changelogs;
6. latency: requests offered at 1,000/s by a load generator in its own
   process; each in-app message read by a read_committed consumer, minus the
   request's created_at.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench import harness
from finstream.codec import Codec
from finstream.domain.notify.preferences import parse_preferences

USERS = 100_000
COUNT = 40_000
LATENCY_RATE = 1_000
LATENCY_SECONDS = 15


def preferences(now: datetime) -> list[dict[str, Any]]:
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
        out.append(parse_preferences(data, now=now))
    return out


async def sealed(env: harness.TestEnv, prefs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The preferences with contacts sealed, each user's key created, a chunk at a time."""
    from finstream.domain.envelope import seal_contacts
    from finstream.privacy.producer import Sealer

    out: list[dict[str, Any]] = []
    async with Sealer.open(env.settings) as sealer:
        for i in range(0, len(prefs), 1_000):
            chunk = prefs[i : i + 1_000]
            keys = await sealer.keys.load([p["user_id"] for p in chunk], create=True)
            out.extend(seal_contacts(p, keys[p["user_id"]]) for p in chunk)
        # What autovacuum does within a minute of so many new rows (10% of a table
        # changed): without statistics the key lookups of the router's drain,
        # 100 users a query, planned a full scan (14 ms each at 100,000 keys, not
        # 0.6 ms), and PostgreSQL took a quarter of a core beside the router.
        async with sealer.keys.pool.acquire() as conn:
            await conn.execute("ANALYZE user_keys, erased_users")
    return out


async def raw_keys(env: harness.TestEnv, users: list[str]) -> dict[str, dict[int, bytes]]:
    """Each user's data keys, unwrapped, for the anchor to hold in memory.

    The router reads a user's keys from PostgreSQL (and unwraps them) on the
    user's first request; the anchor is spared that: it has them all at start.
    """
    from finstream.domain.envelope import wrap_context
    from finstream.privacy.producer import Sealer

    out: dict[str, dict[int, bytes]] = {u: {} for u in users}
    async with Sealer.open(env.settings) as sealer:
        ring = sealer.keys
        async with ring.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT user_id, version, master_key_id, wrapped FROM user_keys"
                " WHERE user_id = ANY($1::text[])",
                users,
            )
        for row in rows:
            user, version = row["user_id"], row["version"]
            out[user][version] = await ring.master.unwrap(
                row["master_key_id"], bytes(row["wrapped"]), wrap_context(user, version)
            )
    return out


def requests(count: int) -> list[dict[str, Any]]:
    rng = random.Random(11)
    now = datetime.now(UTC)
    return [
        {
            "request_id": f"bench-{n}",
            "user_id": f"user-{rng.randrange(USERS)}",
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
        for n in range(count)
    ]


def routed_latency(env: harness.TestEnv, codec: Codec) -> tuple[list[float], dict[str, float]]:
    c = Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": f"{env.namespace}latency",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    topic = env.topic("notify.outbound.inapp")
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, -1) for p in parts])  # from the end
    c.consume(100, 1.0)
    gen = harness.loadgen(env, "requests", LATENCY_RATE, LATENCY_SECONDS, str(USERS))
    samples: list[float] = []
    deadline = time.monotonic() + LATENCY_SECONDS + 15
    while time.monotonic() < deadline:
        for m, received in harness.received(c, 0.2):
            record = codec.decode(m.value(), "OutboundMessage")
            if record["request_id"].startswith("lat-"):
                samples.append(received - record["created_at"].timestamp())
        if gen.poll() is not None and time.monotonic() > deadline - 10:
            break
    out, _ = gen.communicate()
    c.close()
    return samples, json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    codec = Codec()
    base, env, logs = harness.setup("bench-r")
    try:
        now = datetime.now(UTC)
        prefs = preferences(now)
        reqs = requests(COUNT)
        t0 = time.perf_counter()
        stored = asyncio.run(sealed(env, prefs))
        print(
            f"sealing {USERS:,} users' contacts, their keys created: "
            f"{time.perf_counter() - t0:.1f} s"
        )
        w = harness.worker(env, "router", logs, instance_id="bench-r0").start()
        t0 = time.perf_counter()
        harness.produce(
            env,
            "notify.preferences",
            [(p["user_id"].encode(), codec.encode("UserPreferences", p)) for p in stored],
        )
        harness.wait_until(
            lambda: (
                harness.committed(env, env.settings.group("router"), "notify.preferences") >= USERS
            ),
            timeout=600,
            interval=0.5,
            message="preferences loaded",
        )
        load_s = time.perf_counter() - t0
        print(
            f"loading {USERS:,} users' preferences (into its store): {load_s:.1f} s "
            f"({USERS / load_s:,.0f}/s)"
        )
        harness.produce(
            env,
            "notify.requests",
            [(r["user_id"].encode(), codec.encode("NotificationRequest", r)) for r in reqs],
        )
        b = harness.baseline(env, "notify.requests", COUNT)
        ref = b["rate"]
        print(
            f"{'baseline: confluent-kafka consume+decode+validate':<44} {ref:>10,.0f}/s"
            f"  ({b['records']:,} records in {b['seconds']:.2f} s, second pass)"
        )
        router = harness.drain(
            env,
            env.settings.group("router"),
            "notify.requests",
            COUNT,
            lambda: harness.events_in(w, env, "notify.requests"),
        )
        messages = harness.metric(w, "finstream_router_messages_total")
        w.stop()
        print(
            router.line(f"router, {USERS:,} users' preferences", ref)
            + f", {messages:,.0f} messages"
        )

        with harness.StateDir() as state:
            # What the router's store holds (the sealed preferences as Avro) and
            # every user's keys: the anchor opens and seals as the router does.
            prefs_file = Path(state) / "prefs.pickle"
            prefs_file.write_bytes(
                pickle.dumps({p["user_id"]: codec.encode("UserPreferences", p) for p in stored})
            )
            keys_file = Path(state) / "keys.pickle"
            keys_file.write_bytes(
                pickle.dumps(asyncio.run(raw_keys(env, [p["user_id"] for p in stored])))
            )
            group = f"{env.namespace}quix-router"
            progress = Path(state) / "progress"
            proc = harness.anchor(
                "quix_router.py",
                env.settings.kafka_bootstrap,
                env.topic("notify.requests"),
                group,
                env.topic("notify.outbound.inapp") + ".anchor",
                state,
                str(progress),
                str(prefs_file),
                str(keys_file),
                log=logs / "quix-router.log",
            )
            try:
                anchor = harness.drain(
                    env, group, "notify.requests", COUNT, harness.progress_file(progress)
                )
            finally:
                harness.stop(proc)
        print(anchor.line("anchor: Quix Streams 3.28.1, same work", ref))
        print(f"{'router / anchor':<44} {router.rate / anchor.rate:>10.2f}x")

        w = harness.worker(env, "router", logs, instance_id="bench-r1").start()
        restored = harness.metric(w, "finstream_stream_restored_records_total")
        restore_s = harness.metric(w, "finstream_stream_restore_seconds_sum")
        print(
            f"state restore of a new replica: {restored:,.0f} changelog records in "
            f"{restore_s:.2f} s ({restored / restore_s:,.0f} records/s)"
        )
        samples, gen = routed_latency(env, codec)
        w.stop()
        p50, p99 = harness.percentiles(samples)
        print(
            f"request -> in-app message (read_committed) at {gen['rate']:,.0f} requests/s "
            f"offered ({gen['sent']:,} sent): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
            f"({len(samples):,} messages)"
        )
    finally:
        harness.teardown(base, env)


if __name__ == "__main__":
    main()
