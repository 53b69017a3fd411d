"""A stack of a test's own that the test may break: Kafka, PostgreSQL and Redis on free
ports, each behind a Toxiproxy proxy, never the shared services on 9092, 5432 and 6379.

The broker has two client listeners: ``PLAINTEXT`` (the test's own clients, direct) and
``PROXIED``, which advertises the proxy's address, so that a client bootstrapped
through the proxy is told to reach the broker through the proxy again (Kafka answers
metadata with the advertised address of the listener a request came in on; one
advertised address would send clients around the proxy after their first request).
PostgreSQL (no WAL archiving: not needed here) and Redis (a cache node that comes back
empty when its data is wiped) are started by `finstream stack`'s own code, as the
restore drill does.

:meth:`PrivateStack.worker_overrides` points a worker at the proxies; the test's own
clients use :attr:`PrivateStack.settings` (direct).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from finstream.settings import Settings
from finstream.stack import Stack
from tests.support.services import free_port, pid_alive
from tests.support.toxiproxy import Proxy, Toxiproxy


def _quiet(_message: str) -> None:
    pass


def _with_port(url: str, port: int) -> str:
    parsed = urlparse(url)
    netloc = parsed.netloc.rsplit(":", 1)[0]
    return urlunparse(parsed._replace(netloc=f"{netloc}:{port}"))


class PrivateStack:
    def __init__(self, base: Settings, log_dir: Path, toxiproxy: Toxiproxy) -> None:
        # Under the repository (the postgres user must reach it), never /tmp/pytest-of-root.
        self.root = log_dir / f"faults-{uuid.uuid4().hex[:8]}"
        self.root.mkdir(parents=True)
        shared_cache = base.stack_dir / "cache"
        if shared_cache.is_dir():
            # The Kafka jars `make stack-up` fetched: no second Maven run.
            (self.root / "cache").symlink_to(shared_cache)
        kafka, proxied, ctrl = free_port(), free_port(), free_port()
        pg, redis = free_port(), free_port()
        self.settings = Settings(
            stack_dir=self.root,
            kafka_bootstrap=f"127.0.0.1:{kafka}",
            kafka_controller_port=ctrl,
            kafka_heap="512m",
            kafka_version=base.kafka_version,
            database_url=f"postgresql://finstream:faults@127.0.0.1:{pg}/finstream",  # type: ignore[arg-type]
            redis_url=f"redis://127.0.0.1:{redis}/0",  # type: ignore[arg-type]
            backup_archive=False,
        )
        self.toxiproxy = toxiproxy
        self.kafka_proxy: Proxy = toxiproxy.proxy("kafka", f"127.0.0.1:{proxied}")
        self.pg_proxy: Proxy = toxiproxy.proxy("postgres", f"127.0.0.1:{pg}")
        self.redis_proxy: Proxy = toxiproxy.proxy("redis", f"127.0.0.1:{redis}")
        self.stack = Stack(
            self.settings,
            kafka_properties={
                "listeners": f"PLAINTEXT://127.0.0.1:{kafka},PROXIED://127.0.0.1:{proxied},"
                f"CONTROLLER://127.0.0.1:{ctrl}",
                "advertised.listeners": f"PLAINTEXT://127.0.0.1:{kafka},"
                f"PROXIED://127.0.0.1:{self.kafka_proxy.port}",
                "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT,"
                "CONTROLLER:PLAINTEXT",
                # A dead worker's transaction is aborted within a second of its
                # timeout (the broker looks every 10 s by default).
                "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
                "transaction.state.log.num.partitions": "4",
                "offsets.topic.num.partitions": "4",
            },
        )

    def __enter__(self) -> PrivateStack:
        try:
            self.stack.up(log=_quiet)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stack.down(log=_quiet)
        shutil.rmtree(self.root, ignore_errors=True)

    def worker_overrides(self, database_url: str) -> dict[str, str]:
        """Settings that send a worker through the proxies (``database_url``: the test's
        database on this stack's PostgreSQL, direct)."""
        return {
            "kafka_bootstrap": f"127.0.0.1:{self.kafka_proxy.port}",
            "database_url": _with_port(database_url, self.pg_proxy.port),
            "redis_url": _with_port(
                self.settings.redis_url.get_secret_value(), self.redis_proxy.port
            ),
        }

    # -- breaking things ---------------------------------------------------------------

    def _kill(self, pidfile: Path) -> None:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"pid {pid} survived SIGKILL")
            time.sleep(0.05)

    def kill_kafka(self) -> None:
        """SIGKILL the broker: no shutdown, nothing flushed beyond what the OS has."""
        self._kill(self.stack.kafka_dir / "kafka.pid")

    def kill_redis(self, wipe: bool = True) -> None:
        """SIGKILL Redis; ``wipe`` removes its data, so it comes back empty."""
        self._kill(self.stack.redis_dir / "redis.pid")
        if wipe:
            shutil.rmtree(self.stack.redis_dir / "appendonlydir", ignore_errors=True)
            (self.stack.redis_dir / "dump.rdb").unlink(missing_ok=True)

    def stop_postgres(self) -> None:
        """A fast shutdown: sessions are terminated, new ones refused."""
        assert self.stack.postgres_stop(), "the private PostgreSQL was not running"

    def start(self) -> None:
        """Start whatever is down again, on the same ports and data."""
        self.stack.up(log=_quiet)
