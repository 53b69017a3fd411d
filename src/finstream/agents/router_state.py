"""The router's per-user state: in memory per partition, durable in compacted changelogs.

Each store (preferences, routing state, holds) keeps, for every partition this
replica owns, a map user id -> bytes, and writes each change to its changelog
topic (``<group>-<store>-changelog``, compacted, one partition per input
partition) in the partition of the user's input records. When the consumer
group gives this replica a partition, :func:`restore` reads that partition of
every changelog from its beginning to its end before any record of the
partition is routed; when it takes a partition away, the maps of that
partition are dropped.

This is what a faust table does; the router does it itself because
faust-streaming's consumer skipped records around table recovery in our
SIGKILL-and-restart test (offsets delivered after 127 jumped to 193 on every
partition at once, within one generation), which loses notifications. See
:mod:`finstream.agents.router`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives a key."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


class ChangelogStore:
    def __init__(self, name: str, topic: str, partitions: int) -> None:
        self.name = name
        self.topic = topic
        self.partitions = partitions
        self._data: dict[int, dict[bytes, bytes]] = {}

    def partition(self, key: bytes) -> int:
        return key_partition(key, self.partitions)

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(self.partition(key), {}).get(key)

    def put(self, key: bytes, value: bytes | None) -> int:
        """Change the in-memory value; returns the changelog partition to write to."""
        p = self.partition(key)
        if value is None:
            self._data.get(p, {}).pop(key, None)
        else:
            self._data.setdefault(p, {})[key] = value
        return p

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for data in self._data.values():
            yield from data.items()

    def __len__(self) -> int:
        return sum(len(d) for d in self._data.values())

    @property
    def loaded(self) -> set[int]:
        return set(self._data)

    def drop(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self._data.pop(p, None)

    def load(self, partition: int, key: bytes, value: bytes | None) -> None:
        data = self._data.setdefault(partition, {})
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value


async def ensure_changelogs(settings: Settings, stores: Sequence[ChangelogStore]) -> None:
    """Create the compacted changelog topics that do not exist yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                s.topic,
                num_partitions=s.partitions,
                replication_factor=settings.internal_topic_replication,
                topic_configs={"cleanup.policy": "compact", "min.compaction.lag.ms": "60000"},
            )
            for s in stores
            if s.topic not in existing
        ]
        if wanted:
            try:
                response = await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                return  # another replica was quicker
            for error in getattr(response, "topic_errors", ()):
                name, code = error[0], error[1]
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"cannot create changelog topic {name}: error code {code}")
            log.info("changelog topics created", topics=[t.name for t in wanted])
    finally:
        await admin.close()


async def restore(
    settings: Settings, stores: Sequence[ChangelogStore], partitions: Iterable[int]
) -> int:
    """Load the given partitions of every store from its changelog; returns records read."""
    wanted = sorted(set(partitions))
    if not wanted:
        return 0
    for s in stores:
        s.drop(wanted)
        for p in wanted:
            s._data.setdefault(p, {})
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    by_topic = {s.topic: s for s in stores}
    read = 0
    try:
        tps = [TopicPartition(s.topic, p) for s in stores for p in wanted]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                store = by_topic[tp.topic]
                for r in records:
                    if r.offset < ends[tp] and r.key is not None:
                        store.load(tp.partition, r.key, r.value)
                        read += 1
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return read
