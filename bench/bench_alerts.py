"""The alerts role: ticks/s with 0 and with 100,000 rules over 5,000 symbols, restore
speed, and tick-to-alerts.fired latency seen by a read_committed consumer.

1. baseline: a raw confluent-kafka consume + decode + validate loop (warm);
2. the alerts role draining 100,000 ticks over 5,000 symbols with no rules;
3. 100,000 rules (20 per symbol, 13 kinds, levels a percent or more away so
   that few ticks fire) loaded through alerts.rules (and its repartition by
   symbol), then the same ticks: the ratio of 3 to 2 is the cost of rules.
   Then ``PAIRS - 1`` more pairs on the same two workers, now warm, each the
   next 100,000 ticks of the same walk, in alternating order: on this VM the
   worker's CPU time per tick moved from 28 to 51 us between drains of the
   same code (2026-12-08), more than rules cost, so one pair's ratio is
   mostly that; the median pair's is printed, every pair too ("two workers");
3b. the same ratio on one worker (``one_worker``): the 0-rules worker is given
   the rules, drains, loses them, drains, gets them back, drains; each drain
   with rules beside the drain without next to it (three pairs, both orders).
   Within a run one of the two workers can take 23-52% more CPU per tick in
   every drain for the same work, which two workers' ratios carry and one
   worker's do not. The figure is the median of the warm pairs (two
   workers' pairs 2.., one worker's), pair 1 printed beside it;
4. anchor: a Quix Streams application evaluating the same rules on the same
   ticks with finstream's pure alert engine (bench/anchor/quix_alerts.py);
5. a new replica restoring the role's state (100,000 rules, 5,000 symbols'
   evaluation state) from its changelogs;
6. latency: ticks offered at 5,000/s by a load generator in its own process
   over 500 symbols, 25 of which cross a rule's level on every tick (5% of
   ticks fire); each AlertFired read by a read_committed consumer (so after
   the role's transaction commits), minus the tick's send time.
"""

from __future__ import annotations

import itertools
import json
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from bench import harness
from bench.workloads import first_prices, rules, symbols, tape
from finstream.codec import Codec
from finstream.domain.alerts import AlertRule

SYMBOLS = 5_000
RULES_PER_SYMBOL = 20
COUNT = 100_000
PAIRS = 3
ONE_WORKER_DRAINS = 3
LATENCY_RATE = 5_000
LATENCY_SECONDS = 15
SEED = 5


def rules_loaded(w: harness.WorkerProcess, count: int) -> None:
    """Wait until the worker holds exactly ``count`` rules (``finstream_alerts_rules``).

    Not until every symbol has a rule: that gauge reached 5,000 with 45,000 of
    the 100,000 rules in (2026-12-07), and the rest, loading for 5.5 s more,
    competed with the ticks the steps after it measure. Nor by counting the
    records read back: a rewind reads some twice.
    """
    harness.wait_until(
        lambda: harness.metric(w, "finstream_alerts_rules") == count,
        timeout=600,
        interval=0.2,
        message=f"{count:,} rules held",
    )
    # The gauge moves when the last rules are applied, before their batch's
    # transaction (the rules' changelog, one JSON per symbol) commits, which
    # could then overlap the first ticks measured. Loaded means committed: no
    # commit for half a second.
    last = [harness.metric(w, "finstream_stream_commit_seconds_count"), time.monotonic()]

    def idle() -> bool:
        commits = harness.metric(w, "finstream_stream_commit_seconds_count")
        if commits != last[0]:
            last[:] = [commits, time.monotonic()]
        return time.monotonic() - last[1] >= 0.5

    harness.wait_until(idle, timeout=600, interval=0.1, message="rules committed")


def drain_next(
    w: harness.WorkerProcess, env: harness.TestEnv, ticks: list[tuple[bytes, bytes]]
) -> harness.Drain:
    """Produce the next tape to a running worker and drain it (progress counted from now)."""
    before = harness.events_in(w, env, "md.ticks")
    harness.produce(env, "md.ticks", ticks)
    return harness.drain(
        env,
        env.settings.group("alerts"),
        "md.ticks",
        COUNT,
        lambda: harness.events_in(w, env, "md.ticks") - before,
        pid=harness.pid_of(w),
    )


