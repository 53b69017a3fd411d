"""The ``statestore`` role: compacted state topics -> Redis read models.

Consumes ``alerts.rules`` (key: rule id), ``notify.preferences`` (key: user
id) and ``notify.scheduled.items`` (key: user id/item id) and keeps :mod:`finstream.stores.read_models` current, so the API and the
delivery workers can point-query what a compacted topic cannot answer.

Applying is idempotent and version-ordered (a record never replaces a newer
one; a delete leaves a version behind), so at-least-once redelivery, replays
from the start of the topic and the API's own write-through of rules all converge on
the topic's last record per key. A tombstone deletes. A value that does not
decode or validate (the engine's contracts), or whose key is not the record's id (a producer bug that would make
compaction keep the wrong record), goes to ``dlq`` and the partition moves on.

The topics are the source of truth of the read models: when Redis turns out
to have lost them (a partition's repair mark is gone,
:class:`finstream.stores.redis.RepairMarks`), the replica reads that
partition of the three topics again from the beginning, with a reader of its own
that stops at the end it saw when it started, and applies every record with
the same version-ordered writes; then it marks the partition repaired.
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from finstream.codec import Codec, DecodeError
from finstream.domain.notify.scheduled import split_key
from finstream.runtime.engine import StreamEngine
from finstream.runtime.kafka import consumer_config
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.settings import Settings
from finstream.stores.read_models import PreferencesStore, RulesStore, ScheduledStore
from finstream.stores.redis import RepairMarks, connect
from finstream.stores.redis import probe as redis_probe
from finstream.topics import contract

log = get_logger(__name__)


class TopicReader:
    """Partition ``p`` of some topics, from the beginning to the end they had at the start.

    Blocking (librdkafka); the repair calls it from a worker thread.
    """

    def __init__(self, settings: Settings, topics: list[str], partition: int) -> None:
        self._consumer = Consumer({**consumer_config(settings, None), "enable.partition.eof": True})
        self._ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            tp = TopicPartition(topic, partition)
            _low, high = self._consumer.get_watermark_offsets(tp, timeout=10)
            if high > 0:
                self._ends[(topic, partition)] = high
        self._consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for (t, p) in self._ends])

    def batch(self) -> tuple[list[Any], bool]:
        """The next records, and whether every partition has reached its end."""
        if not self._ends:
            return [], True
        records = []
        for m in self._consumer.consume(1000, 0.2):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    where = (str(m.topic()), int(m.partition() or 0))
                    end = self._ends.get(where)
                    if end is not None and int(m.offset() or 0) >= end:
                        del self._ends[where]
                    continue
                raise KafkaException(err)
            records.append(m)
        return records, not self._ends

    def close(self) -> None:
        self._consumer.close()


class StateStoreSink(Processor):
    def __init__(
        self,
        ctx: ServiceContext,
        rules: RulesStore,
        prefs: PreferencesStore,
        scheduled: ScheduledStore,
        marks: RepairMarks | None = None,
    ) -> None:
        self.settings = ctx.settings
        self.codec: Codec = ctx.codec
        self.rules = rules
        self.prefs = prefs
        self.scheduled = scheduled
        self.marks = marks
        self.rules_topic = ctx.settings.topic("alerts.rules")
        self.prefs_topic = ctx.settings.topic("notify.preferences")
        self.scheduled_topic = ctx.settings.topic("notify.scheduled.items")
        self.owned: set[int] = set()

    async def assigned(self, partitions: frozenset[int]) -> None:
        self.owned = set(partitions)

    async def revoked(self, partitions: frozenset[int]) -> None:
        self.owned -= partitions

    async def punctuate(self, out: Output) -> None:
        if self.marks is None or not self.owned:
            return
        try:
            lost = await self.marks.missing(str(p) for p in sorted(self.owned))
            for p in lost:
                applied = await self.repair(int(p))
                await self.marks.mark([p])
                log.warning(
                    "Redis had lost the read models; rebuilt them from the topics",
                    partition=int(p),
                    records=applied,
                )
        except Exception as exc:
            # Tried again at the next punctuation; the live writes go on meanwhile.
            log.warning("read models not repaired yet", error=f"{type(exc).__name__}: {exc}")

    async def repair(self, partition: int) -> int:
        """Apply partition ``partition`` of the three topics again, from the beginning."""
        topics = [
            t
            for t, name in (
                (self.rules_topic, "alerts.rules"),
                (self.prefs_topic, "notify.preferences"),
                (self.scheduled_topic, "notify.scheduled.items"),
            )
            if partition < contract(name, self.settings.namespace).partitions
        ]
        reader = await asyncio.to_thread(TopicReader, self.settings, topics, partition)
        applied = 0
        try:
            done = False
            while not done:
                records, done = await asyncio.to_thread(reader.batch)
                for m in records:
                    applied += await self._reapply(m.topic(), m.key(), m.value())
        finally:
            await asyncio.to_thread(reader.close)
        return applied

    async def _reapply(self, topic: str, raw_key: bytes | None, value: bytes | None) -> int:
        # What process() stored; what it dead-lettered stays out (it is in dlq already).
        if topic == self.scheduled_topic:
            return await self._reapply_scheduled(raw_key, value)
        key = raw_key.decode("utf-8", "replace") if raw_key else ""
        rules = topic == self.rules_topic
        if value is None:
            await (self.rules.delete(key) if rules else self.prefs.delete(key))
            return 1
        try:
            record = self.codec.decode(value, "AlertRule" if rules else "UserPreferences")
        except DecodeError:
            return 0
        if record["rule_id" if rules else "user_id"] != key:
            return 0
        await (self.rules.put(value) if rules else self.prefs.put(key, value))
        return 1

    async def _reapply_scheduled(self, raw_key: bytes | None, value: bytes | None) -> int:
        user, item_id = split_key(raw_key or b"")
        if not user or not item_id:
            return 0
        if value is None:
            await self.scheduled.delete(user, item_id)
            return 1
        try:
            record = self.codec.decode(value, "ScheduledItem")
        except DecodeError:
            return 0
        if (record["user_id"], record["item_id"]) != (user, item_id):
            return 0
        await self.scheduled.put(user, item_id, value)
        return 1

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
            elif ev.topic == self.scheduled_topic:
                await self._scheduled(ev, out)
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

    async def _scheduled(self, ev: Event, out: Output) -> None:
        user, item_id = split_key(ev.key or b"")
        if not user or not item_id:
            out.dead_letter(ev, "key is not USER/ITEM_ID", "InvalidKey")
        elif ev.value is None:
            await self.scheduled.delete(user, item_id)
        elif (ev.item["user_id"], ev.item["item_id"]) != (user, item_id):
            out.dead_letter(ev, f"key {user}/{item_id} is not the item's", "KeyMismatch")
        else:
            await self.scheduled.put(user, item_id, ev.value)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    redis = connect(settings)
    ctx.health.add_dependency("redis", lambda: redis_probe(redis))
    sink = StateStoreSink(
        ctx,
        RulesStore(redis, settings, ctx.codec),
        PreferencesStore(redis, settings, ctx.codec),
        ScheduledStore(redis, settings, ctx.codec),
        RepairMarks(redis, settings, ctx.role),
    )
    engine = StreamEngine(
        settings,
        ctx.role,
        ["alerts.rules", "notify.preferences", "notify.scheduled.items"],
        sink,
        ctx.health,
        guarantee="at_least_once",
        batch_size=500,
        batch_wait=0.05,
        punctuate_every=settings.redis_repair_check_seconds,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await redis.aclose()
