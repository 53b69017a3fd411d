"""Fixtures shared by every test.

Integration and end-to-end tests use the real local stack (the same
`finstream stack up` that `make run` uses; a no-op when it already runs).
Each test module gets its own namespace: topics, consumer groups, Redis keys
and a PostgreSQL database of its own, all removed afterwards.

Hypothesis runs under the ``ci`` profile unless ``HYPOTHESIS_PROFILE`` names
another: CI machines have two cores shared with Kafka, PostgreSQL, Redis and
worker processes, so a test's run time says nothing about the code under
test. The profile therefore has no per-example deadline and does not fail on
the ``too_slow`` health check, and it is derandomized: every run tries the
same examples, so a red CI is the change's fault, never the draw's. The
``explore`` profile (random, more examples, failures printed as a
reproduction blob) is for hunting bugs locally:
``HYPOTHESIS_PROFILE=explore .venv/bin/pytest tests/unit``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from finstream.settings import Settings
from tests.support.services import TestEnv, create_env, destroy_env

hypothesis_settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    print_blob=True,
)
hypothesis_settings.register_profile(
    "explore",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=1000,
    print_blob=True,
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def stack(base_settings: Settings) -> Settings:
    from finstream.stack import Stack, StackError

    try:
        Stack(base_settings).up(log=lambda _msg: None)
    except StackError as exc:
        pytest.fail(f"local stack unavailable: {exc}")
    return base_settings


@pytest.fixture(scope="module")
def env(stack: Settings, request: pytest.FixtureRequest) -> Iterator[TestEnv]:
    label = request.module.__name__.rsplit(".", 1)[-1].replace("test_", "")[:10].replace("_", "-")
    e = create_env(stack, label)
    try:
        yield e
    finally:
        destroy_env(e, stack)


@pytest.fixture(scope="session")
def log_dir(base_settings: Settings) -> Path:
    path = base_settings.stack_dir / "test-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path
