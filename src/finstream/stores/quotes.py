"""The latest quote per symbol in Redis, and its live pub/sub channel.

``quote:<SYMBOL>`` is a hash of the latest tick's fields; every update is also
published as JSON on the ``quotes:<SYMBOL>`` channel for live subscribers (the
WebSocket API fans these out). Updates are monotonic in event time: a late or
replayed tick never overwrites a newer quote, so at-least-once redelivery and
replays cannot move the cache backwards.

The quotes role writes through :class:`QuoteWriter`: it keeps only the newest
tick per symbol of a batch and writes them in one Redis pipeline after the
batch, so a round trip per tick never throttles the stream. Live subscribers
therefore see a conflated feed (at most one update per symbol per batch), the
usual trade-off of quote distribution. What a crash loses is repaired from the
role's ``latest-quote`` store when its partitions are assigned again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from finstream.domain.marketdata.ticks import Tick
from finstream.domain.time import to_micros
from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)

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


# Many quotes in one call: KEYS are the quote hashes; ARGV holds, per key in
# order, ts in micros, channel, JSON, the number of field/value pairs, then the
# pairs. One script call per batch instead of one per symbol keeps the cost on
# the client (packing commands) and the round trips flat. It touches keys of
# many slots, which a standalone Redis (what finstream.stores.redis
# connects to) allows and a Redis Cluster would not.
_UPDATE_MANY = """
local i = 1
local stored = 0
for k = 1, #KEYS do
  local ts, channel, doc, n = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local first = i + 4
  i = first + 2 * n
  local current = redis.call('HGET', KEYS[k], 'ts_us')
  if not (current and tonumber(current) > tonumber(ts)) then
    redis.call('HSET', KEYS[k], unpack(ARGV, first, i - 1))
    redis.call('PUBLISH', channel, doc)
    stored = stored + 1
  end
end
return stored
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
        self._many = redis.register_script(_UPDATE_MANY)

    def key(self, symbol: str) -> str:
        return self._settings.redis_key(f"quote:{symbol}")

    def channel(self, symbol: str) -> str:
        return self._settings.redis_key(f"quotes:{symbol}")

    def _args(self, tick: Tick) -> list[Any]:
        fields = quote_fields(tick)
        args: list[Any] = [fields["ts_us"], self.channel(tick.symbol), json.dumps(fields)]
        for k, v in fields.items():
            args.extend((k, v))
        return args

    async def update(self, tick: Tick) -> bool:
        """Store the tick as the latest quote unless a newer one is there; True if stored."""
        return bool(await self._script(keys=[self.key(tick.symbol)], args=self._args(tick)))

    async def update_many(self, ticks: list[Tick]) -> int:
        """Several symbols in one script call; returns how many were stored."""
        if not ticks:
            return 0
        keys: list[str] = []
        args: list[Any] = []
        for tick in ticks:
            fields = quote_fields(tick)
            keys.append(self.key(tick.symbol))
            args += (fields["ts_us"], self.channel(tick.symbol), json.dumps(fields), len(fields))
            for pair in fields.items():
                args += pair
        return int(await self._many(keys=keys, args=args))

    async def get(self, symbol: str) -> dict[str, str] | None:
        raw = await self._redis.hgetall(self.key(symbol))
        if not raw:
            return None
        return {_text(k): _text(v) for k, v in raw.items()}


class QuoteWriter:
    """Newest tick per symbol, written to the cache in one pipeline per flush.

    A stream role offers every tick it accepts and flushes after each batch.
    If Redis does not answer, the newest tick per symbol stays here (memory is
    bounded by the number of symbols) and later flushes retry, at most once
    per backoff period so that a dead Redis does not slow the stream down.
    """

    def __init__(self, cache: QuoteCache, clock: Callable[[], float] = time.monotonic) -> None:
        self._cache = cache
        self._clock = clock
        self._pending: dict[str, Tick] = {}
        self._failures = 0
        self._retry_at = 0.0

    def offer(self, tick: Tick) -> None:
        current = self._pending.get(tick.symbol)
        if current is None or tick.ts >= current.ts:
            self._pending[tick.symbol] = tick

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        if not self._pending:
            return
        now = self._clock()
        if now < self._retry_at:
            return
        batch, self._pending = list(self._pending.values()), {}
        try:
            await self._cache.update_many(batch)
        except Exception as exc:
            for tick in batch:
                # A newer tick offered meanwhile wins over the one being retried.
                self._pending.setdefault(tick.symbol, tick)
            self._failures += 1
            self._retry_at = now + min(0.25 * 2**self._failures, 5.0)
            log.warning(
                "quote cache write failed; will retry", error=str(exc), pending=len(self._pending)
            )
            return
        if self._failures:
            log.info("quote cache writes resumed", after_failures=self._failures)
        self._failures = 0
