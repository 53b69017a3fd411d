"""PostgreSQL connections and versioned, idempotent migrations.

Migrations are ``migrations/NNNN_name.sql`` files applied in order, each in
its own transaction, recorded in ``schema_migrations`` with a checksum. A
PostgreSQL advisory lock serializes concurrent migrators (several pods
starting at once). An applied migration whose file changed is an error: fix
forward with a new file, never edit history.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

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


async def connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.database_url.get_secret_value(),
        timeout=settings.pg_connect_timeout,
        command_timeout=settings.pg_command_timeout,
    )


async def create_pool(settings: Settings, min_size: int = 1, max_size: int = 5) -> asyncpg.Pool:
    """A pool whose connects and statements time out (pg_connect_timeout, pg_command_timeout),
    so a half-open connection to PostgreSQL fails a call instead of hanging it."""
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(),
        min_size=min_size,
        max_size=max_size,
        timeout=settings.pg_connect_timeout,
        command_timeout=settings.pg_command_timeout,
    )
    assert pool is not None
    return pool


async def migrate(
    conn: asyncpg.Connection, migrations: list[Migration] | None = None
) -> list[Migration]:
    """Apply what is missing; return what was applied now."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
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
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now
