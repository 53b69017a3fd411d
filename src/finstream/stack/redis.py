"""The stack's Redis: a redis-server of the machine's, with an append-only file."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

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


class RedisService(StackBase):
    """``finstream stack`` for Redis: start, check and stop the server we manage."""

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
        pid = read_pid(self._redis_pidfile)
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
        pid = read_pid(self._redis_pidfile)
        err = self._redis_ping()
        if err is None:
            log(
                f"redis: already running at {self.redis_host}:{self.redis_port} ({'managed' if pid else 'external'})"
            )
            return
        if port_open(self.redis_host, self.redis_port):
            raise StackError(
                f"port {self.redis_port} answers but not as the configured Redis ({err}); fix FINSTREAM_REDIS_URL or free the port"
            )
        if not is_local(self.redis_host):
            raise StackError(
                f"Redis at {self.redis_host}:{self.redis_port} is not reachable ({err}); start it or fix FINSTREAM_REDIS_URL"
            )
        server = shutil.which("redis-server")
        if server is None:
            log("redis: not installed; installing the Debian package")
            apt_install("redis-server")
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
        raise StackError(f"Redis did not answer in 20s; see {logfile}: {tail(logfile, 2)}")

    def _redis_down(self) -> bool:
        pid = read_pid(self._redis_pidfile)
        if pid is None:
            return False
        stop_pid(pid, timeout=15.0)
        self._redis_pidfile.unlink(missing_ok=True)
        return True
