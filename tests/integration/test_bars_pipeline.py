"""Bars end to end on the real stack: quotes agent -> md.bars.1m -> bars sink ->
PostgreSQL and Redis, with late corrections (higher revisions) and too-late ticks in dlq."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis

from finstream.domain.deadletter import H_ERROR_CLASS, H_ERROR_MESSAGE, parse_headers
from finstream.domain.marketdata.ticks import make_tick
from tests.support.services import TestEnv, wait_until, workers

NOW = datetime.now(UTC)
T0 = (NOW - timedelta(minutes=30)).replace(second=0, microsecond=0)
T0 -= timedelta(minutes=T0.minute % 5)  # on a 5-minute boundary too


def tick(
    symbol: str, n: int, price: str, at: datetime, size: int = 10
) -> tuple[str, dict[str, Any]]:
    t = make_tick(
        tick_id=f"b{n}", symbol=symbol, price=price, size=size, ts=at, received_at=at, source="test"
    )
    return symbol, t.to_record()


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_bars_are_built_corrected_stored_and_published(env: TestEnv, log_dir: Path) -> None:
    r = redis.Redis.from_url(env.settings.redis_url.get_secret_value(), decode_responses=True)
    channel = env.settings.redis_key("bars:1m:IBM")
    pubsub = r.pubsub()
    pubsub.subscribe(channel)
    with workers(env, log_dir, "quotes", "bars", bar_intervals="1m,5m", bar_allowed_lateness="5"):
        env.produce_records(
            "md.ticks",
            "Tick",
            [
                tick("IBM", 1, "100", s(1), 10),
                tick("IBM", 2, "104", s(20), 30),
                tick("IBM", 3, "99", s(50), 10),
                tick("IBM", 4, "101", s(61)),  # bar 0 closes (not final yet)
                tick("IBM", 5, "98", s(59)),  # late by 2 s, within lateness: correction
                tick("IBM", 6, "102", s(66)),  # watermark 66 >= 60 + 5: bar 0 final
                tick("IBM", 7, "120", s(30)),  # too late: bar 0 is final
                tick("IBM", 8, "103", s(125)),  # closes bar 1 (and makes it final)
                tick("IBM", 9, "104", s(301)),  # closes the first 5m bar
                tick("IBM", 10, "105", s(400)),
                tick("MSFT", 11, "400", s(5)),
                tick("MSFT", 12, "401", s(70)),
            ],
        )
        expected = {
            ("IBM", "1m", T0),
            ("IBM", "1m", s(60)),
            ("IBM", "1m", s(120)),
            ("IBM", "1m", s(300)),
            ("IBM", "5m", T0),
            ("MSFT", "1m", T0),
        }

        def stored() -> list[Any] | None:
            rows = env.sql("SELECT * FROM bars ORDER BY symbol, interval, start")
            done = {(x["symbol"], x["interval"], x["start"]) for x in rows if x["final"]}
            return rows if done >= expected else None

        rows = wait_until(stored, timeout=90, message="bars in PostgreSQL")

        def cached_final() -> bool:
            # The sink writes Redis after PostgreSQL.
            first = r.zrange(channel, 0, 0)
            return bool(first) and json.loads(first[0])["revision"] == 2

        wait_until(cached_final, timeout=30, message="the final bar in Redis")
        dlq = wait_until(
            lambda: [m for m in env.consume_all("dlq", timeout=5) if m.key() == b"IBM"] or None,
            timeout=30,
            message="late tick in dlq",
        )

    ibm_1m = {x["start"]: x for x in rows if x["symbol"] == "IBM" and x["interval"] == "1m"}
    bar0 = ibm_1m[T0]
    assert (bar0["open"], bar0["high"], bar0["low"], bar0["close"]) == (
        Decimal("100"),
        Decimal("104"),
        Decimal("98"),
        Decimal("98"),  # the late tick (59 s) is the latest by exchange time: the close
    )
    assert bar0["volume"] == Decimal("60")
    assert bar0["trades"] == 4
    assert bar0["vwap"] == Decimal("101.5")  # (1000 + 3120 + 990 + 980) / 60
    assert bar0["final"] is True
    assert bar0["revision"] == 2
    assert bar0["end"] == s(60)
    bar1 = ibm_1m[s(60)]
    assert (bar1["open"], bar1["close"], bar1["trades"], bar1["final"]) == (
        Decimal("101"),
        Decimal("102"),
        2,
        True,
    )
    five = [x for x in rows if x["symbol"] == "IBM" and x["interval"] == "5m"]
    # Too late for its 1m bar, the 120 tick is still on time for the open 5m bar.
    assert [(x["start"], x["high"], x["trades"], x["final"]) for x in five] == [
        (T0, Decimal("120"), 8, True)
    ]
    assert {(x["symbol"], x["interval"], x["start"]) for x in rows} == expected

    # Every publication on the topic, in order: rev 0, the correction, then final.
    published = [
        env.codec.decode(m.value(), "Bar")
        for m in env.consume_all("md.bars.1m")
        if m.key() == b"IBM"
    ]
    first = [
        (b["revision"], b["final"], b["low"])
        for b in published
        if b["interval"] == "1m" and b["start"] == T0
    ]
    assert first == [(0, False, Decimal("99")), (1, False, Decimal("98")), (2, True, Decimal("98"))]

    headers = parse_headers(dlq[0].headers() or [])
    assert headers[H_ERROR_CLASS] == "LateTick"
    assert "late tick" in headers[H_ERROR_MESSAGE]
    assert "allowed lateness of 5s" in headers[H_ERROR_MESSAGE]
    assert "1m bar" in headers[H_ERROR_MESSAGE]
    assert "5m bar" not in headers[H_ERROR_MESSAGE]
    assert env.codec.decode(dlq[0].value(), "Tick")["tick_id"] == "b7"

    # Redis: latest bars, one member per start, newest last; corrections replaced in place.
    members = [json.loads(m) for m in r.zrange(env.settings.redis_key("bars:1m:IBM"), 0, -1)]
    assert [m["start"] for m in members] == sorted(m["start"] for m in members)
    assert len({m["start"] for m in members}) == len(members)
    assert members[0]["start"] == T0.isoformat()
    assert members[0]["revision"] == 2
    assert members[0]["vwap"] == "101.5"
    assert members[0]["close"] == "98"
    assert set(members[0]) == {
        "symbol",
        "interval",
        "start",
        "end",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "vwap",
        "trades",
        "final",
        "revision",
    }
    live = []
    while (msg := pubsub.get_message(timeout=1.0)) is not None:
        if msg["type"] == "message":
            live.append(json.loads(msg["data"]))
    # A batch stores only its highest revision, so subscribers may skip some, never go back.
    revisions = [m["revision"] for m in live if m["start"] == T0.isoformat()]
    assert revisions
    assert revisions == sorted(set(revisions))
    assert revisions[-1] == 2
