"""The stack's Kafka: a KRaft broker in combined mode, from Maven Central jars."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from finstream.resources import resource
from finstream.stack.common import (
    Log,
    ServiceStatus,
    StackBase,
    StackError,
    is_local,
    port_open,
    read_pid,
    stop_pid,
    tail,
)

if TYPE_CHECKING:
    from finstream.stack_security import SecuredBroker


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


class KafkaService(StackBase):
    """``finstream stack`` for Kafka: start, check and stop the broker we manage."""

    @property
    def _kafka_pidfile(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    def _kafka_ready(self, timeout: float = 3.0) -> bool:
        if not port_open(self.kafka_host, self.kafka_port):
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
        pid = read_pid(self._kafka_pidfile)
        running = self._kafka_ready(timeout=2.0)
        detail = "" if running or pid is None else "process alive but not answering"
        return ServiceStatus(
            "kafka", running, pid is not None, f"{self.kafka_host}:{self.kafka_port}", pid, detail
        )

    def _kafka_up(self, log: Log) -> None:
        pid = read_pid(self._kafka_pidfile)
        if self._kafka_ready():
            owner = f"managed, pid {pid}" if pid else "external"
            log(f"kafka: already running at {self.kafka_host}:{self.kafka_port} ({owner})")
            return
        if pid is not None:
            log(f"kafka: our broker (pid {pid}) is not answering; restarting it")
            stop_pid(pid)
        if not is_local(self.kafka_host):
            raise StackError(
                f"Kafka at {self.settings.kafka_bootstrap} is not reachable and is not local: "
                "start it, or unset FINSTREAM_KAFKA_BOOTSTRAP to run a local broker"
            )
        ctrl = self.settings.kafka_controller_port
        for port, what in ((self.kafka_port, "broker"), (ctrl, "controller")):
            if port_open("127.0.0.1", port):
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
                    f"Kafka exited at start (code {proc.returncode}); see {out}: {tail(out, 3)}"
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

    # -- a secured listener (finstream.stack_security) --------------------------
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
        pid = read_pid(self._kafka_pidfile)
        if pid is None:
            return False
        stop_pid(pid, timeout=30.0)
        self._kafka_pidfile.unlink(missing_ok=True)
        return True
