"""Native range partitions of the time-series tables: list them, create them ahead.

The tables and their partition keys are listed once, in :data:`TABLES`. A
partition maintenance pass creates the current period and the next
``ahead`` ones for each table; when rows of a new period already sit in the
table's DEFAULT partition (a replay of old ticks, a month nobody created in
time), they are moved into the new partition in the same transaction, since
PostgreSQL refuses to create a partition whose rows live in the default one.
Partition DDL runs as ``finstream_owner`` (see migrations/0040).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from finstream.domain.retention import Granularity, Range, missing

MAINTENANCE_LOCK = 0x66696E74  # "fint": one maintenance pass at a time per database
OWNER_ROLE = "finstream_owner"


@dataclass(frozen=True)
class TimeTable:
    name: str
    key: str
    granularity: Granularity

    @property
    def default(self) -> str:
        return f"{self.name}_default"


TABLES: tuple[TimeTable, ...] = (
    TimeTable("ticks", "ts", "day"),
    TimeTable("bars", "start", "month"),
    TimeTable("delivery_results", "at", "month"),
    TimeTable("audit_events", "recorded_at", "month"),
)
BY_NAME = {t.name: t for t in TABLES}

_BOUND = re.compile(r"FOR VALUES FROM \((.+?)\) TO \((.+?)\)$")


def _bound_value(text: str) -> datetime | None:
    text = text.strip()
    if text in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(text.strip("'"))


def parse_bound(expr: str) -> tuple[datetime | None, datetime | None] | None:
    """(start, end) of a partition bound as pg_get_expr prints it; None for DEFAULT."""
    if expr.strip() == "DEFAULT":
        return None
    match = _BOUND.match(expr.strip())
    if not match:
        raise ValueError(f"unexpected partition bound {expr!r}")
    return _bound_value(match.group(1)), _bound_value(match.group(2))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(when: datetime) -> str:
    return "'" + when.isoformat() + "'"


async def use_owner_role(conn: asyncpg.Connection) -> bool:
    """SET ROLE finstream_owner when it exists and we may; True when in force."""
    allowed = await conn.fetchval(
        "SELECT pg_has_role(current_user, oid, 'MEMBER') FROM pg_roles WHERE rolname = $1",
        OWNER_ROLE,
    )
    if allowed:
        await conn.execute(f"SET ROLE {OWNER_ROLE}")
    return bool(allowed)


async def is_partitioned(conn: asyncpg.Connection, table: str) -> bool:
    kind: str | None = await conn.fetchval(
        "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)", table
    )
    return kind == "p"


async def list_partitions(conn: asyncpg.Connection, table: str) -> list[Range]:
    """The range partitions of a table (the DEFAULT one left out), oldest first."""
    rows = await conn.fetch(
        """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = to_regclass($1)""",
        table,
    )
    out = []
    for row in rows:
        bound = parse_bound(row["bound"])
        if bound is not None:
            out.append(Range(row["relname"], bound[0], bound[1]))
    return sorted(out, key=lambda r: (r.start is not None, r.start or datetime.min))


async def create_partition(
    conn: asyncpg.Connection, table: TimeTable, name: str, start: datetime, end: datetime
) -> int:
    """Create one partition; return how many rows moved into it from the default partition."""
    parent, part, default = (
        quote_ident(table.name),
        quote_ident(name),
        quote_ident(table.default),
    )
    key = quote_ident(table.key)
    bounds = f"FOR VALUES FROM ({literal(start)}) TO ({literal(end)})"
    async with conn.transaction():
        stray = await conn.fetchval(
            f"SELECT count(*) FROM {default} WHERE {key} >= $1 AND {key} < $2", start, end
        )
        if not stray:
            await conn.execute(f"CREATE TABLE {part} PARTITION OF {parent} {bounds}")
            return 0
        await conn.execute(
            f"CREATE TABLE {part} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        moved = await conn.execute(
            f"WITH moved AS (DELETE FROM {default} WHERE {key} >= $1 AND {key} < $2 RETURNING *) "
            f"INSERT INTO {part} SELECT * FROM moved",
            start,
            end,
        )
        await conn.execute(f"ALTER TABLE {parent} ATTACH PARTITION {part} {bounds}")
    return int(moved.split()[-1])


async def ensure_partitions(
    conn: asyncpg.Connection, now: datetime, ahead: dict[str, int] | None = None
) -> list[tuple[str, str, int]]:
    """Create the current and next partitions of every table; return (table, partition, moved)."""
    created = []
    for table in TABLES:
        if not await is_partitioned(conn, table.name):
            continue
        existing = await list_partitions(conn, table.name)
        count = (ahead or {}).get(table.name, 3)
        for name, start, end in missing(existing, table.name, now, table.granularity, count):
            moved = await create_partition(conn, table, name, start, end)
            created.append((table.name, name, moved))
    return created
