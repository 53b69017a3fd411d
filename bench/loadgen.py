"""An offered load at a fixed rate, in its own process (never in the measuring loop).

    python -m bench.loadgen ticks BOOTSTRAP NAMESPACE RATE SECONDS SYMBOLS [SEED] [UNIVERSE]
    python -m bench.loadgen requests BOOTSTRAP NAMESPACE RATE SECONDS USERS

``ticks``: ticks of the first SYMBOLS of UNIVERSE symbols (bench.workloads;
UNIVERSE defaults to SYMBOLS), round robin, each
stamped with the time it is sent (ts = received_at = now, tick_id ``lat-N``).
The first CROSSING_SYMBOLS symbols swing 0.1% around their first price of the
tape with SEED, across the crossing level the alerts benchmark puts there;
the others stay put.

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
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from confluent_kafka import Producer

from bench.workloads import CROSSING_SYMBOLS, first_prices, symbols, tape
from finstream.codec import Codec
from finstream.domain.marketdata.ticks import Tick


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
        universe = symbols(int(argv[7]) if len(argv) > 7 else size)
        first = first_prices(
            tape(universe, len(universe), datetime.now(UTC), timedelta(milliseconds=1), seed)
        )
        syms = universe[:size]
        topic = f"{namespace}md.ticks"
    else:
        topic = f"{namespace}notify.requests"
    rng = random.Random(7)
    started = time.perf_counter()
    n = 0
    while n < total:
        # Send what is due, in bursts: one wake-up per millisecond or two, not per record.
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due <= n:
            time.sleep(max(0.0, started + n / rate - time.perf_counter()))
            continue
        now = datetime.now(UTC)
        for i in range(n, due):
            if kind == "ticks":
                index = i % len(syms)
                symbol = syms[index]
                if index < CROSSING_SYMBOLS:
                    factor = Decimal("1.001") if (i // len(syms)) % 2 else Decimal("0.999")
                else:
                    factor = Decimal("0.998")
                tick = Tick(
                    tick_id=f"lat-{i}",
                    symbol=symbol,
                    price=(first[symbol] * factor).quantize(Decimal("0.00000001")),
                    size=Decimal(10),
                    ts=now,
                    received_at=now,
                    source="loadgen",
                )
                key, value = symbol.encode(), codec.encode("Tick", tick.to_record())
            else:
                user = f"user-{rng.randrange(size)}"
                record: dict[str, Any] = {
                    "request_id": f"lat-{uuid.uuid4().hex}",
                    "user_id": user,
                    "category": "price_alert",
                    "priority": "HIGH",
                    "template": "price_alert",
                    "data": {
                        "symbol": "AAPL",
                        "price": "190.10",
                        "title": "AAPL",
                        "body": "crossed",
                    },
                    "channels": [],
                    "deliver_at": None,
                    "expires_at": None,
                    "collapse_key": None,
                    "created_at": now,
                    "source": "loadgen",
                    "correlation_id": None,
                }
                key, value = user.encode(), codec.encode("NotificationRequest", record)
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
