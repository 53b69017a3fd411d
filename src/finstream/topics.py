"""topics.yaml: the topic catalogue, its validation, and applying it to a cluster.

``plan`` is pure: given the catalogue and what the cluster has, it lists the
changes (create, add partitions, set configs) and what it refuses (fewer
partitions, which Kafka cannot do and which would move keyed data). ``apply``
carries a plan out with the Kafka admin API.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from finstream.domain.alerts.rules import AlertRule, validate_rule
from finstream.domain.marketdata.bars import Bar, validate_bar
from finstream.domain.marketdata.ticks import Tick, validate_tick
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.request import Request
from finstream.domain.notify.scheduled import Command
from finstream.domain.partitioning import key_partition
from finstream.resources import resource


class CatalogueError(ValueError):
    """topics.yaml is malformed; the message names the offending entry and field."""


def _config_strings(value: Any) -> Any:
    """Topic configs are strings to the broker; YAML gives numbers for `1` or `0.1`."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return value


def min_insync_replicas(replication_factor: int) -> str:
    """With 3 or more replicas, acks=all writes need 2 in sync (one broker may be
    down, none is lost); with fewer, requiring more than 1 would stop all writes
    when a single broker is down."""
    return "2" if replication_factor >= 3 else "1"


class TopicSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,200}$")
    description: str = ""
    partitions: int = Field(ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1, le=10)
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    retention_ms: int = Field(default=604_800_000, ge=-1)
    key: str
    value_schema: str
    type: str = Field(
        default="record",
        description="What a consumer receives, decoded and validated: a name in CONTRACT_TYPES.",
    )
    config: dict[str, str] = Field(default_factory=dict)

    @field_validator("config", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return _config_strings(value)

    @model_validator(mode="before")
    @classmethod
    def _default_type(cls, data: Any) -> Any:
        # Without a type, a topic's consumers get the Avro record as is (raw: the bytes).
        if isinstance(data, dict) and "type" not in data:
            return {**data, "type": "raw" if data.get("value_schema") == "raw" else "record"}
        return data

    def configs(self, replication_factor: int | None = None) -> dict[str, str]:
        """Every topic config we manage, as the broker names them.

        ``min.insync.replicas`` follows the replication factor in force (an
        override such as production's 3 included) unless the topic sets it.
        """
        rf = replication_factor or self.replication_factor
        return {
            "min.insync.replicas": min_insync_replicas(rf),
            **self.config,
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
        }


class _Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replication_factor: int = Field(default=1, ge=1, le=10)
    config: dict[str, str] = Field(default_factory=dict)

    @field_validator("config", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        return _config_strings(value)


@dataclass(frozen=True)
class Catalogue:
    topics: tuple[TopicSpec, ...]

    def get(self, name: str) -> TopicSpec:
        for t in self.topics:
            if t.name == name:
                return t
        raise KeyError(f"topic {name!r} is not in topics.yaml")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.topics]


def parse_catalogue(text: str, schemas: set[str] | None = None) -> Catalogue:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"topics.yaml is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("topics"), list):
        raise CatalogueError("topics.yaml must be a mapping with a 'topics' list")
    unknown = set(doc) - {"defaults", "topics"}
    if unknown:
        raise CatalogueError(f"topics.yaml: unknown top-level keys {sorted(unknown)}")
    try:
        defaults = _Defaults.model_validate(doc.get("defaults") or {})
    except ValidationError as exc:
        raise CatalogueError(f"topics.yaml defaults: {_first_error(exc)}") from exc
    topics: list[TopicSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(doc["topics"], start=1):
        label = f"entry #{index}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label += f" ({entry['name']})"
        if not isinstance(entry, dict):
            raise CatalogueError(
                f"topics.yaml {label}: must be a mapping, got {type(entry).__name__}"
            )
        merged = {
            "replication_factor": defaults.replication_factor,
            **entry,
            "config": {**defaults.config, **(entry.get("config") or {})},
        }
        try:
            spec = TopicSpec.model_validate(merged)
        except ValidationError as exc:
            raise CatalogueError(f"topics.yaml {label}: {_first_error(exc)}") from exc
        if spec.name in seen:
            raise CatalogueError(f"topics.yaml {label}: topic listed twice")
        if schemas is not None and spec.value_schema != "raw" and spec.value_schema not in schemas:
            raise CatalogueError(
                f"topics.yaml {label}: value_schema {spec.value_schema!r} has no schemas/*.avsc"
            )
        if spec.type not in CONTRACT_TYPES:
            raise CatalogueError(
                f"topics.yaml {label}: type {spec.type!r} is not one of {sorted(CONTRACT_TYPES)}"
            )
        if (spec.type == "raw") != (spec.value_schema == "raw"):
            raise CatalogueError(f"topics.yaml {label}: type raw goes with value_schema raw only")
        seen.add(spec.name)
        topics.append(spec)
    return Catalogue(tuple(topics))


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


@functools.cache
def load_catalogue(path: Path | None = None) -> Catalogue:
    path = path or resource("topics.yaml")
    schemas = {p.stem for p in resource("schemas").glob("*.avsc")}
    return parse_catalogue(path.read_text(), schemas)


# -- contracts: what each topic carries, decoded once at the edge ----------------


@dataclass(frozen=True)
class DecodeContext:
    """What validation needs beyond the bytes: the time, and how far ahead a tick may be."""

    now: datetime
    tick_max_future: timedelta = timedelta(minutes=5)


def _tick(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return validate_tick(Tick.from_record(record), ctx.now, ctx.tick_max_future)


def _bar(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return validate_bar(Bar.from_record(record))


def _rule(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return validate_rule(AlertRule.from_record(record))


def _request(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return Request.from_record(record)


def _preferences(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return Preferences.from_record(record)


def _command(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return Command.from_record(record)


def _record(record: dict[str, Any], ctx: DecodeContext) -> Any:
    return record


# A topic's ``type``: how its decoded Avro record becomes what consumers get.
# Each converter validates; a ValueError (DecodeError, TickValidationError,
# InvalidRequest, ...) makes the message a dead letter with that reason.
CONTRACT_TYPES: dict[str, Any] = {
    "Tick": _tick,
    "Bar": _bar,
    "AlertRule": _rule,
    "Request": _request,
    "Preferences": _preferences,
    "ScheduleCommand": _command,
    "record": _record,
    "raw": None,
}


class Contract:
    """One catalogue topic as its producers and consumers see it.

    ``name`` is the namespaced topic name; ``decode`` turns a value into the
    validated domain object of the topic's ``type`` (raising ValueError, with
    the reason, for anything else); ``decode_record`` gives the Avro record
    as written, unconverted and unvalidated (for display, and for stores
    that keep a topic's values); ``encode`` frames a record with the topic's
    schema; ``partition`` places a key as Kafka's default partitioner does.
    """

    def __init__(self, spec: TopicSpec, name: str, codec: Any) -> None:
        self.spec = spec
        self.name = name
        self.codec = codec
        convert = CONTRACT_TYPES[spec.type]
        if convert is None:
            self.decode: Callable[[bytes | None, DecodeContext], Any] = _raw
            self.decode_record: Callable[[bytes | None], dict[str, Any]] = _no_record(name)
        else:
            read = codec.decoder(spec.value_schema)
            self.decode_record = read

            def decode(value: bytes | None, ctx: DecodeContext) -> Any:
                return convert(read(value), ctx)

            self.decode = decode

    @property
    def schema(self) -> str:
        return self.spec.value_schema

    @property
    def partitions(self) -> int:
        return self.spec.partitions

    def encode(self, record: Mapping[str, Any]) -> bytes:
        return bytes(self.codec.encode(self.spec.value_schema, record))

    def partition(self, key: bytes) -> int:
        return key_partition(key, self.spec.partitions)


def _raw(value: bytes | None, ctx: DecodeContext) -> Any:
    return value


def _no_record(name: str) -> Callable[[bytes | None], dict[str, Any]]:
    def decode_record(value: bytes | None) -> dict[str, Any]:
        raise ValueError(f"{name} carries raw bytes, not Avro records")

    return decode_record


def contract(name: str, namespace: str = "", codec: Any = None) -> Contract:
    """The contract of catalogue topic ``name`` (un-namespaced), named within ``namespace``."""
    if codec is None:
        from finstream.codec import default_codec

        codec = default_codec()
    return Contract(load_catalogue().get(name), f"{namespace}{name}", codec)


# -- planning ------------------------------------------------------------------


@dataclass(frozen=True)
class ExistingTopic:
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Change:
    kind: Literal["create", "partitions", "config", "refuse", "warn"]
    topic: str
    detail: str
    spec: TopicSpec | None = None
    partitions: int | None = None
    configs: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        sign = {"create": "+", "partitions": "~", "config": "~", "refuse": "!", "warn": "?"}[
            self.kind
        ]
        return f"{sign} {self.topic}: {self.detail}"


def plan(
    catalogue: Catalogue,
    existing: Mapping[str, ExistingTopic],
    namespace: str = "",
    replication_factor: int | None = None,
) -> list[Change]:
    changes: list[Change] = []
    for spec in catalogue.topics:
        name = f"{namespace}{spec.name}"
        rf = replication_factor or spec.replication_factor
        have = existing.get(name)
        wanted = spec.configs(rf)
        if have is None:
            changes.append(
                Change(
                    "create",
                    name,
                    f"create with {spec.partitions} partitions, replication {rf}, "
                    + ", ".join(f"{k}={v}" for k, v in sorted(wanted.items())),
                    spec=spec,
                    partitions=spec.partitions,
                    configs=wanted,
                )
            )
            continue
        if spec.partitions < have.partitions:
            changes.append(
                Change(
                    "refuse",
                    name,
                    f"topics.yaml asks for {spec.partitions} partitions but the topic has "
                    f"{have.partitions}; Kafka cannot remove partitions (recreate the topic "
                    "or raise the number in topics.yaml)",
                )
            )
        elif spec.partitions > have.partitions:
            changes.append(
                Change(
                    "partitions",
                    name,
                    f"partitions {have.partitions} -> {spec.partitions}",
                    partitions=spec.partitions,
                )
            )
        if rf != have.replication_factor:
            changes.append(
                Change(
                    "warn",
                    name,
                    f"replication factor is {have.replication_factor}, topics.yaml says {rf}; "
                    "changing it needs a partition reassignment (kafka-reassign-partitions)",
                )
            )
        differing = {k: v for k, v in wanted.items() if have.configs.get(k) != v}
        if differing:
            detail = ", ".join(
                f"{k}: {have.configs.get(k, '(default)')} -> {v}"
                for k, v in sorted(differing.items())
            )
            changes.append(Change("config", name, detail, configs=differing))
    return changes


# -- applying ------------------------------------------------------------------


def _admin(client: str | Mapping[str, Any]) -> Any:
    """An admin client for a bootstrap address, or for a whole client configuration
    (``finstream.runtime.kafka.client_config``: security settings included)."""
    from confluent_kafka.admin import AdminClient

    config = {"bootstrap.servers": client} if isinstance(client, str) else dict(client)
    # Quiet: the caller reports a failure in one line (librdkafka would repeat it per retry).
    return AdminClient({**config, "socket.timeout.ms": 10_000, "log_level": 0})


def describe(
    client: str | Mapping[str, Any], names: list[str], timeout: float = 15.0
) -> dict[str, ExistingTopic]:
    from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

    admin = _admin(client)
    metadata = admin.list_topics(timeout=timeout)
    present = [n for n in names if n in metadata.topics and metadata.topics[n].error is None]
    result: dict[str, ExistingTopic] = {}
    if not present:
        return result
    resources = [ConfigResource(ResourceType.TOPIC, n) for n in present]
    futures = admin.describe_configs(resources, request_timeout=timeout)
    for res, fut in futures.items():
        entries = fut.result(timeout=timeout)
        topic_md = metadata.topics[res.name]
        partitions = topic_md.partitions
        rf = len(next(iter(partitions.values())).replicas) if partitions else 0
        result[res.name] = ExistingTopic(
            partitions=len(partitions),
            replication_factor=rf,
            configs={k: v.value for k, v in entries.items() if v.value is not None},
        )
    return result


def apply(
    client: str | Mapping[str, Any],
    changes: list[Change],
    replication_factor: int | None = None,
    timeout: float = 30.0,
) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        NewPartitions,
        NewTopic,
        ResourceType,
    )

    admin = _admin(client)
    creates = [
        NewTopic(
            c.topic,
            num_partitions=c.partitions or 1,
            replication_factor=replication_factor or (c.spec.replication_factor if c.spec else 1),
            config=c.configs,
        )
        for c in changes
        if c.kind == "create"
    ]
    grows = [NewPartitions(c.topic, c.partitions or 1) for c in changes if c.kind == "partitions"]
    alters = [
        ConfigResource(
            ResourceType.TOPIC,
            c.topic,
            incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                for k, v in c.configs.items()
            ],
        )
        for c in changes
        if c.kind == "config"
    ]
    try:
        if creates:
            for name, fut in admin.create_topics(creates, request_timeout=timeout).items():
                try:
                    fut.result(timeout=timeout)
                except KafkaException as exc:
                    # Another applier created it in the meantime: the goal is met.
                    if "TOPIC_ALREADY_EXISTS" not in str(exc):
                        raise RuntimeError(f"creating {name}: {exc}") from exc
        if grows:
            for name, fut in admin.create_partitions(grows, request_timeout=timeout).items():
                try:
                    fut.result(timeout=timeout)
                except KafkaException as exc:
                    raise RuntimeError(f"adding partitions to {name}: {exc}") from exc
        if alters:
            for res, fut in admin.incremental_alter_configs(
                alters, request_timeout=timeout
            ).items():
                try:
                    fut.result(timeout=timeout)
                except KafkaException as exc:
                    raise RuntimeError(f"updating configs of {res.name}: {exc}") from exc
    except KafkaException as exc:
        raise RuntimeError(str(exc)) from exc
