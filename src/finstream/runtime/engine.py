"""The stream engine under every consuming role: batches, state, and Kafka transactions.

A role hands the engine its input topics, its state stores and a
:class:`Processor`; the engine consumes in batches with confluent-kafka,
decodes each record once with its topic's contract (:mod:`finstream.topics`),
hands the role validated domain objects, and commits.

Two guarantees, chosen per role:

``exactly_once`` (quotes, alerts, router: Kafka in, Kafka out)
    Outputs, dead letters, the changelog records of every store changed
    since the last commit, and the consumer offsets are committed in one
    Kafka transaction (KIP-447: ``send_offsets_to_transaction`` with the
    consumer's group metadata, so a producer of an older group generation is
    fenced). Downstream consumers read with ``isolation.level=read_committed``
    and see each output once. A failed or aborted transaction rewinds the
    replica: the stores of its partitions are read again from their
    changelogs and consumption resumes from the committed offsets.

``at_least_once`` (sinks and delivery workers: Kafka in, PostgreSQL, Redis or
a provider out)
    The processor writes each batch durably and idempotently before the
    engine commits the batch's offsets; a crash re-reads at most the batches
    after the last commit, which the idempotent writes make harmless.

Rebalances. Partitions are assigned by range, so partition *p* of every input
topic goes to the same replica (co-partitioning). On assignment the engine
fetches committed offsets with ``require_stable`` (it waits out a dead
owner's open transaction), reads the assigned partitions of every store's
changelog to the end that existed then (see :meth:`StreamEngine._restore`),
and only then consumes. On revocation it commits what it has processed. A
lost assignment (session timeout) aborts the open transaction.

Zombies. The transactional id is ``<group>-<instance id>``: a restarted
replica with the same ``FINSTREAM_INSTANCE_ID`` fences its dead predecessor at
once and aborts its open transaction; a replica that lost its partitions
while paused (GC, SIGSTOP, network partition) fails its next commit with a
fencing error, aborts and rewinds.

Threads. librdkafka calls block; they run on one dedicated thread, so the
event loop stays free for the role's asyncio clients (Redis, PostgreSQL, the
health server). Rebalance callbacks run on that thread inside ``consume``.

Failures. Anything that fails a batch or a commit (a broker gone, a
PostgreSQL or Redis write that failed) voids what is open and rewinds to the
last commit after a backoff that grows while the failures go on (0.2 s to
5 s), so the committed offsets hold and nothing is skipped. A transaction
that Kafka failed (the broker gone, a timeout, fencing) is voided by a new
producer with the same transactional id, created once the broker answers
(see :meth:`StreamEngine._abort`).
Readiness says what is wrong meanwhile: the engine probes Kafka in the
background (the group's committed offsets and the ends of its partitions,
:meth:`StreamEngine._probe_kafka_sync`), which also gives the consumer lag and
whether the role is stalled: no committed progress for
``stream_stall_seconds`` while records wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client import Counter, Gauge, Histogram

from finstream.domain.resilience import Backoff
from finstream.domain.time import utcnow
from finstream.runtime.deadletters import DeadLetters
from finstream.runtime.health import HealthServer
from finstream.runtime.kafka import (
    client_config,
    consumer_config,
    kafka_error,
    producer_config,
)
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import CONSUMER_LAG, EVENTS_IN, EVENTS_OUT, PROCESSING_SECONDS
from finstream.runtime.state import Store
from finstream.settings import Settings
from finstream.topics import Contract, DecodeContext, contract

log = get_logger(__name__)

T = TypeVar("T")
Guarantee = Literal["exactly_once", "at_least_once"]

TRANSACTIONS = Counter(
    "finstream_stream_transactions_total",
    "Commits of the stream engine by outcome (committed, aborted)",
    ["role", "outcome"],
)
COMMIT_SECONDS = Histogram(
    "finstream_stream_commit_seconds",
    "Time to commit (transaction or offsets), changelog writes included",
    ["role"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
REBALANCES = Counter(
    "finstream_stream_rebalances_total", "Partition assignments and revocations", ["role", "kind"]
)
RESTORED_RECORDS = Counter(
    "finstream_stream_restored_records_total", "Changelog records read to restore state", ["role"]
)
RESTORE_SECONDS = Histogram(
    "finstream_stream_restore_seconds",
    "Time to restore the state of newly assigned partitions",
    ["role"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
REWINDS = Counter(
    "finstream_stream_rewinds_total",
    "Times a replica went back to its last commit (failed batch or transaction)",
    ["role", "reason"],
)
ASSIGNED = Gauge("finstream_stream_assigned_partitions", "Input partitions owned", ["role"])
STALLED = Gauge(
    "finstream_stream_stalled_seconds",
    "Seconds the role has committed no progress while records wait on its partitions "
    "(0 while it progresses or is caught up)",
    ["role"],
)

_EOF = KafkaError._PARTITION_EOF
# A topic just created, or a broker just restarted: its partitions have no leader yet.
_NOT_READY = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
)


class Rewind(Exception):
    """The open batch or transaction is void: go back to the last commit."""


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


@dataclass(slots=True)
class Event:
    """One input record: where it came from, its bytes, and what they decode to."""

    topic: str  # the Kafka topic, namespace included
    source: str  # the catalogue name (md.ticks, notify.requests, ...)
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    item: Any  # the validated domain object of the topic's contract; None for a tombstone
    headers: list[tuple[str, bytes]] | None
    timestamp: int  # milliseconds, as the producer or broker set it


class Output:
    """Where a processor's records go: into the open transaction, or the idempotent producer."""

    def __init__(self, engine: StreamEngine) -> None:
        self._engine = engine
        self.dead_letters = DeadLetters(None, engine.settings, engine.role)

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        self._engine._produce(topic, key, value, headers, partition)

    def dead_letter(
        self,
        event: Event,
        error: BaseException | str,
        error_class: str | None = None,
        attempts: int | None = None,
    ) -> None:
        self.dead_letter_record(
            source_topic=event.topic,
            partition=event.partition,
            offset=event.offset,
            key=event.key,
            value=event.value,
            headers=event.headers or (),
            error=error,
            error_class=error_class,
            attempts=attempts,
        )

    def dead_letter_record(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: BaseException | str,
        headers: Sequence[tuple[str, bytes]] = (),
        error_class: str | None = None,
        attempts: int | None = None,
    ) -> None:
        k, v, h = self.dead_letters.letter(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            error=error,
            error_class=error_class,
            headers=headers,
            attempts=attempts,
        )
        self.produce(self.dead_letters.topic, k, v, h)


