"""Users' in-app inboxes in Redis.

Per user (the ``{user}`` hash tag keeps a user's keys on one cluster slot):

* ``inbox:{user}:msgs``     hash message_id -> JSON message
* ``inbox:{user}:index``    sorted set message_id by created time (newest last)
* ``inbox:{user}:unread``   set of unread message ids
* ``inbox:{user}:archived`` set of archived message ids
* ``inbox:{user}:seen``     sorted set of every id ever stored (bounded), so a
  redelivered message that was already trimmed is not stored again
* channel ``inbox:{user}``  each new message as JSON, for live delivery

An entry's subject, body and data are kept sealed under the user's data key
(``sealed``; :func:`open_entry` opens it), so the inbox, its pub/sub channel
and Redis' persistence files hold no message content in clear.

Adding is idempotent on message_id and atomic (one Lua script): a message is
stored, indexed, marked unread, trimmed to the per-user cap and published
exactly once however often Kafka redelivers it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from finstream.domain import strict_json
from finstream.domain.envelope import EnvelopeError, UserKeys
from finstream.settings import Settings

# KEYS: msgs, index, unread, archived, seen
# ARGV: id, json, score, cap, channel ('' publishes nothing: a repair), seen_cap
_ADD = """
if redis.call('ZSCORE', KEYS[5], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
local seen = redis.call('ZCARD', KEYS[5])
if seen > tonumber(ARGV[6]) then
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, seen - tonumber(ARGV[6]) - 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
local n = redis.call('ZCARD', KEYS[2])
local cap = tonumber(ARGV[4])
if n > cap then
  local old = redis.call('ZRANGE', KEYS[2], 0, n - cap - 1)
  for _, id in ipairs(old) do
    redis.call('HDEL', KEYS[1], id)
    redis.call('SREM', KEYS[3], id)
    redis.call('SREM', KEYS[4], id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - cap - 1)
end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[2])
end
return 1
"""


def open_entry(entry: dict[str, Any], keys: UserKeys) -> dict[str, Any]:
    """An inbox entry as its user reads it: the sealed part opened (subject, body, data).

    An entry whose key is gone (its user was erased) shows no content.
    """
    token = entry.get("sealed")
    if not token:
        return entry
    out = {k: v for k, v in entry.items() if k != "sealed"}
    try:
        secret = keys.open_json(str(token))
    except EnvelopeError:
        secret = {}
    out["subject"] = secret.get("subject")
    out["body"] = secret.get("body_text") or ""
    out["data"] = secret.get("data") or {}
    return out


@dataclass(frozen=True)
class InboxPage:
    messages: list[dict[str, Any]]
    unread: int
    total: int


class Inbox:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._cap = settings.inbox_max_messages
        self._add = redis.register_script(_ADD)

    def _key(self, user_id: str, part: str) -> str:
        return self._settings.redis_key(f"inbox:{{{user_id}}}:{part}")

    def channel(self, user_id: str) -> str:
        return self._settings.redis_key(f"inbox:{user_id}")

    async def add(
        self,
        user_id: str,
        message_id: str,
        message: dict[str, Any],
        score: float,
        *,
        publish: bool = True,
    ) -> bool:
        """Store a message; False when it was stored before (a redelivery).

        ``publish=False`` stores without telling live clients: what a repair
        puts back was delivered (and shown) before.
        """
        # Strict JSON: the payload is published to browsers as it is (NonFiniteNumber else).
        payload = strict_json.dumps({**message, "message_id": message_id}, default=str)
        keys = [self._key(user_id, p) for p in ("msgs", "index", "unread", "archived", "seen")]
        args: list[str | float | int] = [
            message_id,
            payload,
            score,
            self._cap,
            self.channel(user_id) if publish else "",
            self._cap * 10,
        ]
        return bool(await self._add(keys=keys, args=args))

    async def page(
        self,
        user_id: str,
        *,
        limit: int = 50,
        before: float | None = None,
        unread_only: bool = False,
        include_archived: bool = False,
    ) -> InboxPage:
        """Newest first; ``before`` is the score (created time) to continue below."""
        index = self._key(user_id, "index")
        max_score: Any = f"({before}" if before is not None else "+inf"
        ids: list[bytes] = await self._redis.zrevrangebyscore(  # type: ignore[assignment]
            index, max_score, "-inf", start=0, num=limit * 4 + 10
        )
        unread = {m for m in await self._redis.smembers(self._key(user_id, "unread"))}
        archived = {m for m in await self._redis.smembers(self._key(user_id, "archived"))}
        wanted = [
            i
            for i in ids
            if (include_archived or i not in archived) and (not unread_only or i in unread)
        ][:limit]
        raw = await self._redis.hmget(self._key(user_id, "msgs"), wanted) if wanted else []
        messages = []
        for mid, blob in zip(wanted, raw, strict=True):
            if blob is None:
                continue
            msg = json.loads(blob)
            msg["read"] = mid not in unread
            msg["archived"] = mid in archived
            messages.append(msg)
        total = await self._redis.zcard(index)
        return InboxPage(messages, len(unread), int(total))

    async def get(self, user_id: str, message_id: str) -> dict[str, Any] | None:
        blob = await self._redis.hget(self._key(user_id, "msgs"), message_id)
        if blob is None:
            return None
        msg: dict[str, Any] = json.loads(blob)
        msg["read"] = not await self._redis.sismember(self._key(user_id, "unread"), message_id)
        msg["archived"] = bool(
            await self._redis.sismember(self._key(user_id, "archived"), message_id)
        )
        return msg

    async def _exists(self, user_id: str, message_id: str) -> bool:
        return bool(await self._redis.hexists(self._key(user_id, "msgs"), message_id))

    async def mark_read(self, user_id: str, message_id: str, read: bool = True) -> bool:
        if not await self._exists(user_id, message_id):
            return False
        key = self._key(user_id, "unread")
        if read:
            await self._redis.srem(key, message_id)
        else:
            await self._redis.sadd(key, message_id)
        return True

    async def archive(self, user_id: str, message_id: str, archived: bool = True) -> bool:
        if not await self._exists(user_id, message_id):
            return False
        key = self._key(user_id, "archived")
        if archived:
            await self._redis.sadd(key, message_id)
        else:
            await self._redis.srem(key, message_id)
        return True

    async def unread_count(self, user_id: str) -> int:
        return int(await self._redis.scard(self._key(user_id, "unread")))
