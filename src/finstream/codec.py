"""Avro encoding and decoding of every event on Kafka.

Two framings are understood, chosen by the first bytes of a message:

* **Avro single-object encoding** (the default, from the Avro specification):
  ``C3 01`` + the 8-byte little-endian CRC-64-AVRO fingerprint of the writer's
  schema + the Avro binary body. Any consumer holding the ``.avsc`` files in
  ``schemas/`` can decode it; no registry is needed.
* **Confluent wire format** when a schema registry is configured: ``00`` + the
  4-byte big-endian schema id + the Avro binary body. Subjects use the record
  name strategy (``io.finstream.Tick``), so one subject per event type whatever
  the topic.

The writer's schema is resolved against the current reader schema, so data
written with any earlier schema version in ``schemas/history`` stays readable.
Anything that cannot be decoded raises :class:`DecodeError` and nothing else.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from finstream.codec_writers import compile_writer
from finstream.resources import resource

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
NAMESPACE = "io.finstream"
# Far above any event of ours; stops a hostile length prefix from costing memory.
MAX_MESSAGE_BYTES = 1 << 20


class DecodeError(ValueError):
    """The bytes are not a decodable finstream event of the expected type."""


class EncodeError(ValueError):
    """The record does not fit its schema; a bug in the producer, never input data."""


@dataclass(frozen=True)
class SchemaVersion:
    name: str  # full name, io.finstream.Tick
    version: str  # "current" or "v1", "v2", ...
    raw: dict[str, Any]
    parsed: Any
    canonical: str
    fingerprint: bytes  # 8 bytes, little-endian, as framed

    @functools.cached_property
    def field_names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.raw["fields"])

    @functools.cached_property
    def writer(self) -> Callable[[Mapping[str, Any]], bytes] | None:
        """The compiled writer of this schema (None: fastavro writes every record)."""
        return compile_writer(self.parsed)


def _full_name(name: str) -> str:
    return name if "." in name else f"{NAMESPACE}.{name}"


def _load(path: Path, version: str) -> SchemaVersion:
    raw = json.loads(path.read_text())
    # A fresh named-schema space per file: history versions reuse type names.
    parsed = fastavro.parse_schema(raw, named_schemas={})
    canonical = to_parsing_canonical_form(raw)
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    name = _full_name(
        raw["name"] if "namespace" not in raw else f"{raw['namespace']}.{raw['name']}"
    )
    return SchemaVersion(name, version, raw, parsed, canonical, fp)


class SchemaCatalog:
    """The current schema of each event type plus every earlier version."""

    def __init__(self, root: Path | None = None) -> None:
        root = root or resource("schemas")
        self.current: dict[str, SchemaVersion] = {}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        self.history: dict[str, list[SchemaVersion]] = {}
        # The 10-byte single-object header of every known schema: one lookup per decode.
        self.by_header: dict[bytes, SchemaVersion] = {}
        for path in sorted(root.glob("*.avsc")):
            sv = _load(path, "current")
            self.current[sv.name] = sv
            self.by_fingerprint[sv.fingerprint] = sv
        history_root = root / "history"
        if history_root.is_dir():
            for folder in sorted(p for p in history_root.iterdir() if p.is_dir()):
                for path in sorted(folder.glob("v*.avsc"), key=lambda p: int(p.stem[1:])):
                    sv = _load(path, path.stem)
                    self.history.setdefault(sv.name, []).append(sv)
                    self.by_fingerprint.setdefault(sv.fingerprint, sv)
        self.by_header = {SINGLE_OBJECT_MAGIC + fp: sv for fp, sv in self.by_fingerprint.items()}

    def get(self, name: str) -> SchemaVersion:
        try:
            return self.current[_full_name(name)]
        except KeyError:
            raise KeyError(f"no schema named {name!r} in schemas/") from None


class SchemaRegistryClient:
    """Minimal Confluent Schema Registry REST client with caching.

    Only two calls are needed: register (idempotent on the registry side) and
    fetch by id. Both are cached for the life of the process, so the hot path
    never leaves memory after the first message of each type.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        import httpx

        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self._ids: dict[str, int] = {}
        self._by_id: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def register(self, subject: str, schema: SchemaVersion) -> int:
        with self._lock:
            cached = self._ids.get(schema.canonical)
            if cached is not None:
                return cached
            resp = self._client.post(
                f"/subjects/{subject}/versions",
                json={"schema": json.dumps(schema.raw)},
                headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            )
            resp.raise_for_status()
            schema_id = int(resp.json()["id"])
            self._ids[schema.canonical] = schema_id
            self._by_id[schema_id] = schema.raw
            return schema_id

    def schema(self, schema_id: int) -> dict[str, Any]:
        with self._lock:
            cached = self._by_id.get(schema_id)
            if cached is not None:
                return cached
            resp = self._client.get(f"/schemas/ids/{schema_id}")
            if resp.status_code == 404:
                raise DecodeError(f"schema id {schema_id} is unknown to the registry")
            resp.raise_for_status()
            raw = json.loads(resp.json()["schema"])
            self._by_id[schema_id] = raw
            return raw  # type: ignore[no-any-return]


