"""The image, built from the Dockerfile and run (issue 15), without a Docker engine.

`make tools` installs buildah and podman (Debian's packages) and makes a
stand-in for the Dockerfile's pinned base (no registry is reachable here): a
Debian bookworm minbase with CPython 3.11 from debootstrap, imported with
podman (deploy/image/standin-base.sh). The stand-in is only for this test;
release builds use the pinned python:3.11-slim-bookworm.

Here the real Dockerfile is built with `buildah bud --isolation chroot`
(layers cached in the machine's container storage, so a rebuild redoes only
what changed), its configuration checked (non-root user, production, tini,
health check), and a worker role run from the image's own filesystem against
the local stack: as uid 10001, with the root filesystem mounted read-only and
only /tmp and /var/lib/finstream writable, as the chart runs it. It must
become ready and store a tick produced to md.ticks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from finstream.domain.marketdata.ticks import Tick
from tests.support.services import TestEnv, free_port, wait_until

from .conftest import ROOT, TOOLS_ENV

# The first test builds the image (its fixture), which pip-installs every wheel inside
# buildah: minutes on two loaded cores. The build has its own bound (1,800 s); the
# suite's 300 s default cut it off on a CI run beside a CPU hog.
pytestmark = pytest.mark.timeout(1800)

IMAGE = "localhost/finstream:test"


def tool_values() -> dict[str, str]:
    if not TOOLS_ENV.exists():
        pytest.fail(f"{TOOLS_ENV} is missing: run `make tools`")
    return dict(line.split("=", 1) for line in TOOLS_ENV.read_text().splitlines() if "=" in line)


@pytest.fixture(scope="module")
def built() -> str:
    values = tool_values()
    base, buildah = values.get("IMAGE_BASE"), values.get("BUILDAH")
    if not base or not buildah or not Path(buildah).exists():
        pytest.fail("buildah and the stand-in base are missing: run `make tools`")
    proc = subprocess.run(
        [
            buildah,
            "bud",
            "--isolation",
            "chroot",
            "--network=host",
            "--layers",
            # Docker's format keeps the HEALTHCHECK (OCI images have none).
            "--format",
            "docker",
            "--from",
            base,
            "-t",
            IMAGE,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return buildah


def inspect(buildah: str) -> dict[str, Any]:
    proc = subprocess.run(
        [buildah, "inspect", "--type", "image", IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_image_runs_as_non_root_in_production_under_tini(built: str) -> None:
    data = inspect(built)
    config = data["Docker"]["config"]
    assert config["User"] == "10001:10001"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["FINSTREAM_ENV"] == "production"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "finstream"]
    assert config["Healthcheck"]["Test"] == ["CMD", "finstream-healthcheck"]
    assert set(config["Volumes"]) == {"/tmp", "/var/lib/finstream"}


@contextlib.contextmanager
def container(buildah: str) -> Iterator[Path]:
    """A working container of the image; yields its root filesystem (mounted)."""
    name = f"fs-image-test-{uuid.uuid4().hex[:8]}"
    subprocess.run([buildah, "from", "--name", name, IMAGE], capture_output=True, check=True)
    try:
        mount = subprocess.run(
            [buildah, "mount", name], capture_output=True, text=True, check=True
        ).stdout.strip()
        yield Path(mount)
    finally:
        subprocess.run([buildah, "umount", name], capture_output=True, check=False)
        subprocess.run([buildah, "rm", name], capture_output=True, check=False)


def test_buildah_run_reaches_the_local_stack(built: str, stack: Any) -> None:
    """The image's CLI, run by buildah as the image's user, sees the local stack."""
    name = f"fs-image-run-{uuid.uuid4().hex[:8]}"
    subprocess.run([built, "from", "--name", name, IMAGE], capture_output=True, check=True)
    try:
        subprocess.run(
            [built, "config", "--env", f"FINSTREAM_KAFKA_BOOTSTRAP={stack.kafka_bootstrap}", name],
            check=True,
        )
        proc = subprocess.run(
            [
                built,
                "run",
                "--isolation",
                "chroot",
                "--network",
                "host",
                name,
                "--",
                "sh",
                "-c",
                "id -u && finstream stack status",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        subprocess.run([built, "rm", name], capture_output=True, check=False)
    lines = proc.stdout.splitlines()
    assert lines[0] == "10001", proc.stdout + proc.stderr
    kafka = next(line for line in lines if line.startswith("kafka"))
    assert "running" in kafka, proc.stdout


def read_only_run(
    root: Path, env: dict[str, str], *argv: str, log: Path
) -> subprocess.Popen[bytes]:
    """argv from the image's filesystem: root read-only, /tmp and the state dir tmpfs, uid 10001.

    A private mount namespace (unshare -m) so that nothing leaks onto the host.
    """
    ro = root.parent / f"ro-{uuid.uuid4().hex[:6]}"
    assigns = " ".join(f"{k}={v}" for k, v in env.items())
    script = (
        "set -e\n"
        f"mkdir -p {ro}\n"
        f"mount --bind {root} {ro}\n"
        f"mount -o remount,bind,ro {ro}\n"
        f"mount -t tmpfs -o size=64m,mode=1777 tmpfs {ro}/tmp\n"
        f"mount -t tmpfs -o size=64m,uid=10001,gid=10001,mode=0750 tmpfs {ro}/var/lib/finstream\n"
        f"mount -t proc proc {ro}/proc\n"
        f"exec chroot --userspec=10001:10001 {ro} /usr/bin/env -i "
        f"PATH=/opt/finstream/bin:/usr/bin:/bin HOME=/var/lib/finstream {assigns} "
        + " ".join(argv)
        + "\n"
    )
    out = log.open("ab")
    try:
        return subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        out.close()


def test_a_worker_role_from_the_image_stores_a_tick_with_a_read_only_root(
    built: str, env: TestEnv, log_dir: Path
) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to run the image's filesystem read-only")
    port = free_port()
    settings = env.settings
    worker_env = {
        "FINSTREAM_NAMESPACE": env.namespace,
        "FINSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FINSTREAM_DATABASE_URL": settings.database_url.get_secret_value(),
        "FINSTREAM_REDIS_URL": settings.redis_url.get_secret_value(),
        "FINSTREAM_HTTP_HOST": "127.0.0.1",
        "FINSTREAM_HTTP_PORT": str(port),
        "FINSTREAM_INSTANCE_ID": "image-test",
        "FINSTREAM_COMMIT_INTERVAL": "0.5",
    }
    log = log_dir / f"image-history-{port}.log"
    with container(built) as root:
        # Inside the image nothing is writable by the role but its two volumes.
        probe = read_only_run(
            root,
            {},
            "sh",
            "-c",
            "'touch /opt/finstream/x 2>&1; touch /etc/x 2>&1; touch /tmp/x /var/lib/finstream/x && echo writable-volumes'",
            log=log,
        )
        assert probe.wait(timeout=60) == 0, log.read_text()
        text = log.read_text()
        assert text.count("Read-only file system") == 2, text
        assert "writable-volumes" in text
        proc = read_only_run(
            root, worker_env, "/usr/bin/tini", "--", "finstream", "worker", "history", log=log
        )
        try:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    return (
                        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                    )
                return False

            wait_until(ready, timeout=120, message="the image's history role ready")
            tick = Tick(
                tick_id=f"img-{uuid.uuid4().hex[:16]}",
                symbol="IMGT",
                price=Decimal("123.45"),
                ts=datetime.now(UTC),
                received_at=datetime.now(UTC),
                source="image-test",
            ).to_record()
            env.produce_records("md.ticks", "Tick", [("IMGT", tick)])
            rows = wait_until(
                lambda: env.sql("SELECT symbol, price FROM ticks WHERE symbol = 'IMGT'"),
                timeout=60,
                message="the tick stored by the image's history role",
            )
            assert rows[0]["price"] == Decimal("123.45")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        assert code == 0, log.read_text()[-3000:]
