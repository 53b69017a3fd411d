"""Strict JSON: what browsers parse never carries NaN or Infinity (WebSocket frames,
Redis pub/sub payloads), and what is replaced is named."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.api.hub import frame_for, frame_text
from finstream.api.metrics import WS_NONFINITE
from finstream.domain import strict_json
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.settings import Settings
from finstream.sinks.delivery.inapp import InboxProvider
from tests.support.services import free_port

# Every JSON shape, with every float including NaN and both infinities.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=16,
)


def strict_loads(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def expected(value: Any, pointer: str = "") -> tuple[Any, list[str]]:
    """The value with non-finite floats as None, and their pointers (an independent oracle)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [pointer]
    if isinstance(value, dict):
        out, found = {}, []
        for k, v in value.items():
            out[k], where = expected(v, f"{pointer}/{k.replace('~', '~0').replace('/', '~1')}")
            found += where
        return out, found
    if isinstance(value, list):
        items, found = [], []
        for i, v in enumerate(value):
            item, where = expected(v, f"{pointer}/{i}")
            items.append(item)
            found += where
        return items, found
    return value, []


@given(values)
def test_a_relayed_payload_is_strict_json_with_non_finite_numbers_named(value: Any) -> None:
    payload = json.dumps(value)  # Python's default: writes NaN and Infinity
    frame = strict_loads(frame_for("bar", {"symbol": "IBM", "interval": "1m"})(payload))
    data, pointers = expected(value)
    assert frame["data"] == data
    assert frame.get("nonfinite", []) == pointers
    assert (frame["type"], frame["symbol"], frame["interval"]) == ("bar", "IBM", "1m")


@given(values)
def test_writers_refuse_non_finite_numbers_and_name_them(value: Any) -> None:
    _, pointers = expected(value)
    if pointers:
        with pytest.raises(strict_json.NonFiniteNumber) as info:
            strict_json.dumps(value)
        assert info.value.pointers == pointers
    else:
        assert strict_loads(strict_json.dumps(value)) == value


@given(values)
def test_frames_the_api_builds_are_strict_json(value: Any) -> None:
    frame = strict_loads(frame_text({"type": "quote", "data": value}))
    data, pointers = expected(value)
    assert frame["data"] == data
    assert frame.get("nonfinite", []) == [f"/data{p}" for p in pointers]


def test_a_non_finite_frame_is_counted() -> None:
    before = WS_NONFINITE.labels("quote")._value.get()
    text = frame_for("quote", {"symbol": "AAPL"})('{"price": NaN, "size": 1e999, "bid": "1.5"}')
    assert strict_loads(text) == {
        "type": "quote",
        "symbol": "AAPL",
        "data": {"price": None, "size": None, "bid": "1.5"},
        "nonfinite": ["/price", "/size"],
    }
    assert WS_NONFINITE.labels("quote")._value.get() == before + 1


def test_strict_payloads_pass_through_untouched() -> None:
    payload = '{"price": "189.12", "ts_us": "1", "n": 1.25, "deep": [{"a/b": null}]}'
    assert frame_for("quote", {"symbol": "AAPL"})(payload) == (
        '{"type":"quote","symbol":"AAPL","data":' + payload + "}"
    )
    assert strict_json.parse("[1, 2.5]") == ([1, 2.5], [])
    with pytest.raises(ValueError, match="Expecting"):
        strict_json.parse("{not json")


async def test_an_inbox_entry_with_a_non_finite_number_is_refused_with_the_reason() -> None:
    # Refused before Redis is asked: no server needs to listen.
    provider = InboxProvider(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    message = {
        "message_id": "m-nan",
        "request_id": "r-nan",
        "user_id": "u-1",
        "category": "price_alert",
        "priority": "NORMAL",
        "subject": "s",
        "body_text": "b",
        "data": {"ratio": float("nan")},
        "created_at": utcnow(),
    }
    try:
        with pytest.raises(DeliveryError) as info:
            await provider.send(message)
    finally:
        await provider.close()
    assert info.value.error_class is ErrorClass.PERMANENT
    assert "/data/ratio" in str(info.value)
