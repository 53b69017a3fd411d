"""The pipeline over SASL_SSL with SCRAM, on a private broker, and a wrong password.

A second Kafka of its own (free ports, data under .stack/test-logs) is started
by `finstream stack` with a SASL_SSL listener: certificates made at start-up,
the client user's SCRAM credentials set once the broker is up. The shared
broker on 9092 is never touched; PostgreSQL and Redis are the shared ones,
isolated by namespace and database as usual.

Through it run, as real worker processes configured only by FINSTREAM_KAFKA_*
settings: connector -> md.ticks -> quotes (Redis quote cache) and history
(PostgreSQL); notify.requests -> router -> notify.outbound.inapp -> inapp
(the Redis inbox). A worker and a CLI command given a wrong password stop at
once with one line naming the user and the broker's refusal.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from finstream.domain.notify.preferences import parse_preferences
from finstream.settings import Settings
from finstream.stack import Stack, StackError
from finstream.stores.inbox import Inbox, open_entry
from finstream.stores.redis import connect
from tests.support.privacy import keys_of
from tests.support.services import (
    TestEnv,
    WorkerProcess,
    create_env,
    destroy_env,
    free_port,
    kafka_security_env,
    wait_until,
    workers,
)

pytestmark = pytest.mark.integration

USER = "fs-pipeline"
PASSWORD = f"pw-{uuid.uuid4().hex}"
SYMBOLS = "AAPL,MSFT"


@pytest.fixture(scope="module")
def secured(stack: Settings, log_dir: Path) -> Iterator[Settings]:
    """A private SASL_SSL broker; PostgreSQL and Redis are the shared ones."""
    root = log_dir / f"sasl-{uuid.uuid4().hex[:8]}"
    cache = stack.stack_dir / "cache" / f"kafka-{stack.kafka_version}"
    if (cache / ".complete").exists():
        # The jars the shared stack fetched: no second download.
        (root / "cache").mkdir(parents=True)
        (root / "cache" / cache.name).symlink_to(cache)
    settings = stack.model_copy(
        update={
            "stack_dir": root,
            "kafka_bootstrap": f"localhost:{free_port()}",
            "kafka_controller_port": free_port(),
            "kafka_heap": "512m",
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": USER,
            "kafka_sasl_password": SecretStr(PASSWORD),
            "kafka_ssl_ca_file": root / "client" / "ca.crt",
        }
    )
    private = Stack(settings)
    lines: list[str] = []
    try:
        private.up(log=lines.append)
    except StackError as exc:
        private.down(log=lambda _m: None)
        pytest.fail(f"private SASL_SSL broker did not start: {exc}")
    assert any("kafka: ready" in line and "(SASL_SSL)" in line for line in lines), lines
    # The shared services were used, not started again.
    assert any(line.startswith("postgres: already running") for line in lines), lines
    try:
        yield settings
    finally:
        stopped: list[str] = []
        private.down(log=stopped.append)
        assert "kafka: stopped" in stopped, stopped
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def senv(secured: Settings, stack: Settings) -> Iterator[TestEnv]:
    e = create_env(secured, "sasl")
    try:
        yield e
    finally:
        destroy_env(e, secured)


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FINSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FINSTREAM_NAMESPACE": settings.namespace,
        **kafka_security_env(settings),
    }
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_broker_listens_only_on_sasl_ssl(secured: Settings) -> None:
    props = (secured.stack_dir / "kafka" / "server.properties").read_text()
    port = secured.kafka_bootstrap.rsplit(":", 1)[1]
    assert f"listeners=SASL_SSL://127.0.0.1:{port}," in props
    assert "PLAINTEXT://" not in props.split("CONTROLLER://")[0]
    assert "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512" in props
    ok = _cli(secured, "topics", "apply", "--dry-run")
    assert ok.returncode == 0, ok.stderr


def now() -> datetime:
    return datetime.now(UTC)


def _inbox(env: TestEnv, user: str) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        r = connect(env.settings)
        try:
            page = await Inbox(r, env.settings).page(user)
            return list(page.messages)
        finally:
            await r.aclose()

    return asyncio.run(go())


def test_pipeline_slice_runs_over_sasl_ssl_with_scram(senv: TestEnv, log_dir: Path) -> None:
    overrides = {"sim_symbols": SYMBOLS, "md_chain": "simulated", "sim_rate": "40"}
    r = redis.Redis.from_url(senv.settings.redis_url.get_secret_value())
    with workers(
        senv, log_dir, "connector", "quotes", "history", "router", "inapp", **overrides
    ) as procs:
        assert len(procs) == 5
        # connector -> md.ticks -> history (PostgreSQL) and quotes (Redis quote cache)
        wait_until(
            lambda: senv.sql("SELECT count(*) AS n FROM ticks")[0]["n"] >= 20,
            timeout=60,
            message="ticks stored by history",
        )
        for symbol in SYMBOLS.split(","):
            wait_until(
                lambda s=symbol: r.exists(senv.settings.redis_key(f"quote:{s}")),
                timeout=60,
                message=f"quote of {symbol} cached by quotes",
            )
        # request -> router -> notify.outbound.inapp -> inapp (the Redis inbox)
        user = f"u-{uuid.uuid4().hex[:6]}"
        prefs = parse_preferences(
            {"user_id": user, "categories": {"account": {"channels": ["inapp"]}}}, now=now()
        )
        senv.produce_records("notify.preferences", "UserPreferences", [(user, prefs)])
        request = {
            "request_id": f"r-{uuid.uuid4().hex[:12]}",
            "user_id": user,
            "category": "account",
            "priority": "HIGH",
            "template": "welcome",
            "data": {"title": "Over SASL_SSL", "body": "secured"},
            "channels": ["INAPP"],
            "deliver_at": None,
            "expires_at": None,
            "collapse_key": None,
            "created_at": now(),
            "source": "test",
            "correlation_id": None,
        }
        senv.produce_records("notify.requests", "NotificationRequest", [(user, request)])
        inbox = wait_until(lambda: _inbox(senv, user), timeout=60, message="in-app message")
        assert len(inbox) == 1
        # Inbox entries are sealed under the user's data key (issue 14): open it.
        opened = open_entry(inbox[0], keys_of(senv.settings, [user])[user])
        assert "Over SASL_SSL" in str(opened)
        routed = senv.decode_all("notify.outbound.inapp", "OutboundMessage", min_count=1)
        assert [m["request_id"] for m in routed if m["user_id"] == user] == [request["request_id"]]
    r.close()


def test_a_wrong_password_fails_with_one_clear_line(senv: TestEnv, log_dir: Path) -> None:
    wrong = senv.settings.model_copy(update={"kafka_sasl_password": SecretStr("not-the-password")})
    expected = (
        f"Kafka at {wrong.kafka_bootstrap} over SASL_SSL as {USER!r} (SCRAM-SHA-512) "
        "refused the connection"
    )
    # A worker stops at start instead of retrying forever (a crash loop names the reason).
    worker = WorkerProcess(senv, "quotes", log_dir, kafka_sasl_password="not-the-password")
    worker.start(wait_ready=False)
    assert worker.proc is not None
    code = worker.proc.wait(timeout=60)
    assert code == 1
    # The command line's own tools say the same in one line, without a traceback.
    cli = _cli(wrong, "topics", "apply", "--dry-run")
    assert cli.returncode == 1
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1, cli.stderr
    assert lines[0].startswith(f"error: {expected}: ")
    assert "Authentication failed" in lines[0]
    assert "SCRAM-SHA-512" in lines[0]
    assert "not-the-password" not in cli.stderr
    worker_line = [ln for ln in worker.log_tail(200).splitlines() if ln.startswith("error: ")]
    assert len(worker_line) == 1, worker.log_tail()
    assert worker_line[0].startswith(f"error: {expected}: ")
    assert "Traceback" not in worker.log_tail(200)