class Processor:
    """What a role implements. Every method may be left as is."""

    async def process(self, events: list[Event], out: Output) -> None:
        """Handle one batch. Outputs go to ``out``; state changes to the stores.

        Raising voids the batch (and, exactly-once, the transaction): the
        engine rewinds and tries again after a backoff. Bad input must not
        raise: dead-letter it with ``out.dead_letter`` and go on.
        """

    async def flush(self) -> None:
        """Finish whatever ``process`` left in flight: called before every commit.

        A sink that writes in the background (overlapping its writes with the
        decoding of the next batch) waits for them here; raising voids the
        uncommitted batches, as in ``process``.
        """

    async def assigned(self, partitions: frozenset[int]) -> None:
        """The replica now owns these input partitions; their stores are restored."""

    async def revoked(self, partitions: frozenset[int]) -> None:
        """These partitions are about to go (their work so far is committed)."""

    async def punctuate(self, out: Output) -> None:
        """Called every ``punctuate_every`` seconds between batches (timers, releases)."""


@dataclass
class _Input:
    contract: Contract
    tombstones: bool


@dataclass
class EngineOptions:
    guarantee: Guarantee
    batch_size: int
    batch_wait: float  # seconds
    commit_interval: float  # seconds
    commit_when_caught_up: bool = False
    punctuate_every: float | None = None
    group: str | None = None
    extra_consumer_config: dict[str, Any] = field(default_factory=dict)


