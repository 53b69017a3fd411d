"""The anchor: the quotes workload as a Quix Streams application, exactly-once.

Run by the benchmarks in a virtualenv of its own (bench/anchor/requirements.txt,
created by `make bench` under .tools/anchor-venv), never by finstream itself.
It does what finstream's quotes role does on md.ticks, the way a Quix Streams
user would write it: the latest quote per symbol in the state store, and a
1-minute OHLCV bar per symbol (tumbling window on event time) published to a
topic when the window closes. The input is finstream's Avro single-object
encoded Tick; prices become floats here, which favours the anchor.

    python quix_quotes.py BOOTSTRAP TOPIC GROUP OUT_TOPIC STATE_DIR [GUARANTEE] [COMMIT_INTERVAL]
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


def main(argv: list[str]) -> None:
    bootstrap, topic_name, group, out_name, state_dir = argv[:5]
    guarantee = argv[5] if len(argv) > 5 else "exactly-once"
    commit_interval = float(argv[6]) if len(argv) > 6 else 5.0
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee=guarantee,  # type: ignore[arg-type]
        commit_interval=commit_interval,
        state_dir=state_dir,
        loglevel="WARNING",
    )
    ticks = app.topic(
        topic_name,
        key_deserializer="str",
        value_deserializer=AvroTick(),
        timestamp_extractor=lambda value, headers, timestamp, kind: value["ts"] // 1000,
    )
    bars_out = app.topic(out_name, value_serializer="json")
    sdf = app.dataframe(ticks)
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
