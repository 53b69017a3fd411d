"""What every benchmark shares: environments, producing, baselines, drains, anchors.

Measurement rules (bench/RESULTS.md):

* A drain rate is the contender's own progress on a filled topic: records
  processed between 10% and 90% of the topic, over that time (start-up and
  the tail do not count; commits in between do). A finstream role's progress
  is its events-in counter, a Quix application's a counter in the
  application itself (bench/anchor/). The run then waits until the group has
  committed the whole topic: a figure counts only work that was made durable.
* Baselines and anchors run in their own processes, warm (the baseline reads
  the topic once before the timed pass); load generators run in their own
  process too, never in the loop that measures.
* Every figure is printed with its sample count.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from finstream.settings import Settings
from finstream.stack import Stack
from finstream.testing.services import TestEnv, WorkerProcess, create_env, destroy_env, wait_until

__all__ = ["TestEnv", "WorkerProcess", "create_env", "wait_until"]

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_PYTHON = ROOT / ".tools" / "anchor-venv" / "bin" / "python"


def setup(label: str) -> tuple[Settings, TestEnv, Path]:
    base = Settings()
    Stack(base).up(log=lambda _m: None)
    logs = base.stack_dir / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    return base, create_env(base, label), logs


def teardown(base: Settings, env: TestEnv) -> None:
    destroy_env(env, base)


def broker_pid(env: TestEnv) -> int | None:
    """The local stack's Kafka broker, when this machine runs it (its CPU is part of the cost)."""
    from finstream.stack.common import read_pid

    return read_pid(env.settings.stack_dir / "kafka" / "kafka.pid")


def producer(env: TestEnv) -> Producer:
    # Kafka's default partitioner, like every finstream producer.
    return Producer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 10,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
            "log_level": 3,
        }
    )


def produce(env: TestEnv, topic: str, messages: Sequence[tuple[bytes, bytes | None]]) -> float:
    """Produce everything, wait for the broker; seconds taken."""
    p = producer(env)
    name = env.topic(topic)
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                p.produce(name, key=key, value=value)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(300):
        raise SystemExit(f"could not produce to {name}")
    return time.perf_counter() - started


def baseline(env: TestEnv, topic: str, count: int) -> dict[str, Any]:
    """A raw confluent-kafka consume + decode(+validate) loop in its own process, warm."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.baseline",
            env.settings.kafka_bootstrap,
            env.topic(topic),
            topic,
            str(count),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@dataclass
class Drain:
    rate: float
    records: int
    seconds: float
    # The contender's own CPU time over the same window, when its pid was given.
    cpu: float | None = None

    def line(self, label: str, ref: float | None = None, ref_label: str = "baseline") -> str:
        ratio = f"  {self.rate / ref:.2f}x {ref_label}" if ref else ""
        used = (
            f"; {self.cpu / self.records * 1e6:.1f} us CPU/record, "
            f"{self.cpu / self.seconds:.0%} of a core"
            if self.cpu is not None and self.records
            else ""
        )
        return (
            f"{label:<44} {self.rate:>10,.0f}/s{ratio}  "
            f"({self.records:,} records committed in {self.seconds:.2f} s{used})"
        )


def pid_of(worker: WorkerProcess) -> int:
    if worker.proc is None:
        raise RuntimeError("the worker has not been started")
    return worker.proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def committed(env: TestEnv, group: str, topic: str, consumer: Consumer | None = None) -> int:
    c = consumer or Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    name = env.topic(topic)
    parts = c.list_topics(name, timeout=10).topics[name].partitions
    offsets = c.committed([TopicPartition(name, p) for p in parts], timeout=10)
    if consumer is None:
        c.close()
    return sum(max(tp.offset, 0) for tp in offsets)


def drain(
    env: TestEnv,
    group: str,
    topic: str,
    count: int,
    progress: Callable[[], float],
    timeout: float = 900.0,
    pid: int | None = None,
) -> Drain:
    """Rate between 10% and 90% of ``count`` records processed, by ``progress``;
    returns once the group has committed the whole topic. ``pid``: the
    contender's process, whose CPU time over the same window is kept."""
    marks: dict[float, tuple[float, float, float]] = {}
    began = time.perf_counter()
    while 0.9 not in marks:
        n = progress()
        now = time.perf_counter()
        for frac in (0.1, 0.9):
            if frac not in marks and n >= frac * count:
                marks[frac] = (now, n, cpu_seconds(pid) if pid is not None else 0.0)
        if now - began > timeout:
            raise SystemExit(f"{group} did not process {topic} in {timeout:.0f} s")
        # A worker's progress is its /metrics page: scraped 50 times a second
        # it took ~4% of the router's CPU (py-spy, 2026-12-06); the anchor's
        # progress file costs it nothing. 0.1 s is <= 1% of a >= 10 s window.
        time.sleep(0.1)
    end = end_offsets(env, topic)
    while committed(env, group, topic) < end:
        if time.perf_counter() - began > timeout:
            raise SystemExit(f"{group} did not commit {topic} in {timeout:.0f} s")
        time.sleep(0.1)
    (t0, n0, c0), (t1, n1, c1) = marks[0.1], marks[0.9]
    return Drain((n1 - n0) / (t1 - t0), int(n1 - n0), t1 - t0, c1 - c0 if pid is not None else None)


