"""One place that opens Redis connections from settings."""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from finstream.settings import Settings


async def probe(redis: aioredis.Redis) -> None:
    """Raise unless Redis answers a PING (a readiness probe)."""
    await redis.ping()


def connect(settings: Settings) -> aioredis.Redis:
    """A client whose connects and commands time out (``redis_socket_timeout``): a
    half-open connection fails the command with a TimeoutError instead of hanging it."""
    return aioredis.from_url(
        settings.redis_url.get_secret_value(),
        decode_responses=False,
        health_check_interval=30,
        socket_keepalive=True,
        # A Redis that stops answering must fail a call, not hang a worker.
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_timeout,
    )


class RepairMarks:
    """Which parts of what a role keeps in Redis are known to be complete.

    Redis holds copies (caches, read models, inboxes) of what lives elsewhere:
    a role's state store, a compacted topic, the delivery records. A Redis
    that restarts without its data (no persistence, a failover to a replica
    that lagged, a flush) loses them all at once, and nothing else tells.
    So each role writes one mark per scope (a partition it owns, or the role
    as a whole) once that scope's data is in Redis, and looks at its marks
    every ``redis_repair_check_seconds``: a missing mark means the data is
    gone too, and the role repairs that scope from its source of truth before
    marking it again. Repairs are idempotent, monotonic writes, so a repair
    that races the live writes, or two replicas repairing at once, converge.
    (A Redis that evicts keys under memory pressure could drop data and keep
    a mark: run it with ``maxmemory-policy noeviction``.)
    """

    def __init__(self, redis: aioredis.Redis, settings: Settings, name: str) -> None:
        self._redis = redis
        self._prefix = settings.redis_key(f"repaired:{name}:")

    async def missing(self, scopes: Iterable[str]) -> list[str]:
        """The scopes without a mark (raises when Redis does not answer)."""
        wanted = list(scopes)
        if not wanted:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for scope in wanted:
                pipe.exists(self._prefix + scope)
            found = await pipe.execute()
        return [scope for scope, n in zip(wanted, found, strict=True) if not n]

    async def mark(self, scopes: Iterable[str]) -> None:
        wanted = list(scopes)
        if not wanted:
            return
        await self._redis.mset({self._prefix + scope: b"1" for scope in wanted})
