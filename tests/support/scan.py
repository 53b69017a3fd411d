"""Where finstream keeps data, read back whole: every PostgreSQL table, every Redis key and
every topic of a test environment, decoded with finstream's own decoders.

What a privacy officer would do to check an erasure: look everywhere, in every
form the data takes, for a user's contact points and message text. Each record
is rendered as its raw bytes and, where finstream can decode it, as the
decoded record (Avro by the catalogue's schema, a dead letter by its source
topic's schema, the router's changelogs by their store's format), so that a
search for a string finds it in clear whatever the encoding.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from finstream.codec import Codec, DecodeError
from finstream.domain.deadletter import H_SOURCE_TOPIC
from finstream.domain.envelope import CONTACT_FIELDS, is_sealed
from finstream.topics import load_catalogue
from tests.support.services import TestEnv


@dataclass(frozen=True)
class Found:
    where: str  # "postgres:deliveries", "redis:<key>", "kafka:<topic>"
    text: str  # the rendering searched


def _render(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


# -- PostgreSQL ---------------------------------------------------------------------------


async def _postgres(env: TestEnv) -> list[Found]:
    conn = await asyncpg.connect(env.settings.database_url.get_secret_value())
    try:
        tables = await conn.fetch(
            """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"""
        )
        out = []
        for t in tables:
            for row in await conn.fetch(f'SELECT * FROM "{t["relname"]}"'):
                values = {
                    k: (
                        bytes(v).decode("utf-8", "replace")
                        if isinstance(v, bytes | memoryview)
                        else v
                    )
                    for k, v in dict(row).items()
                }
                raw = {k: v for k, v in dict(row).items() if isinstance(v, bytes | memoryview)}
                text = _render(values)
                for k, v in raw.items():
                    text += _decoded_blob(bytes(v), t["relname"], k)
                out.append(Found(f"postgres:{t['relname']}", text))
        return out
    finally:
        await conn.close()


def _decoded_blob(blob: bytes, table: str, column: str) -> str:
    """A bytea column holding an Avro record (deliveries.message, the outbox's values)."""
    codec = Codec()
    for schema in (
        "OutboundMessage",
        "UserPreferences",
        "DeliveryResult",
        "AuditEvent",
        "NotificationRequest",
        "AlertRule",
    ):
        try:
            return _render(codec.decode(blob, schema))
        except DecodeError:
            continue
    return ""


# -- Redis ---------------------------------------------------------------------------------


async def _redis(env: TestEnv) -> list[Found]:
    r = aioredis.from_url(env.settings.redis_url.get_secret_value())
    out = []
    try:
        async for key in r.scan_iter(match=f"{env.namespace}*", count=1000):
            kind = (await r.type(key)).decode()
            value: Any
            if kind == "string":
                value = await r.get(key)
            elif kind == "hash":
                value = await r.hgetall(key)
            elif kind == "set":
                value = await r.smembers(key)
            elif kind == "zset":
                value = await r.zrange(key, 0, -1)
            elif kind == "list":
                value = await r.lrange(key, 0, -1)
            elif kind == "stream":
                value = await r.xrange(key)
            else:
                value = None
            text = key.decode("utf-8", "replace") + " " + _render(_texts(value))
            text += "".join(_decoded_blob(b, "redis", "") for b in _blobs(value))
            out.append(Found(f"redis:{key.decode()}", text))
    finally:
        await r.aclose()
    return out


def _texts(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_texts(k): _texts(v) for k, v in value.items()}
    if isinstance(value, list | set | tuple):
        return [_texts(v) for v in value]
    return value


def _blobs(value: Any) -> Iterator[bytes]:
    if isinstance(value, bytes):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _blobs(v)
    elif isinstance(value, list | set | tuple):
        for v in value:
            yield from _blobs(v)


# -- Kafka ---------------------------------------------------------------------------------


def topics_of(env: TestEnv) -> list[str]:
    admin = AdminClient({"bootstrap.servers": env.settings.kafka_bootstrap, "log_level": 3})
    return sorted(t for t in admin.list_topics(timeout=10).topics if t.startswith(env.namespace))


def _records(env: TestEnv, topic: str, within: float = 180.0) -> list[Any]:
    """Every record of a topic, aborted transactions included (read_uncommitted).

    Read to the end of every partition (librdkafka says when it is there); a scan that
    cannot get there fails rather than pass on part of a topic."""
    c = Consumer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "group.id": f"scan-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )
    try:
        parts = list(c.list_topics(topic, timeout=30).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        done: set[int] = set()
        deadline = time.monotonic() + within
        while len(done) < len(parts):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"could not read {topic} to its end: {sorted(done)} of {parts}"
                )
            msg = c.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
                continue
            done.discard(msg.partition())
            out.append(msg)
        return out
    finally:
        c.close()


def decode(
    env: TestEnv,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]],
) -> Any:
    """A record as finstream reads it (None when it is not one finstream can decode)."""
    if value is None:
        return None
    codec = Codec()
    name = topic.removeprefix(env.namespace)
    catalogue = {t.name: t for t in load_catalogue().topics}
    try:
        if name in catalogue:
            spec = catalogue[name]
            if spec.value_schema != "raw":
                return codec.decode(value, spec.value_schema)
            source = dict(headers).get(H_SOURCE_TOPIC, b"").decode()
            inner = catalogue.get(source.removeprefix(env.namespace))
            if inner is not None and inner.value_schema != "raw":
                return codec.decode(value, inner.value_schema)
            return None
        if name.endswith("-prefs-changelog"):
            return codec.decode(value, "UserPreferences")
        if name.endswith("-holds-changelog"):
            holds = json.loads(value)
            for hold in holds.get("requests", {}).values():
                hold["request"] = codec.decode(
                    base64.b64decode(hold["request"]), "NotificationRequest"
                )
            return holds
        if name.endswith("-changelog"):
            return json.loads(value)
    except (DecodeError, ValueError):
        return None
    return None


