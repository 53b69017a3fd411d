"""Per-resource write locks in a real Redis: one holder at a time, a bounded wait,
release only by the holder, and one lock for the API's routes and every other
writer of a user's preferences."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from finstream.api.deps import WriteLocks
from finstream.api.problems import Problem
from finstream.codec import default_codec
from finstream.privacy.prefs import Busy, PreferencesWriter
from finstream.stores.locks import LOCK_TTL_MS, LockBusy, RedisLocks
from tests.support.services import TestEnv

pytestmark = pytest.mark.integration


def client(env: TestEnv) -> aioredis.Redis:
    return aioredis.Redis.from_url(env.settings.redis_url.get_secret_value())


async def test_a_second_holder_waits_for_the_first_and_gives_up_after_its_wait(
    env: TestEnv,
) -> None:
    r = client(env)
    try:
        locks = RedisLocks(r, env.settings)
        order: list[str] = []
        held, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with locks.hold("res:a", wait=1):
                order.append("first in")
                held.set()
                await release.wait()
                order.append("first out")

        task = asyncio.create_task(first())
        await held.wait()
        with pytest.raises(LockBusy):
            await locks.acquire("res:a", wait=0.2)
        # Another resource is not held back.
        async with locks.hold("res:b", wait=0.2):
            order.append("other resource")
        waiter = asyncio.create_task(locks.acquire("res:a", wait=30))
        release.set()
        token = await waiter
        order.append("second in")
        await task
        assert order == ["first in", "other resource", "first out", "second in"]
        ttl = await r.pttl(locks.key("res:a"))
        assert 0 < ttl <= LOCK_TTL_MS, "a holder that dies frees the lock"
        await locks.release("res:a", token)
        assert await r.exists(locks.key("res:a")) == 0
    finally:
        await r.aclose()


async def test_a_holder_whose_lock_expired_does_not_free_the_next_holders(
    env: TestEnv,
) -> None:
    r = client(env)
    try:
        locks = RedisLocks(r, env.settings)
        stale = await locks.acquire("res:c", wait=1)
        await r.delete(locks.key("res:c"))  # its TTL passed
        current = await locks.acquire("res:c", wait=1)
        await locks.release("res:c", stale)
        assert await r.get(locks.key("res:c")) == current.encode()
        await locks.release("res:c", current)
        assert await r.exists(locks.key("res:c")) == 0
    finally:
        await r.aclose()


async def test_the_api_and_the_preferences_writer_share_the_users_lock(env: TestEnv) -> None:
    r = client(env)
    try:
        api = WriteLocks(r, env.settings)
        writer = PreferencesWriter(
            settings=env.settings,
            codec=default_codec(),
            redis=r,
            publisher=cast(Any, None),
            keys=cast(Any, None),
            actor="test",
        )
        async with api.hold("prefs:u-lock"):
            with pytest.raises(Busy):
                async with writer.lock("u-lock", wait=0.2):
                    pass
        async with writer.lock("u-lock", wait=0.2):
            with pytest.raises(Problem) as info:
                async with api.hold("prefs:u-lock"):
                    pass
            assert info.value.status == 409
        # Both released: each takes it at once.
        async with api.hold("prefs:u-lock"):
            pass
        async with writer.lock("u-lock", wait=0.2):
            pass
    finally:
        await r.aclose()
