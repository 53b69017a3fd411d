"""Market-data connectors: normalization throughput per provider.

For each provider's wire format, the same set of realistic response bodies is
parsed three ways in this run:

1. baseline: plain ``json.loads`` (binary floats, no checks) — the least any
   client does with the body;
2. ``json.loads(parse_float=Decimal)`` — the least a client that keeps
   prices exact does;
3. the connector's parser plus ``validate_tick``: shape checks, classified
   errors, Decimal prices quantized to the contract, UTC times, content ids.

Prints responses per second (and ticks per second) for each, and the
connector's ratio to both baselines. No network and no services: this is the
CPU cost of normalization, which bounds how many responses one connector
process can take.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from finstream.connectors.alphavantage import parse_global_quote, parse_intraday
from finstream.connectors.finnhub import parse_quote, parse_ws_message
from finstream.connectors.iex import parse_legacy_quote
from finstream.connectors.polygon import parse_message
from finstream.connectors.yahoo import parse_chart, parse_quote_response
from finstream.domain.marketdata.dedupe import TickDeduper
from finstream.domain.marketdata.ticks import Tick, validate_tick

BODIES = 200
MIN_SECONDS = 0.2
ROUNDS = 3  # interleaved; the best round counts (the machine is shared and noisy)
NOW = datetime.now(UTC)
EPOCH = int(NOW.timestamp()) - 60
SYMBOLS = [f"S{i:03d}" for i in range(50)]
EASTERN = ZoneInfo("America/New_York")
rng = random.Random(7)


def px() -> str:
    return f"{rng.uniform(5, 900):.4f}"


def av_quote(i: int) -> tuple[bytes, tuple[Any, ...]]:
    sym = SYMBOLS[i % len(SYMBOLS)]
    body = {
        "Global Quote": {
            "01. symbol": sym, "02. open": px(), "03. high": px(), "04. low": px(), "05. price": px(),
            "06. volume": str(rng.randint(1, 10**7)), "07. latest trading day": NOW.date().isoformat(),
            "08. previous close": px(), "09. change": "-0.1900", "10. change percent": "-0.1135%",
        }
    }  # fmt: skip
    return json.dumps(body).encode(), (sym,)


def av_intraday(i: int) -> tuple[bytes, tuple[Any, ...]]:
    sym = SYMBOLS[i % len(SYMBOLS)]
    start = NOW.astimezone(EASTERN).replace(second=0, microsecond=0, tzinfo=None) - timedelta(
        minutes=100
    )
    series = {
        (start + timedelta(minutes=m)).strftime("%Y-%m-%d %H:%M:%S"): {
            "1. open": px(), "2. high": px(), "3. low": px(), "4. close": px(), "5. volume": str(rng.randint(1, 10**5)),
        }
        for m in range(100)
    }  # fmt: skip
    body = {
        "Meta Data": {"2. Symbol": sym, "6. Time Zone": "US/Eastern"},
        "Time Series (1min)": series,
    }
    return json.dumps(body).encode(), (sym, "1min")


def yahoo_quote(i: int) -> tuple[bytes, tuple[Any, ...]]:
    syms = [SYMBOLS[(i + k) % len(SYMBOLS)] for k in range(10)]
    result = [
        {
            "symbol": s, "currency": "USD", "marketState": "REGULAR", "shortName": f"{s} Inc.",
            "regularMarketPrice": float(px()), "regularMarketChange": 0.65, "regularMarketChangePercent": 0.35,
            "regularMarketTime": EPOCH, "regularMarketDayHigh": float(px()), "regularMarketDayLow": float(px()),
            "regularMarketVolume": rng.randint(1, 10**8), "regularMarketPreviousClose": float(px()),
            "bid": float(px()), "ask": float(px()),
        }
        for s in syms
    ]  # fmt: skip
    return json.dumps({"quoteResponse": {"result": result, "error": None}}).encode(), (syms,)


def yahoo_chart(i: int) -> tuple[bytes, tuple[Any, ...]]:
    sym = SYMBOLS[i % len(SYMBOLS)]
    stamps = [EPOCH - 60 * (390 - m) for m in range(390)]
    closes = [float(px()) if m % 17 else None for m in range(390)]
    body = {
        "chart": {
            "result": [
                {
                    "meta": {"currency": "USD", "symbol": sym, "dataGranularity": "1m"},
                    "timestamp": stamps,
                    "indicators": {
                        "quote": [
                            {"close": closes, "volume": [rng.randint(0, 10**5) for _ in stamps]}
                        ]
                    },
                }
            ],
            "error": None,
        }
    }
    return json.dumps(body).encode(), (sym,)


def finnhub_quote(i: int) -> tuple[bytes, tuple[Any, ...]]:
    sym = SYMBOLS[i % len(SYMBOLS)]
    body = {
        "c": float(px()),
        "d": 0.65,
        "dp": 0.35,
        "h": float(px()),
        "l": float(px()),
        "o": float(px()),
        "pc": float(px()),
        "t": EPOCH,
    }
    return json.dumps(body).encode(), (sym,)


def finnhub_ws(i: int) -> tuple[bytes, tuple[Any, ...]]:
    data = [
        {
            "s": SYMBOLS[(i + k) % len(SYMBOLS)],
            "p": float(px()),
            "t": EPOCH * 1000 + k,
            "v": rng.randint(1, 500),
            "c": ["1", "12"],
        }
        for k in range(5)
    ]
    return json.dumps({"type": "trade", "data": data}).encode(), ()


def polygon_ws(i: int) -> tuple[bytes, tuple[Any, ...]]:
    events = [
        {"ev": "T", "sym": SYMBOLS[(i + k) % len(SYMBOLS)], "x": 4, "i": str(k), "z": 3, "p": float(px()),
         "s": rng.randint(1, 500), "c": [0, 12], "t": EPOCH * 1000 + k, "q": k}
        for k in range(10)
    ]  # fmt: skip
    return json.dumps(events).encode(), ()


def iex_quote(i: int) -> tuple[bytes, tuple[Any, ...]]:
    sym = SYMBOLS[i % len(SYMBOLS)]
    body = {
        "symbol": sym, "latestPrice": float(px()), "latestUpdate": EPOCH * 1000, "latestVolume": rng.randint(1, 10**7),
        "iexBidPrice": 0, "iexAskPrice": float(px()), "previousClose": float(px()), "calculationPrice": "tops",
    }  # fmt: skip
    return json.dumps(body).encode(), (sym,)


def _ticks(out: Any) -> list[Tick]:
    if isinstance(out, Tick):
        return [out]
    if isinstance(out, tuple) and isinstance(out[0], dict):  # yahoo: (ticks, errors, unknown)
        return list(out[0].values())
    if isinstance(out, tuple):  # streams: (ticks, errors)
        return list(out[0])
    return list(out)


CASES: list[tuple[str, Callable[[int], tuple[bytes, tuple[Any, ...]]], Callable[..., Any]]] = [
    ("alphavantage GLOBAL_QUOTE", av_quote, lambda b, a: parse_global_quote(b, *a, NOW)),
    ("alphavantage INTRADAY 100 bars", av_intraday, lambda b, a: parse_intraday(b, *a, NOW)),
    ("yahoo v7 quote, 10 symbols", yahoo_quote, lambda b, a: parse_quote_response(b, *a, NOW)),
    ("yahoo v8 chart, 390 bars", yahoo_chart, lambda b, a: parse_chart(b, *a, NOW)),
    ("finnhub quote", finnhub_quote, lambda b, a: parse_quote(b, *a, NOW)),
    ("finnhub ws, 5 trades", finnhub_ws, lambda b, a: parse_ws_message(b, NOW)),
    ("polygon ws, 10 trades", polygon_ws, lambda b, a: parse_message(b, NOW)),
    ("iex legacy quote", iex_quote, lambda b, a: parse_legacy_quote(b, *a, NOW)),
]


def _rate(fn: Callable[[], int]) -> tuple[float, float]:
    """(calls per second, items per second) of ``fn``, which returns its item count."""
    calls = items = 0
    started = time.perf_counter()
    while True:
        items += fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= MIN_SECONDS and calls >= 3:
            return calls / elapsed, items / elapsed


def main() -> None:
    future = timedelta(seconds=300)
    print(
        f"# {BODIES} distinct bodies per provider; best of {ROUNDS} interleaved rounds of {MIN_SECONDS}s"
    )
    print(
        f"{'provider / body':<34} {'json.loads':>12} {'+Decimal':>12} {'connector':>12} {'ticks/s':>12}  ratios"
    )
    for name, make, parse in CASES:
        bodies = [make(i) for i in range(BODIES)]

        def plain(bodies: list[tuple[bytes, tuple[Any, ...]]] = bodies) -> int:
            for body, _ in bodies:
                json.loads(body)
            return len(bodies)

        def decimal(bodies: list[tuple[bytes, tuple[Any, ...]]] = bodies) -> int:
            for body, _ in bodies:
                json.loads(body, parse_float=Decimal)
            return len(bodies)

        def connector(
            bodies: list[tuple[bytes, tuple[Any, ...]]] = bodies, parse: Callable[..., Any] = parse
        ) -> int:
            n = 0
            for body, args in bodies:
                for tick in _ticks(parse(body, args)):
                    validate_tick(tick, NOW, future)
                    n += 1
            return n

        base = dec = calls = ticks = 0.0
        for _ in range(ROUNDS):
            base = max(base, _rate(plain)[0])
            dec = max(dec, _rate(decimal)[0])
            c, t = _rate(connector)
            calls, ticks = max(calls, c), max(ticks, t)
        base_rps, dec_rps, conn_rps = base * BODIES, dec * BODIES, calls * BODIES
        print(
            f"{name:<34} {base_rps:>10,.0f}/s {dec_rps:>10,.0f}/s {conn_rps:>10,.0f}/s {ticks:>10,.0f}/s"
            f"  {conn_rps / base_rps:.2f}x json.loads, {conn_rps / dec_rps:.2f}x +Decimal"
        )
    # The chain's per-tick work after parsing: the dedupe decision.
    ticks = [t for i in range(BODIES) for t in parse_ws_message(finnhub_ws(i)[0], NOW)[0]]
    deduper = TickDeduper()

    def dedupe() -> int:
        for t in ticks:
            deduper.offer(t)
        return len(ticks)

    def baseline_set() -> int:
        seen: set[str] = set()
        for t in ticks:
            seen.add(t.tick_id)
        return len(ticks)

    base_tps = max(_rate(baseline_set)[1] for _ in range(ROUNDS))
    dedupe_tps = max(_rate(dedupe)[1] for _ in range(ROUNDS))
    print(
        f"{'dedupe (TickDeduper.offer)':<34} {dedupe_tps:>10,.0f} ticks/s  (plain set.add {base_tps:,.0f}/s, {dedupe_tps / base_tps:.2f}x)"
    )


if __name__ == "__main__":
    main()
