"""The anchor of the alerts benchmark: the alerts role's evaluation on Quix Streams.

    python quix_alerts.py BOOTSTRAP TICKS_TOPIC GROUP OUT_TOPIC STATE_DIR PROGRESS_FILE RULES_FILE

Each tick (finstream's md.ticks contract: Avro decode and validation) is
evaluated with finstream's pure alert engine against its symbol's rule book,
with the symbol's evaluation state in Quix's state store (exactly-once, the
default 5 s commit interval); firings are published as Avro AlertFired
records. The rules come from RULES_FILE (a pickle of AlertRule objects) and
are held in memory, built into rule books once: the finstream role keeps
them in a changelog-backed store instead, which is more work, not less.
"""

from __future__ import annotations

import pickle
import sys
from collections import defaultdict
from typing import Any

from quixstreams import Application

from bench.anchor.common import ContractValue, Progress
from finstream.codec import Codec
from finstream.domain.alerts.books import RuleBook
from finstream.domain.alerts.engine import SymbolState, evaluate
from finstream.domain.marketdata.bars import parse_interval
from finstream.domain.time import utcnow


class Evaluate:
    def __init__(self, rules_file: str) -> None:
        interval = parse_interval("1m")
        with open(rules_file, "rb") as f:
            rules = pickle.load(f)
        by_symbol: dict[str, list[Any]] = defaultdict(list)
        for rule in rules:
            by_symbol[rule.symbol].append(rule)
        self.books = {s: RuleBook.build(r, interval) for s, r in by_symbol.items()}
        self.empty = RuleBook.build((), interval)
        self.codec = Codec()

    def __call__(self, tick: Any, state: Any) -> list[bytes]:
        raw = state.get("s")
        current = SymbolState.from_bytes(raw.encode()) if raw is not None else SymbolState()
        result = evaluate(current, self.books.get(tick.symbol, self.empty), tick)
        if result.stale or result.duplicate:
            return []
        state.set("s", result.state.to_bytes().decode())
        now = utcnow()
        return [self.codec.encode("AlertFired", f.alert_fired(now)) for f in result.firings]


def main(argv: list[str]) -> None:
    bootstrap, ticks_name, group, out_name, state_dir, progress_path, rules_file = argv[:7]
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    ticks = app.topic(
        ticks_name, key_deserializer="str", value_deserializer=ContractValue("md.ticks")
    )
    out = app.topic(out_name, value_serializer="bytes")
    sdf = app.dataframe(ticks).update(Progress(progress_path))
    sdf.apply(Evaluate(rules_file), stateful=True, expand=True).to_topic(out)
    app.run()


if __name__ == "__main__":
    main(sys.argv[1:])
