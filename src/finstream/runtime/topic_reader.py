"""Reading a topic from outside any consumer group: to its end, or over a time range.

The CLI (``alerts list``, ``dlq``, ``topics tail`` and ``topics replay``),
the back-test and ``finstream run``'s progress line read topics this way,
with partitions assigned directly (no group membership, nothing committed).

Reads are bounded: the end of every partition is fixed when reading starts
(its high watermark, or the offset of ``end`` by Kafka's time index), so a
busy topic does not keep a reader going forever. The end of a partition is
also recognized by librdkafka's end-of-partition event, which is what ends
a read_committed read of a transactional topic, whose last offsets are
commit markers rather than records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from finstream.runtime.kafka import check_access, client_config
from finstream.settings import Settings

Isolation = Literal["read_committed", "read_uncommitted"]


class TopicReadError(RuntimeError):
    """The topic cannot be read as asked; the message says why."""


class TopicMissing(TopicReadError):
    """The topic does not exist."""


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def _headers(headers: Any) -> tuple[tuple[str, bytes], ...]:
    pairs = headers.items() if isinstance(headers, dict) else (headers or [])
    return tuple((str(k), v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs)


def _consumer(settings: Settings, group: str, isolation: Isolation) -> Consumer:
    return Consumer(
        {
            **client_config(settings),
            # A reader prints to the terminal: librdkafka's errors only.
            "log_level": 3,
            # Partitions are assigned, never subscribed: the group only names the client.
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
        }
    )


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def _partitions(consumer: Consumer, settings: Settings, topic: str) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    except KafkaException as exc:
        # Refused credentials or certificates fail alike on every retry: say so in one line.
        raise TopicReadError(
            check_access(settings, timeout=5)
            or f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}"
        ) from None
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise TopicMissing(f"topic {topic} does not exist")
    return sorted(metadata.partitions)


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition's high watermark: how many records were ever written to it."""
    consumer = _consumer(settings, "finstream-topic-reader", "read_uncommitted")
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in _partitions(consumer, settings, topic)
        }
    finally:
        consumer.close()


def read_to_end(
    settings: Settings,
    topic: str,
    *,
    isolation: Isolation = "read_uncommitted",
    group: str = "finstream-topic-reader",
    idle_timeout: float | None = None,
) -> Iterator[Record]:
    """Every record of every partition, from the oldest kept to the end when reading starts."""
    return read_range(
        settings, topic, None, None, isolation=isolation, group=group, idle_timeout=idle_timeout
    )


def read_range(
    settings: Settings,
    topic: str,
    start: datetime | None,
    end: datetime | None,
    *,
    tail: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    isolation: Isolation = "read_uncommitted",
    group: str = "finstream-topic-reader",
    idle_timeout: float | None = None,
) -> Iterator[Record]:
    """Records of every partition with start <= timestamp < end (or the last ``tail`` per partition).

    Partitions are read side by side, each in offset order. ``on_progress``
    gets (records read, records in the range); ``idle_timeout`` ends the
    read with :class:`TopicReadError` when the broker sends nothing for
    that many seconds.
    """
    consumer = _consumer(settings, group, isolation)
    try:
        partitions = _partitions(consumer, settings, topic)
        highs = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in partitions
        }
        if tail is not None:
            starts = {p: max(low, high - tail) for p, (low, high) in highs.items()}
        elif start is not None:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, _ms(start)) for p in partitions], timeout=10
            )
            starts = {
                tp.partition: (tp.offset if tp.offset >= 0 else highs[tp.partition][1])
                for tp in found
            }
        else:
            starts = {p: low for p, (low, _high) in highs.items()}
        if end is not None:
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, _ms(end)) for p in partitions], timeout=10
            )
            stops = {
                tp.partition: (tp.offset if tp.offset >= 0 else highs[tp.partition][1])
                for tp in found
            }
        else:
            stops = {p: high for p, (_low, high) in highs.items()}
        todo = {p for p in partitions if starts[p] < stops[p]}
        total = sum(max(stops[p] - starts[p], 0) for p in partitions)
        if not todo:
            return
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in sorted(todo)])
        done = 0
        heard = time.monotonic()
        while todo:
            msg = consumer.poll(1.0)
            if msg is None:
                if idle_timeout is not None and time.monotonic() - heard > idle_timeout:
                    raise TopicReadError(f"timed out reading {topic}")
                continue
            heard = time.monotonic()
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                    continue
                raise TopicReadError(f"reading {topic}: {error}")
            p = msg.partition()
            offset = msg.offset()
            if p is None or offset is None or p not in todo:
                continue
            if offset >= stops[p]:
                todo.discard(p)
                consumer.pause([TopicPartition(topic, p)])
                continue
            kind, ts = msg.timestamp()
            yield Record(
                topic=topic,
                partition=p,
                offset=offset,
                timestamp=datetime.fromtimestamp(ts / 1000, UTC) if kind and ts >= 0 else None,
                key=msg.key(),
                value=msg.value(),
                headers=_headers(msg.headers()),
            )
            done += 1
            if on_progress is not None:
                on_progress(done, total)
            if offset + 1 >= stops[p]:
                todo.discard(p)
    finally:
        consumer.close()
