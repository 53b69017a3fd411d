"""Bars writer (the ``bars`` role, :mod:`finstream.agents.bars`): md.bars.1m -> PostgreSQL ``bars`` and Redis.

PostgreSQL keeps every bar, one row per (symbol, interval, start); an upsert
replaces a row only with a higher revision, so redelivered, replayed or
reordered publications never move a bar backwards.

Redis keeps the latest ``bars_redis_keep`` bars of each symbol and interval
in a sorted set ``{ns}bars:{interval}:{SYMBOL}`` scored by the bar's start
(epoch seconds), one JSON member per bar: ``ZRANGE key -N -1`` gives the
latest N, oldest first, newest last. A corrected bar replaces its older
revision in place. Each bar that lands in Redis is also published as the
same JSON on the pub/sub channel of the same name, for live subscribers (the
API's WebSocket). JSON fields: symbol, interval, start, end (ISO 8601),
open, high, low, close, volume, vwap (decimal strings; vwap may be null),
trades, final, revision.

The role runs on the stream engine, at least once: a batch is stored in PostgreSQL,
then in Redis, then its offsets are committed; a crash re-reads what was not
committed, which the revision checks make harmless.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from finstream.domain.marketdata.bars import Bar
from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)

_UPSERT = """
INSERT INTO bars (symbol, interval, start, "end", open, high, low, close, volume, vwap,
                  trades, final, revision, updated_at)
SELECT s, i, st, en, o, h, l, c, v, vw, t, f, r, now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::numeric[],
            $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::numeric[],
            $11::integer[], $12::boolean[], $13::integer[])
     AS u(s, i, st, en, o, h, l, c, v, vw, t, f, r)
ON CONFLICT (symbol, interval, start) DO UPDATE SET
    "end" = excluded."end", open = excluded.open, high = excluded.high, low = excluded.low,
    close = excluded.close, volume = excluded.volume, vwap = excluded.vwap,
    trades = excluded.trades, final = excluded.final, revision = excluded.revision,
    updated_at = now()
WHERE bars.revision < excluded.revision
"""

# KEYS[1] sorted set; ARGV: score (start, epoch s), revision, JSON, keep, channel.
# A member with the same start and an equal or higher revision wins.
_PUT_BAR = """
local existing = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
for _, member in ipairs(existing) do
  local ok, doc = pcall(cjson.decode, member)
  if ok and tonumber(doc['revision']) >= tonumber(ARGV[2]) then
    return 0
  end
end
if #existing > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('PUBLISH', ARGV[5], ARGV[3])
  return 1
end
return 0
"""


def bars_key(settings: Settings, interval: str, symbol: str) -> str:
    """Redis sorted set and pub/sub channel of one symbol's bars of one interval."""
    return settings.redis_key(f"bars:{interval}:{symbol}")


def latest_per_key(bars: Sequence[Bar]) -> list[Bar]:
    """One bar per (symbol, interval, start): the highest revision of the batch."""
    best: dict[tuple[str, str, Any], Bar] = {}
    for bar in bars:
        key = (bar.symbol, bar.interval, bar.start)
        kept = best.get(key)
        if kept is None or bar.revision > kept.revision:
            best[key] = bar
    return list(best.values())


class BarStore:
    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings) -> None:
        self._pool = pool
        self._redis = redis
        self._settings = settings
        self._put = redis.register_script(_PUT_BAR)

    async def write_postgres(self, bars: Sequence[Bar]) -> int:
        if not bars:
            return 0
        rows = latest_per_key(bars)
        columns: list[list[Any]] = [[] for _ in range(13)]
        for b in rows:
            values = (
                b.symbol,
                b.interval,
                b.start,
                b.end,
                b.open,
                b.high,
                b.low,
                b.close,
                b.volume,
                b.vwap,
                b.trades,
                b.final,
                b.revision,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        async with self._pool.acquire() as conn:
            status = await conn.execute(_UPSERT, *columns)
        return int(status.split()[-1])

    async def write_redis(self, bars: Sequence[Bar]) -> int:
        if not bars:
            return 0
        keep = self._settings.bars_redis_keep
        async with self._redis.pipeline(transaction=False) as pipe:
            for b in sorted(latest_per_key(bars), key=lambda b: (b.start, b.revision)):
                key = bars_key(self._settings, b.interval, b.symbol)
                member = json.dumps(b.to_json(), separators=(",", ":"))
                score = int(b.start.timestamp())
                await self._put(
                    keys=[key], args=[score, b.revision, member, keep, key], client=pipe
                )
            results = await pipe.execute()
        return sum(int(r) for r in results)

    async def latest(self, symbol: str, interval: str, count: int) -> list[dict[str, Any]]:
        raw = await self._redis.zrange(bars_key(self._settings, interval, symbol), -count, -1)
        return [json.loads(m) for m in raw if isinstance(m, bytes | str)]
