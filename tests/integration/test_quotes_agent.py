"""Quotes agent against real Kafka and Redis: latest quote, live channel, dead letters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import redis

from finstream.domain.marketdata.ticks import make_tick
from tests.support.services import TestEnv, WorkerProcess, wait_until


def _tick(symbol: str, price: str, ts: datetime, n: int) -> tuple[str, dict]:
    t = make_tick(
        symbol=symbol, price=price, size=10, ts=ts, received_at=ts, source="test", tick_id=f"q{n}"
    )
    return symbol, t.to_record()


def test_latest_quote_is_cached_published_and_never_moves_back(env: TestEnv, log_dir: Path) -> None:
    r = redis.Redis.from_url(env.settings.redis_url.get_secret_value(), decode_responses=True)
    key = env.settings.redis_key("quote:IBM")
    pubsub = r.pubsub()
    pubsub.subscribe(env.settings.redis_key("quotes:IBM"))
    t0 = datetime.now(UTC) - timedelta(seconds=30)
    worker = WorkerProcess(env, "quotes", log_dir).start()
    try:
        env.produce_records(
            "md.ticks",
            "Tick",
            [_tick("IBM", "167.10", t0, 1), _tick("IBM", "167.25", t0 + timedelta(seconds=1), 2)],
        )
        wait_until(lambda: r.hget(key, "price") == "167.25", timeout=60, message="IBM quote")
        quote = r.hgetall(key)
        assert quote["tick_id"] == "q2"
        assert quote["ts"] == (t0 + timedelta(seconds=1)).isoformat()
        assert quote["size"] == "10"

        # A late tick (older event time) must not replace the newer quote;
        # garbage in between must not stop the partition.
        env.produce("md.ticks", [(b"IBM", b"\xc3\x01garbage")])
        env.produce_records(
            "md.ticks", "Tick", [_tick("IBM", "150.00", t0 - timedelta(seconds=5), 3)]
        )
        env.produce_records(
            "md.ticks", "Tick", [_tick("IBM", "168.00", t0 + timedelta(seconds=2), 4)]
        )
        wait_until(lambda: r.hget(key, "price") == "168", timeout=30, message="newer quote")
        assert r.hget(key, "tick_id") == "q4"

        published = []
        while (msg := pubsub.get_message(timeout=1.0)) is not None or len(published) < 3:
            if msg is None:
                break
            if msg["type"] == "message":
                published.append(json.loads(msg["data"]))
        prices = [Decimal(p["price"]) for p in published]
        assert Decimal("167.25") in prices
        assert Decimal("168") in prices
        assert Decimal("150") not in prices, "a late tick was published as the live quote"

        letters = env.consume_all("dlq", min_count=1, timeout=20)
        assert len(letters) == 1
        assert dict(letters[0].headers())["dlq.role"] == b"quotes"
    finally:
        assert worker.stop() == 0, worker.log_tail()
        pubsub.close()
        r.close()
