"""PostgreSQL connections and versioned, idempotent migrations.

Migrations are ``migrations/NNNN_name.sql`` files applied in order, each in
its own transaction, recorded in ``schema_migrations`` with a checksum. A
PostgreSQL advisory lock serializes concurrent migrators (several pods
starting at once). An applied migration whose file changed is an error: fix
forward with a new file, never edit history.

Migrations run as the ``finstream_owner`` role once it exists (the login user
is a member of it; migrations/0040 creates it), so every object belongs to
that role whoever applied it; after them the time partitions of the current
and next periods are created (finstream.db.partitions).

Pools are sized by settings (``db_pool_min_size``/``db_pool_max_size``) and
report their size, connections in use and acquire waits as Prometheus metrics
labelled with the process's role.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from finstream.resources import resource
from finstream.settings import Settings

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_ID = 0x66696E73  # "fins"


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path | None = None) -> list[Migration]:
    folder = folder or resource("migrations")
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise MigrationError(f"duplicate migration numbers in {folder}")
    return found


POOL_ACQUIRE_SECONDS = Histogram(
    "finstream_db_pool_acquire_seconds",
    "Time a worker waited for a pooled PostgreSQL connection",
    ["role"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)


def process_role() -> str:
    """The worker role this process runs (bound in the log context), or 'cli'."""
    return str(structlog.contextvars.get_contextvars().get("role") or "cli")


class InstrumentedPool(asyncpg.Pool):
    """An asyncpg pool that times every acquire (waits show pool exhaustion)."""

    role = "cli"

    async def _acquire(self, timeout: float | None) -> Any:  # noqa: ASYNC109 (asyncpg's signature)
        started = time.perf_counter()
        try:
            return await super()._acquire(timeout)  # type: ignore[misc]
        finally:
            POOL_ACQUIRE_SECONDS.labels(self.role).observe(time.perf_counter() - started)


class _PoolCollector(Collector):
    """Size, in-use and maximum of every live pool, read at scrape time."""

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[InstrumentedPool] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily(
            "finstream_db_pool_connections", "Connections open in the pool", labels=["role"]
        )
        used = GaugeMetricFamily(
            "finstream_db_pool_in_use", "Pooled connections handed out", labels=["role"]
        )
        top = GaugeMetricFamily(
            "finstream_db_pool_max", "Most connections the pool opens", labels=["role"]
        )
        totals: dict[str, list[int]] = {}
        for pool in list(self.pools):
            if pool.is_closing():
                continue
            t = totals.setdefault(pool.role, [0, 0, 0])
            t[0] += pool.get_size()
            t[1] += pool.get_size() - pool.get_idle_size()
            t[2] += pool.get_max_size()
        for role, (n, busy, most) in sorted(totals.items()):
            size.add_metric([role], n)
            used.add_metric([role], busy)
            top.add_metric([role], most)
        yield from (size, used, top)


_POOLS = _PoolCollector()
with contextlib.suppress(ValueError):  # registered once per process
    REGISTRY.register(_POOLS)


async def connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=settings.pg_connect_timeout,
        command_timeout=settings.pg_command_timeout,
    )


async def create_pool(
    settings: Settings, min_size: int | None = None, max_size: int | None = None
) -> asyncpg.Pool:
    """A pool sized by settings (or the caller), instrumented, named in pg_stat_activity."""
    role = process_role()
    top = max_size if max_size is not None else settings.db_pool_max_size
    low = min(min_size if min_size is not None else settings.db_pool_min_size, top)
    pool = InstrumentedPool(
        settings.database_url.get_secret_value(),
        min_size=low,
        max_size=top,
        max_queries=50000,
        max_inactive_connection_lifetime=300.0,
        # A half-open connection (bytes stop, the socket stays open) must fail
        # a call, not hang it: connects and statements time out.
        timeout=settings.pg_connect_timeout,
        command_timeout=settings.pg_command_timeout,
        connect=None,
        setup=None,
        init=None,
        reset=None,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        server_settings={"application_name": f"finstream-{role}"},
    )
    pool.role = role
    await pool
    _POOLS.pools.add(pool)
    return pool


async def migrate(
    conn: asyncpg.Connection, migrations: list[Migration] | None = None
) -> list[Migration]:
    """Apply what is missing; return what was applied now."""
    from finstream.db.partitions import ensure_partitions, use_owner_role
    from finstream.domain.time import utcnow

    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await _owner_may_create(conn)
        await use_owner_role(conn)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = {r["version"]: r for r in rows}
        for m in migrations:
            row = done.get(m.version)
            if row is not None:
                if row["checksum"] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name} changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied_now.append(m)
            if m.version == 40:  # the owner role exists from here on
                await _owner_may_create(conn)
                await use_owner_role(conn)
        await ensure_partitions(conn, utcnow())
    finally:
        await conn.execute("RESET ROLE")
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now


async def _owner_may_create(conn: asyncpg.Connection) -> None:
    """Let finstream_owner create objects in the schema (PostgreSQL 15 grants PUBLIC no CREATE)."""
    await conn.execute(
        """DO $$ BEGIN
             IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'finstream_owner')
                AND has_schema_privilege(current_schema(), 'CREATE')
                AND pg_has_role(current_user,
                                (SELECT nspowner FROM pg_namespace WHERE nspname = current_schema()),
                                'USAGE') THEN
               EXECUTE format('GRANT USAGE, CREATE ON SCHEMA %I TO finstream_owner', current_schema());
             END IF;
           END $$"""
    )
