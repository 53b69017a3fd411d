"""One place that opens Redis connections from settings."""

from __future__ import annotations

import redis.asyncio as aioredis

from finstream.settings import Settings


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
