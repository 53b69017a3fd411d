"""At-least-once batch consumption for service roles (sinks, delivery workers).

The loop is: fetch a batch, hand it to the role's handler, flush what the
handler produced, then commit. A crash anywhere before the commit means the
batch is read again, so handlers must be idempotent (unique keys in
PostgreSQL, NX writes in Redis, claimed idempotency keys for providers). A
handler never raises for one bad message: it dead-letters it and goes on;
if it raises anyway, the batch is not committed and the worker stops, so
nothing is skipped silently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, RebalanceInProgressError

from finstream.runtime.kafka import AiokafkaPublisher
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import CONSUMER_LAG, EVENTS_IN, PROCESSING_SECONDS
from finstream.settings import Settings

log = get_logger(__name__)

Batch = Sequence[Any]  # aiokafka ConsumerRecord
Handler = Callable[[Batch], Awaitable[None]]


class _Assignment(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self._on_change = on_change

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._on_change(False)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._on_change(True)


def consumer_config(settings: Settings, group: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": int(settings.consumer_session_timeout * 1000),
        # Kafka's guidance: heartbeat at most a third of the session timeout.
        "heartbeat_interval_ms": int(settings.consumer_session_timeout * 1000 / 10),
    }


class BatchConsumer:
    def __init__(
        self,
        settings: Settings,
        role: str,
        topics: Sequence[str],
        handler: Handler,
        *,
        publisher: AiokafkaPublisher | None = None,
        batch_size: int = 500,
        batch_ms: int = 200,
        group: str | None = None,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self.role = role
        self.topics = list(topics)
        self._handler = handler
        self._publisher = publisher
        self._batch_size = batch_size
        self._batch_ms = batch_ms
        self._on_ready = on_ready or (lambda _ready: None)
        self._consumer = AIOKafkaConsumer(
            **consumer_config(settings, group or settings.group(role))
        )
        self._last_lag = 0.0

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self._consumer

    async def run(self, stop: asyncio.Event) -> None:
        self._consumer.subscribe(self.topics, listener=_Assignment(self._on_ready))
        await self._consumer.start()
        log.info("consuming", topics=self.topics)
        try:
            while not stop.is_set():
                batches = await self._consumer.getmany(
                    timeout_ms=self._batch_ms, max_records=self._batch_size
                )
                records = [r for tp_records in batches.values() for r in tp_records]
                if records:
                    await self._process(records, batches)
                await self._report_lag()
        finally:
            self._on_ready(False)
            await self._consumer.stop()

    async def _process(self, records: list[Any], batches: dict[TopicPartition, list[Any]]) -> None:
        started = time.perf_counter()
        for r in records:
            EVENTS_IN.labels(self.role, r.topic).inc()
        await self._handler(records)
        if self._publisher is not None:
            await self._publisher.flush()
        offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items()}
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # The partitions moved on; their new owner reads the batch again and
            # the idempotent handler makes that harmless.
            log.warning("commit failed after rebalance", error=str(exc))
        PROCESSING_SECONDS.labels(self.role, "batch").observe(time.perf_counter() - started)

    async def _report_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < 5.0:
            return
        self._last_lag = now
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            position = await self._consumer.position(tp)
            CONSUMER_LAG.labels(self.role, tp.topic, str(tp.partition)).set(
                max(highwater - position, 0)
            )
