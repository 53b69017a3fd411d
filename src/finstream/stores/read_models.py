"""Read models in Redis of the compacted state topics.

``alerts.rules`` and ``notify.preferences`` are the source of truth; a
compacted topic cannot be point-queried, so the API (and the delivery
workers' feedback) read these Redis copies, kept current by the ``statestore``
role that consumes both topics. Values are the Avro single-object bytes of the
topic's record, so the read model holds exactly what the topic holds.

* ``prefs:{user}``           UserPreferences bytes
* ``rules:{user}``           hash rule_id -> AlertRule bytes
* ``rules:index``            hash rule_id -> user_id (lookup by id across users)
* ``scheduled:{user}``       hash item_id -> ScheduledItem bytes (notify.scheduled.items:
  what the router holds for the user; a tombstone removes the item)

Writes carry the record's ``updated_at`` and never replace a newer version
with an older one, so replays and redelivery cannot move the model backwards.

Who writes ``prefs:{user}``: the ``statestore`` role alone, applying every
record of ``notify.preferences`` (the router keeps its own store; the delivery
workers change no preferences). The writers of the topic
(:class:`finstream.privacy.prefs.PreferencesWriter`: API, CLI, the feedback
role) wait until the statestore has applied their version, so that the API
reads its own write and the next change builds on it. Erasure deletes the
keys (its tombstone follows on the topic).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from finstream.codec import Codec, DecodeError
from finstream.domain.time import to_micros
from finstream.settings import Settings
from finstream.topics import contract

# KEYS[1] value key (string), KEYS[2] version key; ARGV[1] bytes, ARGV[2] version.
_PUT_IF_NEWER = """
local current = redis.call('GET', KEYS[2])
if current and tonumber(current) > tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] user hash, KEYS[2] version hash, KEYS[3] index; ARGV: rule_id, bytes, version, user
_PUT_RULE_IF_NEWER = """
local current = redis.call('HGET', KEYS[2], ARGV[1])
if current and tonumber(current) > tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""

# KEYS: user hash, version hash, index; ARGV: rule_id, deletion version (-1: last + 1).
_DELETE_RULE = """
local current = redis.call('HGET', KEYS[2], ARGV[1])
local version = ARGV[2]
if tonumber(version) < 0 then
  version = current and string.format('%d', tonumber(current) + 1) or '1'
elseif current and tonumber(current) > tonumber(version) then
  version = current
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], version)
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class PreferencesStore:
    """Each user's latest notify.preferences value (its bytes, as on the topic)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, codec: Codec) -> None:
        self._redis = redis
        self._settings = settings
        self._topic = contract("notify.preferences", settings.namespace, codec)
        self._put = redis.register_script(_PUT_IF_NEWER)

    def _keys(self, user_id: str) -> list[str]:
        base = self._settings.redis_key(f"prefs:{{{user_id}}}")
        return [base, f"{base}:version"]

    async def put(self, user_id: str, value: bytes) -> bool:
        """Store encoded UserPreferences unless a newer version is there."""
        record = self._topic.decode_record(value)
        return bool(
            await self._put(keys=self._keys(user_id), args=[value, to_micros(record["updated_at"])])
        )

    def published_key(self, user_id: str) -> str:
        """The version a writer last published for the user (PreferencesWriter's note)."""
        return f"{self._keys(user_id)[0]}:published"

    async def delete(self, user_id: str) -> None:
        # The writers' note goes too: a version forgotten is not one to wait for.
        await self._redis.delete(*self._keys(user_id), self.published_key(user_id))

    async def version(self, user_id: str) -> int | None:
        """The ``updated_at`` (microseconds) of the version held, or None."""
        raw = await self._redis.get(self._keys(user_id)[1])
        return int(raw) if raw is not None else None

    async def get_bytes(self, user_id: str) -> bytes | None:
        value = await self._redis.get(self._keys(user_id)[0])
        return _bytes(value) if value is not None else None

    async def get(self, user_id: str) -> dict[str, Any] | None:
        raw = await self.get_bytes(user_id)
        if raw is None:
            return None
        try:
            return self._topic.decode_record(raw)
        except DecodeError:
            return None


class RulesStore:
    """Each user's live alert rules, as their alerts.rules values."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, codec: Codec) -> None:
        self._redis = redis
        self._settings = settings
        self._topic = contract("alerts.rules", settings.namespace, codec)
        self._put = redis.register_script(_PUT_RULE_IF_NEWER)
        self._delete = redis.register_script(_DELETE_RULE)

    def _user_keys(self, user_id: str) -> list[str]:
        base = self._settings.redis_key(f"rules:{{{user_id}}}")
        return [base, f"{base}:version"]

    @property
    def _index(self) -> str:
        return self._settings.redis_key("rules:index")

    async def put(self, value: bytes) -> bool:
        record = self._topic.decode_record(value)
        keys = [*self._user_keys(record["user_id"]), self._index]
        args = [record["rule_id"], value, to_micros(record["updated_at"]), record["user_id"]]
        return bool(await self._put(keys=keys, args=args))

    async def delete(self, rule_id: str, version: int | None = None) -> None:
        """Remove a rule, remembering the deletion as a version (``version``
        in micros, else just above the last one), so a late put of an older
        version (a lagging reader of alerts.rules) cannot bring it back."""
        user = await self.owner(rule_id)
        if user is None:
            return
        keys = [*self._user_keys(user), self._index]
        await self._delete(keys=keys, args=[rule_id, -1 if version is None else version])

    async def owner(self, rule_id: str) -> str | None:
        user = await self._redis.hget(self._index, rule_id)
        return _text(user) if user is not None else None

    async def get(self, rule_id: str) -> dict[str, Any] | None:
        user = await self.owner(rule_id)
        if user is None:
            return None
        raw = await self._redis.hget(self._user_keys(user)[0], rule_id)
        return self._topic.decode_record(_bytes(raw)) if raw is not None else None

    async def list_for_user(self, user_id: str) -> list[dict[str, Any]]:
        raw = await self._redis.hgetall(self._user_keys(user_id)[0])
        rules = [self._topic.decode_record(_bytes(v)) for v in raw.values()]
        return sorted(rules, key=lambda r: (r["created_at"], r["rule_id"]))


class ScheduledStore:
    """Each user's held notifications, as their notify.scheduled.items values.

    One writer (the statestore role) applies the topic in order per key, so
    the last record of an item wins; a tombstone removes it.
    """

    def __init__(self, redis: aioredis.Redis, settings: Settings, codec: Codec) -> None:
        self._redis = redis
        self._settings = settings
        self._topic = contract("notify.scheduled.items", settings.namespace, codec)

    def _key(self, user_id: str) -> str:
        return self._settings.redis_key(f"scheduled:{{{user_id}}}")

    async def put(self, user_id: str, item_id: str, value: bytes) -> None:
        await self._redis.hset(self._key(user_id), item_id, value)

    async def delete(self, user_id: str, item_id: str) -> None:
        await self._redis.hdel(self._key(user_id), item_id)

    async def get(self, user_id: str, item_id: str) -> dict[str, Any] | None:
        raw = await self._redis.hget(self._key(user_id), item_id)
        return self._topic.decode_record(_bytes(raw)) if raw is not None else None

    async def list_for_user(self, user_id: str) -> list[dict[str, Any]]:
        raw = await self._redis.hgetall(self._key(user_id))
        found = [self._topic.decode_record(_bytes(v)) for v in raw.values()]
        return sorted(found, key=lambda r: (r["due"], r["item_id"]))
