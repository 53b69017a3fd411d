"""Fixtures shared by every test.

Integration and end-to-end tests use the real local stack (the same
`finstream stack up` that `make run` uses; a no-op when it already runs).
Each test module gets its own namespace: topics, consumer groups, Redis keys
and a PostgreSQL database of its own, all removed afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from finstream.settings import Settings
from tests.support.services import TestEnv, create_env, destroy_env


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
