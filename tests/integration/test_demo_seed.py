"""The demo seed against real Kafka: rules and requests wait for the router.

Kafka orders the router's two inputs (preferences, requests) not at all
against each other, so the seed holds back its requests until the router's
consumer group has committed past the preferences it wrote.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from finstream.cli import demo
from tests.support.services import TestEnv


def _commit_as_router(env: TestEnv, name: str) -> None:
    """Commit the router group to the end of a topic, as a router that consumed it would."""
    admin = AdminClient(env.kafka_config())
    reader = Consumer({**env.kafka_config(), "group.id": "test-demo-seed-ends", "log_level": 3})
    try:
        topic = env.topic(name)
        parts = reader.list_topics(topic, timeout=10).topics[topic].partitions
        ends = [
            TopicPartition(topic, p, reader.get_watermark_offsets(TopicPartition(topic, p), 10)[1])
            for p in parts
        ]
    finally:
        reader.close()
    request = ConsumerGroupTopicPartitions(env.settings.group("router"), ends)
    for future in admin.alter_consumer_group_offsets([request], request_timeout=10).values():
        future.result(timeout=30)


def test_rules_and_requests_go_out_only_after_the_router_committed_the_preferences(
    env: TestEnv,
) -> None:
    items = demo.records(env.settings, datetime.now(UTC), {})
    outcome: list[bool] = []
    seeding = threading.Thread(
        target=lambda: outcome.append(demo.publish(env.settings, items, router_wait=120))
    )
    seeding.start()
    try:
        prefs = env.consume_all("notify.preferences", min_count=len(demo.PERSONAS), timeout=30)
        assert len(prefs) == len(demo.PERSONAS)
        # The preferences are out and nothing has committed them: the rest is held.
        assert seeding.is_alive()
        assert env.consume_all("notify.requests", timeout=1) == []
        assert env.consume_all("alerts.rules", timeout=1) == []

        _commit_as_router(env, "notify.preferences")
        seeding.join(timeout=60)
        assert outcome == [True]
        requests = [i for i in items if i[0] == "notify.requests"]
        rules = [i for i in items if i[0] == "alerts.rules"]
        assert len(env.consume_all("notify.requests", min_count=len(requests))) == len(requests)
        assert len(env.consume_all("alerts.rules", min_count=len(rules))) == len(rules)
    finally:
        seeding.join(timeout=180)


def test_publish_reports_a_router_that_never_consumed_and_still_publishes(env: TestEnv) -> None:
    items = demo.records(env.settings, datetime.now(UTC), {})
    requests = [i for i in items if i[0] == "notify.requests"]
    before = len(env.consume_all("notify.requests"))  # the module's topics are shared
    assert demo.publish(env.settings, items, router_wait=1) is False
    got = env.consume_all("notify.requests", min_count=before + len(requests), timeout=30)
    assert len(got) == before + len(requests)
