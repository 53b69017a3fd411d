"""`finstream topics apply` against the real broker."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from finstream.topics import describe
from tests.support.services import TestEnv


def _apply(env: TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "topics", "apply", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _catalogue(path: Path, a_partitions: int, retention: int) -> Path:
    path.write_text(
        "topics:\n"
        f"  - {{name: a, partitions: {a_partitions}, key: k, value_schema: Tick, retention_ms: {retention}}}\n"
        "  - {name: b, partitions: 2, key: k, value_schema: raw, cleanup_policy: compact, retention_ms: -1}\n"
    )
    return path


def test_the_project_catalogue_is_applied_and_idempotent(env: TestEnv) -> None:
    # The env fixture applied topics.yaml already: a second apply changes nothing.
    result = _apply(env)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    existing = describe(
        env.settings.kafka_bootstrap, [env.topic("md.ticks"), env.topic("alerts.rules")]
    )
    assert existing[env.topic("md.ticks")].partitions == 6
    assert existing[env.topic("alerts.rules")].configs["cleanup.policy"] == "compact"


def test_create_grow_update_refuse(env: TestEnv, tmp_path: Path) -> None:
    sub = f"x{uuid.uuid4().hex[:6]}."
    path = tmp_path / "topics.yaml"
    renv = env.env(namespace=env.namespace + sub)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "finstream.cli", "topics", "apply", "--file", str(path), *args],
            env=renv,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    _catalogue(path, 2, 1000)
    dry = run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"+ {env.namespace}{sub}a: create with 2 partitions" in dry.stdout
    assert "dry run" in dry.stdout
    assert describe(env.settings.kafka_bootstrap, [f"{env.namespace}{sub}a"]) == {}

    created = run()
    assert created.returncode == 0, created.stderr
    assert "2 change(s) applied" in created.stdout

    _catalogue(path, 4, 5000)
    grown = run()
    assert grown.returncode == 0, grown.stderr
    assert "partitions 2 -> 4" in grown.stdout
    assert "retention.ms: 1000 -> 5000" in grown.stdout
    now = describe(env.settings.kafka_bootstrap, [f"{env.namespace}{sub}a"])[
        f"{env.namespace}{sub}a"
    ]
    assert now.partitions == 4
    assert now.configs["retention.ms"] == "5000"

    _catalogue(path, 3, 5000)
    refused = run()
    assert refused.returncode == 1
    assert "cannot remove partitions" in refused.stdout
    assert "refused; nothing applied" in refused.stderr
    assert (
        describe(env.settings.kafka_bootstrap, [f"{env.namespace}{sub}a"])[
            f"{env.namespace}{sub}a"
        ].partitions
        == 4
    )

    path.write_text("topics:\n  - {name: a, partitions: many, key: k, value_schema: raw}\n")
    malformed = run()
    assert malformed.returncode == 1
    assert malformed.stderr.startswith("error: topics.yaml entry #1 (a): partitions")
    assert "Traceback" not in malformed.stderr
