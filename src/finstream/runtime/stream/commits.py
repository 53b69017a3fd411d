"""Producing, commits (one Kafka transaction, or offsets after idempotent writes), and rewinds."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Producer, TopicPartition

from finstream.runtime.kafka import kafka_error, producer_config
from finstream.runtime.metrics import EVENTS_OUT
from finstream.runtime.stream.base import COMMIT_SECONDS, TRANSACTIONS, EngineBase, log
from finstream.runtime.stream.events import Rewind

T = TypeVar("T")


class _DaemonCaller:
    """Runs calls one at a time on a daemon thread of its own.

    For a call that may never return: a ThreadPoolExecutor's threads are
    joined when the interpreter exits, so one blocked call would keep a
    stopped worker from exiting; a daemon thread is not waited for.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[
            tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ]
        self._calls = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((future, fn, args))
        return future

    def close(self) -> None:
        """The thread ends after the call it is in, if any (never, for a blocked one)."""
        self._calls.put(None)


class Commits(EngineBase):
    """The engine's producing, committing and rewinding (Kafka thread)."""

    _offsets_calls: _DaemonCaller

    # -- producing ----------------------------------------------------------------------------

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        partition: int | None,
    ) -> None:
        producer = self._producer
        if self.exactly_once and producer is None:
            raise Rewind("the transactional producer is being replaced")
        if self.exactly_once and not self._in_txn:
            producer.begin_transaction()
            self._in_txn = True
            self._txn_started = time.monotonic()
        kwargs: dict[str, Any] = {"key": key, "value": value}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
        self._produced[topic] += 1

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    # -- commits ------------------------------------------------------------------------------

    def _commit(self) -> bool:
        """Commit what was processed (Kafka thread); True when offsets moved.

        Raises :class:`Rewind` if it cannot.
        """
        started = time.perf_counter()
        # Positions also move when nothing reaches the processor: past a transaction
        # marker read by a later, empty consume, or past an aborted transaction's
        # records (after a producer crashed), which a read_committed consumer skips.
        # Committing them keeps a caught-up group's lag at zero. Never past a batch
        # that failed (its rewind is pending).
        offsets = [] if self._needs_rewind else self._offsets_to_commit()
        if self.exactly_once:
            if not offsets and not self._in_txn and not any(s.dirty for s in self.stores):
                self._last_commit = time.monotonic()
                return False
            self._commit_transaction(offsets)
        else:
            if not offsets and not self._produced:
                self._last_commit = time.monotonic()
                return False
            self._commit_offsets(offsets)
        for topic, n in self._produced.items():
            EVENTS_OUT.labels(self.role, topic).inc(n)
        self._produced.clear()
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self._last_commit = time.monotonic()
        COMMIT_SECONDS.labels(self.role).observe(time.perf_counter() - started)
        return bool(offsets)

    def _offsets_to_commit(self) -> list[TopicPartition]:
        """The consumer's positions that moved since the last commit.

        Every record consumed before this point has been processed: the engine
        commits only between batches (and in the revocation callback, which
        runs before the next batch is handed out).
        """
        assignment = self._consumer.assignment()
        if not assignment:
            return []
        committed = self._committed
        return [
            tp
            for tp in self._consumer.position(assignment)
            if tp.offset >= 0 and committed.get((tp.topic, tp.partition)) != tp.offset
        ]

    def _commit_transaction(self, offsets: list[TopicPartition]) -> None:
        self._ensure_producer()
        producer = self._producer
        try:
            if not self._in_txn:
                producer.begin_transaction()
                self._in_txn = True
            for store in self.stores:
                for partition, key, value in store.drain_dirty():
                    self._produce(store.changelog, key, value, None, partition)
            if offsets:
                self._send_offsets(producer, offsets)
            self._end_transaction()
        except KafkaException as exc:
            self._abort(exc)
            raise Rewind(f"transaction aborted: {exc}") from exc
        TRANSACTIONS.labels(self.role, "committed").inc()

    # How long past its own timeout a send_offsets_to_transaction may take.
    _offsets_grace = 5.0

    def _send_offsets(self, producer: Any, offsets: list[TopicPartition]) -> None:
        """send_offsets_to_transaction, on a thread of its own and bounded.

        librdkafka can block in it past its own timeout when the group
        coordinator it cached went away (confluentinc/librdkafka#5456 and
        #5511, open in 2.16): seen here as a router whose first transaction
        after a broker restart never returned, while the others recovered. A
        call that has not returned in time abandons its producer (its thread
        stays blocked; the producer is kept, never closed, since closing it
        would block too; the thread is a daemon, so it does not hold the
        process at exit) and fails the transaction like any Kafka error: the
        replacement's init_transactions, with the same transactional id,
        fences the abandoned producer and aborts its transaction, so its
        offsets are never committed. The batch is rewound and processed again.
        """
        timeout = self._txn_call_timeout
        bound = timeout + self._offsets_grace
        metadata = self._consumer.consumer_group_metadata()
        call = self._offsets_calls.submit(
            producer.send_offsets_to_transaction, offsets, metadata, timeout
        )
        try:
            call.result(bound)
        except FutureTimeout:
            log.warning(
                "send_offsets_to_transaction did not return; abandoning the producer",
                seconds=bound,
            )
            # The blocked thread keeps the producer referenced: never deallocated
            # (rd_kafka_destroy would block as well).
            self._producer = None
            self._in_txn = False
            self._offsets_calls.close()
            self._offsets_calls = _DaemonCaller(f"{self.role}-txn-offsets")
            raise KafkaException(
                KafkaError(
                    KafkaError._TIMED_OUT,
                    f"send_offsets_to_transaction did not return within {bound:.0f}s",
                )
            ) from None

    def _end_transaction(self) -> None:
        for attempt in range(1, 6):
            try:
                self._producer.commit_transaction(30)
                self._in_txn = False
                return
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is not None and err.retriable() and attempt < 5:
                    log.warning("transaction commit will be retried", error=str(err))
                    continue
                raise

    def _abort(self, exc: BaseException) -> None:
        """Void the open transaction.

        A batch the role itself gave up on is aborted in place. A transaction
        that Kafka failed (a timeout, a broker that went away, fencing) is
        voided by a new producer with the same transactional id instead: its
        init_transactions aborts what the old one left open on the broker and
        bumps the epoch. A broker restart leaves librdkafka's transactional
        state behind (an abort that returns while nothing reached the broker,
        sequence numbers the restarted broker does not know, and then a
        send_offsets_to_transaction that never returned); a new producer
        carries none of it. While the broker is gone the replacement fails and
        the producer stays None: :meth:`_ensure_producer` tries again before
        the next batch, after the engine's backoff.
        """
        TRANSACTIONS.labels(self.role, "aborted").inc()
        from_kafka = kafka_error(exc) is not None
        log.warning("aborting transaction", error=str(exc), kafka=from_kafka)
        self._in_txn = False
        self._produced.clear()
        if not from_kafka and self._producer is not None:
            try:
                self._producer.abort_transaction(self._txn_call_timeout)
                return
            except KafkaException as abort_exc:
                log.warning("abort failed; replacing the producer", error=str(abort_exc))
        self._replace_producer()

    def _ensure_producer(self) -> None:
        """A usable transactional producer, or an exception (Kafka thread)."""
        if self.exactly_once and self._producer is None:
            self._replace_producer()

    def _replace_producer(self) -> None:
        self._in_txn = False
        old, self._producer = self._producer, None
        if old is not None:
            # Its queued records belong to the void transaction: drop them.
            with contextlib.suppress(Exception):
                old.purge()
        self._producer = self._new_transactional_producer()

    @property
    def _txn_call_timeout(self) -> float:
        # Long enough for a live coordinator, short enough that readiness and
        # the backoff, not a blocked call, decide what happens while it is gone.
        return max(self.settings.stream_transaction_timeout_ms / 1000, 5.0)

    def _commit_offsets(self, offsets: list[TopicPartition]) -> None:
        remaining = self._producer.flush(30)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise Rewind(
                f"{remaining} outputs not delivered; {'; '.join(errors[:3]) or 'flush timed out'}"
            )
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is not None and err.code() in (
                    KafkaError.REBALANCE_IN_PROGRESS,
                    KafkaError.ILLEGAL_GENERATION,
                    KafkaError.UNKNOWN_MEMBER_ID,
                ):
                    # The partitions moved on; their new owner reads the batch
                    # again and the idempotent writes make that harmless.
                    log.warning("offset commit refused after a rebalance", error=str(err))
                    return
                raise

    # -- going back to the last commit --------------------------------------------------------

    def _rewind(self) -> None:
        """Abort what is open and go back to the last commit (Kafka thread).

        Every assigned partition is paused and sought to its committed offset;
        its stores are read again before it resumes (:meth:`_prepare_assignment`).
        """
        if self.exactly_once and self._in_txn:
            self._abort(RuntimeError("rewind"))
        self._ensure_producer()
        self._produced.clear()
        self._committed.clear()
        self._delivery_errors.clear()
        assignment = self._consumer.assignment()
        if assignment:
            self._consumer.pause(assignment)
            for tp in self._stable_committed(assignment):
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            self._pending = (frozenset(tp.partition for tp in assignment), True)
        self._needs_rewind = False

    def _stable_committed(self, tps: Sequence[TopicPartition]) -> list[TopicPartition]:
        """Committed offsets once no transaction holds them (KIP-447 require_stable).

        A dead owner's open transaction keeps its offsets unstable until the
        broker aborts it (transaction.timeout.ms); librdkafka retries inside
        ``committed`` until then, and we keep asking.
        """
        query = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        started = time.monotonic()
        while True:
            try:
                return list(self._consumer.committed(query, timeout=5))
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or err.code() not in (
                    KafkaError._TIMED_OUT,
                    KafkaError.UNSTABLE_OFFSET_COMMIT,
                    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                    KafkaError.NOT_COORDINATOR,
                    KafkaError._TRANSPORT,
                    KafkaError._WAIT_COORD,
                ):
                    raise
                waited = time.monotonic() - started
                log.info(
                    "waiting for committed offsets to be stable",
                    waited_seconds=round(waited, 1),
                    error=str(err),
                )
                if waited > 600:
                    raise
                # A broker that is gone answers at once: do not spin.
                time.sleep(0.5)

    # -- the transactional producer ----------------------------------------------------------

    @property
    def _transactional_id(self) -> str:
        return f"{self.group}-{self.instance_id}"

    def _new_transactional_producer(self) -> Any:
        producer = Producer(producer_config(self.settings, self._transactional_id))
        # Fences any earlier producer with this id and aborts its open transaction.
        producer.init_transactions(60)
        log.info("transactional producer ready", transactional_id=self._transactional_id)
        return producer