def fired_latency(env: harness.TestEnv, codec: Codec) -> tuple[list[float], dict[str, float]]:
    c = Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": f"{env.namespace}latency",
            "isolation.level": "read_committed",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    topic = env.topic("alerts.fired")
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, -1) for p in parts])  # from the end
    c.consume(100, 1.0)
    gen = harness.loadgen(
        env, "ticks", LATENCY_RATE, LATENCY_SECONDS, "500", str(SEED), str(SYMBOLS)
    )
    samples: list[float] = []
    # The generator encodes its ticks (a few seconds) before it starts sending;
    # firings of its last ticks are read for 10 s after it has sent them all.
    deadline = time.monotonic() + LATENCY_SECONDS + 40
    sent_all: float | None = None
    while time.monotonic() < deadline:
        for m, received in harness.received(c, 0.2):
            record = codec.decode(m.value(), "AlertFired")
            if record["tick_id"].startswith("lat-"):
                samples.append(received - record["tick_ts"].timestamp())
        if sent_all is None and gen.poll() is not None:
            sent_all = time.monotonic()
        if sent_all is not None and time.monotonic() > sent_all + 10:
            break
    out, _ = gen.communicate()
    c.close()
    return samples, json.loads(out.decode().strip().splitlines()[-1])


def latency_step(
    w: harness.WorkerProcess, env: harness.TestEnv, codec: Codec, rules: int | None = None
) -> None:
    """The latency load on a started alerts worker, which is stopped after it: the
    firing line (with the rule count when given) and the worker's cycles."""
    cycles = harness.Cycles.of(w)
    samples, gen = fired_latency(env, codec)
    load_cycles = harness.Cycles.of(w).since(cycles)
    w.stop()
    p50, p99 = harness.percentiles(samples)
    held = f", {rules:,} rules" if rules is not None else ""
    print(
        f"tick -> alerts.fired (read_committed) at {gen['rate']:,.0f} ticks/s offered "
        f"({gen['sent']:,} sent{held}): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"({len(samples):,} firings)"
    )
    print(f"  the worker during that load: {load_cycles}")


def latency_only() -> None:
    """The rules loaded and the latency step alone (no drains, no anchor).

    ``python -m bench.bench_alerts latency``: a fresh namespace and alerts
    worker each time; minutes apart, its rounds compare settings or commits
    faster than whole runs do.
    """
    codec = Codec()
    base, env, logs = harness.setup("bench-al")
    try:
        now = datetime.now(UTC)
        first = first_prices(tape(symbols(SYMBOLS), SYMBOLS, now, timedelta(milliseconds=1), SEED))
        rule_set = rules(first, RULES_PER_SYMBOL, now - timedelta(days=1))
        harness.produce(
            env,
            "alerts.rules",
            [(r.rule_id.encode(), codec.encode("AlertRule", r.to_record())) for r in rule_set],
        )
        w = harness.worker(env, "alerts", logs, instance_id="bench-al0").start()
        rules_loaded(w, len(rule_set))
        latency_step(w, env, codec, len(rule_set))
    finally:
        harness.teardown(base, env)


