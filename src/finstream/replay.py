"""Reading topics over a time range: `finstream topics tail` and `topics replay`.

Analysts replay a topic between two times into a JSON-lines file (values
decoded with the catalogue's schema) or into a sandbox topic (bytes, keys,
headers and partitions kept, so a sandboxed worker sees what production saw).
A replay never writes into a catalogue topic: replaying into production data
would duplicate it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import IO, Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from finstream.codec import DecodeError
from finstream.settings import Settings
from finstream.topics import Contract, contract, load_catalogue


class ReplayError(RuntimeError):
    """A replay cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def to_jsonable(value: Any) -> Any:
    """Avro records as JSON: decimals and times as text (no precision lost), bytes as base64."""
    if isinstance(value, Decimal):
        return f"{value.normalize():f}" if value.is_finite() else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def render(record: Record, source: Contract | None) -> dict[str, Any]:
    """One record as a JSON-ready dict; an undecodable value is shown, not hidden.

    ``source`` is the contract of the record's catalogue topic (None for
    another topic: the value is shown as base64).
    """
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp.isoformat() if record.timestamp else None,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
    }
    if record.value is None:
        out["value"] = None
    elif source is None or source.spec.type == "raw":
        out["value_base64"] = base64.b64encode(record.value).decode()
    else:
        try:
            out["value"] = to_jsonable(source.decode_record(record.value))
        except DecodeError as exc:
            out["decode_error"] = str(exc)
            out["value_base64"] = base64.b64encode(record.value).decode()
    if record.headers:
        out["headers"] = {k: v.decode("utf-8", "replace") for k, v in record.headers}
    return out


def source_contract(settings: Settings, topic: str) -> Contract | None:
    """The contract of a namespaced catalogue topic; None for any other topic."""
    name = topic.removeprefix(settings.namespace)
    try:
        return contract(name, settings.namespace)
    except KeyError:
        return None


def _headers(headers: Any) -> tuple[tuple[str, bytes], ...]:
    pairs = headers.items() if isinstance(headers, dict) else (headers or [])
    return tuple((k, v.encode() if isinstance(v, str) else (v or b"")) for k, v in pairs)


def _consumer(settings: Settings) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "finstream-replay",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def read_range(
    settings: Settings,
    topic: str,
    start: datetime | None,
    end: datetime | None,
    *,
    tail: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[Record]:
    """Records of every partition with start <= timestamp < end (or the last ``tail`` per partition).

    Bounded: the end offsets are fixed when reading starts, so a busy topic
    does not keep a replay running forever.
    """
    consumer = _consumer(settings)
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise ReplayError(f"topic {topic} does not exist")
        partitions = sorted(metadata.partitions)
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
        while todo:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                    continue
                raise ReplayError(f"reading {topic}: {error}")
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


def write_jsonl(records: Iterator[Record], out: IO[str], source: Contract | None) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(render(record, source), ensure_ascii=False) + "\n")
        count += 1
    return count


def ensure_sandbox(settings: Settings, source: str, target: str) -> None:
    """Create the sandbox topic like the source (partitions) unless it exists; refuse catalogue topics."""
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    if target.removeprefix(settings.namespace) in load_catalogue().names:
        raise ReplayError(f"{target} is a catalogue topic; replay only into a sandbox topic")
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
    topics = admin.list_topics(timeout=10).topics
    if target in topics:
        return
    partitions = len(topics[source].partitions)
    # Replayed records keep their original timestamps; under time-based retention
    # the broker would delete old ones at its next check. A sandbox is kept until
    # an operator deletes it.
    sandbox = NewTopic(
        target, num_partitions=partitions, replication_factor=1, config={"retention.ms": "-1"}
    )
    futures = admin.create_topics([sandbox])
    for fut in futures.values():
        fut.result(timeout=30)


def copy_to_topic(settings: Settings, records: Iterator[Record], target: str) -> int:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
            "log_level": 3,
        }
    )
    count = 0
    for record in records:
        while True:
            try:
                # Same partition as the source: per-key order and co-partitioning hold.
                producer.produce(
                    target,
                    key=record.key,
                    value=record.value,
                    partition=record.partition,
                    headers=list(record.headers) or None,
                    timestamp=_ms(record.timestamp) if record.timestamp else 0,
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        count += 1
    if producer.flush(60) != 0:
        raise ReplayError("some replayed records were not acknowledged by Kafka")
    return count
