"""Real services for tests: a namespaced slice of the local Kafka, a fresh
PostgreSQL database, and namespaced Redis keys.

Every test environment gets its own namespace, so tests can run against one
broker without seeing each other's topics, groups or keys, and clean up after
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse, urlunparse

import asyncpg
import httpx
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from finstream.codec import Codec
from finstream.runtime.kafka import client_config
from finstream.settings import REPO_ROOT, Settings
from finstream.stack.common import port_bindable
from finstream.stores.postgres import migrate
from finstream.topics import apply, describe, load_catalogue, plan

REPO = REPO_ROOT
READ_TO_END = 60.0  # how long past its timeout a topic read goes on to reach the end


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now, below the
    kernel's ephemeral range.

    A port the kernel hands out for binding port 0 comes from the ephemeral
    range, which is also where every outgoing connection takes its local
    port: a server started on it a moment later may find a Kafka or
    PostgreSQL client sitting there. A CI run's ``finstream run`` lost its
    router that way (a health port, base + 3, held by a client socket).
    Below the range only servers bind.
    """
    low, _ = _ephemeral_range()
    pick = random.SystemRandom()
    for _ in range(500):
        base = pick.randrange(10_000, max(10_001, low - count))
        if all(port_bindable("127.0.0.1", p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports between 10000 and {low}")


def free_port() -> int:
    return free_ports(1)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc (no psutil needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.25,
    message: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


def kafka_security_env(settings: Settings) -> dict[str, str]:
    """The FINSTREAM_KAFKA_* security variables of ``settings``, for a worker subprocess."""
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        if not name.startswith(("kafka_security", "kafka_sasl", "kafka_ssl")):
            continue
        value = getattr(settings, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"FINSTREAM_{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def _db_url(base: str, name: str) -> str:
    parsed = urlparse(base)
    return urlunparse(parsed._replace(path=f"/{name}"))


@dataclass
class TestEnv:
    """One isolated environment: namespace, database, and the settings that point at them."""

    __test__ = False  # not a test class, despite the name

    namespace: str
    database: str
    settings: Settings
    codec: Codec = field(default_factory=Codec)

    # -- environment for worker subprocesses --------------------------------------
    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "FINSTREAM_NAMESPACE": self.namespace,
                "FINSTREAM_DATABASE_URL": self.settings.database_url.get_secret_value(),
                "FINSTREAM_REDIS_URL": self.settings.redis_url.get_secret_value(),
                "FINSTREAM_KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
                "FINSTREAM_LOG_LEVEL": "INFO",
                "FINSTREAM_COMMIT_INTERVAL": "0.5",
                **kafka_security_env(self.settings),
            }
        )
        env.update({f"FINSTREAM_{k.upper()}": v for k, v in overrides.items()})
        return env

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    # -- Kafka --------------------------------------------------------------------
    def kafka_config(self) -> dict[str, Any]:
        """Bootstrap and security settings of every client (TLS/SASL for a secured broker)."""
        return client_config(self.settings, log_level=3)

    def producer(self) -> Producer:
        # murmur2: the partitioner of the Java clients and of finstream's producers, so test keys
        # land on the partitions finstream's own producers would choose.
        return Producer(
            {
                **self.kafka_config(),
                "linger.ms": 5,
                "enable.idempotence": True,
                "partitioner": "murmur2_random",
                "log_level": 3,
            }
        )

    def produce(
        self,
        name: str,
        items: list[tuple[bytes | None, bytes | None]],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        p = self.producer()
        pairs: list[tuple[str, str | bytes | None]] | None = (
            None if headers is None else [(k, v) for k, v in headers]
        )
        failed: list[str] = []

        def report(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                failed.append(str(err))

        for key, value in items:
            p.produce(self.topic(name), key=key, value=value, headers=pairs, on_delivery=report)
            p.poll(0)
        assert p.flush(30) == 0, "messages left unsent"
        # flush() counts what is still queued, not what the broker refused.
        assert not failed, f"{len(failed)} of {len(items)} messages refused: {failed[:3]}"

    def produce_records(
        self, name: str, schema: str, records: list[tuple[str, dict[str, Any]]]
    ) -> None:
        self.produce(name, [(k.encode(), self.codec.encode(schema, r)) for k, r in records])

    def consume_all(
        self,
        name: str,
        timeout: float = 10.0,
        min_count: int = 0,
        isolation: str = "read_committed",
    ) -> list[Any]:
        """Every message of a topic from the beginning, as a downstream consumer sees
        it (read_committed: committed transactions only; waits up to ``timeout`` for
        at least ``min_count``; returns as soon as that many and the end are reached).
        Every partition is read to its end even past ``timeout`` (``READ_TO_END``
        more, then TimeoutError): a read cut short would look like lost records."""
        c = Consumer(
            {
                **self.kafka_config(),
                "group.id": f"test-reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": isolation,
                # The end of a transactional partition is a commit marker, not a
                # message: librdkafka says when it reaches the end.
                "enable.partition.eof": True,
                "log_level": 3,
            }
        )
        topic = self.topic(name)
        parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        at_end: set[int] = set()
        reached: set[int] = set()  # partitions read to their end at least once
        deadline = time.monotonic() + timeout
        try:
            while True:
                now = time.monotonic()
                if len(at_end) == len(parts) and len(out) >= min_count:
                    break
                if now >= deadline and len(reached) == len(parts):
                    break
                if now >= deadline + READ_TO_END:
                    raise TimeoutError(
                        f"{topic}: partitions {sorted(set(parts) - reached)} not read to their "
                        f"end within {timeout + READ_TO_END:.0f} s ({len(out)} records read)"
                    )
                msg = c.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        at_end.add(cast(int, msg.partition()))
                        reached.add(cast(int, msg.partition()))
                    continue
                at_end.discard(msg.partition())
                out.append(msg)
        finally:
            c.close()
        return out

    def decode_all(self, name: str, schema: str, **kwargs: Any) -> list[dict[str, Any]]:
        return [self.codec.decode(m.value(), schema) for m in self.consume_all(name, **kwargs)]

    # -- PostgreSQL -----------------------------------------------------------------
    def sql(self, query: str, *args: Any) -> list[Any]:
        async def go() -> list[Any]:
            conn = await asyncpg.connect(self.settings.database_url.get_secret_value())
            try:
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return asyncio.run(go())


def group_caught_up(env: TestEnv, group: str, names: list[str]) -> bool:
    """The group has committed every partition of these topics up to its end."""
    c = Consumer(
        {
            **env.kafka_config(),
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
            "log_level": 3,
        }
    )
    try:
        for name in names:
            topic = env.topic(name)
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            tps = [TopicPartition(topic, p) for p in parts]
            for tp in c.committed(tps, timeout=10):
                _low, high = c.get_watermark_offsets(tp, timeout=10)
                if high > 0 and tp.offset < high:
                    return False
        return True
    finally:
        c.close()


def committed_count(env: TestEnv, group: str, name: str) -> int:
    """How many records of a topic the group has committed (sum of committed offsets)."""
    c = Consumer(
        {
            **env.kafka_config(),
            "group.id": group,
            "enable.auto.commit": False,
            # read_committed (librdkafka's default) would wait out the role's open
            # transaction (require_stable, KIP-447) and could time out under load.
            "isolation.level": "read_uncommitted",
            "log_level": 3,
        }
    )
    try:
        topic = env.topic(name)
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        committed = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return sum(max(tp.offset, 0) for tp in committed)
    finally:
        c.close()


def metric_value(worker: WorkerProcess, name: str) -> float:
    """The sum of a metric family's samples (every label) on a worker's /metrics; 0 if down."""
    try:
        text = worker.metrics()
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def create_env(base: Settings, label: str = "t") -> TestEnv:
    ns = f"{label}{uuid.uuid4().hex[:8]}."
    database = f"fs_{ns[:-1].replace('-', '_')}"
    admin_url = base.database_url.get_secret_value()

    async def make_db() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(_db_url(admin_url, database))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(make_db())
    settings = base.model_copy(
        update={
            "namespace": ns,
            "database_url": type(base.database_url)(_db_url(admin_url, database)),
        }
    )
    catalogue = load_catalogue()
    names = [settings.topic(n) for n in catalogue.names]
    changes = plan(catalogue, describe(client_config(settings), names), ns)
    apply(client_config(settings), changes)
    return TestEnv(ns, database, settings)


def destroy_env(env: TestEnv, base: Settings) -> None:
    admin = AdminClient(client_config(base, log_level=3))
    topics = [
        t
        for t in admin.list_topics(timeout=10).topics
        if t.startswith(env.namespace) or t.startswith(f"{env.namespace}finstream-")
    ]
    if topics:
        for fut in admin.delete_topics(topics, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result()

    async def cleanup() -> None:
        import redis.asyncio as aioredis

        r = aioredis.from_url(base.redis_url.get_secret_value())
        try:
            keys = [k async for k in r.scan_iter(match=f"{env.namespace}*", count=1000)]
            for i in range(0, len(keys), 500):
                await r.delete(*keys[i : i + 500])
        finally:
            await r.aclose()
        conn = await asyncpg.connect(base.database_url.get_secret_value())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{env.database}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(cleanup())


class WorkerProcess:
    """A `finstream worker <role>` subprocess with its own health port and log file."""

    def __init__(self, env: TestEnv, role: str, log_dir: Path, **overrides: str) -> None:
        self.env = env
        self.role = role
        self.port = free_port()
        self.overrides = overrides
        self.log_path = log_dir / f"{role}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 90.0) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finstream.cli", "worker", self.role],
            env=self.env.env(http_port=str(self.port), **self.overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"worker {self.role} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 90.0) -> None:
        try:
            wait_until(self.ready, timeout=timeout, message=f"{self.role} ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no commit."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
                raise AssertionError(f"{self.role} did not stop on SIGTERM in {timeout}s") from None
        return self.proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def workers(
    env: TestEnv, log_dir: Path, *roles: str, **overrides: str
) -> Iterator[list[WorkerProcess]]:
    started = [WorkerProcess(env, role, log_dir, **overrides) for role in roles]
    try:
        for w in started:
            w.start(wait_ready=False)
        for w in started:
            w.wait_ready()
        yield started
    finally:
        for w in started:
            with contextlib.suppress(Exception):
                w.stop()
