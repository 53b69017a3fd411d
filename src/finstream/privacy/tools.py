"""For the command line: open sealed records (operators, on purpose) and audit what was done."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from finstream.domain.envelope import (
    EnvelopeError,
    open_contacts,
    open_data,
    open_outbound,
)
from finstream.settings import Settings


async def _open(settings: Settings, schema: str, record: Mapping[str, Any]) -> dict[str, Any]:
    import asyncpg

    from finstream.privacy.keys import KeyRing
    from finstream.privacy.kms import master_keys

    user = str(record.get("user_id") or "")
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(), min_size=1, max_size=1
    )
    try:
        keys = await KeyRing(pool, master_keys(settings)).get(user)
    finally:
        await pool.close()
    try:
        if schema == "OutboundMessage":
            return open_outbound(record, keys)
        if schema == "NotificationRequest":
            return {**record, "data": open_data(record.get("data") or {}, keys)}
        if schema == "UserPreferences":
            return open_contacts(record, keys)
    except EnvelopeError as exc:
        return {**record, "_sealed": f"does not open: {exc}"}
    return dict(record)


def open_record(settings: Settings, schema: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded record with what is sealed in it opened (keys gone: said so)."""
    return asyncio.run(_open(settings, schema, record))


def audit_now(settings: Settings, events: Sequence[Mapping[str, Any]]) -> None:
    """Publish AuditEvents and wait for Kafka (the CLI's changes are audited too)."""
    if not events:
        return
    from confluent_kafka import Producer

    from finstream.codec import default_codec

    codec = default_codec()
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "log_level": 3,
        }
    )
    for event in events:
        producer.produce(
            settings.topic("audit.events"),
            key=str(event["subject_id"]).encode(),
            value=codec.encode("AuditEvent", event),
        )
    if producer.flush(30) != 0:
        raise RuntimeError("audit events were not acknowledged by Kafka")
