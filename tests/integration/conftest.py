"""Fixtures shared by integration modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import TestEnv, WorkerProcess


@pytest.fixture(scope="module")
def statestore(env: TestEnv, log_dir: Path) -> Iterator[WorkerProcess]:
    """The preferences read model's only writer: the API waits for it to apply a change."""
    worker = WorkerProcess(env, "statestore", log_dir).start()
    try:
        yield worker
    finally:
        assert worker.stop() == 0, worker.log_tail()
