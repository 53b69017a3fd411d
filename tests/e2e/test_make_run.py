"""`finstream run` (what `make run` starts): ticks reach PostgreSQL and Redis, the
demo notification reaches the in-app inbox, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from tests.support.services import TestEnv, child_pids, free_port, pid_alive, wait_until


def test_run_brings_the_pipeline_up_and_stops_cleanly_on_ctrl_c(
    env: TestEnv, log_dir: Path
) -> None:
    base_port = free_port()
    run_env = env.env(
        run_base_port=str(base_port),
        api_port=str(free_port()),
        sim_rate="50",
        stack_dir=str(log_dir / f"run-{base_port}"),
    )
    # The run's logs and state go to their own folder; the services are the shared stack's.
    out = (log_dir / f"make-run-{base_port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finstream.cli", "run"],
        env=run_env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    r = redis.Redis.from_url(env.settings.redis_url.get_secret_value(), decode_responses=True)
    try:
        wait_until(
            lambda: env.sql("SELECT count(*) AS n FROM ticks")[0]["n"] > 0,
            timeout=60,
            message="rows in PostgreSQL within 60 s",
        )
        wait_until(
            lambda: list(r.scan_iter(match=env.settings.redis_key("quote:*"))),
            timeout=30,
            message="quote:* keys in Redis",
        )
        inbox = env.settings.redis_key("inbox:{demo-user}:msgs")

        def categories() -> set[str]:
            return {json.loads(m)["category"] for m in r.hvals(inbox)}

        # The demo alert fires on the simulated feed, is routed by the demo
        # user's preferences to the in-app inbox and to the email outbound topic.
        wait_until(
            lambda: {"account", "price_alert"} <= categories(),
            timeout=90,
            message="welcome and price alert in the demo inbox",
        )
        fired = env.decode_all("alerts.fired", "AlertFired", min_count=1, timeout=30)
        assert {f["user_id"] for f in fired} == {"demo-user"}
        emails = env.decode_all("notify.outbound.email", "OutboundMessage", min_count=1, timeout=30)
        assert "price_alert" in {e["category"] for e in emails}
        assert {e["recipient"] for e in emails} == {"demo@example.com"}
        children = child_pids(proc.pid)
        assert len(children) >= 5

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        wait_until(
            lambda: not any(pid_alive(c) for c in children),
            timeout=10,
            message="no worker left behind",
        )
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        out.close()
        r.close()
    text = (log_dir / f"make-run-{base_port}.log").read_text()
    assert "psql" in text
    assert "redis-cli" in text
    assert "/metrics" in text
    assert "finstream api stream" in text
    assert "stopped." in text
