"""Guard against offsets a faust consumer skipped (used by the quotes and alerts agents)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from finstream.runtime.logging import get_logger

log = get_logger(__name__)

GAPS_FILLED = Counter(
    "finstream_consumer_gap_messages_total",
    "Messages the faust consumer skipped and the agent read directly from Kafka",
    ["role", "topic"],
)


class GapGuard:
    """Re-reads messages faust skipped, so that none is lost.

    faust (0.15.3) can skip a stretch of a partition around a rebalance: the
    fetcher drops the rest of a fetched batch when the flow is suspended, the
    next delivered offset is further on, and faust records the hole as a
    "gap" (meant for transaction markers) that it acks and commits past. See
    faust-streaming/faust#216 and #221 for the same race in other paths.
    Every offset the agent processed is remembered per partition; a message
    beyond the next expected offset means a hole, which is read directly from
    Kafka and processed first, in order. A hole that only held transaction
    markers or aborted records reads as nothing. Messages delivered twice
    (faust seeks back to the committed offset after a rebalance) are the
    ordinary at-least-once replay that the handlers already absorb.
    """

    def __init__(self, settings: Any, role: str, max_reread: int = 50_000) -> None:
        self._settings = settings
        self._max_reread = max_reread
        self._role = role
        self._next: dict[tuple[str, int], int] = {}
        self._consumer: Any = None

    async def missing(self, msg: Any) -> list[Any]:
        """Messages of msg's partition between the last one processed and msg."""
        key = (msg.topic, msg.partition)
        expected = self._next.get(key)
        self._next[key] = msg.offset + 1
        if expected is None or msg.offset <= expected:
            return []
        if msg.offset - expected > self._max_reread:
            log.warning(
                "partition advanced elsewhere while away; not re-reading",
                topic=msg.topic,
                partition=msg.partition,
                first=expected,
                last=msg.offset - 1,
            )
            return []
        GAPS_FILLED.labels(self._role, msg.topic).inc(msg.offset - expected)
        log.warning(
            "offsets skipped by the consumer; reading them directly",
            topic=msg.topic,
            partition=msg.partition,
            first=expected,
            last=msg.offset - 1,
        )
        return await self._read(msg.topic, msg.partition, expected, msg.offset)

    async def _read(self, topic: str, partition: int, start: int, end: int) -> list[Any]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=self._settings.kafka_bootstrap,
                group_id=None,
                enable_auto_commit=False,
            )
            await self._consumer.start()
        tp = TopicPartition(topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, start)
        out: list[Any] = []
        position = start
        while position < end:
            batch = await self._consumer.getmany(tp, timeout_ms=1000, max_records=1000)
            records = batch.get(tp, [])
            if not records:
                position = await self._consumer.position(tp)
                continue
            for r in records:
                if r.offset >= end:
                    return out
                out.append(r)
                position = r.offset + 1
        return out

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
