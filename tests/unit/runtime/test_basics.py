"""Logging redaction, dead-letter headers, simulation, migrations loading, settings."""

from __future__ import annotations

import itertools
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from finstream.domain.deadletter import DeadLetter, parse_headers
from finstream.domain.marketdata.simulation import GbmMarket
from finstream.domain.marketdata.ticks import validate_tick
from finstream.domain.notify.ids import outbound_message_id
from finstream.runtime.logging import (
    configure_logging,
    correlation,
    correlation_from_headers,
    new_correlation_id,
    redact,
)
from finstream.settings import Settings
from finstream.stores.postgres import MigrationError, load_migrations


def test_redaction_masks_secrets_and_contact_details() -> None:
    event = redact(
        None,
        "info",
        {
            "event": "GET https://x/query?function=GLOBAL_QUOTE&apikey=SECRET123&symbol=IBM",
            "api_key": "abc",
            "authorization": "Bearer x.y.z",
            "email": "a@b.com",
            "note": "send to jane@example.com or +14155550100",
            "symbol": "IBM",
        },
    )
    text = json.dumps(event)
    for secret in ("SECRET123", "abc", "x.y.z", "a@b.com", "jane@example.com", "+14155550100"):
        assert secret not in text
    assert event["symbol"] == "IBM"
    assert "GLOBAL_QUOTE" in event["event"]


def test_new_correlation_ids_are_distinct_uuid4_hex() -> None:
    ids = [new_correlation_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for cid in ids:
        parsed = uuid.UUID(hex=cid)
        assert parsed.hex == cid
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_correlation_blocks_nest_and_restore_the_outer_id(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json", role="test")
    log = structlog.get_logger("t")
    with correlation("outer") as outer:
        with correlation(None) as inner:
            log.info("inside")
        log.info("after")
    log.info("outside")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert outer == "outer"
    assert uuid.UUID(hex=inner).version == 4
    assert [line.get("correlation_id") for line in lines] == [inner, "outer", None]


def test_logs_are_json_with_the_correlation_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", role="test")
    with correlation("cid-123"):
        structlog.get_logger("t").info("hello", token="t0ps3cret")
        logging.getLogger("aiokafka.foo").warning("library line")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["event"] == "hello"
    assert lines[0]["correlation_id"] == "cid-123"
    assert lines[0]["role"] == "test"
    assert lines[0]["token"] == "[redacted]"
    assert lines[1]["event"] == "library line"
    assert lines[1]["correlation_id"] == "cid-123"


def test_correlation_id_from_headers() -> None:
    assert correlation_from_headers([("x", b"1"), ("correlation-id", b"abc")]) == "abc"
    assert correlation_from_headers([("correlation-id", b"\xff")]) is None
    assert correlation_from_headers(None) is None


def test_dead_letter_headers_name_the_source_and_reason() -> None:
    letter = DeadLetter(
        source_topic="md.ticks",
        source_partition=3,
        source_offset=42,
        error_class="DecodeError",
        reason="bad" * 1000,
        role="quotes",
        at=datetime(2024, 1, 1, tzinfo=UTC),
        key=b"k",
        value=b"v",
        original_headers=(("correlation-id", b"c"), ("dlq.error.class", b"Old")),
    )
    parsed = parse_headers(letter.headers())
    assert parsed["dlq.source.topic"] == "md.ticks"
    assert parsed["dlq.source.partition"] == "3"
    assert parsed["dlq.source.offset"] == "42"
    assert parsed["dlq.error.class"] == "DecodeError"
    assert len(parsed["dlq.error.message"]) == 2000
    assert ("correlation-id", b"c") in letter.headers()
    assert [k for k, _ in letter.headers()].count("dlq.error.class") == 1


def test_simulated_market_is_reproducible_and_valid() -> None:
    start = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    a = list(
        itertools.islice(GbmMarket(["A", "B", "C"], seed=7).ticks(start, timedelta(seconds=1)), 300)
    )
    b = list(
        itertools.islice(GbmMarket(["A", "B", "C"], seed=7).ticks(start, timedelta(seconds=1)), 300)
    )
    assert a == b
    assert {t.symbol for t in a} == {"A", "B", "C"}
    assert len({t.tick_id for t in a}) == 300
    for t in a:
        validate_tick(t, start + timedelta(hours=1), timedelta(minutes=5))
        assert t.price == t.price.quantize(t.price.__class__("0.01"))
    assert a != list(
        itertools.islice(GbmMarket(["A", "B", "C"], seed=8).ticks(start, timedelta(seconds=1)), 300)
    )


def test_outbound_ids_are_deterministic_and_distinct() -> None:
    assert outbound_message_id("r1", "email", "a@b") == outbound_message_id("r1", "EMAIL", "a@b")
    assert outbound_message_id("r1", "EMAIL", "a@b") != outbound_message_id("r1", "SMS", "a@b")
    assert outbound_message_id("r1", "EMAIL", "a@b") != outbound_message_id("r2", "EMAIL", "a@b")


def test_migrations_are_numbered_and_unique() -> None:
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    assert versions == sorted(set(versions))
    assert migrations[0].name == "ticks"


def test_misnamed_migration_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path
    (folder / "1_bad.sql").write_text("select 1")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        load_migrations(folder)


def test_namespace_applies_to_topics_groups_and_keys() -> None:
    s = Settings(namespace="qa.")
    assert s.topic("md.ticks") == "qa.md.ticks"
    assert s.group("quotes") == "qa.finstream-quotes"
    assert s.redis_key("quote:AAPL") == "qa.quote:AAPL"
    with pytest.raises(ValueError, match="namespace"):
        Settings(namespace="bad ns")
