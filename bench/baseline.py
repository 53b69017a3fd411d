"""The baseline: a raw confluent-kafka consume + decode loop, the least any consumer does.

    python -m bench.baseline BOOTSTRAP TOPIC CATALOGUE_NAME COUNT

Reads the first COUNT records of TOPIC twice, decoding and validating each
with the topic's contract (finstream.topics), as every finstream role must:
the first pass warms the process, the second is timed. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from finstream.topics import DecodeContext, contract


def one_pass(bootstrap: str, topic: str, name: str, count: int) -> float:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-baseline-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "log_level": 3,
        }
    )
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    decode = contract(name).decode
    ctx = DecodeContext(datetime.now(UTC), timedelta(days=3650))
    seen = 0
    started = time.perf_counter()
    while seen < count:
        for m in c.consume(5000, 0.5):
            if m.error() is None:
                decode(m.value(), ctx)
                seen += 1
    elapsed = time.perf_counter() - started
    c.close()
    return elapsed


def main(argv: list[str]) -> None:
    bootstrap, topic, name, count = argv[0], argv[1], argv[2], int(argv[3])
    one_pass(bootstrap, topic, name, count)
    seconds = one_pass(bootstrap, topic, name, count)
    print(json.dumps({"rate": count / seconds, "records": count, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
