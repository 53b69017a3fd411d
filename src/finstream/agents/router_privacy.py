"""What the router seals and opens: crypto-shredding on the routing path, in one place.

The router (``agents/router.py``) calls these hooks; they keep every copy it
makes of a user's personal data sealed under the user's data key:

* ``prepare``: one key-ring load per batch for the users whose requests it
  holds (a user's first key is created here when needed);
* requests: ``data`` values sealed by the API (or an upstream producer using
  :mod:`finstream.privacy.producer`) are opened to render; what the router
  holds (``holds`` store, its changelog, dead letters of releases) is sealed,
  plaintext from producers that do not seal included;
* preferences: contact points arrive sealed (the API seals them); the store
  and its changelog keep the bytes as they came; they are opened in memory
  only to address a message;
* outbound messages: recipient, subject, bodies and data sealed into one
  ``sealed`` token (:func:`finstream.domain.envelope.seal_outbound`);
* digests: each item's subject and text sealed in the holds store.

A request for an erased user is dropped (audited): nothing of theirs is
routed, held or dead-lettered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import Counter

from finstream.domain.envelope import (
    CONTACT_FIELDS,
    EnvelopeError,
    UserErased,
    UserKeys,
    data_is_sealed,
    is_sealed,
    open_data,
    seal_data,
    seal_outbound,
)
from finstream.domain.notify.digest import DigestBuffer
from finstream.domain.notify.preferences_view import CHANNEL_CONTACTS, Preferences
from finstream.domain.notify.request import Request
from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)

T = TypeVar("T")
E = TypeVar("E")

# Events whose users' keys load together, one chunk ahead of routing, and how
# many are routed between two turns of the loop (for the load in flight).
KEY_CHUNK = 100
KEY_YIELD = 10

PLAINTEXT = Counter(
    "finstream_privacy_plaintext_records_total",
    "Records that reached a role with personal data in clear (a producer that does not seal)",
    ["role", "kind"],
)
# Looked up once: a producer that does not seal makes this a per-request count.
_PLAINTEXT_DATA = PLAINTEXT.labels("router", "request_data")
_PLAINTEXT_CONTACTS = PLAINTEXT.labels("router", "contacts")

_ALL_CONTACTS = frozenset(field for field, _ in CONTACT_FIELDS)


@functools.lru_cache(maxsize=256)  # a few tuples: the policy's, the users', requests' choices
def _contact_lists(channels: tuple[str, ...]) -> frozenset[str]:
    return frozenset(CHANNEL_CONTACTS[c] for c in channels if c in CHANNEL_CONTACTS)


class SealedDataUnreadable(ValueError):
    """A request's sealed data does not open (a key version this worker cannot get)."""