class Codec:
    """Encodes records (dicts in fastavro's shape) and decodes bytes back."""

    def __init__(
        self,
        catalog: SchemaCatalog | None = None,
        registry: SchemaRegistryClient | None = None,
    ) -> None:
        self.catalog = catalog or SchemaCatalog()
        self.registry = registry
        self._registry_writers: dict[int, SchemaVersion] = {}

    # -- encoding -------------------------------------------------------------
    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        schema = self.catalog.get(name)
        # fastavro ignores unknown keys; a typo in a field name must not vanish.
        unknown = record.keys() - schema.field_names
        if unknown:
            raise EncodeError(f"{schema.name}: unknown fields {sorted(unknown)}")
        if self.registry is not None:
            schema_id = self.registry.register(schema.name, schema)
            header = CONFLUENT_MAGIC + struct.pack(">I", schema_id)
        else:
            header = SINGLE_OBJECT_MAGIC + schema.fingerprint
        writer = schema.writer
        if writer is not None:
            try:
                return header + writer(record)
            except Exception:  # noqa: S110 (a value it does not take: fastavro writes it, or says why not)
                pass
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, schema.parsed, record)
        except Exception as exc:
            raise EncodeError(f"{schema.name}: {type(exc).__name__}: {exc}") from exc
        return buf.getvalue()

    # -- decoding -------------------------------------------------------------
    def decode(self, data: bytes | None, name: str) -> dict[str, Any]:
        """Decode ``data`` as the event type ``name``; raise DecodeError otherwise."""
        reader = self.catalog.get(name)
        if data is None:
            raise DecodeError("message has no value")
        if len(data) > MAX_MESSAGE_BYTES:
            raise DecodeError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        writer, body_start = self._writer_for(data)
        if writer.name != reader.name:
            raise DecodeError(f"expected {reader.name}, got {writer.name}")
        buf = io.BytesIO(data)
        buf.seek(body_start)
        # Schema resolution costs a third of a decode; data written with the
        # current schema (nearly all of it) needs none.
        resolve = None if writer is reader else reader.parsed
        try:
            record = fastavro.schemaless_reader(buf, writer.parsed, resolve)
        except Exception as exc:
            raise DecodeError(f"{reader.name}: corrupt body: {type(exc).__name__}: {exc}") from exc
        if buf.tell() != len(data):
            raise DecodeError(f"{reader.name}: {len(data) - buf.tell()} trailing bytes")
        if not isinstance(record, dict):
            raise DecodeError(f"{reader.name}: body is not a record")
        return record

    def decoder(self, name: str) -> Callable[[bytes | None], dict[str, Any]]:
        """A decode function for ``name``, fast for data written with the current schema.

        The hot path of every consumer: data framed with the current schema's
        single-object header needs no schema resolution nor lookups; anything
        else takes :meth:`decode`, with the same checks and errors.
        """
        reader = self.catalog.get(name)
        header = SINGLE_OBJECT_MAGIC + reader.fingerprint
        parsed = reader.parsed
        read = fastavro.schemaless_reader
        bytes_io = io.BytesIO
        full = self.decode

        def decode(data: bytes | None) -> dict[str, Any]:
            if data is None or data[:10] != header or len(data) > MAX_MESSAGE_BYTES:
                return full(data, name)
            buf = bytes_io(data)
            buf.seek(10)
            try:
                record = read(buf, parsed, None)
            except Exception as exc:
                raise DecodeError(
                    f"{reader.name}: corrupt body: {type(exc).__name__}: {exc}"
                ) from exc
            if buf.tell() != len(data):
                raise DecodeError(f"{reader.name}: {len(data) - buf.tell()} trailing bytes")
            if not isinstance(record, dict):
                raise DecodeError(f"{reader.name}: body is not a record")
            return record

        return decode

    def _writer_for(self, data: bytes) -> tuple[SchemaVersion, int]:
        known = self.catalog.by_header.get(data[:10])
        if known is not None:
            return known, 10
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise DecodeError("truncated single-object header")
            writer = self.catalog.by_fingerprint.get(bytes(data[2:10]))
            if writer is None:
                raise DecodeError(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
            return writer, 10
        if data[:1] == CONFLUENT_MAGIC:
            if len(data) < 5:
                raise DecodeError("truncated Confluent header")
            if self.registry is None:
                raise DecodeError("Confluent-framed message but no schema registry is configured")
            (schema_id,) = struct.unpack(">I", data[1:5])
            return self._registry_writer(schema_id), 5
        raise DecodeError(f"unknown framing (first bytes {bytes(data[:2]).hex() or 'empty'})")

    def _registry_writer(self, schema_id: int) -> SchemaVersion:
        cached = self._registry_writers.get(schema_id)
        if cached is not None:
            return cached
        assert self.registry is not None
        try:
            raw = self.registry.schema(schema_id)
            parsed = fastavro.parse_schema(raw, named_schemas={})
            canonical = to_parsing_canonical_form(raw)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id}: {type(exc).__name__}: {exc}") from exc
        name = _full_name(f"{raw.get('namespace', NAMESPACE)}.{raw['name']}")
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
        sv = SchemaVersion(name, f"registry:{schema_id}", raw, parsed, canonical, fp)
        self._registry_writers[schema_id] = sv
        return sv


@functools.cache
def default_codec() -> Codec:
    """The process-wide codec, configured from settings."""
    from finstream.settings import get_settings

    url = get_settings().schema_registry_url
    return Codec(registry=SchemaRegistryClient(url) if url else None)
