"""Replaying topics: `finstream topics tail` and `topics replay` (reading: runtime.topic_reader).

Analysts replay a topic between two times into a JSON-lines file (values
decoded with the catalogue's schema) or into a sandbox topic (bytes, keys,
headers and partitions kept, so a sandboxed worker sees what production saw).
A replay never writes into a catalogue topic: replaying into production data
would duplicate it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import IO, Any

from confluent_kafka import Producer

from finstream.codec import DecodeError
from finstream.runtime.kafka import client_config, producer_config
from finstream.runtime.topic_reader import Record, TopicReadError
from finstream.settings import Settings
from finstream.topics import Contract, contract, load_catalogue

GROUP = "finstream-replay"  # names the reading client; nothing is committed


class ReplayError(TopicReadError):
    """A replay cannot run as asked; the message says why."""


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


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


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
    admin = AdminClient({**client_config(settings), "log_level": 3})
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
    producer = Producer({**producer_config(settings), "log_level": 3})
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
