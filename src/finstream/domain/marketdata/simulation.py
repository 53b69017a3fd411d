"""Simulated market: geometric Brownian motion per symbol, deterministic by seed.

S(t+dt) = S(t) * exp((mu - sigma^2 / 2) dt + sigma sqrt(dt) Z), Z ~ N(0, 1),
with time in years. Prices are rounded to cents like a real equity tape.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from finstream.domain.marketdata.ticks import Tick, make_tick

SECONDS_PER_TRADING_YEAR = 252 * 6.5 * 3600
_CENT = Decimal("0.01")


@dataclass
class SymbolState:
    symbol: str
    price: float
    mu: float
    sigma: float
    prev_close: Decimal
    seq: int = 0
    last_ts: datetime | None = None


@dataclass
class GbmMarket:
    """An endless, reproducible stream of trades over a set of symbols."""

    symbols: Sequence[str]
    seed: int | None = None
    run_id: str = "sim"
    _rng: random.Random = field(init=False, repr=False)
    _states: list[SymbolState] = field(init=False, repr=False)
    _cursor: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("the simulated market needs at least one symbol")
        self._rng = random.Random(self.seed)
        self._states = []
        for sym in self.symbols:
            start = round(self._rng.uniform(20, 500), 2)
            self._states.append(
                SymbolState(
                    symbol=sym,
                    price=start,
                    mu=self._rng.uniform(-0.1, 0.2),
                    sigma=self._rng.uniform(0.15, 0.6),
                    prev_close=Decimal(str(start)).quantize(_CENT),
                )
            )

    def step(self, state: SymbolState, dt_seconds: float) -> float:
        dt = max(dt_seconds, 1e-6) / SECONDS_PER_TRADING_YEAR
        z = self._rng.gauss(0.0, 1.0)
        state.price *= math.exp(
            (state.mu - state.sigma**2 / 2) * dt + state.sigma * math.sqrt(dt) * z
        )
        # A simulated price never rounds to zero, which validation would reject.
        state.price = max(state.price, 0.01)
        return state.price

    def next_tick(self, now: datetime) -> Tick:
        """The next trade, round-robin over the symbols, stamped ``now``."""
        state = self._states[self._cursor % len(self._states)]
        self._cursor += 1
        dt = (now - state.last_ts).total_seconds() if state.last_ts else 1.0
        state.last_ts = now
        price = self.step(state, dt)
        state.seq += 1
        return make_tick(
            tick_id=f"{self.run_id}:{state.symbol}:{state.seq}",
            symbol=state.symbol,
            price=Decimal(f"{price:.2f}"),
            size=self._rng.choice((1, 5, 10, 25, 50, 100, 200, 500)),
            prev_close=state.prev_close,
            ts=now,
            received_at=now,
            source="simulated",
            currency="USD",
        )

    def ticks(self, start: datetime, interval: timedelta) -> Iterator[Tick]:
        """An endless sequence of ticks ``interval`` apart in event time."""
        ts = start
        while True:
            yield self.next_tick(ts)
            ts += interval
