"""`finstream stack`: a second, isolated stack on free ports proves up, idempotence,
status and a down that leaves no process behind; failures are one clear line."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from finstream.settings import Settings
from finstream.stack import Stack, StackError
from tests.support.services import free_port, pid_alive


def _isolated(tmp: Path, base: Settings) -> Settings:
    pg, redis_port, kafka, ctrl = free_port(), free_port(), free_port(), free_port()
    return Settings(
        stack_dir=tmp / "stack",
        kafka_bootstrap=f"127.0.0.1:{kafka}",
        kafka_controller_port=ctrl,
        kafka_heap="512m",
        database_url=f"postgresql://finstream:secret@127.0.0.1:{pg}/finstream",  # type: ignore[arg-type]
        redis_url=f"redis://127.0.0.1:{redis_port}/0",  # type: ignore[arg-type]
        kafka_version=base.kafka_version,
    )


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "FINSTREAM_STACK_DIR": str(settings.stack_dir),
        "FINSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FINSTREAM_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
        "FINSTREAM_KAFKA_HEAP": settings.kafka_heap,
        "FINSTREAM_DATABASE_URL": settings.database_url.get_secret_value(),
        "FINSTREAM_REDIS_URL": settings.redis_url.get_secret_value(),
    }
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "stack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.timeout(400)
def test_isolated_stack_up_is_idempotent_and_down_leaves_nothing(
    log_dir: Path, stack: Settings
) -> None:
    # Under the repository, not /tmp/pytest-of-root (0700): the postgres user must reach it.
    where = log_dir / f"stack-{uuid.uuid4().hex[:8]}"
    settings = _isolated(where, stack)
    s = Stack(settings)
    try:
        first = _cli(settings, "up")
        assert first.returncode == 0, first.stderr
        assert "kafka: ready" in first.stdout
        assert "postgres: ready" in first.stdout
        assert "redis: ready" in first.stdout

        second = _cli(settings, "up")
        assert second.returncode == 0, second.stderr
        assert second.stdout.count("already running") == 3

        status = _cli(settings, "status")
        assert status.returncode == 0
        assert status.stdout.count("managed by finstream") == 3
        pids = [st.pid for st in s.status()]
        assert all(pids)
    finally:
        down = _cli(settings, "down")
    assert down.returncode == 0, down.stderr
    assert all(not pid_alive(p) for p in pids if p)
    after = _cli(settings, "status")
    assert after.returncode == 3
    services = [
        line
        for line in after.stdout.splitlines()
        if line.split()[:1] in (["kafka"], ["postgres"], ["redis"])
    ]
    assert [line.split()[1] for line in services] == ["stopped"] * 3, after.stdout
    shutil.rmtree(where, ignore_errors=True)


def test_busy_port_is_one_clear_line(tmp_path: Path, stack: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = _isolated(tmp_path, stack).model_copy(
            update={"kafka_bootstrap": f"127.0.0.1:{port}"}
        )
        result = _cli(settings, "up")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port}" in lines[0]
    assert "in use" in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_java_or_maven_says_what_to_install(
    tmp_path: Path, stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _isolated(tmp_path, stack)
    real_which = shutil.which
    monkeypatch.setattr(
        "finstream.stack.kafka.shutil.which",
        lambda name: None if name == "java" else real_which(name),
    )
    with pytest.raises(StackError, match=r"Java 17\+ is needed"):
        Stack(settings).up(log=lambda _m: None)
    monkeypatch.setattr(
        "finstream.stack.kafka.shutil.which",
        lambda name: None if name == "mvn" else real_which(name),
    )
    with pytest.raises(StackError, match="Maven is needed"):
        Stack(settings).up(log=lambda _m: None)


def test_unreachable_remote_service_is_reported_not_started(
    tmp_path: Path, stack: Settings
) -> None:
    settings = _isolated(tmp_path, stack).model_copy(
        update={"kafka_bootstrap": "10.255.255.1:9092"}
    )
    with pytest.raises(StackError, match="not reachable and is not local"):
        Stack(settings).up(log=lambda _m: None)
