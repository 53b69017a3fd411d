"""How long a message waits in the measuring consumer: Consumer.consume vs poll.

`python -m bench.consume_probe` (local stack up). A producer sends 300
messages at 100/s, each carrying its send time; a consumer reads them with
``consume(1000, 0.2)``, then another with ``poll(0.2)``, and prints the
receive-minus-send percentiles of each. consume returns only when 1,000
messages are in or 0.2 s has passed, so at this rate every message is stamped
late; the latency benchmarks use poll (harness.received) for that reason.
"""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench import harness
from finstream.runtime.kafka import client_config
from finstream.settings import Settings

COUNT = 300
RATE = 100


def probe(settings: Settings, mode: str) -> list[float]:
    topic = f"bench-probe-{mode}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(client_config(settings))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    producer = Producer({**client_config(settings), "linger.ms": 0})
    consumer = Consumer({**client_config(settings), "group.id": topic, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    consumer.consume(10, 1.0)  # joined and fetching before the first message

    def send() -> None:
        for _ in range(COUNT):
            producer.produce(topic, str(time.time()).encode())
            producer.poll(0)
            time.sleep(1 / RATE)
        producer.flush(10)

    sender = threading.Thread(target=send)
    sender.start()
    samples: list[float] = []
    quiet_since: float | None = None
    while len(samples) < COUNT:
        if not sender.is_alive():
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 5:
                break
        if mode == "consume":
            batch = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
            now = time.time()
            samples.extend(now - float(m.value() or b"nan") for m in batch)
        else:
            samples.extend(
                now - float(m.value() or b"nan") for m, now in harness.received(consumer, 0.2)
            )
    sender.join()
    consumer.close()
    admin.delete_topics([topic])
    return samples


def main() -> None:
    settings = Settings()
    for mode in ("consume", "poll"):
        samples = probe(settings, mode)
        p50, p99 = harness.percentiles(samples)
        print(f"{mode + ':':<9} p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(samples)} messages)")


if __name__ == "__main__":
    main()
