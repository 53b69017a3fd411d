"""`finstream db ...`: backups and restore, init and reset, retention, health, statistics.

Added to the `db` group of finstream.cli (beside `db migrate`). Every command
prints progress and ends with one clear `error: ...` line on failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from finstream.cli.common import fail
from finstream.settings import Settings, get_settings

T = TypeVar("T")


def _with_conn(settings: Settings, work: Callable[[Any], Awaitable[T]]) -> T:
    import asyncpg

    async def go() -> T:
        conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
        try:
            return await work(conn)
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except OSError as exc:
        fail(f"cannot reach PostgreSQL: {exc} (is `finstream stack up` done?)")
    except asyncpg.PostgresError as exc:
        fail(f"PostgreSQL: {exc}")
    raise AssertionError("unreachable")


@click.group()
def db() -> None:
    """PostgreSQL: schema, backups and restore, retention, health."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply pending SQL migrations (idempotent)."""
    from finstream.stores.postgres import MigrationError, connect, migrate

    async def go() -> list[Any]:
        conn = await connect(get_settings())
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    try:
        applied = asyncio.run(go())
    except MigrationError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot reach PostgreSQL: {exc} (is `finstream stack up` done?)")
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")
    click.echo(f"database: {len(applied)} migration(s) applied, schema up to date")


# -- backups ----------------------------------------------------------------------------


@click.command("backup")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["full", "diff", "incr"]),
    default="incr",
    show_default=True,
    help="incr and diff fall back to full when no full backup exists yet.",
)
def backup(kind: str) -> None:
    """Take a pgBackRest backup and record it (db_backups)."""
    from finstream.db.backup import BackupError, PgBackRest, backups_of, human_bytes, record_backups

    settings = get_settings()
    try:
        pgbr = PgBackRest.for_settings(settings)
        click.echo(f"backup: {kind} of stanza {settings.backup_stanza}")
        pgbr.run(f"--type={kind}", "backup", log=lambda line: click.echo(f"  {line}"))
        found = backups_of(pgbr.info())
    except BackupError as exc:
        fail(str(exc))
    if not found:
        fail("pgbackrest finished but lists no backup")
    latest = found[-1]
    _with_conn(settings, lambda conn: record_backups(conn, found))
    click.echo(
        f"backup: {latest.label} ({latest.type}) done, {human_bytes(latest.size)} "
        f"({human_bytes(latest.repo_size)} stored), WAL {latest.wal_start} .. {latest.wal_stop}"
    )


@click.command("backups")
@click.option("--json", "as_json", is_flag=True, help="pgBackRest's own JSON.")
def backups(as_json: bool) -> None:
    """Backups in the repository with sizes, ages and the WAL they need."""
    from finstream.db.backup import (
        BackupError,
        PgBackRest,
        backups_of,
        human_age,
        human_bytes,
        wal_range,
    )

    settings = get_settings()
    try:
        info = PgBackRest.for_settings(settings).info()
    except BackupError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    now = datetime.now(UTC)
    found = backups_of(info)
    click.echo(f"{'label':<34} {'type':<5} {'age':>7} {'size':>10} {'stored':>10}  WAL")
    for b in found:
        click.echo(
            f"{b.label:<34} {b.type:<5} {human_age((now - b.stopped).total_seconds()):>7} "
            f"{human_bytes(b.size):>10} {human_bytes(b.repo_size):>10}  {b.wal_start} .. {b.wal_stop}"
        )
    low, high = wal_range(info)
    status = (info.get("status") or {}).get("message", "")
    click.echo(f"{len(found)} backup(s); WAL archive {low} .. {high}; status: {status}")


@click.command("verify")
def verify() -> None:
    """Check that WAL archiving works and the repository's backups and WAL are intact."""
    from finstream.db.backup import BackupError, PgBackRest

    settings = get_settings()
    try:
        pgbr = PgBackRest.for_settings(settings)
        click.echo("verify: archiving a WAL segment (pgbackrest check)")
        pgbr.run("check", log=lambda line: click.echo(f"  {line}"), timeout=300)
        click.echo("verify: checksums of backups and WAL in the repository (pgbackrest verify)")
        pgbr.run("verify", log=lambda line: click.echo(f"  {line}"))
    except BackupError as exc:
        fail(str(exc))
    click.echo("verify: archive and repository OK")


