"""An offered load at a fixed rate, in its own process (never in the measuring loop).

    python -m bench.loadgen ticks BOOTSTRAP NAMESPACE RATE SECONDS SYMBOLS [SEED] [UNIVERSE]
    python -m bench.loadgen requests BOOTSTRAP NAMESPACE RATE SECONDS USERS

``ticks``: ticks of the first SYMBOLS of UNIVERSE symbols (bench.workloads;
UNIVERSE defaults to SYMBOLS), round robin, each
stamped with the time it is sent (ts = received_at = now, tick_id ``lat-N``).
The first CROSSING_SYMBOLS symbols swing 0.1% around their first price of the
tape with SEED, across the crossing level the alerts benchmark puts there;
the others stay put.

Ticks are encoded before the clock starts and only stamped when sent
(:class:`Stamped`): building and encoding each one while sending took some
60-100 us of the generator's CPU per tick, about a third of a core at
5,000 ticks/s on the two cores the worker under measurement shares.

``requests``: price-alert notification requests to random users among USERS,
created_at = now.

Prints one JSON line: records sent and the rate achieved.
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from confluent_kafka import Producer

from bench.workloads import CROSSING_SYMBOLS, first_prices, symbols, tape
from finstream.codec import Codec
from finstream.domain.marketdata.ticks import Tick

# Any fixed instant: the send time replaces it (Stamped).
_PLACEHOLDER = datetime(2030, 1, 1, tzinfo=UTC)


def _varint(n: int) -> bytes:
    """An Avro long: zigzag, then little-endian base-128."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _micros(ts: datetime) -> int:
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


class Stamped:
    """An encoded tick whose ts and received_at are written when it is sent.

    In the Tick schema the two timestamps are adjacent longs, so the payload
    is what comes before them, the two, and what comes after.
    """

    def __init__(self, payload: bytes) -> None:
        mark = _varint(_micros(_PLACEHOLDER)) * 2
        at = payload.find(mark)
        if at < 0 or payload.find(mark, at + 1) >= 0:
            raise ValueError("the placeholder timestamps are not found once in the payload")
        self.head, self.tail = payload[:at], payload[at + len(mark) :]

    def at(self, micros: int) -> bytes:
        ts = _varint(micros)
        return self.head + ts + ts + self.tail


def ticks(
    codec: Codec, total: int, size: int, seed: int, universe_size: int
) -> list[tuple[bytes, Stamped]]:
    universe = symbols(universe_size)
    first = first_prices(
        tape(universe, len(universe), datetime.now(UTC), timedelta(milliseconds=1), seed)
    )
    syms = universe[:size]
    # One record per symbol and price: only the tick id differs from tick to tick.
    records: dict[tuple[str, Decimal], dict[str, Any]] = {}
    out = []
    for i in range(total):
        index = i % len(syms)
        symbol = syms[index]
        if index < CROSSING_SYMBOLS:
            factor = Decimal("1.001") if (i // len(syms)) % 2 else Decimal("0.999")
        else:
            factor = Decimal("0.998")
        record = records.get((symbol, factor))
        if record is None:
            record = Tick(
                tick_id="",
                symbol=symbol,
                price=(first[symbol] * factor).quantize(Decimal("0.00000001")),
                size=Decimal(10),
                ts=_PLACEHOLDER,
                received_at=_PLACEHOLDER,
                source="loadgen",
            ).to_record()
            records[(symbol, factor)] = record
        record["tick_id"] = f"lat-{i}"
        out.append((symbol.encode(), Stamped(codec.encode("Tick", record))))
    return out


def requests(codec: Codec, users: int) -> Iterator[tuple[bytes, bytes]]:
    rng = random.Random(7)
    while True:
        user = f"user-{rng.randrange(users)}"
        record: dict[str, Any] = {
            "request_id": f"lat-{uuid.uuid4().hex}",
            "user_id": user,
            "category": "price_alert",
            "priority": "HIGH",
            "template": "price_alert",
            "data": {
                "symbol": "AAPL",
                "price": "190.10",
                # What the price_alert template needs: without it the router
                # drops the request as unrenderable and nothing is measured.
                "description": "AAPL crossed above 190.00",
            },
            "channels": [],
            "deliver_at": None,
            "expires_at": None,
            "collapse_key": None,
            "created_at": datetime.now(UTC),
            "source": "loadgen",
            "correlation_id": None,
        }
        yield user.encode(), codec.encode("NotificationRequest", record)


def main(argv: list[str]) -> None:
    kind, bootstrap, namespace = argv[0], argv[1], argv[2]
    rate, seconds, size = int(argv[3]), float(argv[4]), int(argv[5])
    codec = Codec()
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 2,
            "log_level": 3,
        }
    )
    total = int(rate * seconds)
    if kind == "ticks":
        seed = int(argv[6]) if len(argv) > 6 else 5
        stamped = ticks(codec, total, size, seed, int(argv[7]) if len(argv) > 7 else size)
        now_us = time.time_ns() // 1000
        check = codec.decode(stamped[0][1].at(now_us), "Tick")
        if _micros(check["ts"]) != now_us or _micros(check["received_at"]) != now_us:
            raise SystemExit(f"stamping is broken: {check}")
        topic = f"{namespace}md.ticks"
    else:
        made = requests(codec, size)
        topic = f"{namespace}notify.requests"
    started = time.perf_counter()
    n = 0
    while n < total:
        # Send what is due, in bursts: at most one wake-up per millisecond, not one per record.
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due <= n:
            time.sleep(max(0.001, started + n / rate - time.perf_counter()))
            continue
        now_us = time.time_ns() // 1000
        for i in range(n, due):
            if kind == "ticks":
                key, tick = stamped[i]
                value = tick.at(now_us)
            else:
                key, value = next(made)
            while True:
                try:
                    p.produce(topic, key=key, value=value)
                    break
                except BufferError:
                    p.poll(0.01)
        n = due
        p.poll(0)
    achieved = total / (time.perf_counter() - started)
    p.flush(60)
    print(json.dumps({"sent": total, "rate": achieved}))


if __name__ == "__main__":
    main(sys.argv[1:])
