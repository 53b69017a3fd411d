"""Tick normalization and validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.codec import Codec
from finstream.domain.marketdata.ticks import (
    Tick,
    TickValidationError,
    make_tick,
    normalize_symbol,
    to_decimal,
    validate_tick,
)

NOW = datetime(2024, 5, 10, 15, 30, tzinfo=UTC)
LIMIT = timedelta(minutes=5)


def tick(**kw: object) -> Tick:
    base: dict[str, object] = {
        "symbol": "AAPL",
        "price": "189.98",
        "ts": NOW,
        "received_at": NOW,
        "source": "t",
    }
    base.update(kw)
    return make_tick(**base)  # type: ignore[arg-type]


def test_prices_keep_their_cents() -> None:
    assert tick(price="0.1").price + tick(price="0.2").price == Decimal("0.3")
    assert tick(price=0.1).price == Decimal(
        "0.10000000"
    )  # a float goes through its repr, not binary
    assert to_decimal("189.9800") == Decimal("189.98000000")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"price": "0"}, "non_positive_price"),
        ({"price": "-1.5"}, "non_positive_price"),
        ({"price": "NaN"}, "non_finite"),
        ({"price": "Infinity"}, "non_finite"),
        ({"price": "abc"}, "malformed"),
        ({"price": None}, "malformed"),
        ({"price": True}, "malformed"),
        ({"price": "1e30"}, "out_of_range"),
        ({"symbol": "aa pl"}, "bad_symbol"),
        ({"symbol": ""}, "bad_symbol"),
        ({"symbol": 42}, "bad_symbol"),
        ({"symbol": "X" * 40}, "bad_symbol"),
        ({"size": "-1"}, "negative_size"),
        ({"bid": "0"}, "non_positive_price"),
        ({"ts": NOW + timedelta(hours=1)}, "future_timestamp"),
    ],
)
def test_invalid_ticks_are_refused_with_a_reason(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(TickValidationError) as info:
        validate_tick(tick(**kwargs), NOW, LIMIT)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "symbol", ["AAPL", "brk.b", "BTC-USD", "^GSPC", "EURUSD=X", "X:BTCUSD", " msft "]
)
def test_symbols_of_every_provider_are_accepted(symbol: str) -> None:
    assert normalize_symbol(symbol) == symbol.strip().upper()


def test_a_tick_slightly_in_the_future_is_clock_skew_not_garbage() -> None:
    assert validate_tick(tick(ts=NOW + timedelta(minutes=4)), NOW, LIMIT)


@given(
    price=st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("9999999999"), places=8),
    size=st.none() | st.integers(0, 10**9),
)
def test_valid_ticks_survive_the_avro_round_trip_exactly(price: Decimal, size: int | None) -> None:
    t = validate_tick(tick(price=price, size=size), NOW, LIMIT)
    codec = Codec()
    back = Tick.from_record(codec.decode(codec.encode("Tick", t.to_record()), "Tick"))
    assert back == t
    assert back.price == price


@given(text=st.text(max_size=30))
def test_to_decimal_never_raises_anything_but_validation_errors(text: str) -> None:
    try:
        value = to_decimal(text)
    except TickValidationError:
        return
    assert value.is_finite()
