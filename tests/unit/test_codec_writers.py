"""The compiled Avro writers write what fastavro writes, and hand back what they do not take."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finstream.codec import Codec, EncodeError, SchemaCatalog, SchemaVersion
from finstream.codec_writers import compile_writer
from tests.support.avro_strategies import strategy

CATALOG = SchemaCatalog()
CODEC = Codec(CATALOG)
VERSIONS: list[SchemaVersion] = [
    *CATALOG.current.values(),
    *(v for versions in CATALOG.history.values() for v in versions),
]
COMPILED = [v for v in VERSIONS if v.writer is not None]


def fastavro_bytes(schema: SchemaVersion, record: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def test_the_routers_records_compile_and_decimals_are_left_to_fastavro() -> None:
    compiled = {v.name.rsplit(".", 1)[1] for v in CATALOG.current.values() if v.writer}
    assert {"OutboundMessage", "AuditEvent", "NotificationRequest"} <= compiled
    assert "Tick" not in compiled  # prices are decimals
    assert "Bar" not in compiled


@pytest.mark.parametrize("schema", COMPILED, ids=lambda v: f"{v.name}:{v.version}")
@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_compiled_writers_write_the_bytes_fastavro_writes(
    schema: SchemaVersion, data: st.DataObject
) -> None:
    record = data.draw(strategy(schema.raw))
    writer = schema.writer
    assert writer is not None
    assert writer(record) == fastavro_bytes(schema, record)


_instants = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.builds(
        timezone, st.integers(-14 * 60, 14 * 60).map(lambda m: timedelta(minutes=m))
    ),
)


@settings(max_examples=500, deadline=None)
@given(at=_instants | st.integers(-(2**63), 2**63 - 1))
def test_timestamps_in_any_offset_or_as_integers_write_as_fastavro_does(at: Any) -> None:
    schema = CATALOG.get("AuditEvent")
    record = {
        "event_id": "e",
        "at": at,
        "actor": "a",
        "action": "x",
        "subject_type": "s",
        "subject_id": "i",
        "user_id": None,
        "reason": None,
        "details": {},
        "correlation_id": None,
    }
    assert CODEC.encode("AuditEvent", record)[10:] == fastavro_bytes(schema, record)


OUTBOUND = {
    "message_id": "m-1",
    "request_id": "r-1",
    "user_id": "u-1",
    "channel": "PUSH",
    "category": "price_alert",
    "priority": "HIGH",
    "recipient": "*******79",
    "platform": "FCM",
    "locale": "en",
    "subject": None,
    "body_text": "",
    "body_html": None,
    "data": {"symbol": "AAPL"},
    "transactional": True,
    "created_at": datetime(2026, 12, 7, 14, 11, 2, 701706, tzinfo=UTC),
    "expires_at": None,
    "attempt": 0,
    "correlation_id": "c",
    "sealed": "fse1:1:abc",
    "template": "price_alert",
}
_ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    2**70,
    1.5,
    "x",
    b"x",
    bytearray(b"x"),
    [],
    ("PUSH", "x"),
    {},
    datetime(2026, 1, 1, 12),  # naive: fastavro reads it as local time
    "NOT_A_CHANNEL",
]


@pytest.mark.parametrize("field", sorted(OUTBOUND))
@pytest.mark.parametrize("value", _ODD_VALUES, ids=repr)
def test_a_value_the_writer_does_not_take_is_written_or_refused_by_fastavro(
    field: str, value: Any
) -> None:
    schema = CATALOG.get("OutboundMessage")
    record = {**OUTBOUND, field: value}
    try:
        expected: bytes | None = fastavro_bytes(schema, record)
    except Exception:  # whatever fastavro raises, Codec.encode must raise too
        expected = None
    if expected is None:
        with pytest.raises(EncodeError):
            CODEC.encode("OutboundMessage", record)
    else:
        assert CODEC.encode("OutboundMessage", record)[10:] == expected


def test_a_missing_field_is_written_by_fastavro_with_its_default() -> None:
    schema = CATALOG.get("OutboundMessage")
    record = {k: v for k, v in OUTBOUND.items() if k != "template"}
    assert CODEC.encode("OutboundMessage", record)[10:] == fastavro_bytes(schema, record)


def test_schemas_outside_the_compiled_subset_get_no_writer() -> None:
    fixed = fastavro.parse_schema(
        {
            "type": "record",
            "name": "F",
            "fields": [{"name": "f", "type": {"type": "fixed", "name": "X", "size": 2}}],
        }
    )
    two = fastavro.parse_schema(
        {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["string", "long"]}]}
    )
    recursive = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Node",
            "fields": [{"name": "next", "type": ["null", "Node"]}],
        }
    )
    assert compile_writer(fixed) is None
    assert compile_writer(two) is None
    assert compile_writer(recursive) is None
