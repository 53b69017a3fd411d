"""What the stack's services share: errors, statuses, the stack's state and process helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from finstream.settings import Settings

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


class StackBase:
    """The stack's state, set by ``Stack.__init__``; each service's mixin reads it."""

    settings: Settings
    kafka_properties: dict[str, str]
    root: Path
    kafka_dir: Path
    pg_dir: Path
    redis_dir: Path
    cache_dir: Path
    kafka_host: str
    kafka_port: int
    pg_host: str
    pg_port: int
    pg_user: str
    pg_password: str
    pg_db: str
    redis_host: str
    redis_port: int


# -- process and network helpers ---------------------------------------------------


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def port_bindable(host: str, port: int) -> bool:
    """Whether a server could bind ``port`` on ``host`` now.

    With SO_REUSEADDR, as the workers' HTTP servers bind: a port left in
    TIME_WAIT by an earlier process is free, one something listens on is not.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
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


def read_pid(path: Path) -> int | None:
    """The live pid in a pid file (PostgreSQL's postmaster.pid has it on the first line)."""
    try:
        pid = int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def tail(path: Path, lines: int = 5) -> str:
    try:
        content = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(content[-lines:])


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"x://{url}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def apt_install(package: str) -> None:
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