async def _kafka(env: TestEnv) -> list[Found]:
    out = []
    for topic in topics_of(env):
        for m in await asyncio.to_thread(_records, env, topic):
            headers = [(k, bytes(v or b"")) for k, v in (m.headers() or [])]
            decoded = decode(env, topic, m.key(), m.value(), headers)
            text = " ".join(
                [
                    (m.key() or b"").decode("utf-8", "replace"),
                    (m.value() or b"").decode("utf-8", "replace"),
                    _render({k: v.decode("utf-8", "replace") for k, v in headers}),
                    _render(decoded),
                ]
            )
            out.append(Found(f"kafka:{topic}", text))
    return out


async def everything(env: TestEnv) -> list[Found]:
    return [*(await _postgres(env)), *(await _redis(env)), *(await _kafka(env))]


def containing(found: list[Found], needles: list[str]) -> list[tuple[str, str]]:
    """(where, needle) for every place a needle appears in clear."""
    hits = []
    for f in found:
        lowered = f.text.lower()
        for n in needles:
            if n.lower() in lowered:
                hits.append((f.where, n))
    return sorted(set(hits))


# -- the user's sealed tokens on topics -----------------------------------------------------


def tokens_of(env: TestEnv, user: str) -> list[tuple[str, str]]:
    """(topic, token) of every sealed value of ``user`` on the environment's topics."""
    out = []
    for topic in topics_of(env):
        for m in _records(env, topic):
            headers = [(k, bytes(v or b"")) for k, v in (m.headers() or [])]
            record = decode(env, topic, m.key(), m.value(), headers)
            for token in _tokens(record, user):
                out.append((topic, token))
            if topic.endswith("-holds-changelog") and m.key() == user.encode() and record:
                for digest in record.get("digests", {}).values():
                    for item in digest.get("items", []):
                        if is_sealed(item.get("sealed")):
                            out.append((topic, str(item["sealed"])))
    return out


def _tokens(record: Any, user: str) -> Iterator[str]:
    if not isinstance(record, dict):
        return
    if record.get("user_id") == user:
        if is_sealed(record.get("sealed")):
            yield str(record["sealed"])
        for v in (record.get("data") or {}).values():
            if is_sealed(v):
                yield str(v)
        for field, name in CONTACT_FIELDS:
            for item in record.get(field) or ():
                if is_sealed(item.get(name)):
                    yield str(item[name])
    for hold in (record.get("requests") or {}).values() if "requests" in record else ():
        yield from _tokens(hold.get("request"), user)
