"""Users' data keys: stored wrapped in PostgreSQL, cached unwrapped for a short while.

``user_keys`` holds every version of every user's data key, wrapped by a
master key (:mod:`finstream.privacy.kms`); ``erased_users`` lists the users
whose keys were destroyed. :class:`KeyRing` is what a worker holds:

* :meth:`KeyRing.load` gives the keys of many users in one query (a batch of
  a stream role), creating a user's first key on demand (``create=True``:
  whoever seals first for a user creates it; concurrent creators agree, the
  primary key picks one);
* keys stay cached, unwrapped, for ``privacy_key_cache_seconds`` (LRU,
  ``privacy_key_cache_size``): the bound on how long a running worker can
  still open an erased user's data;
* an erased user is never given a key again: :class:`~finstream.domain.envelope.UserErased`.

Erasure (:meth:`KeyRing.erase`) records the user in ``erased_users`` first,
then deletes their keys: every load checks ``erased_users``, so a key a
concurrent creator slipped in is never used, and the erasure sweep deletes
it. Rotation: :meth:`KeyRing.rotate` adds a data key version (new data is
sealed with it, old data still opens); :meth:`KeyRing.rewrap` re-wraps every
stored key under the current master key (then the old master key can go).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg
from prometheus_client import Counter

from finstream.domain.envelope import UserErased, UserKeys, new_data_key, wrap_context
from finstream.privacy.kms import MasterKeys, master_keys
from finstream.settings import Settings

T = TypeVar("T")

KEY_LOADS = Counter(
    "finstream_privacy_key_loads_total",
    "Users' data keys read from PostgreSQL (cache misses) and created",
    ["kind"],
)

_SELECT = """
SELECT u.user_id, k.version, k.master_key_id, k.wrapped, (e.user_id IS NOT NULL) AS erased
FROM unnest($1::text[]) AS u(user_id)
LEFT JOIN erased_users e ON e.user_id = u.user_id
LEFT JOIN user_keys k ON k.user_id = u.user_id AND e.user_id IS NULL
"""

_CREATE = """
INSERT INTO user_keys (user_id, version, master_key_id, wrapped)
SELECT x.u, 1, x.m, x.w
FROM unnest($1::text[], $2::text[], $3::bytea[]) AS x(u, m, w)
WHERE NOT EXISTS (SELECT 1 FROM erased_users e WHERE e.user_id = x.u)
ON CONFLICT (user_id, version) DO NOTHING
RETURNING user_id
"""


class KeyRing:
    def __init__(
        self,
        pool: asyncpg.Pool,
        master: MasterKeys,
        *,
        ttl: float = 60.0,
        size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.master = master
        self.ttl = ttl
        self.size = size
        self.clock = clock
        # user -> keys, oldest first; their expiry times apart, in a dict of floats:
        # an entry object per user was one more long-lived object the collector
        # walks (bench/RESULTS.md, the router's heap).
        self._cache: OrderedDict[str, UserKeys] = OrderedDict()
        self._expires: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, pool: asyncpg.Pool) -> KeyRing:
        return cls(
            pool,
            master_keys(settings),
            ttl=settings.privacy_key_cache_seconds,
            size=settings.privacy_key_cache_size,
        )

    async def close(self) -> None:
        await self.master.close()

    # -- reading ----------------------------------------------------------------------------

    def cached(self, user_id: str) -> UserKeys | None:
        keys = self._cache.get(user_id)
        if keys is None or self._expires[user_id] <= self.clock():
            return None
        return keys

    def forget(self, user_id: str) -> None:
        self._cache.pop(user_id, None)
        self._expires.pop(user_id, None)

    def _remember(self, keys: UserKeys) -> None:
        if not keys.keys and not keys.erased:
            return  # a user without keys yet: another process may create them any moment
        user = keys.user_id
        self._cache[user] = keys
        self._cache.move_to_end(user)
        self._expires[user] = self.clock() + self.ttl
        while len(self._cache) > self.size:
            oldest, _ = self._cache.popitem(last=False)
            del self._expires[oldest]

    async def get(self, user_id: str, *, create: bool = False) -> UserKeys:
        return (await self.load([user_id], create=create))[user_id]

    async def load(self, user_ids: Iterable[str], *, create: bool = False) -> dict[str, UserKeys]:
        """Every user's keys (cached, else one query); ``create``: a user without any
        gets a first one. Erased users come back with ``erased`` set."""
        out: dict[str, UserKeys] = {}
        missing: list[str] = []
        now = self.clock()
        cache, expires = self._cache, self._expires
        for user in dict.fromkeys(user_ids):
            keys = cache.get(user)
            if keys is not None and expires[user] > now:
                out[user] = keys
            else:
                missing.append(user)
        if not missing:
            return out
        found = await self._fetch(missing)
        if create:
            absent = [u for u in missing if not found[u].keys and not found[u].erased]
            if absent:
                made = await self._create(absent)
                found.update(made)
                # Another worker's key (it created first) or an erasure won the race.
                lost = [u for u in absent if u not in made]
                if lost:
                    found.update(await self._fetch(lost))
        for user in missing:
            self._remember(found[user])
            out[user] = found[user]
        return out

    async def _fetch(self, users: Sequence[str]) -> dict[str, UserKeys]:
        KEY_LOADS.labels("read").inc(len(users))
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_SELECT, list(users))
        raw: dict[str, dict[int, bytes]] = {u: {} for u in users}
        erased: set[str] = set()
        stored = []
        for row in rows:
            if row["erased"]:
                erased.add(row["user_id"])
            elif row["version"] is not None:
                stored.append(row)
        plain = await self._each(
            self.master.unwrap,
            [
                (r["master_key_id"], bytes(r["wrapped"]), wrap_context(r["user_id"], r["version"]))
                for r in stored
            ],
        )
        for row, key in zip(stored, plain, strict=True):
            raw[row["user_id"]][row["version"]] = key
        return {
            u: UserKeys(u, {}, erased=True) if u in erased else UserKeys.from_raw(u, raw[u])
            for u in users
        }

    async def _create(self, users: Sequence[str]) -> dict[str, UserKeys]:
        """First keys for ``users``; returns those that were stored (the rest lost a race).

        The stored ones are used as created, so a batch of new users costs one
        read and one write rather than a second read and an unwrap per key.
        """
        KEY_LOADS.labels("created").inc(len(users))
        plain = [new_data_key() for _ in users]
        made = await self._each(
            self.master.wrap,
            [(key, wrap_context(u, 1)) for u, key in zip(users, plain, strict=True)],
        )
        ids = [key_id for key_id, _ in made]
        wrapped = [blob for _, blob in made]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_CREATE, list(users), ids, wrapped)
        stored = {row["user_id"] for row in rows}
        return {
            user: UserKeys.from_raw(user, {1: key})
            for user, key in zip(users, plain, strict=True)
            if user in stored
        }

    async def _each(
        self, call: Callable[..., Awaitable[T]], args: Sequence[tuple[Any, ...]]
    ) -> list[T]:
        """``call(*a)`` for each of ``args``, answers in order: one after another where
        each is CPU work here (local keys: a task each would cost more than the unwrap),
        else together (KMS round trips; the provider bounds how many are in flight)."""
        if self.master.concurrency <= 1 or len(args) <= 1:
            return [await call(*a) for a in args]
        return list(await asyncio.gather(*(call(*a) for a in args)))

    async def seal_keys(self, user_id: str) -> UserKeys:
        """The keys to seal with (created if needed); raises UserErased for an erased user."""
        keys = await self.get(user_id, create=True)
        if keys.erased:
            raise UserErased(user_id)
        return keys

    # -- erasure and rotation ----------------------------------------------------------------

    async def erase(
        self, conn: asyncpg.Connection | Any, user_id: str, by: str, sweep_after: float
    ) -> bool:
        """Destroy a user's keys; True if the user was not erased before.

        The erasure is recorded (and committed) before the keys go, so no load
        in between can hand out a key.
        """
        first = await conn.fetchval(
            """INSERT INTO erased_users (user_id, erased_by, sweep_due)
               VALUES ($1, $2, now() + make_interval(secs => $3))
               ON CONFLICT (user_id) DO NOTHING RETURNING true""",
            user_id,
            by,
            sweep_after,
        )
        await conn.execute("DELETE FROM user_keys WHERE user_id = $1", user_id)
        self._remember(UserKeys(user_id, {}, erased=True))
        return bool(first)

    async def rotate(self, user_id: str) -> int:
        """A new data key version for a user (new data is sealed with it); returns it."""
        for _ in range(5):
            async with self.pool.acquire() as conn:
                row = await conn.fetchrow(
                    """SELECT coalesce(max(k.version), 0) + 1 AS next,
                              EXISTS (SELECT 1 FROM erased_users e WHERE e.user_id = $1) AS erased
                       FROM user_keys k WHERE k.user_id = $1""",
                    user_id,
                )
                assert row is not None  # an aggregate: always one row
                if row["erased"]:
                    raise UserErased(user_id)
                version = int(row["next"])
                key_id, blob = await self.master.wrap(
                    new_data_key(), wrap_context(user_id, version)
                )
                done = await conn.fetchval(
                    """INSERT INTO user_keys (user_id, version, master_key_id, wrapped)
                       VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING version""",
                    user_id,
                    version,
                    key_id,
                    blob,
                )
            if done is not None:
                self.forget(user_id)
                return version
        raise RuntimeError(f"could not add a key version for {user_id!r} (concurrent rotations)")

    async def rewrap(self, batch: int = 500) -> int:
        """Re-wrap every stored key not wrapped by the current master key; returns how many."""
        current = await self.master.current()
        moved = 0
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    """SELECT user_id, version, master_key_id, wrapped FROM user_keys
                       WHERE master_key_id <> $1 LIMIT $2 FOR UPDATE SKIP LOCKED""",
                    current,
                    batch,
                )
                if not rows:
                    return moved
                contexts = [wrap_context(r["user_id"], r["version"]) for r in rows]
                plain = await self._each(
                    self.master.unwrap,
                    [
                        (r["master_key_id"], bytes(r["wrapped"]), c)
                        for r, c in zip(rows, contexts, strict=True)
                    ],
                )
                made = await self._each(self.master.wrap, list(zip(plain, contexts, strict=True)))
                await conn.executemany(
                    """UPDATE user_keys SET master_key_id = $3, wrapped = $4
                       WHERE user_id = $1 AND version = $2""",
                    [
                        (r["user_id"], r["version"], key_id, blob)
                        for r, (key_id, blob) in zip(rows, made, strict=True)
                    ],
                )
                moved += len(rows)
