"""The engine's Kafka probe answers while the role's own transaction holds offsets.

An exactly-once role always has a transaction open with offsets sent to it
(KIP-447: pending offsets). A read_committed consumer asks for committed
offsets with require_stable, the broker answers "unstable" until the
transaction ends, and librdkafka retries until the probe's deadline: CI
rehearsal 13 saw quotes' readiness turn red for a healthy role that way
("Failed to get committed offsets: Local: Timed out"). Here a transaction is
held open on purpose, longer than the probe's deadline.
"""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from finstream.runtime.engine import StreamEngine
from finstream.runtime.health import HealthServer
from finstream.runtime.stream.events import Processor
from tests.support.services import TestEnv, wait_until

TOPIC = "md.ticks"


def test_probe_reads_committed_offsets_and_lag_while_a_transaction_holds_new_offsets(
    env: TestEnv,
) -> None:
    settings = env.settings.model_copy(update={"health_probe_timeout": 3.0})
    group = f"probe-{uuid.uuid4().hex[:8]}"
    engine = StreamEngine(
        settings,
        "quotes",
        [TOPIC],
        Processor(),
        HealthServer("quotes", "127.0.0.1", 0),
        guarantee="exactly_once",
        group=group,
    )
    engine._assignment = frozenset({0})
    topic = env.topic(TOPIC)
    producer = Producer(
        {**env.kafka_config(), "transactional.id": f"probe-test-{uuid.uuid4().hex}"}
    )
    member = Consumer({**env.kafka_config(), "group.id": group})
    try:
        producer.init_transactions(30)
        producer.begin_transaction()
        written: list[int] = []

        def delivered(err: object, msg: Message) -> None:
            assert err is None, err
            written.append(msg.offset() or 0)

        for i in range(3):
            producer.produce(
                topic,
                f"tick-{i}".encode(),
                partition=0,
                on_delivery=delivered,
            )
        producer.commit_transaction(30)
        assert len(written) == 3

        def stable_end() -> int:
            # commit_transaction returns before the commit marker is on the
            # partition; until it is, a read_committed end is the last stable
            # offset, still 0 here (CI saw end - 2 = -2, which librdkafka's
            # send_offsets_to_transaction ignores: nothing was ever committed).
            ends = member.get_watermark_offsets(TopicPartition(topic, 0), 10)
            assert ends is not None
            return int(ends[1]) if ends[1] > max(written) else 0

        end = wait_until(stable_end, timeout=30, message="the data transaction's marker")

        # The role's group has committed one record short of the end.
        producer.begin_transaction()
        producer.send_offsets_to_transaction(
            [TopicPartition(topic, 0, end - 2)], member.consumer_group_metadata(), 30
        )
        producer.commit_transaction(30)

        def committed(offset: int) -> bool:
            # The coordinator writes a transaction's offsets after it answered
            # the commit (a probe right after it saw none: lag 4).
            engine._probe_kafka_sync()
            return engine._probe_committed == (frozenset({0}), offset)

        wait_until(lambda: committed(end - 2), timeout=30, message="the first offsets committed")

        # A transaction holds the rest of the way, pending, past the probe's deadline.
        producer.begin_transaction()
        producer.send_offsets_to_transaction(
            [TopicPartition(topic, 0, end)], member.consumer_group_metadata(), 30
        )
        engine._probe_kafka_sync()
        assert engine._lag == 2
        assert engine._probe_committed == (frozenset({0}), end - 2)

        producer.commit_transaction(30)
        wait_until(
            lambda: committed(end), timeout=30, message="the transaction's offsets committed"
        )
        assert engine._lag == 0
    finally:
        engine._close_probe_clients()
        member.close()
