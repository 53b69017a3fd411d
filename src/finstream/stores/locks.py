"""Short per-resource write locks in Redis, shared by the API and every other writer.

A change reads the current version of a resource, publishes the next one to a
compacted topic and waits for Kafka. Two changes interleaving could reach the
topic in the opposite order of their versions; holding the resource's lock
makes topic order follow version order, across API replicas, the CLI and the
roles that write preferences. A holder that dies frees it after ``LOCK_TTL_MS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from finstream.settings import Settings

LOCK_TTL_MS = 10_000

# Deletes the key only if this holder still owns it (its TTL may have passed
# and another holder taken it).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LockBusy(RuntimeError):
    """The lock stayed held by someone else for the whole wait."""


class RedisLocks:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._unlock = redis.register_script(_UNLOCK)

    def key(self, name: str) -> str:
        # The API's prefix, though the CLI and roles hold these locks too: during
        # a rolling upgrade the previous release's replicas take the same keys.
        return self._settings.redis_key(f"api:lock:{name}")

    async def acquire(
        self, name: str, wait: float, busy: Callable[[], Exception] | None = None
    ) -> str:
        """Take ``name``'s lock; its holder's token.

        Raises ``busy()`` (default :class:`LockBusy`) if it is not free within ``wait``.
        """
        key = self.key(name)
        token = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.005
        while not await self._redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            if loop.time() > deadline:
                raise busy() if busy is not None else LockBusy(name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        return token

    async def release(self, name: str, token: str) -> None:
        await self._unlock(keys=[self.key(name)], args=[token])

    @contextlib.asynccontextmanager
    async def hold(
        self, name: str, wait: float, busy: Callable[[], Exception] | None = None
    ) -> AsyncIterator[None]:
        token = await self.acquire(name, wait, busy)
        try:
            yield
        finally:
            await self.release(name, token)
