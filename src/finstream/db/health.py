"""Database health, statistics and slow queries, from PostgreSQL's own views.

:func:`health` gathers findings (connections against the limit, long-running
and idle-in-transaction sessions, blocked queries, cache hit ratio, dead
tuples and bloat, autovacuum, replication, WAL archiving, backup age) and
scores them with finstream.domain.retention.score. Anything a check cannot
see (no permission, a setting that is off) is a finding too, never a silent
pass. :class:`DatabaseMetrics` turns the same views into Prometheus gauges
for the dashboard and the alert rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import Gauge

from finstream.domain.retention import (
    Finding,
    Severity,
    backup_severity,
    ratio_severity,
    score,
)
from finstream.settings import Settings


@dataclass(frozen=True)
class Health:
    score: int
    findings: list[Finding]

    def render(self) -> list[str]:
        verdict = "healthy" if self.score >= 80 else "degraded" if self.score >= 50 else "unhealthy"
        lines = [f"database health: {self.score}/100 ({verdict})"]
        lines += [f.render() for f in self.findings]
        return lines


async def _row(conn: asyncpg.Connection, query: str) -> Any:
    row = await conn.fetchrow(query)
    assert row is not None, query
    return row


async def _connections(conn: asyncpg.Connection) -> list[Finding]:
    row = await _row(
        conn,
        """SELECT count(*) AS used,
                  current_setting('max_connections')::int AS max,
                  current_setting('superuser_reserved_connections')::int AS reserved
           FROM pg_stat_activity WHERE backend_type = 'client backend'""",
    )
    limit = max(int(row["max"]) - int(row["reserved"]), 1)
    used = int(row["used"])
    sev = ratio_severity(used / limit, 0.8, 0.95)
    return [Finding("connections", sev, f"{used} of {limit} usable connections in use")]


async def _sessions(conn: asyncpg.Connection, settings: Settings) -> list[Finding]:
    rows = await conn.fetch(
        """SELECT pid, state, datname, usename, application_name,
                  extract(epoch FROM now() - query_start) AS running,
                  extract(epoch FROM now() - state_change) AS idle
           FROM pg_stat_activity
           WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"""
    )
    out = []
    long = [
        r
        for r in rows
        if r["state"] == "active" and (r["running"] or 0) > settings.db_long_query_seconds
    ]
    idle = [
        r
        for r in rows
        if r["state"] in ("idle in transaction", "idle in transaction (aborted)")
        and (r["idle"] or 0) > settings.db_idle_in_transaction_seconds
    ]
    if long:
        worst = max(long, key=lambda r: r["running"])
        out.append(
            Finding(
                "long-running queries",
                "warning",
                f"{len(long)} running over {settings.db_long_query_seconds:.0f}s "
                f"(longest: pid {worst['pid']}, {worst['application_name'] or worst['usename']}, {worst['running']:.0f}s)",
            )
        )
    else:
        out.append(Finding("long-running queries", "ok", "none"))
    if idle:
        worst = max(idle, key=lambda r: r["idle"])
        out.append(
            Finding(
                "idle in transaction",
                "warning",
                f"{len(idle)} sessions idle in a transaction over "
                f"{settings.db_idle_in_transaction_seconds:.0f}s (longest: pid {worst['pid']}, {worst['idle']:.0f}s)",
            )
        )
    else:
        out.append(Finding("idle in transaction", "ok", "none"))
    return out


async def _locks(conn: asyncpg.Connection) -> list[Finding]:
    rows = await conn.fetch(
        """SELECT pid, pg_blocking_pids(pid) AS blockers,
                  extract(epoch FROM now() - query_start) AS waiting
           FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0"""
    )
    if not rows:
        return [Finding("locks", "ok", "no blocked queries")]
    worst = max(rows, key=lambda r: r["waiting"] or 0)
    sev: Severity = "critical" if (worst["waiting"] or 0) > 60 else "warning"
    return [
        Finding(
            "locks",
            sev,
            f"{len(rows)} blocked queries (longest: pid {worst['pid']} waiting "
            f"{worst['waiting'] or 0:.0f}s on {list(worst['blockers'])})",
        )
    ]


async def _cache(conn: asyncpg.Connection) -> list[Finding]:
    row = await _row(
        conn, "SELECT blks_hit, blks_read FROM pg_stat_database WHERE datname = current_database()"
    )
    total = int(row["blks_hit"] or 0) + int(row["blks_read"] or 0)
    if total < 1000:
        return [Finding("cache hit ratio", "info", "too few reads yet to judge")]
    ratio = int(row["blks_hit"]) / total
    sev: Severity = "ok" if ratio >= 0.99 else "warning" if ratio >= 0.9 else "critical"
    return [Finding("cache hit ratio", sev, f"{ratio:.2%} of block reads served from memory")]


async def _vacuum(conn: asyncpg.Connection) -> list[Finding]:
    rows = await conn.fetch(
        """SELECT relname, n_live_tup, n_dead_tup, last_autovacuum, last_vacuum
           FROM pg_stat_user_tables WHERE n_dead_tup > 10000 ORDER BY n_dead_tup DESC"""
    )
    bloated = [r for r in rows if r["n_dead_tup"] > 0.2 * max(r["n_live_tup"], 1)]
    out = []
    if bloated:
        names = ", ".join(
            f"{r['relname']} ({r['n_dead_tup']} dead, ~{r['n_dead_tup'] / (r['n_dead_tup'] + r['n_live_tup']):.0%} bloat)"
            for r in bloated[:5]
        )
        out.append(Finding("dead tuples", "warning", names))
    else:
        out.append(Finding("dead tuples", "ok", "no table over 20% dead rows"))
    stale = [
        r
        for r in rows
        if (r["last_autovacuum"] or r["last_vacuum"]) is None
        or max(x for x in (r["last_autovacuum"], r["last_vacuum"]) if x is not None)
        < datetime.now((r["last_autovacuum"] or r["last_vacuum"]).tzinfo) - timedelta(days=1)
    ]
    if stale:
        out.append(
            Finding(
                "autovacuum",
                "warning",
                "not vacuumed for a day despite dead rows: "
                + ", ".join(r["relname"] for r in stale[:5]),
            )
        )
    else:
        on = await conn.fetchval("SELECT current_setting('autovacuum')")
        out.append(Finding("autovacuum", "ok" if on == "on" else "critical", f"autovacuum is {on}"))
    return out


async def _replication(conn: asyncpg.Connection) -> list[Finding]:
    if await conn.fetchval("SELECT pg_is_in_recovery()"):
        lag = await conn.fetchval(
            "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())"
        )
        standby: Severity = "ok" if lag is not None and lag < 30 else "warning"
        return [Finding("replication", standby, f"standby, replaying {lag or 0:.0f}s behind")]
    rows = await conn.fetch(
        "SELECT application_name, state, extract(epoch FROM replay_lag) AS lag FROM pg_stat_replication"
    )
    if not rows:
        return [Finding("replication", "info", "no standby connected")]
    worst = max(float(r["lag"] or 0) for r in rows)
    sev: Severity = "ok" if worst < 30 else "warning" if worst < 300 else "critical"
    return [Finding("replication", sev, f"{len(rows)} standbys, worst replay lag {worst:.0f}s")]


async def archive_status(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await _row(
        conn,
        """SELECT current_setting('archive_mode') AS mode,
                  current_setting('archive_command') AS command,
                  archived_count, failed_count, last_archived_time, last_failed_time,
                  last_failed_wal
           FROM pg_stat_archiver""",
    )
    return dict(row)


async def _archive(conn: asyncpg.Connection) -> list[Finding]:
    a = await archive_status(conn)
    if a["mode"] == "off" or not a["command"]:
        return [
            Finding(
                "WAL archive",
                "critical",
                "archive_mode is off: no point-in-time recovery (finstream's own PostgreSQL "
                "archives to pgBackRest; configure an external one as deploy/README.md says)",
            )
        ]
    failing = a["last_failed_time"] is not None and (
        a["last_archived_time"] is None or a["last_failed_time"] > a["last_archived_time"]
    )
    if failing:
        return [
            Finding(
                "WAL archive",
                "critical",
                f"archiving is failing (last failure {a['last_failed_time']:%Y-%m-%d %H:%M:%S} "
                f"on {a['last_failed_wal']}; {a['failed_count']} failures)",
            )
        ]
    last = a["last_archived_time"]
    return [
        Finding(
            "WAL archive",
            "ok",
            f"{a['archived_count']} segments archived"
            + (f", last at {last:%Y-%m-%d %H:%M:%S}" if last else ""),
        )
    ]


async def latest_backups(conn: asyncpg.Connection) -> dict[str, datetime]:
    """Stop time of the latest recorded backup of each type."""
    if await conn.fetchval("SELECT to_regclass('db_backups')") is None:
        return {}
    rows = await conn.fetch("SELECT type, max(stopped_at) AS at FROM db_backups GROUP BY type")
    return {r["type"]: r["at"] for r in rows}


async def _backups(conn: asyncpg.Connection, settings: Settings) -> list[Finding]:
    latest = await latest_backups(conn)
    now = await conn.fetchval("SELECT now()")
    full = latest.get("full")
    # Any backup type resets the clock of its schedule; a full one resets them all.
    any_recent = max(latest.values()) if latest else None
    sev_full = backup_severity(
        now - full if full else None, timedelta(hours=settings.backup_full_every_hours)
    )
    out = [
        Finding(
            "backup",
            sev_full,
            f"last full backup {(now - full).total_seconds() / 3600:.1f}h ago "
            f"(schedule: every {settings.backup_full_every_hours:g}h)"
            if full
            else "no full backup recorded (`finstream db backup --type full`)",
        )
    ]
    every = settings.backup_incr_every_hours or settings.backup_diff_every_hours
    if every and any_recent is not None:
        sev = backup_severity(now - any_recent, timedelta(hours=every))
        out.append(
            Finding(
                "backup (incremental)",
                sev,
                f"last backup of any type {(now - any_recent).total_seconds() / 3600:.1f}h ago "
                f"(schedule: every {every:g}h)",
            )
        )
    return out


async def health(conn: asyncpg.Connection, settings: Settings) -> Health:
    findings: list[Finding] = []
    for check in (
        _connections(conn),
        _sessions(conn, settings),
        _locks(conn),
        _cache(conn),
        _vacuum(conn),
        _replication(conn),
        _archive(conn),
        _backups(conn, settings),
    ):
        try:
            findings += await check
        except asyncpg.PostgresError as exc:
            findings.append(Finding("check", "warning", f"could not check: {exc}"))
    order = {"critical": 0, "warning": 1, "info": 2, "ok": 3}
    findings.sort(key=lambda f: order[f.severity])
    return Health(score(findings), findings)


# -- stats and slow queries ------------------------------------------------------------


async def table_stats(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Tables (partitioned parents summed over their partitions), largest first."""
    rows = await conn.fetch(
        """
        WITH parts AS (
            SELECT coalesce(p.relname, c.relname) AS name, c.oid, c.reltuples
            FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
            LEFT JOIN pg_class p ON p.oid = i.inhparent
            WHERE n.nspname = current_schema() AND c.relkind = 'r')
        SELECT name, count(*) AS partitions,
               sum(greatest(reltuples, 0))::bigint AS rows_estimate,
               sum(pg_table_size(oid))::bigint AS table_bytes,
               sum(pg_indexes_size(oid))::bigint AS index_bytes,
               sum(pg_total_relation_size(oid))::bigint AS total_bytes
        FROM parts GROUP BY name ORDER BY total_bytes DESC
        """
    )
    return [dict(r) for r in rows]


