"""A stuck consumer is told apart from a busy one: no progress while lag grows turns
/readyz red and fires the chart's FinstreamConsumerStalled alert in a real Prometheus.

The history worker is stuck the way workers get stuck in production: its INSERT waits
on a lock another session holds on ``ticks`` (the statement timeout is long, as it
may be for a large batch), while ticks keep arriving. Nothing fails, nothing is
logged: only the worker's own Kafka probe sees the committed offsets stand still with
records waiting. Prometheus (Debian's, from `make tools`) scrapes the worker every
second and evaluates the rule as `helm template` renders it from the chart (with a
threshold and a `for` short enough for a test). Releasing the lock lets the worker
catch up: ready again, the alert resolved, every tick stored once.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from finstream.domain.marketdata.simulation import GbmMarket
from tests.support.services import (
    REPO,
    TestEnv,
    WorkerProcess,
    free_port,
    metric_value,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

TOOLS_ENV = REPO / ".tools" / "deploy-tools.env"
NAMESPACE = "fs-stall"
BATCH = 100


def tool(name: str) -> Path:
    values = dict(
        line.split("=", 1)
        for line in (TOOLS_ENV.read_text() if TOOLS_ENV.exists() else "").splitlines()
        if "=" in line
    )
    path = Path(values.get(name, ""))
    if not values.get(name) or not path.exists():
        pytest.fail(f"{name} is missing from {TOOLS_ENV}: run `make tools`")
    return path


def chart_rules(folder: Path) -> Path:
    """The chart's alert rules as `helm template` renders them, as a Prometheus rule file."""
    proc = subprocess.run(
        [
            str(tool("HELM")),
            "template",
            "fs",
            str(REPO / "helm" / "finstream"),
            "--namespace",
            NAMESPACE,
            "--set",
            "image.digest=sha256:" + "5e" * 32,
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.prometheusRule.stallSeconds=4",
            "--set",
            "metrics.prometheusRule.stallFor=2s",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (rule,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run(
        [str(tool("PROMETHEUS").parent / "promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    return path


class Prometheus:
    """A Prometheus of this test's own: scrapes one worker, evaluates the chart's rules."""

    def __init__(self, folder: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "finstream",
                    # What the chart's ServiceMonitor adds: the pod's namespace.
                    "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
                }
            ],
        }
        self.config = folder / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.data = folder / "tsdb"
        self.log = folder / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(tool("PROMETHEUS")),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(self.up, timeout=60, message="prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def up(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def alert(self, name: str) -> dict[str, Any] | None:
        alerts = httpx.get(f"{self.url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        found = [a for a in alerts if a["labels"]["alertname"] == name]
        return found[0] if found else None


@pytest.fixture
def prometheus_dir(log_dir: Path) -> Iterator[Path]:
    path = log_dir / f"prometheus-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def readiness(worker: WorkerProcess) -> tuple[bool, str]:
    r = httpx.get(f"http://127.0.0.1:{worker.port}/readyz", timeout=2)
    return r.status_code == 200, str(r.json()["reason"])


async def _hold_lock(url: str, locked: threading.Event, release: threading.Event) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE ticks IN ACCESS EXCLUSIVE MODE")
            locked.set()
            await asyncio.to_thread(release.wait)
    finally:
        await conn.close()


def test_a_stuck_consumer_turns_readiness_red_and_fires_the_stalled_alert(
    env: TestEnv, log_dir: Path, prometheus_dir: Path
) -> None:
    market = GbmMarket(["STLA", "STLB"], seed=9, run_id="stall")
    start = datetime.now(UTC) - timedelta(minutes=30)
    ticks = market.ticks(start, timedelta(milliseconds=20))
    history = WorkerProcess(
        env,
        "history",
        log_dir,
        stream_stall_seconds="4",
        health_probe_interval="1",
        # A long statement timeout, as a large batch may need: the INSERT waits on the lock.
        pg_command_timeout="300",
        history_batch_size="200",
    ).start()
    locked, release = threading.Event(), threading.Event()
    produced: list[int] = []
    feed_errors: list[BaseException] = []

    def feed() -> None:
        # A steady stream for as long as the worker is stuck (so its lag keeps
        # growing however slowly the machine runs), then one last batch.
        try:
            while True:
                last = release.is_set()
                batch = list(itertools.islice(ticks, BATCH))
                env.produce_records("md.ticks", "Tick", [(t.symbol, t.to_record()) for t in batch])
                produced.append(len(batch))
                if last:
                    return
                release.wait(0.25)
        except BaseException as exc:
            feed_errors.append(exc)
            raise

    def stored() -> int:
        return int(env.sql("SELECT count(*) AS n FROM ticks")[0]["n"])

    feeder = threading.Thread(target=feed, daemon=True)
    holder = threading.Thread(
        target=asyncio.run,
        args=(_hold_lock(env.settings.database_url.get_secret_value(), locked, release),),
        daemon=True,
    )
    rules = chart_rules(prometheus_dir)
    try:
        with Prometheus(prometheus_dir, f"127.0.0.1:{history.port}", rules) as prom:
            feeder.start()
            wait_until(lambda: stored() >= 500, timeout=60, message="history writing")
            # A busy worker is not a stalled one (not even pending, unless the
            # machine held it back for the whole threshold).
            early = prom.alert("FinstreamConsumerStalled")
            assert early is None or early["state"] != "firing", early
            holder.start()
            assert locked.wait(30), "the lock was not taken"

            # Stuck: ready turns red, saying why, while the lag grows.
            def not_ready() -> str | None:
                ok, reason = readiness(history)
                return None if ok else reason

            why = wait_until(not_ready, timeout=60, message="history not ready")
            assert why.startswith("stalled: no progress committed for"), why
            lag = metric_value(history, "finstream_consumer_lag")
            wait_until(
                lambda: metric_value(history, "finstream_consumer_lag") > lag,
                timeout=30,
                message="lag growing",
            )
            assert metric_value(history, "finstream_stream_stalled_seconds") > 4

            def firing_alert() -> dict[str, Any] | None:
                alert = prom.alert("FinstreamConsumerStalled")
                return alert if alert and alert["state"] == "firing" else None

            firing = wait_until(firing_alert, timeout=60, message="FinstreamConsumerStalled firing")
            assert firing["labels"]["role"] == "history"
            assert firing["labels"]["severity"] == "critical"

            # Unstuck: it catches up, is ready again, and the alert resolves.
            release.set()
            holder.join(30)
            wait_until(lambda: readiness(history)[0], timeout=60, message="history ready again")
            wait_until(
                lambda: prom.alert("FinstreamConsumerStalled") is None,
                timeout=60,
                message="the alert resolved",
            )
        feeder.join(120)
        assert not feeder.is_alive()
        assert not feed_errors, feed_errors
        total = sum(produced)
        try:
            wait_until(lambda: stored() >= total, timeout=120, message=f"{total} ticks stored")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; stored {stored()}, readiness {readiness(history)}, "
                f"lag {metric_value(history, 'finstream_consumer_lag')}; "
                f"worker log:\n{history.log_tail()}"
            ) from None
        rows = env.sql("SELECT count(*) AS n, count(DISTINCT tick_id) AS ids FROM ticks")[0]
        assert (rows["n"], rows["ids"]) == (total, total)
        # Caught up: the probe sees no lag, so no stall (it runs every second).
        wait_until(
            lambda: (
                metric_value(history, "finstream_stream_stalled_seconds") == 0
                and metric_value(history, "finstream_consumer_lag") == 0
            ),
            timeout=60,
            message="no lag and no stall",
        )
    finally:
        release.set()
        assert history.stop() == 0, history.log_tail()