class StreamEngine:
    def __init__(
        self,
        settings: Settings,
        role: str,
        inputs: Sequence[str],
        processor: Processor,
        health: HealthServer,
        *,
        guarantee: Guarantee,
        stores: Sequence[Store[Any]] = (),
        batch_size: int | None = None,
        batch_wait: float | None = None,
        commit_interval: float | None = None,
        punctuate_every: float | None = None,
        group: str | None = None,
    ) -> None:
        self.settings = settings
        self.role = role
        self.processor = processor
        self.health = health
        self.options = EngineOptions(
            guarantee=guarantee,
            batch_size=batch_size or settings.stream_batch_size,
            batch_wait=(
                batch_wait if batch_wait is not None else settings.stream_batch_wait_ms / 1000
            ),
            commit_interval=(
                commit_interval if commit_interval is not None else settings.commit_interval
            ),
            commit_when_caught_up=settings.commit_when_caught_up,
            punctuate_every=punctuate_every,
            group=group or settings.group(role),
        )
        self.group = self.options.group or settings.group(role)
        self.exactly_once = guarantee == "exactly_once"
        self._inputs: dict[str, _Input] = {}
        for name in inputs:
            c = contract(name, settings.namespace)
            self._inputs[c.name] = _Input(c, tombstones="compact" in c.spec.cleanup_policy)
        self.stores = list(stores)
        if self.stores:
            counts = {i.contract.partitions for i in self._inputs.values()}
            if len(counts) != 1:
                raise ValueError(
                    f"{role}: inputs {sorted(self._inputs)} must have equal partition counts "
                    f"(co-partitioned state), topics.yaml has {sorted(counts)}"
                )
            self.state_partitions = counts.pop()
        else:
            self.state_partitions = 0
        for store in self.stores:
            store.changelog = f"{self.group}-{store.name}-changelog"
            store.role = role
        self.out = Output(self)
        self.instance_id = settings.instance_id or uuid.uuid4().hex[:12]
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{role}-kafka")
        # send_offsets_to_transaction runs here, bounded (see _send_offsets).
        self._offsets_calls = _DaemonCaller(f"{role}-txn-offsets")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._restorer: Any = None
        self._hwm: Any = None
        self._in_txn = False
        self._produced = Tally[str]()
        self._delivery_errors: list[str] = []
        # Whether records were processed since the last commit, and the offsets
        # committed then (the consumer's positions, which pass transaction
        # markers, so a caught-up group has no lag on transactional inputs).
        self._committed: dict[tuple[str, int], int] = {}
        self._assignment: frozenset[int] = frozenset()
        self._restored: set[int] = set()
        # Partitions assigned (or rewound) whose state is yet to be restored,
        # and whether every partition's state must be read again.
        self._pending: tuple[frozenset[int], bool] | None = None
        self._needs_rewind = False
        self._txn_started = 0.0
        self._last_commit = time.monotonic()
        self._last_punctuate = time.monotonic()
        self._failures = 0
        self._failed_at = 0.0
        self._failure = ""
        self._backoff = Backoff(base=0.2, cap=5.0)
        # The Kafka probe (health thread): its client, the lag it saw, and the
        # committed progress that tells a stalled role from a busy one.
        self._probe_client: Any = None
        self._probe_committed: tuple[frozenset[int], int] | None = None
        self._progress_at = time.monotonic()
        self._stalled = 0.0
        self._lag = 0
        self._lag_labels: set[tuple[str, str]] = set()
        self._stopping = False
        self._processing_seconds = PROCESSING_SECONDS.labels(role, "batch")
        self._in_counters = {name: EVENTS_IN.labels(role, name) for name in self._inputs}
        self.health.add_check(self._readiness)
        self.health.add_dependency("kafka", self._probe_kafka)
        self._problem: str | None = "starting"

    # -- running --------------------------------------------------------------------------

    async def _kafka(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        # The caller's context (the role and correlation id bound for logs) goes along.
        context = contextvars.copy_context()
        return await self._loop.run_in_executor(self._executor, context.run, fn, *args)

    def _readiness(self) -> str | None:
        if self._problem:
            return self._problem
        if self._stalled > self.settings.stream_stall_seconds:
            return (
                f"stalled: no progress committed for {self._stalled:.0f}s "
                f"while {self._lag} records wait"
            )
        return None

    def _failure_problem(self) -> str | None:
        return f"recovering from {self._failure}" if self._failures else None

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        await self._kafka(self._open)
        log.info(
            "stream engine running",
            inputs=sorted(self._inputs),
            stores=[s.name for s in self.stores],
            guarantee=self.options.guarantee,
            transactional_id=self._transactional_id if self.exactly_once else None,
        )
        self.health.set_ready(True, "")
        try:
            while not stop.is_set():
                await self._step()
        finally:
            self._stopping = True
            self._problem = "stopping"
            try:
                await self._commit_or_rewind()
            finally:
                await self._kafka(self._close)
                self._executor.shutdown(wait=False)
                self._offsets_calls.close()

    async def _step(self) -> None:
        opts = self.options
        try:
            if self._needs_rewind:
                await self._kafka(self._rewind)
            if self._pending is not None:
                await self._kafka(self._prepare_assignment)
            messages = await self._kafka(self._consumer.consume, opts.batch_size, opts.batch_wait)
            # A batch that did not fill: nothing more was waiting, so committing
            # now costs no throughput and spares its outputs the interval's wait.
            caught_up = opts.commit_when_caught_up and 0 < len(messages) < opts.batch_size
            if messages:
                started = time.perf_counter()
                events = self._decode(messages)
                if events:
                    await self.processor.process(events, self.out)
                self._processing_seconds.observe(time.perf_counter() - started)
            now = time.monotonic()
            if (
                opts.punctuate_every is not None
                and now - self._last_punctuate >= opts.punctuate_every
            ):
                self._last_punctuate = now
                if self._assignment and self._pending is None:
                    await self.processor.punctuate(self.out)
            if caught_up or now - self._last_commit >= opts.commit_interval:
                await self.processor.flush()
                progressed = await self._kafka(self._commit)
                if self._failures and (
                    progressed or time.monotonic() - self._failed_at > 2 * self._backoff.cap
                ):
                    # Recovered once a commit moved the offsets (or nothing failed
                    # for a while): an empty commit right after a rewind proves
                    # nothing, and counting it kept the backoff at its first step.
                    log.info("recovered", after_failures=self._failures)
                    self._failures = 0
                    if self._pending is None:
                        self._problem = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._fail(exc)

    async def _fail(self, exc: BaseException) -> None:
        """Void what is open; the next step rewinds to the last commit, after a backoff."""
        self._failures += 1
        self._failed_at = time.monotonic()
        reason = f"{type(exc).__name__}: {exc}"
        self._failure = reason[:200]
        self._problem = self._failure_problem()
        REWINDS.labels(self.role, type(exc).__name__).inc()
        log.warning(
            "batch failed; rewinding to the last commit", error=reason[:500], attempt=self._failures
        )
        self._needs_rewind = True
        await asyncio.sleep(self._backoff.delay(self._failures))

    async def _commit_or_rewind(self) -> None:
        try:
            await self.processor.flush()
            await self._kafka(self._commit)
        except Exception as exc:
            log.warning("final commit failed", error=str(exc))

    # -- decoding at the edge ---------------------------------------------------------------

    def _decode(self, messages: list[Any]) -> list[Event]:
        ctx = DecodeContext(utcnow(), timedelta(seconds=self.settings.tick_max_future_seconds))
        events: list[Event] = []
        counts = Tally[str]()
        inputs = self._inputs
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() != _EOF:
                    log.warning("consumer error", error=str(err))
                continue
            topic = m.topic()
            spec = inputs[topic]
            counts[topic] += 1
            value = m.value()
            headers = m.headers()
            if value is None:
                if not spec.tombstones:
                    self._letter_raw(m, "message has no value", "DecodeError")
                    continue
                item = None
            else:
                try:
                    item = spec.contract.decode(value, ctx)
                except ValueError as exc:
                    self._letter_raw(m, exc, None)
                    continue
            events.append(
                Event(
                    topic,
                    spec.contract.spec.name,
                    m.partition(),
                    m.offset(),
                    m.key(),
                    value,
                    item,
                    headers,
                    m.timestamp()[1],
                )
            )
        for topic, n in counts.items():
            self._in_counters[topic].inc(n)
        return events

    def _letter_raw(self, m: Any, error: BaseException | str, error_class: str | None) -> None:
        self.out.dead_letter_record(
            source_topic=m.topic(),
            partition=m.partition(),
            offset=m.offset(),
            key=m.key(),
            value=m.value(),
            headers=m.headers() or (),
            error=error,
            error_class=error_class,
        )

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

    def _prepare_assignment(self) -> None:
        """Restore the stores of newly assigned (or rewound) partitions, then resume them."""
        assert self._pending is not None
        partitions, full = self._pending
        started = time.perf_counter()
        self._problem = "restoring state" if self.stores else "assigning partitions"
        self._ensure_producer()
        assignment = self._consumer.assignment()
        # Waits out a dead owner's open transaction, whose changelog records
        # the restore must see resolved (committed or aborted).
        self._stable_committed(assignment)
        if self.stores:
            self._restore(set(partitions), full=full)
        self._call_processor(self.processor.assigned(partitions))
        self._consumer.resume(assignment)
        self._pending = None
        self._problem = self._failure_problem()
        log.info(
            "partitions ready",
            partitions=sorted(partitions),
            seconds=round(time.perf_counter() - started, 3),
        )

    # -- rebalances (Kafka thread, inside consume) -----------------------------------------------

    def _on_assign(self, consumer: Any, tps: list[TopicPartition]) -> None:
        # Nothing here may fail: the partitions are taken (from their committed
        # offsets) and paused; the main loop restores their state and resumes
        # them, retrying with backoff if Kafka is not there yet.
        REBALANCES.labels(self.role, "assigned").inc()
        partitions = frozenset(tp.partition for tp in tps)
        consumer.assign(tps)
        self._committed.clear()
        if tps:
            consumer.pause(tps)
            self._pending = (partitions, False)
        else:
            self._problem = self._failure_problem()
        self._assignment = partitions
        ASSIGNED.labels(self.role).set(len(partitions))
        log.info("partitions assigned", partitions=sorted(partitions))

    def _on_revoke(self, consumer: Any, tps: list[TopicPartition]) -> None:
        REBALANCES.labels(self.role, "revoked").inc()
        self._problem = "rebalancing"
        partitions = frozenset(tp.partition for tp in tps)
        try:
            self._call_processor(self.processor.flush())
            self._commit()
        except Exception as exc:
            # Nothing of the open batch survives; the state of every partition
            # is read again at the next assignment.
            log.warning("commit on revocation failed", error=str(exc))
            self._forget_state()
        if not self._stopping:
            self._call_processor(self.processor.revoked(partitions))
        self._pending = None
        self._assignment = frozenset()
        ASSIGNED.labels(self.role).set(0)
        consumer.unassign()

    def _on_lost(self, consumer: Any, tps: list[TopicPartition]) -> None:
        REBALANCES.labels(self.role, "lost").inc()
        self._problem = "partitions lost"
        log.warning("partitions lost (session expired); dropping uncommitted work")
        if self.exactly_once and self._in_txn:
            try:
                self._abort(RuntimeError("partitions lost"))
            except KafkaException as exc:
                # The producer is None: replaced before the next batch.
                log.warning("producer not replaced yet", error=str(exc))
        self._produced.clear()
        self._forget_state()
        self._call_processor(self.processor.revoked(frozenset(tp.partition for tp in tps)))
        self._pending = None
        self._assignment = frozenset()
        consumer.unassign()

    def _forget_state(self) -> None:
        for store in self.stores:
            store.drop(store.partitions)
        self._restored = set()

    def _call_processor(self, coro: Any) -> None:
        """Run a processor hook on the event loop from the Kafka thread and wait for it."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

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

    # -- state restore ---------------------------------------------------------------------------

    def _restore(self, partitions: set[int], *, full: bool) -> None:
        """Read the changelogs of ``partitions`` into the stores.

        Without ``full``, partitions whose state this replica still holds (a
        rebalance that gave them back) are kept; the rest are dropped.

        The end to reach is each changelog partition's high watermark, read
        uncommitted, and the reading itself is read_committed: records of a
        transaction still open when the restore starts (a revoked owner's
        last commit whose markers are not yet written, or a dead owner's
        transaction the broker has yet to abort) are waited for and then
        kept or skipped, never missed.
        """
        keep = set() if full else (self._restored & partitions)
        for store in self.stores:
            store.drop(store.partitions - keep)
        wanted = sorted(partitions - keep)
        self._restored = keep
        if not wanted:
            return
        started = time.perf_counter()
        by_topic = {s.changelog: s for s in self.stores}
        tps = [TopicPartition(s.changelog, p) for s in self.stores for p in wanted]
        for s in self.stores:
            for p in wanted:
                s.start_restore(p)
        ends: dict[tuple[str, int], int] = {}
        for tp in tps:
            high = self._end_offset(tp)
            if high > 0:
                ends[(tp.topic, tp.partition)] = high
        read = 0
        if ends:
            restorer = self._restore_consumer()
            restorer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
            pending = dict(ends)
            last_log = time.monotonic()
            try:
                while pending:
                    # consume() waits for a full batch or the timeout: keep the
                    # timeout short, the end is signalled by EOF events.
                    for m in restorer.consume(10_000, 0.02):
                        err = m.error()
                        where = (m.topic(), m.partition())
                        if err is not None:
                            if err.code() == _EOF:
                                end = pending.get(where)
                                if end is not None and m.offset() >= end:
                                    del pending[where]
                                continue
                            raise KafkaException(err)
                        if m.key() is not None:
                            by_topic[m.topic()].load(m.partition(), m.key(), m.value())
                            read += 1
                    if time.monotonic() - last_log > 10:
                        last_log = time.monotonic()
                        log.info("restoring state", records=read, pending=sorted(pending))
            finally:
                restorer.unassign()
        self._close_restore_clients()
        for store in self.stores:
            store.finish_restore()
        self._restored |= set(wanted)
        seconds = time.perf_counter() - started
        RESTORED_RECORDS.labels(self.role).inc(read)
        RESTORE_SECONDS.labels(self.role).observe(seconds)
        log.info(
            "state restored",
            partitions=wanted,
            records=read,
            seconds=round(seconds, 3),
            records_per_second=round(read / seconds) if seconds > 0 else None,
        )

    def _end_offset(self, tp: TopicPartition) -> int:
        """The partition's high watermark, retrying while its leader is being elected."""
        deadline = time.monotonic() + 60
        while True:
            try:
                _low, high = self._hwm_reader().get_watermark_offsets(tp, timeout=10)
                return int(high)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or not (err.retriable() or err.code() in _NOT_READY):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _restore_consumer(self) -> Any:
        if self._restorer is None:
            self._restorer = Consumer(
                {
                    **consumer_config(self.settings, f"{self.group}-restore"),
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 50,
                    "max.partition.fetch.bytes": 8 * 1024 * 1024,
                }
            )
        return self._restorer

    def _close_restore_clients(self) -> None:
        # Idle between restores; kept open they only reconnect (and log) while
        # the broker is gone.
        for name in ("_restorer", "_hwm"):
            client = getattr(self, name)
            setattr(self, name, None)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

    def _hwm_reader(self) -> Any:
        # Watermarks as a read_uncommitted client sees them: the true end of
        # the log, open transactions included (a read_committed client would
        # answer the last stable offset, which stops short of them).
        if self._hwm is None:
            self._hwm = Consumer(
                {
                    **consumer_config(self.settings, f"{self.group}-restore"),
                    "isolation.level": "read_uncommitted",
                }
            )
        return self._hwm

    # -- clients ------------------------------------------------------------------------------

    @property
    def _transactional_id(self) -> str:
        return f"{self.group}-{self.instance_id}"

    def _new_transactional_producer(self) -> Any:
        producer = Producer(producer_config(self.settings, self._transactional_id))
        # Fences any earlier producer with this id and aborts its open transaction.
        producer.init_transactions(60)
        log.info("transactional producer ready", transactional_id=self._transactional_id)
        return producer

    def _open(self) -> None:
        if self.stores:
            self._ensure_changelogs()
        if self.exactly_once:
            self._producer = self._new_transactional_producer()
        else:
            self._producer = Producer(
                {**producer_config(self.settings), "on_delivery": self._on_delivery}
            )
        self._consumer = Consumer(
            {
                **consumer_config(self.settings, self.group),
                # Range assignment gives partition p of every input topic to one
                # replica: co-partitioned records meet where their state is.
                "partition.assignment.strategy": "range",
            }
        )
        self._consumer.subscribe(
            list(self._inputs),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _close(self) -> None:
        # Stopping must not fail on a broker that is gone or a producer that
        # is fenced: what was not committed is read again by the next owner.
        for what, close in (
            ("consumer", lambda: self._consumer is not None and self._consumer.close()),
            ("producer", lambda: self._producer is not None and self._producer.flush(10)),
            ("restore clients", self._close_restore_clients),
            ("probe", lambda: self._probe_client is not None and self._probe_client.close()),
        ):
            try:
                close()
            except Exception as exc:
                log.warning("closing the Kafka clients", client=what, error=str(exc))

    def _ensure_changelogs(self) -> None:
        admin = AdminClient(client_config(self.settings))
        existing = set(admin.list_topics(timeout=30).topics)
        wanted = [
            NewTopic(
                s.changelog,
                num_partitions=self.state_partitions,
                replication_factor=self.settings.internal_topic_replication,
                config={
                    "cleanup.policy": "compact",
                    "min.compaction.lag.ms": "60000",
                    "min.insync.replicas": "2"
                    if self.settings.internal_topic_replication >= 3
                    else "1",
                },
            )
            for s in self.stores
            if s.changelog not in existing
        ]
        if not wanted:
            return
        for name, fut in admin.create_topics(wanted, request_timeout=30).items():
            try:
                fut.result(timeout=30)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise RuntimeError(f"cannot create changelog topic {name}: {exc}") from exc
        log.info("changelog topics created", topics=[t.topic for t in wanted])
        # Restoring from a topic whose partitions have no leader yet fails; wait for them.
        names = {t.topic for t in wanted}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            topics = admin.list_topics(timeout=10).topics
            if all(
                n in topics
                and topics[n].partitions
                and all(p.leader >= 0 for p in topics[n].partitions.values())
                for n in names
            ):
                return
            time.sleep(0.1)

    # -- readiness: the Kafka probe (health thread) -------------------------------------------

    async def _probe_kafka(self) -> None:
        await asyncio.to_thread(self._probe_kafka_sync)

    def _probe_kafka_sync(self) -> None:
        """Ask the broker for the group's committed offsets and the ends of its partitions.

        Independent of the engine's own thread, so it answers (and the lag
        gauge moves) exactly when that thread is stuck. Raises when Kafka
        does not answer within the probe timeout: readiness then says so.
        A consumer of its own that never joins the group (librdkafka's admin
        client aborted the process on a coordinator lookup that timed out
        while the broker restarted).
        """
        timeout = self.settings.health_probe_timeout
        if self._probe_client is None:
            self._probe_client = Consumer(consumer_config(self.settings, self.group))
        probe = self._probe_client
        owned = self._assignment
        tps = [TopicPartition(t, p) for t in self._inputs for p in sorted(owned)]
        now = time.monotonic()
        if not tps:
            probe.list_topics(topic=next(iter(self._inputs)), timeout=timeout)
            self._record_progress(now, owned, 0, 0, {})
            return
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in probe.committed(tps, timeout=timeout)
        }
        # Timestamp -1 asks for the latest offset: one request per leader, and
        # read_committed (this consumer's isolation) answers the last stable offset.
        latest = [TopicPartition(tp.topic, tp.partition, -1) for tp in tps]
        lags: dict[tuple[str, str], int] = {}
        total_committed = 0
        for tp in probe.offsets_for_times(latest, timeout=timeout):
            done = max(committed.get((tp.topic, tp.partition), -1), 0)
            total_committed += done
            lags[(tp.topic, str(tp.partition))] = max(tp.offset - done, 0)
        self._record_progress(now, owned, sum(lags.values()), total_committed, lags)

    def _record_progress(
        self,
        now: float,
        owned: frozenset[int],
        lag: int,
        committed: int,
        lags: dict[tuple[str, str], int],
    ) -> None:
        seen = (owned, committed)
        if lag == 0 or seen != self._probe_committed:
            self._progress_at = now
        self._probe_committed = seen
        self._lag = lag
        self._stalled = now - self._progress_at if lag > 0 else 0.0
        STALLED.labels(self.role).set(self._stalled)
        for topic, partition in self._lag_labels - set(lags):
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(self.role, topic, partition)
        for (topic, partition), n in lags.items():
            CONSUMER_LAG.labels(self.role, topic, partition).set(n)
        self._lag_labels = set(lags)