def progress_file(path: Path) -> Callable[[], float]:
    """An anchor's progress: the last number it wrote to ``path``."""

    def read() -> float:
        try:
            text = path.read_text().strip()
        except OSError:
            return 0.0
        return float(text or 0)

    return read


def end_offsets(env: TestEnv, topic: str) -> int:
    c = Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": "bench-ends",
            "log_level": 3,
        }
    )
    try:
        name = env.topic(topic)
        parts = c.list_topics(name, timeout=10).topics[name].partitions
        return sum(c.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts)
    finally:
        c.close()


def worker(env: TestEnv, role: str, logs: Path, **settings: str) -> WorkerProcess:
    # The test environment commits every 0.5 s; a benchmark measures the defaults.
    settings.setdefault("commit_interval", str(Settings.model_fields["commit_interval"].default))
    return WorkerProcess(env, role, logs, log_level="WARNING", **settings)


def metric(worker: WorkerProcess, name: str) -> float:
    from finstream.testing.services import metric_value

    return metric_value(worker, name)


def events_in(worker: WorkerProcess, env: TestEnv, topic: str) -> float:
    """A role's events-in counter for one of its input topics."""
    name = env.topic(topic)
    try:
        text = worker.metrics()
    except Exception:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("finstream_events_in_total{") and f'topic="{name}"' in line
    )


def anchor(script: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """A Quix Streams application (bench/anchor/), in the anchor virtualenv."""
    if not ANCHOR_PYTHON.exists():
        raise SystemExit(
            f"{ANCHOR_PYTHON} is missing: `make bench` creates it (bench/anchor/requirements.txt)"
        )
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    return subprocess.Popen(
        [str(ANCHOR_PYTHON), str(ROOT / "bench" / "anchor" / script), *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class StateDir:
    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="bench-anchor-")
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def loadgen(
    env: TestEnv, kind: str, rate: int, seconds: float, *extra: str
) -> subprocess.Popen[bytes]:
    """An offered load in its own process (bench/loadgen.py)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            kind,
            env.settings.kafka_bootstrap,
            env.settings.namespace,
            str(rate),
            str(seconds),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )


@dataclass
class Cycles:
    """A worker's commits and batches, counted from its metrics (see ``since``)."""

    commits: float
    commit_seconds: float
    batches: float
    batch_seconds: float

    @classmethod
    def of(cls, worker: WorkerProcess) -> Cycles:
        return cls(
            metric(worker, "finstream_stream_commit_seconds_count"),
            metric(worker, "finstream_stream_commit_seconds_sum"),
            metric(worker, "finstream_processing_seconds_count"),
            metric(worker, "finstream_processing_seconds_sum"),
        )

    def since(self, before: Cycles) -> str:
        """Where a worker's time went between two readings: what a latency figure is made of."""
        commits = self.commits - before.commits
        batches = self.batches - before.batches
        commit_ms = (self.commit_seconds - before.commit_seconds) / max(commits, 1) * 1000
        batch_ms = (self.batch_seconds - before.batch_seconds) / max(batches, 1) * 1000
        return (
            f"{commits:,.0f} commits (mean {commit_ms:.1f} ms each), "
            f"{batches:,.0f} batches (mean {batch_ms:.1f} ms of processing each)"
        )


def received(consumer: Consumer, timeout: float) -> list[tuple[Any, float]]:
    """The next message (if any) with the time it was received, for latency samples.

    Consumer.consume(n, t) returns only when n messages are in or t has passed:
    at the rates the latency loads offer, a message waited up to t in it before
    being stamped, and the latency figures counted that wait
    (bench/consume_probe.py shows it). poll hands each message over as it arrives.
    """
    m = consumer.poll(timeout)
    if m is None or m.error() is not None:
        return []
    return [(m, time.time())]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds (NaN under 100 samples)."""
    if len(samples) < 100:
        return float("nan"), float("nan")
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1000, q[98] * 1000
