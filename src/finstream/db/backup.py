"""Backups and point-in-time restore with pgBackRest.

pgBackRest does the work: continuous WAL archiving (``archive_command`` runs
``pgbackrest archive-push``), full, differential and incremental backups,
retention of backups and WAL, verification and restore to a point in time.
This module runs it with finstream's stanza and configuration and records
each backup in the ``db_backups`` table, which health checks and the
backup-age metric read.

Locally, `finstream stack up` configures pgBackRest for the PostgreSQL it
manages (``<stack_dir>/pgbackrest``: configuration, repository, logs) and
archives WAL into it. In production pgBackRest reads its own configuration:
``PGBACKREST_*`` variables (a repository on a volume or S3-compatible
storage, the database host) or ``FINSTREAM_PGBACKREST_CONFIG``. Restore
stops, restores and restarts only a PostgreSQL that finstream manages; for
another server, deploy/README.md's runbook gives the same steps by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from finstream.settings import Settings

Log = Callable[[str], None]


class BackupError(RuntimeError):
    """A backup operation failed; the message is one line saying what to do."""


def stack_config_path(settings: Settings) -> Path:
    return settings.stack_dir / "pgbackrest" / "pgbackrest.conf"


def config_path(settings: Settings) -> Path | None:
    if settings.pgbackrest_config is not None:
        return settings.pgbackrest_config
    local = stack_config_path(settings)
    return local if local.exists() else None


def render_config(
    settings: Settings, data_dir: Path, port: int, socket_dir: Path, user: str
) -> str:
    """pgbackrest.conf for the stack's own PostgreSQL (repository beside it)."""
    base = settings.stack_dir / "pgbackrest"
    lines = [
        "[global]",
        f"repo1-path={base / 'repo'}",
        "repo1-retention-full-type=time",
        f"repo1-retention-full={settings.backup_retention_days}",
        f"log-path={base / 'log'}",
        f"lock-path={base / 'lock'}",
        f"spool-path={base / 'spool'}",
        "log-level-file=detail",
        "compress-type=gz",
        "compress-level=3",
        "start-fast=y",
        "",
        f"[{settings.backup_stanza}]",
        f"pg1-path={data_dir}",
        f"pg1-port={port}",
        f"pg1-socket-path={socket_dir}",
        f"pg1-user={user}",
        "",
    ]
    return "\n".join(lines)


def archive_command(settings: Settings, config: Path) -> str:
    return f"pgbackrest --config={config} --stanza={settings.backup_stanza} archive-push %p"


@dataclass
class PgBackRest:
    settings: Settings
    runas: list[str]

    @classmethod
    def for_settings(cls, settings: Settings) -> PgBackRest:
        if shutil.which("pgbackrest") is None:
            raise BackupError(
                "pgbackrest is not installed: `finstream stack up` installs it (apt-get install -y pgbackrest)"
            )
        config = config_path(settings)
        if config is None and not any(k.startswith("PGBACKREST_") for k in _environ()):
            raise BackupError(
                "pgBackRest is not configured for this database: finstream configures it for the "
                "PostgreSQL `finstream stack up` starts; for an external server set "
                "FINSTREAM_PGBACKREST_CONFIG or PGBACKREST_* variables (deploy/README.md, Backups)"
            )
        runas: list[str] = []
        if os.geteuid() == 0 and config is not None and config == stack_config_path(settings):
            # The repository and the data directory belong to the postgres user.
            runas = ["runuser", "-u", "postgres", "--"]
        return cls(settings, runas)

    @property
    def managed(self) -> bool:
        """True when pgBackRest serves the PostgreSQL that `finstream stack` manages."""
        return config_path(self.settings) == stack_config_path(self.settings)

    def command(self, *args: str) -> list[str]:
        config = config_path(self.settings)
        cmd = [*self.runas, "pgbackrest", f"--stanza={self.settings.backup_stanza}"]
        if config is not None:
            cmd.append(f"--config={config}")
        return [*cmd, *args]

    def run(self, *args: str, log: Log | None = None, timeout: float = 3600) -> str:
        """Run pgbackrest; stream its console lines to ``log``; one-line error on failure."""
        cmd = self.command("--log-level-console=info" if log else "--log-level-console=warn", *args)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/"
        )
        out: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            out.append(line.rstrip())
            if log is not None:
                log(line.rstrip())
            if time.monotonic() > deadline:
                proc.kill()
                raise BackupError(f"pgbackrest {args[-1]} did not finish in {timeout:.0f}s")
        code = proc.wait()
        if code != 0:
            errors = [ln for ln in out if "ERROR" in ln] or out[-1:] or ["(no output)"]
            raise BackupError(f"pgbackrest {args[-1]} failed (exit {code}): {errors[-1].strip()}")
        return "\n".join(out)

    def info(self) -> dict[str, Any]:
        text = self.run("--output=json", "info")
        stanzas = json.loads(text[text.index("[") :])
        for stanza in stanzas:
            if stanza.get("name") == self.settings.backup_stanza:
                return dict(stanza)
        raise BackupError(f"stanza {self.settings.backup_stanza} not found in the repository")


def _environ() -> dict[str, str]:
    from finstream.settings import child_environment

    return child_environment()


@dataclass(frozen=True)
class BackupInfo:
    label: str
    type: str
    started: datetime
    stopped: datetime
    size: int | None
    repo_size: int | None
    wal_start: str | None
    wal_stop: str | None

    @classmethod
    def from_json(cls, b: dict[str, Any]) -> BackupInfo:
        info = b.get("info") or {}
        archive = b.get("archive") or {}
        ts = b.get("timestamp") or {}
        return cls(
            label=b["label"],
            type=b["type"],
            started=datetime.fromtimestamp(ts["start"], UTC),
            stopped=datetime.fromtimestamp(ts["stop"], UTC),
            size=info.get("size"),
            repo_size=(info.get("repository") or {}).get("delta"),
            wal_start=archive.get("start"),
            wal_stop=archive.get("stop"),
        )


