"""The anchor: the quotes workload as a Quix Streams application, exactly-once.

Run by the benchmarks in a virtualenv of its own (bench/anchor/requirements.txt,
created by `make bench` under .tools/anchor-venv), never by finstream itself.
It does what finstream's quotes role does on md.ticks, the way a Quix Streams
user would write it: the latest quote per symbol in the state store, and a
1-minute OHLCV bar per symbol (tumbling window on event time) published to a
topic when the window closes. The input is finstream's Avro single-object
encoded Tick; prices become floats here, which favours the anchor. Every
1,000 records it writes how many it has processed to PROGRESS_FILE (the
benchmark's measure of progress, as a finstream role's events-in counter).

    python quix_quotes.py BOOTSTRAP TOPIC GROUP OUT_TOPIC STATE_DIR PROGRESS_FILE \
        [GUARANTEE] [COMMIT_INTERVAL] [MODE]

MODE says how the bars are built:

``domain`` (the default): with finstream's own pure bar code
    (``finstream.domain.marketdata.bars.add_tick``: decimals, allowed lateness,
    revisions, duplicate ticks; bars Avro-encoded to OUT_TOPIC), the tick
    decoded and validated by finstream's topic contract, the latest tick and
    the bar state kept in Quix's state store. Exactly the quotes role's work
    but the Redis cache: the same workload on another engine.
``window``: Quix's tumbling window with its aggregations (floats, no
    lateness or revisions): what a Quix user writes first.
``stateful``: one stateful function keeping the latest quote and the open bar
    as floats: less work than the quotes role does, the fastest Quix can go.
"""

from __future__ import annotations

import io
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import fastavro
from quixstreams import Application
from quixstreams.dataframe.windows import Count, First, Last, Max, Min, Sum
from quixstreams.models.serializers import Deserializer

from bench.anchor.common import ContractValue, Progress

SCHEMA = fastavro.parse_schema(
    json.loads((Path(__file__).resolve().parents[2] / "schemas" / "Tick.avsc").read_text())
)


class AvroTick(Deserializer):
    """Avro single-object encoding: C3 01, an 8-byte fingerprint, the body."""

    def __call__(self, value: bytes, ctx: Any) -> dict[str, Any]:
        buf = io.BytesIO(value)
        buf.seek(10)
        r = fastavro.schemaless_reader(buf, SCHEMA, None)
        return {
            "symbol": r["symbol"],
            "price": float(r["price"]),
            "size": float(r["size"]) if r["size"] is not None else 0.0,
            "ts": int(r["ts"].timestamp() * 1_000_000),
            "tick_id": r["tick_id"],
        }


def keep_latest(value: dict[str, Any], state: Any) -> None:
    current = state.get("latest")
    if current is None or value["ts"] >= current["ts"]:
        state.set("latest", value)


MINUTE_US = 60_000_000


def quote_and_bar(value: dict[str, Any], state: Any) -> dict[str, Any] | None:
    """Latest quote and the open 1-minute bar in one state entry; returns a closed bar."""
    ts, price, size = value["ts"], value["price"], value["size"]
    start = ts - ts % MINUTE_US
    entry = state.get("q") or {"latest": value, "bar": None}
    if ts >= entry["latest"]["ts"]:
        entry["latest"] = value
    bar, closed = entry["bar"], None
    if bar is not None and start > bar["start"]:
        closed, bar = bar, None
    if bar is None:
        bar = {"symbol": value["symbol"], "start": start, "open": price, "high": price}
        bar.update(low=price, close=price, volume=size, trades=1)
    elif start == bar["start"]:
        bar["high"] = max(bar["high"], price)
        bar["low"] = min(bar["low"], price)
        bar["close"] = price
        bar["volume"] += size
        bar["trades"] += 1
    entry["bar"] = bar
    state.set("q", entry)
    return closed


class DomainQuotes:
    """The quotes role's work with finstream's domain code, state in Quix's store."""

    def __init__(self) -> None:
        from finstream.codec import Codec
        from finstream.domain.marketdata.bars import parse_interval

        self.codec = Codec()
        self.interval = parse_interval("1m")
        self.lateness = timedelta(seconds=5)

    def __call__(self, tick: Any, state: Any) -> list[bytes]:
        from finstream.domain.marketdata.bars import BarState, add_tick

        latest = state.get("latest")
        if latest is None or tick.ts.timestamp() >= latest:
            state.set("latest", tick.ts.timestamp())
            state.set("quote", self.codec.encode("Tick", tick.to_record()).hex())
        raw = state.get("bars")
        bars = BarState.from_json(raw.encode()) if raw is not None else BarState()
        update = add_tick(bars, tick, self.interval, self.lateness)
        if update.late is not None or update.duplicate:
            return []
        state.set("bars", update.state.to_json().decode())
        return [self.codec.encode("Bar", bar.to_record()) for bar in update.publish]


def main(argv: list[str]) -> None:
    bootstrap, topic_name, group, out_name, state_dir, progress_path = argv[:6]
    guarantee = argv[6] if len(argv) > 6 else "exactly-once"
    commit_interval = float(argv[7]) if len(argv) > 7 else 5.0
    mode = argv[8] if len(argv) > 8 else "domain"
    progress = Progress(Path(progress_path))
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee=guarantee,  # type: ignore[arg-type]
        commit_interval=commit_interval,
        state_dir=state_dir,
        loglevel="WARNING",
    )
    if mode == "domain":
        ticks = app.topic(
            topic_name, key_deserializer="str", value_deserializer=ContractValue("md.ticks")
        )
        bars_out = app.topic(out_name, value_serializer="bytes")
        sdf = app.dataframe(ticks).update(progress)
        sdf.apply(DomainQuotes(), stateful=True, expand=True).to_topic(bars_out)
        app.run()
        return
    ticks = app.topic(
        topic_name,
        key_deserializer="str",
        value_deserializer=AvroTick(),
        timestamp_extractor=lambda value, headers, timestamp, kind: value["ts"] // 1000,
    )
    bars_out = app.topic(out_name, value_serializer="json")
    sdf = app.dataframe(ticks)
    sdf = sdf.update(progress)
    if mode == "stateful":
        sdf.apply(quote_and_bar, stateful=True).filter(lambda bar: bar is not None).to_topic(
            bars_out
        )
        app.run()
        return
    sdf = sdf.update(keep_latest, stateful=True)
    bars = (
        sdf.tumbling_window(timedelta(minutes=1))
        .agg(
            open=First("price"),
            high=Max("price"),
            low=Min("price"),
            close=Last("price"),
            volume=Sum("size"),
            trades=Count(),
        )
        .final()
    )
    bars.to_topic(bars_out)
    app.run()


if __name__ == "__main__":
    main(sys.argv[1:])
