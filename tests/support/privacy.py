"""Tests read what finstream seals: open records with the environment's key ring.

Workers under test use the development master key (FINSTREAM_ENV dev/test),
so a key ring on the test environment's database opens what they sealed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import asyncpg

from finstream.domain.envelope import (
    UserKeys,
    is_sealed,
    open_contacts,
    open_outbound,
    seal_contacts,
    seal_data,
)
from finstream.privacy.keys import KeyRing
from finstream.privacy.kms import master_keys
from finstream.settings import Settings


async def load_keys(
    settings: Settings, users: Iterable[str], *, create: bool = False
) -> dict[str, UserKeys]:
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(), min_size=1, max_size=2
    )
    try:
        return await KeyRing(pool, master_keys(settings)).load(users, create=create)
    finally:
        await pool.close()


def keys_of(
    settings: Settings, users: Iterable[str], *, create: bool = False
) -> dict[str, UserKeys]:
    return asyncio.run(load_keys(settings, users, create=create))


def opened_messages(settings: Settings, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OutboundMessage records as the router composed them (sealed ones opened)."""
    sealed = [r for r in records if r.get("sealed")]
    if not sealed:
        return records
    keys = keys_of(settings, {r["user_id"] for r in sealed})
    return [open_outbound(r, keys[r["user_id"]]) if r.get("sealed") else r for r in records]


def opened_prefs(settings: Settings, record: dict[str, Any]) -> dict[str, Any]:
    if not any(
        is_sealed(i.get(n))
        for f, n in (("emails", "address"), ("phones", "number"), ("push_tokens", "token"))
        for i in record.get(f) or ()
    ):
        return record
    keys = keys_of(settings, [record["user_id"]])[record["user_id"]]
    return open_contacts(record, keys)


def sealed_prefs(settings: Settings, record: dict[str, Any]) -> dict[str, Any]:
    """A preferences record as the API writes it (contacts sealed)."""
    keys = keys_of(settings, [record["user_id"]], create=True)[record["user_id"]]
    return seal_contacts(record, keys)


def sealed_data(settings: Settings, user: str, data: dict[str, str]) -> dict[str, str]:
    keys = keys_of(settings, [user], create=True)[user]
    return seal_data(data, keys)