def backups_of(info: dict[str, Any]) -> list[BackupInfo]:
    return [BackupInfo.from_json(b) for b in info.get("backup", [])]


def wal_range(info: dict[str, Any]) -> tuple[str | None, str | None]:
    archives = info.get("archive") or []
    if not archives:
        return None, None
    return archives[-1].get("min"), archives[-1].get("max")


async def record_backups(conn: asyncpg.Connection, backups: list[BackupInfo]) -> int:
    """Store backups not recorded yet in db_backups; return how many were new."""
    await conn.executemany(
        """INSERT INTO db_backups (label, type, started_at, stopped_at, size_bytes, repo_bytes,
                                   wal_start, wal_stop)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (label) DO NOTHING""",
        [
            (b.label, b.type, b.started, b.stopped, b.size, b.repo_size, b.wal_start, b.wal_stop)
            for b in backups
        ],
    )
    return len(backups)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


# -- restore ------------------------------------------------------------------------------

# Roles whose PostgreSQL writes come from Kafka: after a restore their consumer
# groups are moved back to the restored point, so they write again what the
# database lost (their writes are idempotent, so overlap is harmless).
REPLAY_ROLES = ("history", "bars", "audit", "delivery-email", "delivery-push", "delivery-sms")
REWIND_SLACK_SECONDS = 60.0


async def newest_write(conn: asyncpg.Connection) -> datetime | None:
    """The newest write time the restored database holds (where the sinks resume)."""
    parts = [
        "SELECT max(inserted_at) AS t FROM ticks",
        "SELECT max(updated_at) FROM bars",
        "SELECT max(recorded_at) FROM audit_events",
        "SELECT max(updated_at) FROM deliveries",
    ]
    value = await conn.fetchval(f"SELECT max(t) FROM ({' UNION ALL '.join(parts)}) AS w")
    return value if isinstance(value, datetime) else None


def rewind_groups(settings: Settings, when: datetime, log: Log) -> int:
    """Move the sink roles' committed offsets back to ``when``; never forward.

    The roles must be stopped (Kafka refuses commits to an active group's
    generation from outside it). Returns how many partitions moved.
    """
    from confluent_kafka import Consumer, TopicPartition

    from finstream.roles import ROLES
    from finstream.runtime.kafka import client_config

    moved = 0
    ms = int(when.timestamp() * 1000)
    for role in REPLAY_ROLES:
        group = settings.group(role)
        consumer = Consumer(
            client_config(
                settings, **{"group.id": group, "enable.auto.commit": False, "log_level": 3}
            )
        )
        try:
            for name in ROLES[role].inputs:
                topic = settings.topic(name)
                meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
                if meta is None or meta.error is not None:
                    continue
                parts = [TopicPartition(topic, p) for p in meta.partitions]
                committed = {
                    tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)
                }
                if all(off < 0 for off in committed.values()):
                    continue  # the group never committed: it starts where it is configured to
                targets = consumer.offsets_for_times(
                    [TopicPartition(topic, p, ms) for p in meta.partitions], timeout=10
                )
                back = []
                for tp in targets:
                    offset = tp.offset
                    if offset < 0:  # nothing at or after `when`: the end of the partition
                        offset = consumer.get_watermark_offsets(
                            TopicPartition(topic, tp.partition), timeout=10
                        )[1]
                    if 0 <= offset < committed.get(tp.partition, -1):
                        back.append(TopicPartition(topic, tp.partition, offset))
                if back:
                    consumer.commit(offsets=back, asynchronous=False)
                    moved += len(back)
                    log(
                        f"rewound {group} on {topic}: {len(back)} partition(s) to {when.isoformat()}"
                    )
        finally:
            consumer.close()
    return moved


def restore(settings: Settings, target: datetime | None, log: Log) -> float:
    """Restore the stack's PostgreSQL to ``target`` (None: the end of the archive).

    Stops the server, restores the data directory from the repository (delta
    when one is there, whole when it was lost), starts it, and waits until WAL
    replay has reached the target and the server accepts writes. Returns the
    seconds it took.
    """
    from finstream.stack import Stack, StackError

    pgbr = PgBackRest.for_settings(settings)
    if not pgbr.managed:
        raise BackupError(
            "restore runs on the PostgreSQL `finstream stack` manages; for another server follow "
            "the restore runbook in deploy/README.md on its host"
        )
    started = time.monotonic()
    stack = Stack(settings)
    if stack.postgres_stop():
        log("postgres: stopped")
    data = stack.pg_data
    args = []
    if (data / "PG_VERSION").exists():
        args.append("--delta")
    else:
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        os.chmod(data, 0o700)
    if target is not None:
        when = target.astimezone(UTC).isoformat(sep=" ")
        args += ["--type=time", f"--target={when}", "--target-action=promote"]
    else:
        args += ["--type=default"]
    log(f"restoring {data} to {target.isoformat() if target else 'the end of the WAL archive'}")
    pgbr.run(*args, "restore", log=log)
    log("postgres: starting and replaying WAL")
    try:
        stack.postgres_up(log)
    except StackError as exc:
        raise BackupError(str(exc)) from None
    deadline = time.monotonic() + settings.stack_start_timeout * 4

    import asyncio

    async def in_recovery() -> bool:
        conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=5)
        try:
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        finally:
            await conn.close()

    while asyncio.run(in_recovery()):
        if time.monotonic() > deadline:
            raise BackupError("PostgreSQL is still replaying WAL; see its log in the stack dir")
        time.sleep(0.5)
    return time.monotonic() - started