class RouterPrivacy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ring: Any = None
        self._pool: Any = None
        self._batch: dict[str, UserKeys] = {}
        # user -> (the Preferences as stored, the contact lists opened, the opened copy),
        # for one batch: a user's next request in it opens nothing again. Not kept
        # longer: contacts in clear stay in memory no longer than the batch, and a
        # copy per user seen lately was long-lived objects for the collector to walk
        # (bench/RESULTS.md, the router's heap).
        self._opened: dict[str, tuple[Preferences, frozenset[str], Preferences]] = {}

    async def _keyring(self) -> Any:
        if self._ring is None:
            from finstream.privacy.keys import KeyRing
            from finstream.stores.postgres import create_pool

            self._pool = await create_pool(self.settings, min_size=1, max_size=2)
            self._ring = KeyRing.from_settings(self.settings, self._pool)
        return self._ring

    async def close(self) -> None:
        if self._ring is not None:
            await self._ring.close()
        if self._pool is not None:
            await self._pool.close()

    async def prepare(self, users: Iterable[str]) -> None:
        """Load (creating where needed) the keys of the users a batch routes."""
        self._begin()
        self._batch = await self._load(set(users))

    async def prepared(self, chunks: Sequence[tuple[T, Iterable[str]]]) -> AsyncGenerator[T, None]:
        """Each chunk of a batch once the keys of its users are loaded.

        The next chunk's keys are asked for before this chunk is yielded: the
        query (and a first key's creation) runs in PostgreSQL while the router
        routes this chunk, rather than stalling it. A cold cache (a restart, a
        rebalance, users seen for the first time) costs one exposed query per
        batch, for its first chunk. Close it (``contextlib.aclosing``) so that
        a load still in flight is cancelled when routing fails.
        """
        self._begin()
        ahead = self._ahead(chunks[0][1]) if chunks else None
        try:
            for i, (chunk, _) in enumerate(chunks):
                assert ahead is not None
                self._batch.update(await ahead)
                ahead = self._ahead(chunks[i + 1][1]) if i + 1 < len(chunks) else None
                if ahead is not None and not ahead.done():
                    await asyncio.sleep(0)  # the load sends its query before the CPU work
                yield chunk
        finally:
            if ahead is not None and not ahead.done():
                # Settled before the engine rewinds: no query of this batch outlives it.
                ahead.cancel()
                await asyncio.wait([ahead])

    async def runs(
        self, events: Sequence[E], user_of: Callable[[E], str | None]
    ) -> AsyncGenerator[Sequence[E], None]:
        """The events, ``KEY_YIELD`` at a time, once the keys of their users (``user_of``)
        are loaded.

        Keys load ``KEY_CHUNK`` events at a time, a chunk ahead (:meth:`prepared`);
        between two runs the loop gets a turn, so the next chunk's load takes its
        next step (the query's answer, then a first key's INSERT) rather than
        waiting until this chunk is done. Runs, not single events: a step of an
        async generator per request was a visible part of the router's time.
        """
        chunks = [
            (chunk, [u for u in map(user_of, chunk) if u is not None])
            for chunk in (events[i : i + KEY_CHUNK] for i in range(0, len(events), KEY_CHUNK))
        ]
        async with contextlib.aclosing(self.prepared(chunks)) as ready:
            async for chunk in ready:
                for i in range(0, len(chunk), KEY_YIELD):
                    yield chunk[i : i + KEY_YIELD]
                    await asyncio.sleep(0)

    def _begin(self) -> None:
        self._batch = {}
        self._opened = {}

    def _ahead(self, users: Iterable[str]) -> asyncio.Future[dict[str, UserKeys]]:
        wanted = set(users)
        if not wanted:
            done: asyncio.Future[dict[str, UserKeys]] = asyncio.get_running_loop().create_future()
            done.set_result({})
            return done
        task = asyncio.ensure_future(self._load(wanted))
        # A load whose chunk is never reached (routing failed) must not log as unretrieved.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _load(self, wanted: set[str]) -> dict[str, UserKeys]:
        if not wanted:
            return {}
        ring = await self._keyring()
        loaded: dict[str, UserKeys] = await ring.load(wanted, create=True)
        return loaded

    def keys(self, user: str) -> UserKeys:
        keys = self._batch.get(user)
        if keys is None:
            # Not prepared: a bug in the caller, never a reason to write plaintext.
            raise RuntimeError(f"keys of {user!r} were not loaded for this batch")
        return keys

    def erased(self, user: str) -> bool:
        keys = self._batch.get(user)
        return keys is not None and keys.erased

    # -- requests -----------------------------------------------------------------------------

    def open_request(self, request: Request) -> Request:
        """The request with its data opened (to render); ``record`` stays as it came."""
        if not data_is_sealed(request.data):
            if request.data and request.record.get("source") != "router.digest":
                _PLAINTEXT_DATA.inc()
            return request
        try:
            opened = open_data(request.data, self.keys(request.user_id))
        except EnvelopeError as exc:
            raise SealedDataUnreadable(f"request data does not open: {exc}") from None
        return dataclasses.replace(request, data=opened)

    def seal_request(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A NotificationRequest record to hold or dead-letter, its data sealed."""
        data = record.get("data") or {}
        if not data:
            return dict(record)
        return {**record, "data": seal_data(data, self.keys(str(record["user_id"])))}

    # -- preferences --------------------------------------------------------------------------

    def open_prefs(
        self, prefs: Preferences, channels: tuple[str, ...] | None = None
    ) -> Preferences:
        """Preferences with the contact points of ``channels`` (None: every channel) opened,
        to address messages (memory only); the other contacts stay sealed."""
        if not prefs.known:
            return prefs
        wanted = _ALL_CONTACTS if channels is None else _contact_lists(channels)
        cached = self._opened.get(prefs.user_id)
        if cached is not None and cached[0] is prefs:
            if wanted <= cached[1]:
                return cached[2]
            wanted |= cached[1]
        # One pass over the contacts: this runs for every request of a user not
        # seen lately (most of them), so it stays lean.
        keys: UserKeys | None = None
        plaintext = False
        opened: dict[str, tuple[dict[str, Any], ...]] = {}
        empty: list[str] = []  # an empty list counts as opened: asking again opens nothing
        for field, name in CONTACT_FIELDS:
            items: tuple[dict[str, Any], ...] = getattr(prefs, field)
            if not items:
                empty.append(field)
                continue
            if field not in wanted:
                continue
            out = []
            sealed = False
            for item in items:
                value = item.get(name)
                if not is_sealed(value):
                    plaintext = True
                    out.append(item)
                    continue
                sealed = True
                if keys is None:
                    keys = self.keys(prefs.user_id)
                try:
                    out.append({**item, name: keys.open_text(value)})
                except EnvelopeError:
                    log.warning("a contact does not open; left out", user_id=prefs.user_id)
            if sealed:
                opened[field] = tuple(out)
        if plaintext:
            _PLAINTEXT_CONTACTS.inc()
        if not opened:
            return prefs
        result = prefs.with_contacts(opened)
        self._opened[prefs.user_id] = (prefs, wanted.union(empty), result)
        return result

    # -- messages and digests -----------------------------------------------------------------

    def seal_message(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return seal_outbound(record, self.keys(str(record["user_id"])))

    def seal_digest_item(self, user: str, buffer: DigestBuffer) -> None:
        """The item just folded into a digest, sealed in place (the holds store keeps it)."""
        item = buffer.items[-1] if buffer.items else None
        if item is None or "sealed" in item:
            return
        token = self.keys(user).seal_json({"subject": item["subject"], "text": item["text"]})
        buffer.items[-1] = {"sealed": token, "at": item["at"]}

    def open_digest(self, user: str, buffer: DigestBuffer) -> DigestBuffer:
        """A copy of a digest with its items opened, to compose the digest request."""
        keys = self.keys(user)
        opened = buffer.copy()
        items = []
        for item in buffer.items:
            if "sealed" in item:
                try:
                    secret = keys.open_json(item["sealed"])
                except EnvelopeError:
                    continue  # sealed under a key that is gone: nothing to show
                items.append(
                    {"subject": secret["subject"], "text": secret["text"], "at": item["at"]}
                )
            else:
                items.append(item)
        opened.items = items
        return opened


def erased_error(user: str) -> str:
    return str(UserErased(user))
