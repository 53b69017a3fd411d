"""Waiting on conditions in async tests (never on how long something should take)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def until(check: Callable[[], Any], what: str, within: float = 30.0) -> Any:
    """The first truthy result of ``check``, polled every 10 ms; AssertionError after
    ``within`` seconds (generous: the machine may be loaded, and a pass returns at once)."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")