def one_worker(
    w0: harness.WorkerProcess,
    env: harness.TestEnv,
    codec: Codec,
    rule_set: list[AlertRule],
    tapes: list[list[tuple[bytes, bytes]]],
    last_zero: harness.Drain,
    line: Callable[[harness.Drain, str], str],
) -> list[float]:
    """The ratio on one worker: the 0-rules worker (warm, its last drain given) is
    given the rules, drains the next tape, loses them (tombstones), drains the
    next, is given them again, drains the last. Each drain with rules is
    paired with the drain without next to it (three pairs, both orders).

    Two workers' ratios compare two processes, and on this VM one worker
    process of a run can take 23-52% more CPU per tick than the other in
    every drain, for the same work (2026-12-08, bench/RESULTS.md), more than
    the rules cost; one worker with and without rules cancels that out.
    """
    records = [(r.rule_id.encode(), codec.encode("AlertRule", r.to_record())) for r in rule_set]
    tombstones: list[tuple[bytes, bytes | None]] = [(r.rule_id.encode(), None) for r in rule_set]
    series: list[tuple[bool, harness.Drain]] = [(False, last_zero)]
    for n, ticks in enumerate(tapes):
        holds = n % 2 == 0
        harness.produce(env, "alerts.rules", records if holds else tombstones)
        rules_loaded(w0, len(rule_set) if holds else 0)
        drained = drain_next(w0, env, ticks)
        label = f"{len(rule_set):,} rules" if holds else "0 rules (rules deleted)"
        print(line(drained, f"alerts role, one worker, {label}"))
        series.append((holds, drained))
    ratios = []
    for (a_holds, a), (_, b) in itertools.pairwise(series):
        ratios.append(a.rate / b.rate if a_holds else b.rate / a.rate)
        print(f"{f'ratio, one worker, pair {len(ratios)}':<44} {ratios[-1]:>10.3f}")
    return ratios


