"""The stack's PostgreSQL: a cluster of the machine's binaries, archived by pgBackRest."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
from pathlib import Path

from finstream.stack.common import (
    Log,
    ServiceStatus,
    StackBase,
    StackError,
    apt_install,
    is_local,
    port_open,
    read_pid,
    stop_pid,
    tail,
)


class PostgresService(StackBase):
    """``finstream stack`` for PostgreSQL, and the operations ``finstream db`` needs."""

    def _pg_check(self) -> str | None:
        """None when the URL's credentials work; otherwise the error text."""
        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(self.settings.database_url.get_secret_value(), timeout=3)
            await conn.close()

        try:
            asyncio.run(probe())
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _pg_bin(self) -> Path | None:
        candidates = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4])
        )
        if candidates:
            return Path(candidates[-1]).parent
        found = shutil.which("pg_ctl")
        return Path(found).resolve().parent if found else None

    def _pg_runas(self) -> list[str]:
        """postgres refuses to run as root; as root we run it as the postgres user."""
        if os.geteuid() != 0:
            return []
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--create-home", "postgres"], check=False)
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), None
        )
        if runuser is None:
            raise StackError(
                "running as root needs `runuser` (util-linux) to start PostgreSQL as the postgres user"
            )
        return [runuser, "-u", "postgres", "--"]

    @property
    def _pg_data(self) -> Path:
        return self.pg_dir / "data"

    def _pg_managed_pid(self) -> int | None:
        return (
            read_pid(self._pg_data / "postmaster.pid")
            if (self._pg_data / "postmaster.pid").exists()
            else None
        )

    def _postgres_status(self) -> ServiceStatus:
        pid = self._pg_managed_pid()
        err = self._pg_check()
        where = f"{self.pg_host}:{self.pg_port}/{self.pg_db}"
        return ServiceStatus("postgres", err is None, pid is not None, where, pid, err or "")

    def _postgres_up(self, log: Log) -> None:
        err = self._pg_check()
        pid = self._pg_managed_pid()
        if err is None:
            log(
                f"postgres: already running at {self.pg_host}:{self.pg_port} ({'managed' if pid else 'external'})"
            )
            if pid is None:
                missing = self._pg_unconfigured()
                if missing:
                    log(f"postgres: external, not configured by finstream: {missing}")
            return
        if pid is None and port_open(self.pg_host, self.pg_port):
            raise StackError(
                f"PostgreSQL at {self.pg_host}:{self.pg_port} refused finstream's credentials ({err}); "
                "set FINSTREAM_DATABASE_URL to a working URL, or free the port"
            )
        if not is_local(self.pg_host):
            raise StackError(
                f"PostgreSQL at {self.pg_host}:{self.pg_port} is not reachable ({err}); start it or fix FINSTREAM_DATABASE_URL"
            )
        bindir = self._pg_bin()
        if bindir is None:
            log("postgres: not installed; installing the Debian package")
            apt_install("postgresql")
            bindir = self._pg_bin()
            if bindir is None:
                raise StackError(
                    "PostgreSQL was installed but pg_ctl is not found; install postgresql yourself"
                )
        runas = self._pg_runas()
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        if runas:
            shutil.chown(self.pg_dir, "postgres", "postgres")
            os.chmod(self.pg_dir, 0o700)
            probe = subprocess.run([*runas, "test", "-w", str(self.pg_dir)], check=False)
            if probe.returncode != 0:
                raise StackError(
                    f"the postgres user cannot reach {self.pg_dir}; make its parent folders traversable (chmod o+x) or set FINSTREAM_STACK_DIR"
                )
        if not (self._pg_data / "PG_VERSION").exists():
            log(f"postgres: initializing a cluster in {self._pg_data}")
            pwfile = self.pg_dir / "pwfile"
            pwfile.write_text(self.pg_password or "finstream")
            if runas:
                shutil.chown(pwfile, "postgres", "postgres")
            proc = subprocess.run(
                [
                    *runas,
                    str(bindir / "initdb"),
                    "-D",
                    str(self._pg_data),
                    "-U",
                    self.pg_user,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            pwfile.unlink(missing_ok=True)
            if proc.returncode != 0:
                raise StackError(
                    f"initdb failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
                )
        sockets = self.pg_dir / "run"
        sockets.mkdir(exist_ok=True)
        if runas:
            shutil.chown(sockets, "postgres", "postgres")
        logfile = self.pg_dir / "postgres.log"
        if runas and not logfile.exists():
            logfile.touch()
            shutil.chown(logfile, "postgres", "postgres")
        if port_open("127.0.0.1", self.pg_port):
            raise StackError(
                f"port {self.pg_port} (PostgreSQL) is in use by another program: stop it or set FINSTREAM_DATABASE_URL to another port"
            )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.pg_port} -c unix_socket_directories={sockets} "
            "-c max_connections=200 -c shared_buffers=256MB"
            # Slow-query statistics for `finstream db slow-queries`.
            " -c shared_preload_libraries=pg_stat_statements -c track_io_timing=on"
        )
        if self.settings.backup_archive:
            opts += " " + self._pgbackrest_setup(sockets, log)
        proc = subprocess.run(
            [
                *runas,
                str(bindir / "pg_ctl"),
                "-D",
                str(self._pg_data),
                "-l",
                str(logfile),
                "-o",
                opts,
                "-w",
                "-t",
                str(int(self.settings.stack_start_timeout)),
                "start",
            ],
            capture_output=True,
            text=True,
            check=False,
            start_new_session=True,
        )
        if proc.returncode != 0:
            raise StackError(f"PostgreSQL did not start; see {logfile}: {tail(logfile, 2)}")
        # The cluster's superuser is the URL's user; make sure the database exists.
        create = subprocess.run(
            [
                *runas,
                str(bindir / "psql"),
                "-h",
                str(sockets),
                "-p",
                str(self.pg_port),
                "-U",
                self.pg_user,
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{self.pg_db}'",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if create.stdout.strip() != "1":
            subprocess.run(
                [
                    *runas,
                    str(bindir / "createdb"),
                    "-h",
                    str(sockets),
                    "-p",
                    str(self.pg_port),
                    "-U",
                    self.pg_user,
                    self.pg_db,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
        err = self._pg_check()
        if err is not None:
            raise StackError(f"PostgreSQL started but refuses the configured URL: {err}")
        if self.settings.backup_archive:
            self._pgbackrest_stanza(log)
        log(f"postgres: ready at {self.pg_host}:{self.pg_port}/{self.pg_db}")

    def _postgres_down(self) -> bool:
        if self._pg_managed_pid() is None:
            return False
        bindir = self._pg_bin()
        if bindir is not None:
            subprocess.run(
                [
                    *self._pg_runas(),
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(self._pg_data),
                    "-m",
                    "fast",
                    "-w",
                    "stop",
                ],
                capture_output=True,
                check=False,
            )
        pid = self._pg_managed_pid()
        if pid is not None:
            stop_pid(pid)
        return True

    # -- backups (pgBackRest) and the operations `finstream db` needs ---------
    def postgres_up(self, log: Log = print) -> None:
        """Start (or check) PostgreSQL alone: `finstream db restore` restarts it this way."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._postgres_up(log)

    def postgres_stop(self) -> bool:
        """Stop the PostgreSQL we manage (fast shutdown); False when it is not ours or not running."""
        return self._postgres_down()

    @property
    def pg_data(self) -> Path:
        return self._pg_data

    def _pg_unconfigured(self) -> str:
        """What an external PostgreSQL lacks for `finstream db backup` and `db slow-queries`."""
        import asyncpg

        async def probe() -> tuple[str, str]:
            conn = await asyncpg.connect(self.settings.database_url.get_secret_value(), timeout=3)
            try:
                mode = await conn.fetchval("SELECT current_setting('archive_mode')")
                preload = await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
            finally:
                await conn.close()
            return str(mode), str(preload)

        try:
            mode, preload = asyncio.run(probe())
        except Exception:
            return ""
        gaps = []
        if mode == "off":
            gaps.append(
                "WAL archiving is off (no point-in-time restore; `finstream db backup` needs "
                "FINSTREAM_PGBACKREST_CONFIG and archive_command, deploy/README.md)"
            )
        if "pg_stat_statements" not in preload:
            gaps.append(
                "pg_stat_statements is not in shared_preload_libraries (`finstream db slow-queries` cannot work)"
            )
        return "; ".join(gaps)

    def _pgbackrest_setup(self, sockets: Path, log: Log) -> str:
        """Write pgbackrest.conf for our cluster; return the postgres options that archive to it."""
        import shlex

        from finstream.db.backup import archive_command, render_config, stack_config_path

        if shutil.which("pgbackrest") is None:
            log("postgres: pgbackrest not installed; installing the Debian package")
            apt_install("pgbackrest")
        base = self.root / "pgbackrest"
        for sub in ("repo", "log", "lock", "spool"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        config = stack_config_path(self.settings)
        config.write_text(
            render_config(self.settings, self._pg_data, self.pg_port, sockets, self.pg_user)
        )
        if os.geteuid() == 0:
            for path in [base, *base.iterdir()]:
                shutil.chown(path, "postgres", "postgres")
            os.chmod(base, 0o750)  # noqa: S103 (the postgres group reads its own configuration)
        settings = {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": archive_command(self.settings, config),
            # An idle cluster still closes a WAL segment a minute: the RPO bound.
            "archive_timeout": "60",
            "max_wal_senders": "3",
        }
        return " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())

    def _pgbackrest_stanza(self, log: Log) -> None:
        from finstream.db.backup import BackupError, PgBackRest

        try:
            PgBackRest.for_settings(self.settings).run("stanza-create", timeout=120)
        except BackupError as exc:
            raise StackError(f"pgBackRest could not set up its stanza: {exc}") from None
        log(f"postgres: WAL archived by pgBackRest (stanza {self.settings.backup_stanza})")