@click.command("restore")
@click.option("--to-time", "to_time", default=None, help="Point in time: ISO 8601 with a zone.")
@click.option("--latest", is_flag=True, help="Replay every archived WAL segment.")
@click.option(
    "--rewind-consumers/--no-rewind-consumers",
    default=True,
    show_default=True,
    help="Move the sink roles' Kafka offsets back to the restored point (stop them first).",
)
def restore(to_time: str | None, latest: bool, rewind_consumers: bool) -> None:
    """Restore the stack's PostgreSQL to a point in time (or the latest archived WAL)."""
    from datetime import timedelta

    from finstream.cli.common import when as _when
    from finstream.db.backup import (
        REWIND_SLACK_SECONDS,
        BackupError,
        newest_write,
        rewind_groups,
    )
    from finstream.db.backup import (
        restore as do_restore,
    )

    if (to_time is None) == (not latest):
        fail("give exactly one of --to-time T or --latest")
    settings = get_settings()
    target = _when(to_time) if to_time else None
    try:
        seconds = do_restore(settings, target, click.echo)
    except BackupError as exc:
        fail(str(exc))
    click.echo(f"restore: done in {seconds:.1f}s; the server accepts writes")
    if not rewind_consumers:
        return
    newest = _with_conn(settings, newest_write)
    if newest is None:
        click.echo("restore: the restored database holds no writes; consumer offsets left alone")
        return
    when = newest - timedelta(seconds=REWIND_SLACK_SECONDS)
    try:
        moved = rewind_groups(settings, when, click.echo)
    except Exception as exc:  # Kafka unreachable: the restore itself is done
        fail(f"restored, but could not rewind consumer groups: {exc}")
    click.echo(
        f"restore: {moved} partition(s) of sink consumer groups rewound to {when.isoformat()}"
    )


# -- init and reset ----------------------------------------------------------------------


@click.command("init")
@click.option("--no-demo", is_flag=True, help="Migrations only, no demo data.")
def init(no_demo: bool) -> None:
    """A new environment: migrations, partitions, development logins and the demo data."""
    from finstream.cli.topics import topics_apply
    from finstream.db.grants import provision_dev_logins

    settings = get_settings()
    ctx = click.get_current_context()
    ctx.invoke(db_migrate)
    if settings.env == "dev":
        users = _with_conn(settings, provision_dev_logins)
        click.echo(f"database: development logins {', '.join(users)}")
    if no_demo:
        return
    from finstream.cli import demo

    ctx.invoke(topics_apply, dry_run=False, replication_factor=None)
    try:
        # No quotes to wait for in a new environment: rule levels use defaults.
        items = demo.seed(settings, quote_wait=0.0)
    except Exception as exc:
        fail(f"cannot send the demo data to Kafka at {settings.kafka_bootstrap}: {exc}")
    personas = ", ".join(p.user_id for p in demo.PERSONAS)
    click.echo(f"demo: {personas}; {len(items)} records (preferences, alert rules, notifications)")


