"""The data every benchmark runs on, built the same way in every process."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from finstream.domain.alerts import AlertRule, parse_rule
from finstream.domain.marketdata.simulation import GbmMarket
from finstream.domain.marketdata.ticks import Tick


def symbols(n: int, prefix: str = "S") -> list[str]:
    width = len(str(n - 1))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def tape(
    syms: list[str], count: int, start: datetime, spacing: timedelta, seed: int = 11
) -> list[Tick]:
    """``count`` ticks round-robin over ``syms`` (a geometric Brownian walk each)."""
    market = GbmMarket(syms, seed=seed, run_id="bench")
    return list(itertools.islice(market.ticks(start, spacing), count))


def first_prices(ticks: list[Tick]) -> dict[str, Decimal]:
    first: dict[str, Decimal] = {}
    for t in ticks:
        first.setdefault(t.symbol, t.price)
    return first


# 13 kinds of rules, levels a percent or more away from the price, so that few
# ticks fire: the figure is the cost of finding and evaluating rules.
_KINDS: list[tuple[str, str, Any]] = [
    ("CROSSING", "EVERY_TIME", lambda p: {"value": p * Decimal("1.01")}),
    ("CROSSING_UP", "ONCE_PER_BAR", lambda p: {"value": p * Decimal("1.03")}),
    ("CROSSING_DOWN", "ONCE_PER_MINUTE", lambda p: {"value": p * Decimal("0.97")}),
    ("GREATER_THAN", "ONLY_ONCE", lambda p: {"value": p * Decimal("1.05")}),
    ("LESS_THAN", "ONLY_ONCE", lambda p: {"value": p * Decimal("0.95")}),
    (
        "ENTERING_CHANNEL",
        "EVERY_TIME",
        lambda p: {"lower": p * Decimal("1.04"), "upper": p * Decimal("1.06")},
    ),
    (
        "EXITING_CHANNEL",
        "ONCE_PER_BAR",
        lambda p: {"lower": p * Decimal("0.9"), "upper": p * Decimal("1.1")},
    ),
    (
        "INSIDE_CHANNEL",
        "ONLY_ONCE",
        lambda p: {"lower": p * Decimal("1.1"), "upper": p * Decimal("1.2")},
    ),
    (
        "OUTSIDE_CHANNEL",
        "ONLY_ONCE",
        lambda p: {"lower": p * Decimal("0.5"), "upper": p * Decimal("2")},
    ),
    ("MOVING_UP_PERCENT", "ONCE_PER_BAR", lambda p: {"percent": "5", "bars": 3}),
    ("MOVING_DOWN_PERCENT", "ONCE_PER_BAR", lambda p: {"percent": "5", "window_seconds": 300}),
    ("CHANGE_FROM_PREV_CLOSE_PERCENT", "ONLY_ONCE", lambda p: {"percent": "20"}),
    ("VOLUME_SPIKE", "ONCE_PER_BAR", lambda p: {"bars": 5, "multiplier": "10"}),
]

# For the latency figure: this many symbols get a crossing level right above
# their first price, which the load generator's ticks swing across.
CROSSING_SYMBOLS = 25


def rules(first: dict[str, Decimal], per_symbol: int, created: datetime) -> list[AlertRule]:
    out = []
    for n, (symbol, price) in enumerate(first.items()):
        for i in range(per_symbol):
            condition, frequency, params = _KINDS[i % len(_KINDS)]
            extra = params(price)
            if i >= len(_KINDS):
                condition, frequency = "CROSSING", "EVERY_TIME"
                extra = {"value": price * Decimal(1 + (i - 6) / 100)}
            if i == len(_KINDS) and n < CROSSING_SYMBOLS:
                extra = {"value": price * Decimal("1.0005")}
            out.append(
                parse_rule(
                    {
                        "rule_id": f"{symbol}-{i}",
                        "user_id": f"u{n % 1000}",
                        "symbol": symbol,
                        "condition": condition,
                        "frequency": frequency,
                        "created_at": created,
                        **{
                            k: (v.quantize(Decimal("0.0001")) if isinstance(v, Decimal) else v)
                            for k, v in extra.items()
                        },
                    },
                    now=created,
                )
            )
    return out
