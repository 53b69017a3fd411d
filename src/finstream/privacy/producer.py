"""For producers outside finstream: seal personal data before it reaches Kafka.

finstream's own writers seal (the API, ``finstream prefs set``, the demo
seed). An upstream service that produces ``notify.requests`` itself should
seal the ``data`` values that are personal, so that nothing of a user is in
clear in Kafka's retention; whatever it writes in clear stays readable there
for the topic's retention (``notify.requests``: 7 days, ``topics.yaml``) and
``finstream_privacy_plaintext_records_total`` counts it. Sealing needs the
``user_keys`` table (a login with ``SELECT, INSERT`` on it) and the master
key setting (or KMS access) that finstream uses::

    from finstream.privacy.producer import Sealer

    async with Sealer.open(settings) as sealer:
        record = await sealer.request(record)          # data values sealed
        value = codec.encode("NotificationRequest", record)
        producer.produce("notify.requests", key=record["user_id"].encode(), value=value)

``Sealer.preferences`` does the same for a UserPreferences record's contact
points. Records for an erased user raise
:class:`~finstream.domain.envelope.UserErased`: nothing may be written for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import asyncpg

from finstream.domain.envelope import seal_contacts, seal_data
from finstream.privacy.keys import KeyRing
from finstream.settings import Settings


class Sealer:
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Sealer]:
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=0,
            max_size=2,
            timeout=settings.pg_connect_timeout,
        )
        keys = KeyRing.from_settings(settings, pool)
        try:
            yield cls(keys)
        finally:
            await keys.close()
            await pool.close()

    async def request(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A NotificationRequest with every ``data`` value sealed under its user's key."""
        keys = await self.keys.seal_keys(str(record["user_id"]))
        return {**record, "data": seal_data(record.get("data") or {}, keys)}

    async def preferences(
        self, record: Mapping[str, Any], previous: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A UserPreferences record with its contact points sealed (an unchanged one keeps
        the token ``previous`` holds)."""
        keys = await self.keys.seal_keys(str(record["user_id"]))
        return seal_contacts(record, keys, previous=previous)

    async def records(
        self, items: Sequence[tuple[str, str, str, Mapping[str, Any]]]
    ) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(topic, key, schema, record) items with requests and preferences sealed."""
        out = []
        for topic, key, schema, record in items:
            if schema == "NotificationRequest":
                out.append((topic, key, schema, await self.request(record)))
            elif schema == "UserPreferences":
                out.append((topic, key, schema, await self.preferences(record)))
            else:
                out.append((topic, key, schema, dict(record)))
        return out