def main() -> None:
    if sys.argv[1:] == ["latency"]:
        latency_only()
        return
    codec = Codec()
    base, empty, logs = harness.setup("bench-a0")
    loaded = harness.create_env(base, "bench-a1")
    try:
        syms = symbols(SYMBOLS)
        now = datetime.now(UTC)
        # One walk, a tape per round of drains: each continues where the last ended.
        n_tapes = PAIRS + ONE_WORKER_DRAINS
        walk = tape(
            syms, COUNT * n_tapes, now - timedelta(hours=1), timedelta(microseconds=500), SEED
        )
        first = first_prices(tape(syms, SYMBOLS, now, timedelta(milliseconds=1), SEED))
        rule_set = rules(first, RULES_PER_SYMBOL, now - timedelta(days=1))
        tapes = [
            [(t.symbol.encode(), codec.encode("Tick", t.to_record())) for t in walk[i : i + COUNT]]
            for i in range(0, COUNT * n_tapes, COUNT)
        ]
        encoded = tapes[0]
        print(f"ticks: {COUNT:,} over {SYMBOLS:,} symbols; rules: {len(rule_set):,}")

        harness.produce(empty, "md.ticks", encoded)
        b = harness.baseline(empty, "md.ticks", COUNT)
        ref = b["rate"]
        print(
            f"{'baseline: confluent-kafka consume+decode+validate':<44} {ref:>10,.0f}/s"
            f"  ({b['records']:,} records in {b['seconds']:.2f} s, second pass)"
        )

        w0 = harness.worker(empty, "alerts", logs, instance_id="bench-a0").start(wait_ready=False)
        zero = harness.drain(
            empty,
            empty.settings.group("alerts"),
            "md.ticks",
            COUNT,
            lambda: harness.events_in(w0, empty, "md.ticks"),
            pid=harness.pid_of(w0),
        )
        print(zero.line("alerts role, 0 rules", ref))

        harness.produce(
            loaded,
            "alerts.rules",
            [(r.rule_id.encode(), codec.encode("AlertRule", r.to_record())) for r in rule_set],
        )
        w = harness.worker(loaded, "alerts", logs, instance_id="bench-a1").start()
        t0 = time.perf_counter()
        rules_loaded(w, len(rule_set))
        load_s = time.perf_counter() - t0
        print(
            f"loading {len(rule_set):,} rules (validated, repartitioned by symbol, stored): "
            f"{load_s:.1f} s ({len(rule_set) / load_s:,.0f} rules/s)"
        )
        harness.produce(loaded, "md.ticks", encoded)
        full = harness.drain(
            loaded,
            loaded.settings.group("alerts"),
            "md.ticks",
            COUNT,
            lambda: harness.events_in(w, loaded, "md.ticks"),
            pid=harness.pid_of(w),
        )
        fired = harness.metric(w, "finstream_alerts_fired_total")
        print(full.line(f"alerts role, {len(rule_set):,} rules", ref) + f", {fired:,.0f} firings")
        ratios = [full.rate / zero.rate]
        print(f"{'ratio 100,000 rules / 0 rules, pair 1':<44} {ratios[0]:>10.3f}")
        last_zero = zero
        for n in range(2, PAIRS + 1):
            drains: dict[str, harness.Drain] = {}
            sides = [("0 rules", empty, w0), (f"{len(rule_set):,} rules", loaded, w)]
            for label, env, worker in sides if n % 2 else sides[::-1]:
                drains[label] = drain_next(worker, env, tapes[n - 1])
                print(drains[label].line(f"alerts role, {label}, pair {n} (warm)", ref))
            ratios.append(drains[sides[1][0]].rate / drains["0 rules"].rate)
            print(f"{f'ratio 100,000 rules / 0 rules, pair {n}':<44} {ratios[-1]:>10.3f}")
            last_zero = drains["0 rules"]
        w.stop()
        print(
            f"{'ratio 100,000 rules / 0 rules, two workers':<44} {statistics.median(ratios):>10.3f}"
            f"  (median of {len(ratios)} pairs: {', '.join(f'{r:.3f}' for r in ratios)})"
        )
        one = one_worker(
            w0,
            empty,
            codec,
            rule_set,
            tapes[PAIRS:],
            last_zero,
            lambda d, label: d.line(label, ref),
        )
        w0.stop()
        print(
            f"{'ratio 100,000 rules / 0 rules, one worker':<44} {statistics.median(one):>10.3f}"
            f"  (median of {len(one)} pairs: {', '.join(f'{r:.3f}' for r in one)})"
        )
        # Pair 1 sets a new process's first drain (on this VM its fastest: 30-34 us of
        # CPU a tick, later ones up to 49, 2026-12-08) against a worker that has
        # loaded the rules; every other pair compares workers past their first drain.
        warm = ratios[1:] + one
        print(
            f"{'ratio 100,000 rules / 0 rules, warm':<44} {statistics.median(warm):>10.3f}"
            f"  (median of {len(warm)} pairs past the first drains; pair 1 {ratios[0]:.3f})"
        )

        with harness.StateDir() as state:
            rules_file = Path(state) / "rules.pickle"
            rules_file.write_bytes(pickle.dumps(rule_set))
            group = f"{loaded.namespace}quix-alerts"
            progress = Path(state) / "progress"
            proc = harness.anchor(
                "quix_alerts.py",
                loaded.settings.kafka_bootstrap,
                loaded.topic("md.ticks"),
                group,
                loaded.topic("alerts.fired") + ".anchor",
                state,
                str(progress),
                str(rules_file),
                log=logs / "quix-alerts.log",
            )
            try:
                anchor = harness.drain(
                    loaded,
                    group,
                    "md.ticks",
                    COUNT,
                    harness.progress_file(progress),
                    pid=proc.pid,
                )
            finally:
                harness.stop(proc)
        print(anchor.line(f"anchor: Quix Streams 3.28.1, {len(rule_set):,} rules", ref))
        print(f"{'alerts role / anchor':<44} {full.rate / anchor.rate:>10.2f}x")

        # A new replica restores everything from the changelogs, then takes the latency load.
        w = harness.worker(loaded, "alerts", logs, instance_id="bench-a2").start()
        restored = harness.metric(w, "finstream_stream_restored_records_total")
        restore_s = harness.metric(w, "finstream_stream_restore_seconds_sum")
        print(
            f"state restore of a new replica: {restored:,.0f} changelog records in "
            f"{restore_s:.2f} s ({restored / restore_s:,.0f} records/s)"
        )
        latency_step(w, loaded, codec)
    finally:
        harness.teardown(base, loaded)
        harness.teardown(base, empty)


if __name__ == "__main__":
    main()