async def unused_indexes(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT s.relname AS table, s.indexrelname AS index, s.idx_scan,
                  pg_relation_size(s.indexrelid) AS bytes
           FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
           WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary
           ORDER BY pg_relation_size(s.indexrelid) DESC"""
    )
    return [dict(r) for r in rows]


class SlowQueriesUnavailable(RuntimeError):
    pass


async def slow_queries(conn: asyncpg.Connection, limit: int, order: str) -> list[dict[str, Any]]:
    loaded = await conn.fetchval(
        "SELECT 'pg_stat_statements' = ANY(string_to_array(current_setting('shared_preload_libraries'), ', '))"
    )
    if not loaded:
        preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
        raise SlowQueriesUnavailable(
            "pg_stat_statements is not loaded (shared_preload_libraries = "
            f"'{preload}'): add it and restart PostgreSQL (finstream's own stack does)"
        )
    if await conn.fetchval("SELECT to_regclass('pg_stat_statements')") is None:
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except asyncpg.InsufficientPrivilegeError as exc:
            raise SlowQueriesUnavailable(
                f"the pg_stat_statements extension is missing in this database and cannot be created here ({exc}): "
                "a superuser runs CREATE EXTENSION pg_stat_statements"
            ) from None
    column = {"total": "total_exec_time", "mean": "mean_exec_time", "calls": "calls"}[order]
    rows = await conn.fetch(
        f"""SELECT queryid, calls, total_exec_time, mean_exec_time, max_exec_time, rows,
                   shared_blks_hit, shared_blks_read, query
            FROM pg_stat_statements s
            WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
            ORDER BY {column} DESC LIMIT $1""",
        limit,
    )
    return [dict(r) for r in rows]


# -- Prometheus gauges (the retention role exports them) -----------------------------------

DB_CONNECTIONS = Gauge("finstream_db_connections", "Client connections by state", ["state"])
DB_MAX_CONNECTIONS = Gauge(
    "finstream_db_max_connections", "Connections usable by clients (max less reserved)"
)
DB_HEALTH_SCORE = Gauge("finstream_db_health_score", "`finstream db health` score, 0-100")
DB_BACKUP_AGE = Gauge(
    "finstream_db_backup_age_seconds", "Age of the latest recorded backup", ["type"]
)
DB_WAL_ARCHIVE_FAILING = Gauge(
    "finstream_db_wal_archive_failing",
    "1 when the last WAL archive attempt failed or archive_mode is off",
)
DB_WAL_ARCHIVED = Gauge("finstream_db_wal_archived_segments", "WAL segments archived")
DB_WAL_ARCHIVE_FAILURES = Gauge("finstream_db_wal_archive_failures", "WAL archive failures")
DB_REPLICATION_LAG = Gauge(
    "finstream_db_replication_lag_seconds", "Worst replay lag of a standby", ["standby"]
)
DB_BLOCKED_QUERIES = Gauge("finstream_db_blocked_queries", "Queries waiting on a lock")
DB_TABLE_BYTES = Gauge("finstream_db_table_bytes", "Size of a table with its indexes", ["table"])
DB_RETENTION_LAST_OK = Gauge(
    "finstream_db_retention_last_ok_timestamp_seconds",
    "When a retention pass last succeeded on this database (db_maintenance_runs)",
)


async def update_metrics(conn: asyncpg.Connection, settings: Settings) -> None:
    for row in await conn.fetch(
        """SELECT coalesce(state, 'unknown') AS state, count(*) AS n FROM pg_stat_activity
           WHERE backend_type = 'client backend' GROUP BY 1"""
    ):
        DB_CONNECTIONS.labels(row["state"]).set(row["n"])
    DB_MAX_CONNECTIONS.set(
        await conn.fetchval(
            "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
        )
    )
    a = await archive_status(conn)
    failing = a["mode"] == "off" or (
        a["last_failed_time"] is not None
        and (a["last_archived_time"] is None or a["last_failed_time"] > a["last_archived_time"])
    )
    DB_WAL_ARCHIVE_FAILING.set(1 if failing else 0)
    DB_WAL_ARCHIVED.set(a["archived_count"] or 0)
    DB_WAL_ARCHIVE_FAILURES.set(a["failed_count"] or 0)
    now = await conn.fetchval("SELECT now()")
    for kind, at in (await latest_backups(conn)).items():
        DB_BACKUP_AGE.labels(kind).set((now - at).total_seconds())
    for row in await conn.fetch(
        "SELECT application_name, extract(epoch FROM replay_lag) AS lag FROM pg_stat_replication"
    ):
        DB_REPLICATION_LAG.labels(row["application_name"] or "standby").set(float(row["lag"] or 0))
    DB_BLOCKED_QUERIES.set(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0"
        )
    )
    for stat in await table_stats(conn):
        DB_TABLE_BYTES.labels(stat["name"]).set(stat["total_bytes"])
    last_ok = await conn.fetchval(
        "SELECT extract(epoch FROM max(finished_at)) FROM db_maintenance_runs "
        "WHERE kind = 'retention' AND ok"
    )
    if last_ok is not None:
        DB_RETENTION_LAST_OK.set(float(last_ok))
    DB_HEALTH_SCORE.set((await health(conn, settings)).score)
