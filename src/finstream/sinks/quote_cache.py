"""The latest quote per symbol in Redis, and its live pub/sub channel.

``quote:<SYMBOL>`` is a hash of the latest tick's fields; every update is also
published as JSON on the ``quotes:<SYMBOL>`` channel for live subscribers (the
WebSocket API fans these out). Updates are monotonic in event time: a late or
replayed tick never overwrites a newer quote, so at-least-once redelivery and
replays cannot move the cache backwards.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from finstream.domain.ticks import Tick
from finstream.domain.time import to_micros
from finstream.settings import Settings

# KEYS[1] quote hash; ARGV[1] ts in micros, ARGV[2] channel, ARGV[3] JSON, ARGV[4..] field/value pairs.
_UPDATE = """
local current = redis.call('HGET', KEYS[1], 'ts_us')
if current and tonumber(current) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decimal_text(value: Decimal) -> str:
    """Plain notation without trailing zeros: 189.12300000 -> 189.123, 1E+2 -> 100."""
    return f"{value.normalize():f}"


def quote_fields(tick: Tick) -> dict[str, str]:
    fields = {
        "symbol": tick.symbol,
        "price": decimal_text(tick.price),
        "ts": tick.ts.isoformat(),
        "ts_us": str(to_micros(tick.ts)),
        "source": tick.source,
        "tick_id": tick.tick_id,
        "kind": tick.kind,
    }
    for name in ("size", "bid", "ask", "prev_close"):
        value = getattr(tick, name)
        if value is not None:
            fields[name] = decimal_text(value)
    if tick.currency:
        fields["currency"] = tick.currency
    return fields


class QuoteCache:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._script = redis.register_script(_UPDATE)

    def key(self, symbol: str) -> str:
        return self._settings.redis_key(f"quote:{symbol}")

    def channel(self, symbol: str) -> str:
        return self._settings.redis_key(f"quotes:{symbol}")

    async def update(self, tick: Tick) -> bool:
        """Store the tick as the latest quote unless a newer one is there; True if stored."""
        fields = quote_fields(tick)
        args: list[Any] = [fields["ts_us"], self.channel(tick.symbol), json.dumps(fields)]
        for k, v in fields.items():
            args.extend((k, v))
        return bool(await self._script(keys=[self.key(tick.symbol)], args=args))

    async def get(self, symbol: str) -> dict[str, str] | None:
        raw = await self._redis.hgetall(self.key(symbol))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}
