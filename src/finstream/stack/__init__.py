"""The local stack without Docker: Kafka (KRaft), PostgreSQL and Redis.

``finstream stack up`` makes the three services reachable at the configured
URLs and is a no-op when they already are:

* a service already answering at its URL (the machine's own PostgreSQL, a
  shared Redis) is used as it is and never stopped by us;
* otherwise we start our own, with data under ``FINSTREAM_STACK_DIR``
  (``.stack/``, git-ignored): Kafka from Maven Central jars fetched into a
  cache folder, storage formatted once, run as ``kafka.Kafka`` in KRaft
  combined mode; PostgreSQL and Redis from the machine's binaries, installed
  from Debian packages when missing.

``down`` stops only what we started (tracked by pid files) and leaves no
process behind; ``status`` says what runs where. Failures raise
:class:`StackError` with one line that says what to do.

One module per service (:mod:`.kafka`, :mod:`.postgres`, :mod:`.redis`), each a
mixin of :class:`Stack`; :mod:`.common` holds what they share, :mod:`.status`
the status of a running ``finstream run``.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from finstream.settings import Settings
from finstream.stack.common import Log, ServiceStatus, StackError, host_port
from finstream.stack.kafka import KafkaService, kraft_cluster_id
from finstream.stack.postgres import PostgresService
from finstream.stack.redis import RedisService

# The stack's API (cli, db restore, tests), importable from here as before the split.
__all__ = ["Log", "ServiceStatus", "Stack", "StackError", "kraft_cluster_id"]


class Stack(KafkaService, PostgresService, RedisService):
    def __init__(self, settings: Settings, kafka_properties: dict[str, str] | None = None) -> None:
        """``kafka_properties`` override the broker's server.properties (fault tests add a
        listener that advertises a proxy's address)."""
        self.settings = settings
        self.kafka_properties = dict(kafka_properties or {})
        self.root = settings.stack_dir
        self.kafka_dir = self.root / "kafka"
        self.pg_dir = self.root / "postgres"
        self.redis_dir = self.root / "redis"
        self.cache_dir = self.root / "cache" / f"kafka-{settings.kafka_version}"
        self.kafka_host, self.kafka_port = host_port(settings.kafka_bootstrap.split(",")[0], 9092)
        db = urlparse(settings.database_url.get_secret_value())
        self.pg_host, self.pg_port = db.hostname or "127.0.0.1", db.port or 5432
        self.pg_user = unquote(db.username or "finstream")
        self.pg_password = unquote(db.password or "")
        self.pg_db = (db.path or "/finstream").lstrip("/") or "finstream"
        self.redis_host, self.redis_port = host_port(settings.redis_url.get_secret_value(), 6379)

    # -- public -----------------------------------------------------------------
    def up(self, log: Log = print) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._kafka_up(log)
        self._postgres_up(log)
        self._redis_up(log)

    def down(self, log: Log = print) -> None:
        for name, stop in (
            ("redis", self._redis_down),
            ("postgres", self._postgres_down),
            ("kafka", self._kafka_down),
        ):
            if stop():
                log(f"{name}: stopped")
            else:
                log(f"{name}: not started by finstream, left alone")

    def status(self) -> list[ServiceStatus]:
        return [self._kafka_status(), self._postgres_status(), self._redis_status()]
