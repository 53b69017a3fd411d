"""The ``statestore`` role: compacted state topics -> Redis read models.

Consumes ``alerts.rules`` (key: rule id) and ``notify.preferences`` (key: user
id) and keeps :mod:`finstream.sinks.state_store` current, so the API and the
delivery workers can point-query what a compacted topic cannot answer.

Applying is idempotent and version-ordered (a record never replaces a newer
one; a delete leaves a version behind), so at-least-once redelivery, replays
from the start of the topic and the API's own write-through all converge on
the topic's last record per key. A tombstone deletes. A value that does not
decode, or whose key is not the record's id (a producer bug that would make
compaction keep the wrong record), goes to ``dlq`` and the partition moves on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finstream.codec import DecodeError
from finstream.runtime.consumer import BatchConsumer
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.sinks.redis_client import connect
from finstream.sinks.state_store import PreferencesStore, RulesStore

log = get_logger(__name__)


class KeyMismatch(ValueError):
    pass


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    redis = connect(settings)
    rules = RulesStore(redis, settings, ctx.codec)
    prefs = PreferencesStore(redis, settings, ctx.codec)
    dead_letters = await ctx.dead_letters()
    rules_topic = settings.topic("alerts.rules")
    prefs_topic = settings.topic("notify.preferences")

    async def apply(r: Any) -> None:
        key = r.key.decode("utf-8") if r.key else ""
        if r.topic == rules_topic:
            if r.value is None:
                await rules.delete(key)
                return
            record = ctx.codec.decode(r.value, "AlertRule")
            if record["rule_id"] != key:
                raise KeyMismatch(f"key {key!r} is not the rule's id {record['rule_id']!r}")
            await rules.put(r.value)
        else:
            if r.value is None:
                await prefs.delete(key)
                return
            record = ctx.codec.decode(r.value, "UserPreferences")
            if record["user_id"] != key:
                raise KeyMismatch(f"key {key!r} is not the preferences' user {record['user_id']!r}")
            await prefs.put(key, r.value)

    async def handle(records: Sequence[Any]) -> None:
        for r in records:
            try:
                await apply(r)
            except (DecodeError, KeyMismatch, UnicodeDecodeError) as exc:
                await dead_letters.send_message(r, exc)

    consumer = BatchConsumer(
        settings,
        ctx.role,
        [rules_topic, prefs_topic],
        handle,
        publisher=await ctx.publisher(),
        batch_size=500,
        batch_ms=100,
        on_ready=lambda ready: ctx.health.set_ready(ready, "" if ready else "rebalancing"),
    )
    log.info("statestore starting", topics=[rules_topic, prefs_topic])
    try:
        await consumer.run(ctx.stop)
    finally:
        await redis.aclose()
