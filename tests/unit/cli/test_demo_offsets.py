"""The demo seed's wait for the router: a broker's refusal is said at once, a transient
error is asked again. The admin client is a stand-in answering as librdkafka does
(a future whose result raises KafkaException); the round trip against the real broker
is in tests/integration/test_demo_seed.py."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition

from finstream.cli import demo
from finstream.settings import Settings


class Answers:
    """What successive OffsetFetch requests answer: an error code, or committed offsets."""

    def __init__(self, *answers: int | dict[int, int]) -> None:
        self.answers = list(answers)
        self.asked = 0

    def __call__(self, _config: dict[str, Any]) -> Answers:
        return self

    def list_consumer_group_offsets(
        self, queries: list[ConsumerGroupTopicPartitions], request_timeout: float
    ) -> dict[str, Future[Any]]:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        future: Future[Any] = Future()
        if isinstance(answer, int):
            future.set_exception(KafkaException(KafkaError(answer)))
        else:
            group = queries[0].group_id
            future.set_result(
                ConsumerGroupTopicPartitions(
                    group, [TopicPartition("t", p, o) for p, o in answer.items()]
                )
            )
        return {queries[0].group_id: future}


@pytest.fixture
def settings() -> Settings:
    return Settings(namespace="demo-unit.")


def test_an_authorization_refusal_is_raised_at_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = Answers(KafkaError.GROUP_AUTHORIZATION_FAILED)
    monkeypatch.setattr("confluent_kafka.admin.AdminClient", answers)
    with pytest.raises(RuntimeError, match="cannot read the router's committed offsets"):
        demo.router_has_consumed(settings, "t", {0: 5}, timeout=30)
    assert answers.asked == 1


def test_a_transient_error_is_asked_again_until_the_offsets_are_committed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = Answers(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, {0: 2}, {0: 5})
    monkeypatch.setattr("confluent_kafka.admin.AdminClient", answers)
    assert demo.router_has_consumed(settings, "t", {0: 5}, timeout=30)
    assert answers.asked == 3


def test_no_commit_by_the_deadline_is_false(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = Answers(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    monkeypatch.setattr("confluent_kafka.admin.AdminClient", answers)
    assert not demo.router_has_consumed(settings, "t", {0: 5}, timeout=0)
