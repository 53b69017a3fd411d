"""A deterministic market shared by every fake provider.

Each symbol's quote changes every ``step`` seconds: step ``k`` has a price
that differs from step ``k-1`` by at least a cent and a cumulative day volume
``1000 + 10 k``, so (price, volume) identifies the step — which is how tests
tell "the same quote seen twice" from "a new quote".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

CENT = Decimal("0.01")


@dataclass(frozen=True)
class Quote:
    symbol: str
    step: int
    price: Decimal
    volume: int
    ts: datetime  # when this step began
    prev_close: Decimal
    open: Decimal


class FakeMarket:
    """``now`` is the market's wall clock (default time.time); a test that runs cycles
    on a fake clock passes its own, so each cycle sees exactly the steps it should."""

    def __init__(
        self,
        symbols: list[str] | None = None,
        step: float = 0.1,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.step = step
        self.now = now
        self.t0 = now() - 3600  # an hour of history for intraday bars
        self.bases = {s: Decimal(100 + 37 * i) for i, s in enumerate(symbols or [])}

    def knows(self, symbol: str) -> bool:
        return symbol.upper() in self.bases

    def add(self, symbol: str, base: Decimal) -> None:
        self.bases[symbol.upper()] = base

    def step_at(self, when: float | None = None) -> int:
        return int(((when if when is not None else self.now()) - self.t0) / self.step)

    def price_at(self, symbol: str, k: int) -> Decimal:
        base = self.bases[symbol.upper()]
        # A saw-tooth of 0.01 .. 2.99 over the base: consecutive steps always differ.
        return base + CENT * (1 + k % 299)

    def quote(self, symbol: str, when: float | None = None) -> Quote:
        k = self.step_at(when)
        sym = symbol.upper()
        return Quote(
            symbol=sym,
            step=k,
            price=self.price_at(sym, k),
            volume=1000 + 10 * k,
            ts=datetime.fromtimestamp(self.t0 + k * self.step, UTC),
            prev_close=self.bases[sym],
            open=self.bases[sym] + CENT,
        )

    def step_of(self, symbol: str, price: Decimal, volume: Decimal | int | None) -> int | None:
        """The step a published (price, volume) pair came from, if it is one of ours."""
        if volume is None:
            return None
        k = (int(volume) - 1000) // 10
        return k if self.price_at(symbol, k) == price else None

    def minute_bars(
        self, symbol: str, minutes: int, end: float | None = None
    ) -> list[tuple[datetime, Decimal, int]]:
        """(start, close, volume) of the last ``minutes`` whole minutes before ``end``."""
        now = end if end is not None else self.now()
        last_start = int(now // 60) * 60 - 60
        out = []
        for i in range(minutes, 0, -1):
            start = last_start - (i - 1) * 60
            close = self.price_at(symbol, self.step_at(start + 59))
            out.append((datetime.fromtimestamp(start, UTC), close, 500 + i))
        return out


def eastern(ts: datetime) -> str:
    """Alpha Vantage's wall-clock stamp of a UTC time."""
    from zoneinfo import ZoneInfo

    return ts.astimezone(ZoneInfo("America/New_York")).strftime("%Y-%m-%d %H:%M:%S")


def epoch(ts: datetime) -> int:
    return int(ts.timestamp())


def millis(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def day(ts: datetime) -> str:
    return (ts - timedelta(0)).date().isoformat()
