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

Layout. This module composes the engine: its loop, rebalances and clients.
Its parts live in :mod:`finstream.runtime.stream` (events and the processor,
decoding, commits and rewinds, state restore, the Kafka probe).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from finstream.domain.resilience import Backoff
from finstream.runtime.health import HealthServer
from finstream.runtime.heap import Heap
from finstream.runtime.kafka import consumer_config, producer_config
from finstream.runtime.metrics import EVENTS_IN, PROCESSING_SECONDS
from finstream.runtime.state import Store
from finstream.runtime.stream.base import ASSIGNED, REBALANCES, REWINDS, log
from finstream.runtime.stream.commits import Commits, _DaemonCaller
from finstream.runtime.stream.decoding import Decoding
from finstream.runtime.stream.events import (
    EngineOptions,
    Guarantee,
    Input,
    Output,
    Processor,
)
from finstream.runtime.stream.probe import KafkaProbe
from finstream.runtime.stream.restore import Restore
from finstream.settings import Settings
from finstream.topics import contract

T = TypeVar("T")


class StreamEngine(Commits, Restore, KafkaProbe, Decoding):
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
        self._inputs: dict[str, Input] = {}
        for name in inputs:
            c = contract(name, settings.namespace)
            self._inputs[c.name] = Input(c, tombstones="compact" in c.spec.cleanup_policy)
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
        self.heap = Heap(
            fold_seconds=settings.stream_gc_fold_seconds,
            reclaim_seconds=settings.stream_gc_reclaim_seconds,
        )
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
        self._probe_clients: tuple[Any, Any] | None = None
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

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        await self._kafka(self._open)
        self.heap.settle()
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
                self.heap.settle()  # the restored state is long-lived
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
                self.heap.tick()
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

    # -- partitions ready after an assignment or a rewind -------------------------------------

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

    # -- clients ------------------------------------------------------------------------------

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
                "fetch.min.bytes": self.settings.stream_fetch_min_bytes,
                "fetch.wait.max.ms": self.settings.stream_fetch_wait_ms,
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
            ("probe", self._close_probe_clients),
        ):
            try:
                close()
            except Exception as exc:
                log.warning("closing the Kafka clients", client=what, error=str(exc))
