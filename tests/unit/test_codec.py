"""The Avro contract: round trips, backward compatibility, framing, fuzzing."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finstream.codec import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MAGIC,
    Codec,
    DecodeError,
    EncodeError,
    SchemaCatalog,
    SchemaRegistryClient,
)
from finstream.resources import resource
from tests.support.avro_strategies import strategy

CATALOG = SchemaCatalog()
CODEC = Codec(CATALOG)
NAMES = sorted(CATALOG.current)
EXPECTED = {
    "Tick",
    "Bar",
    "AlertRule",
    "AlertFired",
    "NotificationRequest",
    "UserPreferences",
    "OutboundMessage",
    "DeliveryResult",
    "AuditEvent",
}


def test_every_contract_type_has_a_schema() -> None:
    assert {n.rsplit(".", 1)[1] for n in NAMES} >= EXPECTED


def test_every_schema_has_its_history() -> None:
    for name in NAMES:
        assert CATALOG.history.get(name), f"{name} has no schemas/history/<name>/v1.avsc"


def test_prices_are_decimals_never_floats() -> None:
    """No price or amount in the contract is a binary float."""
    money = {
        "price",
        "open",
        "high",
        "low",
        "close",
        "bid",
        "ask",
        "vwap",
        "value",
        "lower",
        "upper",
        "prev_close",
        "size",
        "volume",
        "percent",
        "multiplier",
    }
    for sv in CATALOG.current.values():
        for field in _fields(sv.raw):
            if field["name"] in money:
                kinds = json.dumps(field["type"])
                assert '"double"' not in kinds, (sv.name, field["name"])
                assert '"float"' not in kinds, (sv.name, field["name"])


def _fields(schema: Any) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        for f in schema.get("fields", []):
            yield f
            yield from _fields(f["type"])
        if "items" in schema:
            yield from _fields(schema["items"])
        if "values" in schema:
            yield from _fields(schema["values"])
    elif isinstance(schema, list):
        for s in schema:
            yield from _fields(s)


def test_single_object_fingerprint_matches_the_avro_spec_vector() -> None:
    # CRC-64-AVRO of the schema "null" is 0x63dd24e7cc258f8a (Avro's test vectors),
    # written little-endian in the single-object header.
    from fastavro.schema import fingerprint

    assert bytes.fromhex(fingerprint('"null"', "CRC-64-AVRO")) == struct.pack(
        "<Q", 0x63DD24E7CC258F8A
    )


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_round_trip(name: str, data: st.DataObject) -> None:
    record = data.draw(strategy(CATALOG.get(name).raw))
    encoded = CODEC.encode(name, record)
    assert encoded[:2] == SINGLE_OBJECT_MAGIC
    assert encoded[2:10] == CATALOG.get(name).fingerprint
    assert CODEC.decode(encoded, name) == record
    assert CODEC.decoder(name)(encoded) == record


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=200), name=st.sampled_from(NAMES))
def test_the_fast_decoder_fails_exactly_where_decode_does(tail: bytes, name: str) -> None:
    data = SINGLE_OBJECT_MAGIC + CATALOG.get(name).fingerprint + tail
    try:
        expected: object = CODEC.decode(data, name)
    except DecodeError:
        expected = DecodeError
    try:
        got: object = CODEC.decoder(name)(data)
    except DecodeError:
        got = DecodeError
    assert got == expected


def test_single_object_bytes_decode_with_only_the_avsc_file() -> None:
    """A consumer with nothing but schemas/Tick.avsc and fastavro can read our bytes."""
    from datetime import UTC, datetime

    now = datetime(2024, 5, 10, 14, 30, tzinfo=UTC)
    record = {
        "tick_id": "x",
        "symbol": "IBM",
        "kind": "TRADE",
        "price": Decimal("167.12000000"),
        "ts": now,
        "received_at": now,
        "source": "test",
    }
    encoded = CODEC.encode("Tick", record)
    schema = json.loads((resource("schemas") / "Tick.avsc").read_text())
    body = io.BytesIO(encoded[10:])
    decoded = fastavro.schemaless_reader(body, fastavro.parse_schema(schema))
    assert decoded["price"] == Decimal("167.12000000")
    assert decoded["symbol"] == "IBM"


@pytest.mark.parametrize(
    ("name", "version"),
    [(n, sv.version) for n in NAMES for sv in CATALOG.history.get(n, [])],
)
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_current_schema_reads_every_earlier_version(
    name: str, version: str, data: st.DataObject
) -> None:
    """Backward compatibility: data written with any earlier schema decodes with the current one."""
    old = next(sv for sv in CATALOG.history[name] if sv.version == version)
    record = data.draw(strategy(old.raw))
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC + old.fingerprint)
    fastavro.schemaless_writer(buf, old.parsed, record)
    decoded = CODEC.decode(buf.getvalue(), name)
    current_fields = {f["name"] for f in CATALOG.get(name).raw["fields"]}
    assert set(decoded) == current_fields
    for key in set(record) & current_fields:
        assert _as_written(decoded[key], record[key]) == record[key]


def _as_written(decoded: Any, written: Any) -> Any:
    """What was decoded, narrowed to the fields the writer knew (nested records gain
    fields with defaults as a schema evolves)."""
    if isinstance(written, dict) and isinstance(decoded, dict):
        return {k: _as_written(decoded.get(k), v) for k, v in written.items()}
    if isinstance(written, list) and isinstance(decoded, list) and len(written) == len(decoded):
        return [_as_written(d, w) for d, w in zip(decoded, written, strict=True)]
    return decoded


@settings(max_examples=500, deadline=None)
@given(payload=st.binary(max_size=300), name=st.sampled_from(NAMES))
def test_fuzzed_bytes_raise_only_decode_error(payload: bytes, name: str) -> None:
    with contextlib.suppress(DecodeError):
        CODEC.decode(payload, name)


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=200), name=st.sampled_from(NAMES))
def test_valid_header_with_fuzzed_body_raises_only_decode_error(tail: bytes, name: str) -> None:
    header = SINGLE_OBJECT_MAGIC + CATALOG.get(name).fingerprint
    with contextlib.suppress(DecodeError):
        CODEC.decode(header + tail, name)


def test_decode_errors_say_what_is_wrong() -> None:
    now = __import__("datetime").datetime.now(__import__("datetime").UTC)
    tick = CODEC.encode(
        "Tick",
        {
            "tick_id": "a",
            "symbol": "A",
            "price": Decimal("1"),
            "ts": now,
            "received_at": now,
            "source": "s",
        },
    )
    with pytest.raises(DecodeError, match=r"expected io\.finstream\.Bar, got io\.finstream\.Tick"):
        CODEC.decode(tick, "Bar")
    with pytest.raises(DecodeError, match="trailing bytes"):
        CODEC.decode(tick + b"\x00", "Tick")
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        CODEC.decode(SINGLE_OBJECT_MAGIC + b"\x01" * 8 + tick[10:], "Tick")
    with pytest.raises(DecodeError, match="no value"):
        CODEC.decode(None, "Tick")
    with pytest.raises(DecodeError, match="unknown framing"):
        CODEC.decode(b'{"symbol": "AAPL"}', "Tick")
    with pytest.raises(DecodeError, match="no schema registry"):
        CODEC.decode(CONFLUENT_MAGIC + b"\x00\x00\x00\x01" + tick[10:], "Tick")
    with pytest.raises(DecodeError, match="exceeds"):
        CODEC.decode(SINGLE_OBJECT_MAGIC + b"\x00" * (2 << 20), "Tick")


def test_encode_refuses_records_that_do_not_fit() -> None:
    now = __import__("datetime").datetime.now(__import__("datetime").UTC)
    base = {
        "tick_id": "a",
        "symbol": "A",
        "price": Decimal("1"),
        "ts": now,
        "received_at": now,
        "source": "s",
    }
    with pytest.raises(EncodeError, match="unknown fields"):
        CODEC.encode("Tick", {**base, "prise": Decimal("1")})
    with pytest.raises(EncodeError):
        CODEC.encode("Tick", {**base, "price": 1.5})  # a float price is a bug
    with pytest.raises(EncodeError):
        CODEC.encode(
            "Tick", {**base, "price": Decimal("1.123456789")}
        )  # beyond the contract's scale
    with pytest.raises(EncodeError, match="symbol"):
        CODEC.encode("Tick", {k: v for k, v in base.items() if k != "symbol"})


class _FakeRegistry(BaseHTTPRequestHandler):
    """The two calls of the Confluent Schema Registry REST API the codec uses."""

    schemas: dict[int, str] = {}
    ids: dict[str, int] = {}

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        schema = body["schema"]
        sid = self.ids.setdefault(schema, len(self.ids) + 1)
        self.schemas[sid] = schema
        self._reply(200, {"id": sid})

    def do_GET(self) -> None:
        sid = int(self.path.rsplit("/", 1)[1])
        if sid not in self.schemas:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})
        else:
            self._reply(200, {"schema": self.schemas[sid]})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def registry_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_confluent_wire_format_with_a_registry(registry_url: str) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    codec = Codec(CATALOG, SchemaRegistryClient(registry_url))
    record = {
        "tick_id": "a",
        "symbol": "MSFT",
        "price": Decimal("412.5"),
        "ts": now,
        "received_at": now,
        "source": "s",
    }
    encoded = codec.encode("Tick", record)
    assert encoded[:1] == CONFLUENT_MAGIC
    (schema_id,) = struct.unpack(">I", encoded[1:5])
    assert schema_id >= 1
    # A fresh codec (another process) resolves the id through the registry.
    other = Codec(CATALOG, SchemaRegistryClient(registry_url))
    assert other.decode(encoded, "Tick")["price"] == Decimal("412.50000000")
    # Single-object messages stay readable when a registry is configured.
    assert other.decode(CODEC.encode("Tick", record), "Tick")["symbol"] == "MSFT"
    with pytest.raises(DecodeError, match="unknown to the registry"):
        other.decode(CONFLUENT_MAGIC + struct.pack(">I", 999) + encoded[5:], "Tick")
