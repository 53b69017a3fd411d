"""Request size limits and per-token rate limits.

The size limit is an ASGI middleware: a declared ``Content-Length`` over the
limit is refused before the body is read, and a chunked body is counted as it
streams in and refused the moment it passes the limit, so an oversized
request never sits in memory. Webhooks get their own (larger) limit because
providers batch events.

Rate limits are per token (a hash of it, never the token) in fixed windows in
Redis, shared by every API replica. When Redis cannot answer, the limiter lets
the request through and counts it: refusing all traffic because the limiter's
store hiccuped would turn a Redis blip into an outage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finstream.api.metrics import RATE_LIMITER_ERRORS
from finstream.api.problems import Problem
from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)

WEBHOOK_PREFIX = "/v1/webhooks/"


class BodyTooLarge(StarletteHTTPException):
    # An HTTPException, so FastAPI's body parsing lets it through unchanged.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes.")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, webhook_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.webhook_max_bytes = webhook_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = self.webhook_max_bytes if path.startswith(WEBHOOK_PREFIX) else self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await Problem(400, "Content-Length is not a number.").response()(
                        scope, receive, send
                    )
                    return
                if declared > limit:
                    await Problem(413, str(BodyTooLarge(limit).detail)).response()(
                        scope, receive, send
                    )
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float

    def headers(self) -> dict[str, str]:
        reset = max(int(self.reset_seconds + 0.999), 1)
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(reset)
        return headers


# KEYS[1] counter; ARGV[1] window in ms. Returns {count, ms left in the window}.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._settings = settings
        self.limit = settings.api_rate_limit
        self.window_ms = int(settings.api_rate_window_seconds * 1000)
        self._script = redis.register_script(_HIT)

    async def hit(self, token_hash: str) -> RateDecision:
        key = self._settings.redis_key(f"api:ratelimit:{token_hash}")
        try:
            result: Any = await self._script(keys=[key], args=[self.window_ms])
        except RedisError as exc:
            RATE_LIMITER_ERRORS.inc()
            log.warning("rate limiter unavailable; request let through", error=str(exc))
            return RateDecision(True, self.limit, self.limit, self.window_ms / 1000)
        count, ttl_ms = int(result[0]), int(result[1])
        return RateDecision(
            allowed=count <= self.limit,
            limit=self.limit,
            remaining=max(self.limit - count, 0),
            reset_seconds=ttl_ms / 1000,
        )
