"""The quotes role (latest quote, 1-minute bars, Redis cache) and the history sink.

On 200,000 Avro ticks over 200 symbols in md.ticks, each contender drains the
same topic in its own process, one after the other:

1. baseline: a raw confluent-kafka consume + decode + validate loop (warm);
2. anchor: a Quix Streams application keeping the latest quote and the
   1-minute OHLCV bars per symbol in its state store, exactly-once, at its
   default commit interval (5 s), with finstream's own decoding and bar code:
   the same work as the quotes role but the Redis cache
   (bench/anchor/quix_quotes.py). Two lighter Quix apps (its tumbling window;
   a stateful function on floats) are printed beside it for context;
3. the quotes role, exactly-once, at its defaults (commit every 0.1 s);
4. the history sink (PostgreSQL).

Then: tick -> Redis quote latency at 5,000 ticks/s offered by a load
generator in its own process, and how fast a new quotes replica restores the
state from its changelogs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis.asyncio as aioredis

from bench import harness
from bench.workloads import symbols, tape
from finstream.codec import Codec

COUNT = 200_000
LATENCY_RATE = 5_000
LATENCY_SECONDS = 15


async def quote_latency(env: harness.TestEnv) -> tuple[list[float], dict[str, float]]:
    """Publish time of each quote update minus its tick's send time, while the generator runs."""
    r = aioredis.from_url(env.settings.redis_url.get_secret_value())
    pubsub = r.pubsub()
    # A tenth of the symbols: the listener parses each message in Python, and
    # parsing all 5,000/s would compete with the worker for the two cores.
    watched = symbols(200)[::10]
    await pubsub.subscribe(*(env.settings.redis_key(f"quotes:{s}") for s in watched))
    samples: list[float] = []

    async def listen() -> None:
        async for msg in pubsub.listen():
            if msg["type"] != "message":
                continue
            now = time.time()
            body = json.loads(msg["data"])
            if body.get("source") == "loadgen":
                samples.append(now - int(body["ts_us"]) / 1e6)

    listener = asyncio.create_task(listen())
    gen = harness.loadgen(env, "ticks", LATENCY_RATE, LATENCY_SECONDS, "200")
    out, _ = await asyncio.to_thread(gen.communicate)
    # The last ticks' updates: a batch can take most of a second on a loaded machine.
    await asyncio.sleep(3)
    listener.cancel()
    await pubsub.aclose()
    await r.aclose()
    return samples, json.loads(out.decode().strip().splitlines()[-1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_step(w: harness.WorkerProcess, env: harness.TestEnv) -> None:
    """The latency load on a started quotes worker, which is stopped after it: the
    quote line, the worker's cycles, and the cores it and the broker used meanwhile."""
    assert w.proc is not None
    broker = harness.broker_pid(env)
    started = time.monotonic()
    before = (_cpu_seconds(w.proc.pid), _cpu_seconds(broker) if broker else 0.0)
    cycles = harness.Cycles.of(w)
    samples, gen = asyncio.run(quote_latency(env))
    load_cycles = harness.Cycles.of(w).since(cycles)
    took = time.monotonic() - started
    worker_cpu = (_cpu_seconds(w.proc.pid) - before[0]) / took
    broker_cpu = (_cpu_seconds(broker) - before[1]) / took if broker else float("nan")
    w.stop()
    p50, p99 = harness.percentiles(samples)
    print(
        f"tick -> Redis quote at {gen['rate']:,.0f} ticks/s offered ({gen['sent']:,} sent): "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(samples):,} quote updates)"
    )
    print(f"  the worker during that load: {load_cycles}")
    print(
        f"  cores used over those {took:.0f} s (the generator encodes for a few of them first): "
        f"worker {worker_cpu:.2f}, broker {broker_cpu:.2f}"
    )


def latency_only() -> None:
    """The latency step alone, with where the two cores went (the broker's share included).

    ``python -m bench.bench_pipeline latency``: a fresh namespace and quotes
    worker each time; minutes apart, its rounds compare settings or commits
    faster than whole runs do.
    """
    base, env, logs = harness.setup("bench-pl")
    try:
        latency_step(harness.worker(env, "quotes", logs, instance_id="bench-ql0").start(), env)
    finally:
        harness.teardown(base, env)


def main() -> None:
    if sys.argv[1:] == ["latency"]:
        latency_only()
        return
    base, env, logs = harness.setup("bench-p")
    codec = Codec()
    try:
        syms = symbols(200)
        ticks = tape(
            syms, COUNT, datetime.now(UTC) - timedelta(hours=2), timedelta(microseconds=200)
        )
        took = harness.produce(
            env,
            "md.ticks",
            [(t.symbol.encode(), codec.encode("Tick", t.to_record())) for t in ticks],
        )
        print(f"ticks: {COUNT:,} over {len(syms)} symbols, produced in {took:.1f} s")

        b = harness.baseline(env, "md.ticks", COUNT)
        print(
            f"{'baseline: confluent-kafka consume+decode+validate':<44} {b['rate']:>10,.0f}/s"
            f"  ({b['records']:,} records in {b['seconds']:.2f} s, second pass)"
        )
        ref = b["rate"]

        anchors = {}
        for mode in ("domain", "window", "stateful"):
            with harness.StateDir() as state:
                group = f"{env.namespace}quix-quotes-{mode}"
                progress = Path(state) / "progress"
                proc = harness.anchor(
                    "quix_quotes.py",
                    env.settings.kafka_bootstrap,
                    env.topic("md.ticks"),
                    group,
                    env.topic("md.bars.1m"),
                    state,
                    str(progress),
                    "exactly-once",
                    "5",
                    mode,
                    log=logs / f"quix-quotes-{mode}.log",
                )
                try:
                    drained = harness.drain(
                        env, group, "md.ticks", COUNT, harness.progress_file(progress)
                    )
                finally:
                    harness.stop(proc)
            anchors[mode] = drained
            print(drained.line(f"Quix Streams 3.28.1 exactly-once, bars by {mode}", ref))
        # The anchor does the quotes role's work (bar semantics included) on
        # Quix; the other two do less and are printed for context.
        anchor = anchors["domain"]

        w = harness.worker(env, "quotes", logs, instance_id="bench-q0").start(wait_ready=False)
        quotes = harness.drain(
            env,
            env.settings.group("quotes"),
            "md.ticks",
            COUNT,
            lambda: harness.metric(w, "finstream_events_in_total"),
        )
        w.stop()
        print(quotes.line("quotes role, exactly-once (commit 0.1 s)", ref))
        print(f"{'':<44} {quotes.rate / anchor.rate:>10.2f}x the anchor")

        h = harness.worker(env, "history", logs).start(wait_ready=False)
        history = harness.drain(
            env,
            env.settings.group("history"),
            "md.ticks",
            COUNT,
            lambda: harness.metric(h, "finstream_events_in_total"),
        )
        h.stop()
        print(history.line("history sink, at least once (PostgreSQL)", ref))

        # Latency: a fresh quotes replica at 5,000 ticks/s offered.
        w = harness.worker(env, "quotes", logs, instance_id="bench-q0").start()
        restored = harness.metric(w, "finstream_stream_restored_records_total")
        restore_s = harness.metric(w, "finstream_stream_restore_seconds_sum")
        latency_step(w, env)
        if restore_s > 0:
            print(
                f"state restore: {restored:,.0f} changelog records in {restore_s:.2f} s "
                f"({restored / restore_s:,.0f} records/s)"
            )
    finally:
        harness.teardown(base, env)


if __name__ == "__main__":
    main()