@click.command("reset")
@click.option("--confirm", "confirm", default=None, help="The database name, typed back.")
def reset(confirm: str | None) -> None:
    """Development only: drop every table of the database and migrate again."""
    from urllib.parse import urlparse

    from finstream.stores.postgres import migrate

    settings = get_settings()
    if settings.env not in ("dev", "test"):
        fail(f"db reset refuses to run with FINSTREAM_ENV={settings.env} (development only)")
    name = (urlparse(settings.database_url.get_secret_value()).path or "/").lstrip("/")
    typed = (
        confirm
        if confirm is not None
        else click.prompt(f"type the database name ({name}) to drop all its tables")
    )
    if typed != name:
        fail(f"{typed!r} is not {name!r}; nothing dropped")

    async def go(conn: Any) -> int:
        rows = await conn.fetch(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
                 AND NOT c.relispartition"""
        )
        for r in rows:
            await conn.execute(f'DROP TABLE IF EXISTS "{r["relname"]}" CASCADE')
        await migrate(conn)
        return len(rows)

    dropped = _with_conn(settings, go)
    click.echo(f"database {name}: {dropped} table(s) dropped, migrations applied again")


# -- retention ---------------------------------------------------------------------------


@click.command("retention")
@click.option("--no-audit", is_flag=True, help="Do not send audit events (Kafka unavailable).")
def retention(no_audit: bool) -> None:
    """Create partitions ahead and remove what is past each table's retention policy."""
    from finstream.db.retention import RetentionBusy, publish_to_audit_topic, run_pass
    from finstream.domain.time import utcnow

    settings = get_settings()

    async def publish(events: list[dict[str, Any]]) -> None:
        await publish_to_audit_topic(settings, events)

    async def work(conn: Any) -> Any:
        return await run_pass(conn, settings, utcnow(), None if no_audit else publish)

    try:
        report = _with_conn(settings, work)
    except RetentionBusy as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"retention pass failed: {type(exc).__name__}: {exc}")
    for line in report.lines():
        click.echo(line)
    click.echo(
        f"retention: {len(report.created)} partition(s) created, {len(report.removed)} removal(s)"
        + ("" if no_audit else f", {len(report.events)} audit event(s) sent")
    )


# -- health and statistics ------------------------------------------------------------------


@click.command("health")
@click.option("--fail-under", type=int, default=None, help="Exit 2 when the score is below this.")
def health(fail_under: int | None) -> None:
    """A health score with its reasons: connections, sessions, locks, cache, vacuum, WAL, backups."""
    from finstream.db.health import health as check

    settings = get_settings()
    result = _with_conn(settings, lambda conn: check(conn, settings))
    for line in result.render():
        click.echo(line)
    if fail_under is not None and result.score < fail_under:
        sys.exit(2)


@click.command("stats")
def stats() -> None:
    """Table and index sizes, row estimates and unused indexes."""
    from finstream.db.backup import human_bytes
    from finstream.db.health import table_stats, unused_indexes

    async def work(conn: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return await table_stats(conn), await unused_indexes(conn)

    tables, unused = _with_conn(get_settings(), work)
    click.echo(
        f"{'table':<28} {'parts':>5} {'rows (est.)':>12} {'table':>10} {'indexes':>10} {'total':>10}"
    )
    for t in tables:
        click.echo(
            f"{t['name']:<28} {t['partitions']:>5} {t['rows_estimate']:>12} {human_bytes(t['table_bytes']):>10} "
            f"{human_bytes(t['index_bytes']):>10} {human_bytes(t['total_bytes']):>10}"
        )
    click.echo(f"unused indexes (never scanned since statistics reset): {len(unused)}")
    for i in unused:
        click.echo(f"  {i['table']}.{i['index']} {human_bytes(i['bytes'])}")


@click.command("slow-queries")
@click.option("-n", "--limit", default=10, show_default=True)
@click.option(
    "--order", type=click.Choice(["total", "mean", "calls"]), default="total", show_default=True
)
def slow_queries(limit: int, order: str) -> None:
    """The costliest statements of this database, from pg_stat_statements."""
    from finstream.db.health import SlowQueriesUnavailable
    from finstream.db.health import slow_queries as fetch

    async def work(conn: Any) -> list[dict[str, Any]] | str:
        try:
            return await fetch(conn, limit, order)
        except SlowQueriesUnavailable as exc:
            return str(exc)

    rows = _with_conn(get_settings(), work)
    if isinstance(rows, str):
        fail(rows)
    click.echo(f"{'calls':>8} {'total ms':>11} {'mean ms':>9} {'max ms':>9} {'rows':>9}  query")
    for r in rows:
        query = " ".join(str(r["query"]).split())
        click.echo(
            f"{r['calls']:>8} {r['total_exec_time']:>11.1f} {r['mean_exec_time']:>9.2f} "
            f"{r['max_exec_time']:>9.2f} {r['rows']:>9}  {query[:120]}"
        )


COMMANDS = [backup, backups, verify, restore, init, reset, retention, health, stats, slow_queries]

for _command in COMMANDS:
    db.add_command(_command)
