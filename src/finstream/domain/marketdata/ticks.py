"""The normalized tick, its validation, and its Avro record form.

Prices are ``Decimal`` quantized to the contract's 8 decimal places; nothing
on the way from a provider to PostgreSQL goes through a binary float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

PRICE_SCALE = 8
_QUANTUM = Decimal(1).scaleb(-PRICE_SCALE)
# 24 digits of precision with 8 after the point leaves 16 before it.
MAX_PRICE = Decimal(10) ** 16 - 1
# Tickers across providers: BRK.B, BTC-USD, ^GSPC, EURUSD=X, X:BTCUSD, RDS/A.
SYMBOL_RE = re.compile(r"^[A-Z0-9^][A-Z0-9.\-=^/:_]{0,31}$")
TICK_KINDS = ("TRADE", "QUOTE")


class TickValidationError(ValueError):
    """A tick that must not be treated as a price; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_decimal(value: Any, field: str = "price") -> Decimal:
    """A provider value (str, int, Decimal; floats via their repr) as a quantized Decimal."""
    if isinstance(value, bool) or value is None:
        raise TickValidationError("malformed", f"{field} is {value!r}")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value).strip())
    except (InvalidOperation, ValueError) as exc:
        raise TickValidationError("malformed", f"{field} {value!r} is not a number") from exc
    if not number.is_finite():
        raise TickValidationError("non_finite", f"{field} is {number}")
    if abs(number) > MAX_PRICE:
        raise TickValidationError("out_of_range", f"{field} {number} exceeds {MAX_PRICE}")
    return number.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def normalize_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str):
        raise TickValidationError("bad_symbol", f"symbol {symbol!r} is not text")
    sym = symbol.strip().upper()
    if not SYMBOL_RE.match(sym):
        raise TickValidationError("bad_symbol", f"symbol {symbol!r} is malformed")
    return sym


# Not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, three times the cost, and a tick is built for every
# record a role consumes. Nothing mutates a tick; unsafe_hash keeps it hashable.
@dataclass(slots=True, unsafe_hash=True)
class Tick:
    tick_id: str
    symbol: str
    price: Decimal
    ts: datetime
    received_at: datetime
    source: str
    kind: str = "TRADE"
    size: Decimal | None = None
    bid: Decimal | None = None
    ask: Decimal | None = None
    prev_close: Decimal | None = None
    currency: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "tick_id": self.tick_id,
            "symbol": self.symbol,
            "kind": self.kind,
            "price": self.price,
            "size": self.size,
            "bid": self.bid,
            "ask": self.ask,
            "prev_close": self.prev_close,
            "currency": self.currency,
            "ts": self.ts,
            "received_at": self.received_at,
            "source": self.source,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Tick:
        return cls(
            tick_id=record["tick_id"],
            symbol=record["symbol"],
            kind=record.get("kind") or "TRADE",
            price=record["price"],
            size=record.get("size"),
            bid=record.get("bid"),
            ask=record.get("ask"),
            prev_close=record.get("prev_close"),
            currency=record.get("currency"),
            ts=record["ts"],
            received_at=record["received_at"],
            source=record["source"],
        )


def make_tick(
    *,
    symbol: Any,
    price: Any,
    ts: datetime,
    received_at: datetime,
    source: str,
    tick_id: str | None = None,
    kind: str = "TRADE",
    size: Any = None,
    bid: Any = None,
    ask: Any = None,
    prev_close: Any = None,
    currency: str | None = None,
) -> Tick:
    """Build a tick from provider values, normalizing numbers and the symbol.

    Raises TickValidationError for anything that is not a well-formed number;
    call :func:`validate_tick` afterwards for the plausibility checks.
    """
    sym = normalize_symbol(symbol)
    opt = {
        name: (to_decimal(val, name) if val is not None else None)
        for name, val in (("size", size), ("bid", bid), ("ask", ask), ("prev_close", prev_close))
    }
    tick = Tick(
        tick_id=tick_id or f"{source}:{sym}:{int(ts.timestamp() * 1_000_000)}",
        symbol=sym,
        price=to_decimal(price),
        ts=ts,
        received_at=received_at,
        source=source,
        kind=kind,
        currency=currency,
        **opt,
    )
    return tick


def validate_tick(tick: Tick, now: datetime, max_future: timedelta) -> Tick:
    """Plausibility checks every tick passes before it counts as a price."""
    if tick.kind not in TICK_KINDS:
        raise TickValidationError("malformed", f"kind {tick.kind!r}")
    if not tick.tick_id or len(tick.tick_id) > 200:
        raise TickValidationError("malformed", "tick_id is empty or longer than 200 characters")
    if not SYMBOL_RE.match(tick.symbol):
        raise TickValidationError("bad_symbol", f"symbol {tick.symbol!r} is malformed")
    if not isinstance(tick.price, Decimal) or not tick.price.is_finite():
        raise TickValidationError("non_finite", f"price is {tick.price}")
    if tick.price <= 0:
        raise TickValidationError("non_positive_price", f"price is {tick.price}")
    if tick.size is not None and (not tick.size.is_finite() or tick.size < 0):
        raise TickValidationError("negative_size", f"size is {tick.size}")
    for name in ("bid", "ask", "prev_close"):
        value = getattr(tick, name)
        if value is not None and (not value.is_finite() or value <= 0):
            raise TickValidationError("non_positive_price", f"{name} is {value}")
    if tick.ts.tzinfo is None:
        raise TickValidationError("malformed", "timestamp has no time zone")
    if tick.ts > now + max_future:
        raise TickValidationError(
            "future_timestamp",
            f"ts {tick.ts.isoformat()} is after {(now + max_future).isoformat()}",
        )
    return tick
