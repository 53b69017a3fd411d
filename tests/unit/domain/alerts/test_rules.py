"""Alert rules: parsing user input, validation naming the field, the Avro record form."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.codec import Codec
from finstream.domain.alerts.rules import (
    CONDITIONS,
    FREQUENCIES,
    AlertRule,
    RuleValidationError,
    parse_rule,
    validate_rule,
)

NOW = datetime(2025, 3, 3, 15, 0, tzinfo=UTC)
CODEC = Codec()

VALID: dict[str, dict[str, Any]] = {
    "CROSSING": {"value": "190.5"},
    "CROSSING_UP": {"value": 190},
    "CROSSING_DOWN": {"value": Decimal("1.25")},
    "GREATER_THAN": {"value": "10"},
    "LESS_THAN": {"value": "10"},
    "ENTERING_CHANNEL": {"lower": "10", "upper": "20"},
    "EXITING_CHANNEL": {"lower": "10", "upper": "20"},
    "INSIDE_CHANNEL": {"lower": "10", "upper": "20"},
    "OUTSIDE_CHANNEL": {"lower": "10", "upper": "20"},
    "MOVING_UP_PERCENT": {"percent": "2.5", "bars": 3},
    "MOVING_DOWN_PERCENT": {"percent": "5", "window_seconds": 600},
    "CHANGE_FROM_PREV_CLOSE_PERCENT": {"percent": "3"},
    "VOLUME_SPIKE": {"bars": 20, "multiplier": "3"},
}


def rule_input(condition: str, **extra: Any) -> dict[str, Any]:
    return {"user_id": "u-1", "symbol": "aapl", "condition": condition, **VALID[condition], **extra}


def test_every_condition_has_a_valid_example() -> None:
    assert set(VALID) == set(CONDITIONS)


@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("frequency", FREQUENCIES)
def test_valid_rules_round_trip_through_avro(condition: str, frequency: str) -> None:
    extra: dict[str, Any] = {"frequency": frequency.lower()}
    if frequency == "EVERY_TIME":
        extra["cooldown_seconds"] = "30"
    rule = parse_rule(rule_input(condition, **extra), now=NOW)
    assert rule.symbol == "AAPL"
    assert rule.frequency == frequency
    assert rule.created_at == rule.updated_at == NOW
    assert rule.rule_id.startswith("r-")
    record = CODEC.decode(CODEC.encode("AlertRule", rule.to_record()), "AlertRule")
    assert AlertRule.from_record(record) == rule


def test_names_are_forgiving_and_numbers_exact() -> None:
    rule = parse_rule(
        {
            "rule_id": "my-rule.1",
            "user_id": "u",
            "symbol": " brk.b ",
            "condition": "crossing up",
            "value": 0.1,
            "frequency": "once-per-bar-close",
            "expires_at": "2025-03-04T00:00:00Z",
        },
        now=NOW,
    )
    assert (rule.rule_id, rule.symbol, rule.condition) == ("my-rule.1", "BRK.B", "CROSSING_UP")
    assert rule.value == Decimal("0.10000000")
    assert rule.frequency == "ONCE_PER_BAR_CLOSE"
    assert rule.expires_at == datetime(2025, 3, 4, tzinfo=UTC)


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"symbol": "AAPL", "condition": "CROSSING", "value": 1}, "user_id", "required"),
    ({"user_id": "u", "condition": "CROSSING", "value": 1}, "symbol", "required"),
    (
        {"user_id": "u", "symbol": "not a symbol!", "condition": "CROSSING", "value": 1},
        "symbol",
        "malformed",
    ),
    ({"user_id": "u", "symbol": "A"}, "condition", "required"),
    ({"user_id": "u", "symbol": "A", "condition": "SIDEWAYS"}, "condition", "not one of"),
    ({"user_id": "u", "symbol": "A", "condition": "CROSSING"}, "value", "required"),
    ({"user_id": "u", "symbol": "A", "condition": "CROSSING", "value": "-1"}, "value", "positive"),
    ({"user_id": "u", "symbol": "A", "condition": "CROSSING", "value": "0"}, "value", "positive"),
    (
        {"user_id": "u", "symbol": "A", "condition": "CROSSING", "value": "abc"},
        "value",
        "not a number",
    ),
    ({"user_id": "u", "symbol": "A", "condition": "CROSSING", "value": "NaN"}, "value", "NaN"),
    (
        {"user_id": "u", "symbol": "A", "condition": "CROSSING", "value": 1, "upper": 2},
        "upper",
        "not a parameter",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "INSIDE_CHANNEL", "lower": 1},
        "upper",
        "required",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "INSIDE_CHANNEL", "lower": 2, "upper": 2},
        "lower",
        "below upper",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "INSIDE_CHANNEL", "lower": 3, "upper": 2},
        "lower",
        "below upper",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "MOVING_UP_PERCENT", "percent": 1},
        "bars",
        "exactly one",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "MOVING_UP_PERCENT",
            "percent": 1,
            "bars": 2,
            "window_seconds": 60,
        },
        "bars",
        "exactly one",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "MOVING_UP_PERCENT", "percent": 1, "bars": 0},
        "bars",
        "between",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "MOVING_UP_PERCENT",
            "percent": 1,
            "bars": 1.5,
        },
        "bars",
        "whole number",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "MOVING_DOWN_PERCENT",
            "percent": 100,
            "bars": 2,
        },
        "percent",
        "below 100",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "MOVING_DOWN_PERCENT",
            "percent": -3,
            "bars": 2,
        },
        "percent",
        "positive",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "MOVING_UP_PERCENT",
            "percent": 2,
            "window_seconds": 10**9,
        },
        "window_seconds",
        "between",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "CHANGE_FROM_PREV_CLOSE_PERCENT"},
        "percent",
        "required",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "VOLUME_SPIKE", "multiplier": 3},
        "bars",
        "required",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "VOLUME_SPIKE", "bars": 5, "multiplier": 1},
        "multiplier",
        "above 1",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "frequency": "hourly",
        },
        "frequency",
        "not one of",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "cooldown_seconds": 5,
        },
        "cooldown_seconds",
        "EVERY_TIME",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "frequency": "EVERY_TIME",
            "cooldown_seconds": -1,
        },
        "cooldown_seconds",
        "between",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "expires_at": "2025-03-03T14:00:00Z",
        },
        "expires_at",
        "future",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "expires_at": "2025-03-04T14:00:00",
        },
        "expires_at",
        "time zone",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "expires_at": "tomorrow",
        },
        "expires_at",
        "ISO 8601",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "GREATER_THAN", "value": 1, "enabled": "yes"},
        "enabled",
        "true or false",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "message": "x" * 501,
        },
        "message",
        "at most",
    ),
    (
        {
            "user_id": "u",
            "symbol": "A",
            "condition": "GREATER_THAN",
            "value": 1,
            "rule_id": "has space",
        },
        "rule_id",
        "letters",
    ),
    (
        {"user_id": "u", "symbol": "A", "condition": "GREATER_THAN", "value": 1, "valeu": 2},
        "valeu",
        "not a field",
    ),
    (
        {"user_id": "u\x01x", "symbol": "A", "condition": "GREATER_THAN", "value": 1},
        "user_id",
        "control",
    ),
]


@pytest.mark.parametrize(("data", "field", "words"), BAD)
def test_invalid_rules_name_the_field(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(RuleValidationError) as info:
        parse_rule(data, now=NOW)
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ")
    assert words in info.value.message
    assert str(info.value) == info.value.message
    assert isinstance(info.value, ValueError)


def test_validate_rule_rejects_records_that_bypassed_parsing() -> None:
    good = parse_rule(rule_input("ENTERING_CHANNEL"), now=NOW)
    from dataclasses import replace

    with pytest.raises(RuleValidationError, match="lower"):
        validate_rule(replace(good, lower=Decimal(30)))
    with pytest.raises(RuleValidationError, match="symbol"):
        validate_rule(replace(good, symbol="aapl"))
    # An expired rule read back from the topic is still a valid rule (it just never fires).
    expired = replace(good, expires_at=NOW - timedelta(days=1))
    assert validate_rule(expired) is expired


@given(
    st.dictionaries(
        st.sampled_from(
            [
                *sorted(VALID["VOLUME_SPIKE"]),
                "value",
                "lower",
                "upper",
                "percent",
                "window_seconds",
                "frequency",
                "cooldown_seconds",
                "expires_at",
                "enabled",
                "message",
                "symbol",
                "user_id",
                "condition",
            ]
        ),
        st.one_of(
            st.none(),
            st.text(max_size=12),
            st.integers(-5, 10**6),
            st.decimals(allow_nan=True),
            st.booleans(),
            st.floats(),
        ),
    )
)
def test_parse_rule_never_fails_with_anything_but_a_named_error(data: dict[str, Any]) -> None:
    try:
        rule = parse_rule(data, now=NOW)
    except RuleValidationError as exc:
        error = exc
        assert error.field
        assert error.message.startswith(error.field)
    else:
        assert validate_rule(rule) is rule
        CODEC.encode("AlertRule", rule.to_record())
