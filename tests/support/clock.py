"""A clock the test moves: rate limits, pauses and circuit cool-downs without waiting.

One object serves as the monotonic clock of the failover chain and the
connectors (``clock()``), their ``sleep`` (which moves it instead of
waiting), and the fake market's wall clock (``wall()``), so a simulated hour
runs in milliseconds and every run sees the same times.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime


class FakeClock:
    def __init__(self, start: float = 10_000.0, wall_start: float = 1_715_364_000.0) -> None:
        self.now = start
        self._wall_offset = wall_start - start  # 2024-05-10 18:00 UTC at the start

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), UTC)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)
