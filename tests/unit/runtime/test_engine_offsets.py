"""A send_offsets_to_transaction that never returns does not wedge the engine.

librdkafka can block in it past its own timeout (confluentinc/librdkafka#5456,
#5511); tests/e2e/test_faults_pipeline.py met it after a broker restart. The
engine runs the call on a daemon thread with a bound: past it, the producer is
abandoned and the transaction fails like a Kafka error (the replacement
producer fences the abandoned one). Driven here with a fake producer.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from finstream.runtime.engine import StreamEngine
from finstream.runtime.kafka import kafka_error
from finstream.runtime.stream.commits import _DaemonCaller
from finstream.settings import Settings

OFFSETS = [TopicPartition("t", 0, 5)]


class FakeConsumer:
    def consumer_group_metadata(self) -> str:
        return "group-metadata"


class FakeProducer:
    def __init__(self, block: threading.Event | None = None, fail: bool = False) -> None:
        self.block = block
        self.fail = fail
        self.calls: list[tuple[Any, ...]] = []

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, timeout: float) -> None:
        self.calls.append((offsets, metadata, timeout))
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced"))
        if self.block is not None:
            self.block.wait()


class QuickEngine(StreamEngine):
    """The engine's offsets path only. ``grace``: past the call's own timeout; a
    fraction of a second where the call must be abandoned, else long enough that a
    loaded machine's thread handoff never looks like a call that did not return."""

    def __init__(self, grace: float = 30.0) -> None:  # only what _send_offsets uses
        self._offsets_grace = grace
        self.settings = Settings()
        self.role = "router"
        self._consumer = FakeConsumer()
        self._producer = None
        self._in_txn = True
        self._offsets_calls = _DaemonCaller("test-txn-offsets")

    @property
    def _txn_call_timeout(self) -> float:
        return 0.1


def test_an_answered_call_goes_through_with_its_timeout() -> None:
    engine = QuickEngine()
    producer = FakeProducer()
    engine._producer = producer
    engine._send_offsets(producer, OFFSETS)
    assert producer.calls == [(OFFSETS, "group-metadata", 0.1)]
    assert engine._producer is producer
    assert engine._in_txn


def test_a_kafka_error_of_the_call_is_raised_as_it_is() -> None:
    engine = QuickEngine()
    producer = FakeProducer(fail=True)
    engine._producer = producer
    with pytest.raises(KafkaException) as raised:
        engine._send_offsets(producer, OFFSETS)
    err = kafka_error(raised.value)
    assert err is not None
    assert err.code() == KafkaError._FENCED
    assert engine._producer is producer  # _abort decides what to do with it


def test_a_call_that_never_returns_abandons_the_producer_and_fails_the_transaction() -> None:
    engine = QuickEngine(grace=0.2)
    release = threading.Event()
    stuck = FakeProducer(block=release)
    engine._producer = stuck
    caller = engine._offsets_calls
    try:
        with pytest.raises(KafkaException) as raised:
            engine._send_offsets(stuck, OFFSETS)
        err = kafka_error(raised.value)
        assert err is not None
        assert err.code() == KafkaError._TIMED_OUT
        assert "did not return" in err.str()
        # Abandoned: no producer (the next step makes one, fencing this one), no
        # transaction open, and a fresh thread for the next call.
        assert engine._producer is None
        assert not engine._in_txn
        assert engine._offsets_calls is not caller
        engine._offsets_grace = 30.0  # the fresh thread's first call: answered, however slowly
        fresh = FakeProducer()
        engine._send_offsets(fresh, OFFSETS)
        assert len(fresh.calls) == 1
    finally:
        release.set()


def test_a_blocked_call_does_not_keep_the_process_from_exiting() -> None:
    """A ThreadPoolExecutor's thread is joined at exit: a stopped worker hung on SIGTERM."""
    script = (
        "import threading\n"
        "from finstream.runtime.stream.commits import _DaemonCaller\n"
        "caller = _DaemonCaller('blocked')\n"
        "caller.submit(threading.Event().wait)\n"
        "caller.close()\n"
        "print('exiting')\n"
    )
    # The bound only turns a hang into a failure; a healthy run takes a second.
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "exiting"), proc.stderr
