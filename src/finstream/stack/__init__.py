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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from finstream.resources import resource
from finstream.settings import Settings

if TYPE_CHECKING:
    from finstream.stack_security import SecuredBroker

Log = Callable[[str], None]


class StackError(RuntimeError):
    """A stack operation failed; the message is one line telling the user what to do."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    managed: bool  # started by us (we will stop it)
    where: str
    pid: int | None = None
    detail: str = ""

    def render(self) -> str:
        state = "running" if self.running else "stopped"
        owner = "managed by finstream" if self.managed else ("external" if self.running else "")
        pid = f" pid {self.pid}" if self.pid else ""
        extra = f" — {self.detail}" if self.detail else ""
        return f"{self.name:<10} {state:<8} {self.where:<40} {owner}{pid}{extra}".rstrip()


# -- small helpers ---------------------------------------------------------------


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def kraft_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A KRaft cluster id: 16 random bytes in URL-safe base64 without padding.

    One id in 64 would start with "-", and ``StorageTool format -t <id>`` then
    reads it as an option ("argument --cluster-id/-t: expected one argument");
    a landing CI run failed that way. Kafka's own ``Uuid.randomUuid`` draws
    again in that case, and so does this.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _read_pid(path: Path) -> int | None:
    """The live pid in a pid file (PostgreSQL's postmaster.pid has it on the first line)."""
    try:
        pid = int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        content = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(content[-lines:])


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.2)
    if _pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"x://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def _is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def _apt_install(package: str) -> None:
    """Install a Debian package without letting its scripts start a system service."""
    if shutil.which("apt-get") is None:
        raise StackError(
            f"{package} is not installed and apt-get is unavailable: install {package} yourself"
        )
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise StackError(f"{package} is not installed: run `sudo apt-get install -y {package}`")
        prefix = ["sudo", "-n"]
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = False
    if os.geteuid() == 0 and not policy.exists():
        # Debian's convention for "do not start services from maintainer scripts".
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        created_policy = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (
            [*prefix, "apt-get", "update", "-q"],
            [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", package],
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise StackError(f"`{' '.join(cmd)}` failed: {last[0]}")
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)


# -- the stack -------------------------------------------------------------------


class Stack:
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
        self.kafka_host, self.kafka_port = _host_port(settings.kafka_bootstrap.split(",")[0], 9092)
        db = urlparse(settings.database_url.get_secret_value())
        self.pg_host, self.pg_port = db.hostname or "127.0.0.1", db.port or 5432
        self.pg_user = unquote(db.username or "finstream")
        self.pg_password = unquote(db.password or "")
        self.pg_db = (db.path or "/finstream").lstrip("/") or "finstream"
        self.redis_host, self.redis_port = _host_port(settings.redis_url.get_secret_value(), 6379)

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

    # -- Kafka --------------------------------------------------------------------
    @property
    def _kafka_pidfile(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    def _kafka_ready(self, timeout: float = 3.0) -> bool:
        if not _port_open(self.kafka_host, self.kafka_port):
            return False
        try:
            from confluent_kafka.admin import AdminClient

            from finstream.runtime.kafka import client_config

            # As the clients connect: with their TLS and SASL settings.
            admin = AdminClient(
                client_config(
                    self.settings,
                    **{"socket.timeout.ms": int(timeout * 1000), "log_level": 0},
                )
            )
            admin.list_topics(timeout=timeout)
        except Exception:
            return False
        return True

    def _kafka_status(self) -> ServiceStatus:
        pid = _read_pid(self._kafka_pidfile)
        running = self._kafka_ready(timeout=2.0)
        detail = "" if running or pid is None else "process alive but not answering"
        return ServiceStatus(
            "kafka", running, pid is not None, f"{self.kafka_host}:{self.kafka_port}", pid, detail
        )

    def _kafka_up(self, log: Log) -> None:
        pid = _read_pid(self._kafka_pidfile)
        if self._kafka_ready():
            owner = f"managed, pid {pid}" if pid else "external"
            log(f"kafka: already running at {self.kafka_host}:{self.kafka_port} ({owner})")
            return
        if pid is not None:
            log(f"kafka: our broker (pid {pid}) is not answering; restarting it")
            _stop_pid(pid)
        if not _is_local(self.kafka_host):
            raise StackError(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable and is not local: "
                "start it, or unset FINSTREAM_KAFKA_BOOTSTRAP to run a local broker"
            )
        ctrl = self.settings.kafka_controller_port
        for port, what in ((self.kafka_port, "broker"), (ctrl, "controller")):
            if _port_open("127.0.0.1", port):
                raise StackError(
                    f"port {port} (Kafka {what}) is in use by another program: stop it, or set "
                    f"{'FINSTREAM_KAFKA_BOOTSTRAP' if what == 'broker' else 'FINSTREAM_KAFKA_CONTROLLER_PORT'}"
                    " to a free port"
                )
        java = shutil.which("java")
        if java is None:
            raise StackError(
                "Java 17+ is needed for the local Kafka: install a JRE (apt-get install -y openjdk-17-jre-headless)"
            )
        libs = self._kafka_libs(log)
        config = self._kafka_config()
        self._kafka_format(java, libs, config, log)
        logs = self.kafka_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cmd = [
            java,
            f"-Xmx{self.settings.kafka_heap}",
            "-Xms256m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={resource('kafka') / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={logs}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            str(config),
        ]
        out = logs / "kafka.out"
        with out.open("ab") as fh:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.kafka_dir,
            )
        self._kafka_pidfile.write_text(str(proc.pid))
        log(
            f"kafka: starting {self.settings.kafka_version} (pid {proc.pid}), waiting for the broker"
        )
        deadline = time.monotonic() + self.settings.stack_start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._kafka_pidfile.unlink(missing_ok=True)
                raise StackError(
                    f"Kafka exited at start (code {proc.returncode}); see {out}: {_tail(out, 3)}"
                )
            if self._broker_answers(timeout=2.0):
                self._kafka_users(log)
                if not self._kafka_ready(timeout=5.0):
                    raise StackError(
                        f"Kafka started but refuses the clients' settings; see {logs / 'server.log'}"
                    )
                log(
                    f"kafka: ready at {self.kafka_host}:{self.kafka_port}"
                    f" ({self.settings.kafka_security_protocol})"
                )
                return
            time.sleep(0.5)
        raise StackError(
            f"Kafka did not become ready in {self.settings.stack_start_timeout:.0f}s; see {logs / 'server.log'}"
        )

    # -- Kafka: a secured listener (finstream.stack_security) --------------------------
    def _secured(self) -> SecuredBroker | None:
        if self.settings.kafka_security_protocol == "PLAINTEXT":
            return None
        from finstream.stack_security import SecuredBroker

        host = "127.0.0.1" if self.kafka_host in ("localhost", "0.0.0.0") else self.kafka_host
        return SecuredBroker(self.settings, self.kafka_dir, host, self.kafka_port)

    def _broker_answers(self, timeout: float) -> bool:
        """The broker is up (asked as its own user when the client user may not exist yet)."""
        secured = self._secured()
        if secured is None:
            return self._kafka_ready(timeout)
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient(secured.admin_config()).list_topics(timeout=timeout)
        except Exception:
            return False
        return True

    def _kafka_users(self, log: Log) -> None:
        secured = self._secured()
        if secured is None or not secured.sasl:
            return
        from confluent_kafka.admin import AdminClient

        try:
            secured.create_users(AdminClient(secured.admin_config()))
        except Exception as exc:
            raise StackError(
                f"could not create the Kafka user's SCRAM credentials: {exc}"
            ) from None
        log(f"kafka: SASL user {self.settings.kafka_sasl_username!r} (PLAIN, SCRAM-SHA-256/512)")

    def _kafka_libs(self, log: Log) -> Path:
        libs = self.cache_dir / "libs"
        marker = self.cache_dir / ".complete"
        if marker.exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "Maven is needed to fetch the Kafka jars: install it (apt-get install -y maven)"
            )
        log(
            f"kafka: fetching Apache Kafka {self.settings.kafka_version} jars from Maven Central into {libs}"
        )
        shutil.rmtree(libs, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(resource("kafka") / "pom.xml"),
            "dependency:copy-dependencies",
            f"-Dkafka.version={self.settings.kafka_version}",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not list(libs.glob("kafka_2.13-*.jar")):
            last = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "ERROR" in ln][:1]
            raise StackError(
                f"Maven could not fetch Kafka {self.settings.kafka_version}: "
                f"{last[0] if last else 'see `' + ' '.join(cmd) + '`'}"
            )
        marker.write_text(self.settings.kafka_version)
        return libs

    def _kafka_config(self) -> Path:
        data = self.kafka_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ctrl = self.settings.kafka_controller_port
        host = "127.0.0.1" if self.kafka_host in ("localhost", "0.0.0.0") else self.kafka_host
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{ctrl}",
            "listeners": f"PLAINTEXT://{host}:{self.kafka_port},CONTROLLER://127.0.0.1:{ctrl}",
            "advertised.listeners": f"PLAINTEXT://{host}:{self.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            # topics.yaml is the single source of topics: a typo must not create one.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.retention.check.interval.ms": "60000",
            "log.segment.bytes": str(256 * 1024 * 1024),
            **self.kafka_properties,
        }
        secured = self._secured()
        if secured is not None:
            from finstream.stack_security import SecurityError

            try:
                listener = secured.prepare()
            except SecurityError as exc:
                raise StackError(str(exc)) from None
            listener["listeners"] = listener["listeners"].replace("{ctrl}", str(ctrl))
            props.update(listener)
        path = self.kafka_dir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _kafka_format(self, java: str, libs: Path, config: Path, log: Log) -> None:
        if (self.kafka_dir / "data" / "meta.properties").exists():
            return
        id_file = self.kafka_dir / "cluster.id"
        if not id_file.exists() or id_file.read_text().startswith("-"):
            id_file.write_text(kraft_cluster_id())
        log("kafka: formatting storage (first start)")
        proc = subprocess.run(
            [
                java,
                "-cp",
                f"{libs}/*",
                f"-Dlog4j2.configurationFile={resource('kafka') / 'log4j2.yaml'}",
                f"-Dkafka.logs.dir={self.kafka_dir / 'logs'}",
                "kafka.tools.StorageTool",
                "format",
                "-t",
                id_file.read_text().strip(),
                "-c",
                str(config),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise StackError(
                f"formatting Kafka storage failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
            )

    def _kafka_down(self) -> bool:
        pid = _read_pid(self._kafka_pidfile)
        if pid is None:
            return False
        _stop_pid(pid, timeout=30.0)
        self._kafka_pidfile.unlink(missing_ok=True)
        return True

    # -- PostgreSQL ------------------------------------------------------------------
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
            _read_pid(self._pg_data / "postmaster.pid")
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
        if pid is None and _port_open(self.pg_host, self.pg_port):
            raise StackError(
                f"PostgreSQL at {self.pg_host}:{self.pg_port} refused finstream's credentials ({err}); "
                "set FINSTREAM_DATABASE_URL to a working URL, or free the port"
            )
        if not _is_local(self.pg_host):
            raise StackError(
                f"PostgreSQL at {self.pg_host}:{self.pg_port} is not reachable ({err}); start it or fix FINSTREAM_DATABASE_URL"
            )
        bindir = self._pg_bin()
        if bindir is None:
            log("postgres: not installed; installing the Debian package")
            _apt_install("postgresql")
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
        if _port_open("127.0.0.1", self.pg_port):
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
            raise StackError(f"PostgreSQL did not start; see {logfile}: {_tail(logfile, 2)}")
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
            _stop_pid(pid)
        return True

    # -- PostgreSQL: backups (pgBackRest) and the operations `finstream db` needs ---------
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
            _apt_install("pgbackrest")
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

    # -- Redis ---------------------------------------------------------------------
    @property
    def _redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    def _redis_ping(self) -> str | None:
        import redis

        try:
            client = redis.Redis.from_url(
                self.settings.redis_url.get_secret_value(), socket_timeout=2
            )
            client.ping()
            client.close()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _redis_status(self) -> ServiceStatus:
        pid = _read_pid(self._redis_pidfile)
        err = self._redis_ping()
        return ServiceStatus(
            "redis",
            err is None,
            pid is not None,
            f"{self.redis_host}:{self.redis_port}",
            pid,
            err or "",
        )

    def _redis_up(self, log: Log) -> None:
        pid = _read_pid(self._redis_pidfile)
        err = self._redis_ping()
        if err is None:
            log(
                f"redis: already running at {self.redis_host}:{self.redis_port} ({'managed' if pid else 'external'})"
            )
            return
        if _port_open(self.redis_host, self.redis_port):
            raise StackError(
                f"port {self.redis_port} answers but not as the configured Redis ({err}); fix FINSTREAM_REDIS_URL or free the port"
            )
        if not _is_local(self.redis_host):
            raise StackError(
                f"Redis at {self.redis_host}:{self.redis_port} is not reachable ({err}); start it or fix FINSTREAM_REDIS_URL"
            )
        server = shutil.which("redis-server")
        if server is None:
            log("redis: not installed; installing the Debian package")
            _apt_install("redis-server")
            server = shutil.which("redis-server")
            if server is None:
                raise StackError("redis-server was installed but is not on PATH")
            if self._redis_ping() is None:
                log(
                    f"redis: the package started a server at {self.redis_host}:{self.redis_port}; using it"
                )
                return
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.redis_dir / "redis.log"
        password = urlparse(self.settings.redis_url.get_secret_value()).password
        cmd = [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.redis_port),
            "--dir",
            str(self.redis_dir),
            "--daemonize",
            "yes",
            "--pidfile",
            str(self._redis_pidfile),
            "--logfile",
            str(logfile),
            "--appendonly",
            "yes",
            "--save",
            "",
        ]
        if password:
            cmd += ["--requirepass", unquote(password)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, start_new_session=True
        )
        if proc.returncode != 0:
            raise StackError(
                f"redis-server did not start: {(proc.stderr or proc.stdout).strip()[:200]}"
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._redis_ping() is None:
                log(f"redis: ready at {self.redis_host}:{self.redis_port}")
                return
            time.sleep(0.2)
        raise StackError(f"Redis did not answer in 20s; see {logfile}: {_tail(logfile, 2)}")

    def _redis_down(self) -> bool:
        pid = _read_pid(self._redis_pidfile)
        if pid is None:
            return False
        _stop_pid(pid, timeout=15.0)
        self._redis_pidfile.unlink(missing_ok=True)
        return True
