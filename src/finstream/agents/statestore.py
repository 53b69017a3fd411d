"""The ``statestore`` role: compacted state topics -> Redis read models.

Consumes ``alerts.rules`` (key: rule id) and ``notify.preferences`` (key: user
id) and keeps :mod:`finstream.stores.read_models` current, so the API and the
delivery workers can point-query what a compacted topic cannot answer.

Applying is idempotent and version-ordered (a record never replaces a newer
one; a delete leaves a version behind), so at-least-once redelivery, replays
from the start of the topic and the API's own write-through all converge on
the topic's last record per key. A tombstone deletes. A value that does not
decode or validate (the engine's contracts), or whose key is not the record's id (a producer bug that would make
compaction keep the wrong record), goes to ``dlq`` and the partition moves on.
"""

from __future__ import annotations

from finstream.runtime.engine import Event, Output, Processor, StreamEngine
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.stores.read_models import PreferencesStore, RulesStore
from finstream.stores.redis import connect

log = get_logger(__name__)


class StateStoreSink(Processor):
    def __init__(self, ctx: ServiceContext, rules: RulesStore, prefs: PreferencesStore) -> None:
        self.rules = rules
        self.prefs = prefs
        self.rules_topic = ctx.settings.topic("alerts.rules")

    async def process(self, events: list[Event], out: Output) -> None:
        for ev in events:
            key = ev.key.decode("utf-8", "replace") if ev.key else ""
            if ev.topic == self.rules_topic:
                if ev.value is None:
                    await self.rules.delete(key)
                elif ev.item.rule_id != key:
                    out.dead_letter(
                        ev, f"key {key!r} is not the rule's id {ev.item.rule_id!r}", "KeyMismatch"
                    )
                else:
                    await self.rules.put(ev.value)
            elif ev.value is None:
                await self.prefs.delete(key)
            elif ev.item.user_id != key:
                out.dead_letter(
                    ev,
                    f"key {key!r} is not the preferences' user {ev.item.user_id!r}",
                    "KeyMismatch",
                )
            else:
                await self.prefs.put(key, ev.value)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    redis = connect(settings)
    sink = StateStoreSink(
        ctx, RulesStore(redis, settings, ctx.codec), PreferencesStore(redis, settings, ctx.codec)
    )
    engine = StreamEngine(
        settings,
        ctx.role,
        ["alerts.rules", "notify.preferences"],
        sink,
        ctx.health,
        guarantee="at_least_once",
        batch_size=500,
        batch_wait=0.05,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await redis.aclose()
