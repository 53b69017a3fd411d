"""Readiness: what is wrong, from the engine's own state and a background probe of Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import time

from confluent_kafka import Consumer, TopicPartition

from finstream.runtime.kafka import consumer_config
from finstream.runtime.metrics import CONSUMER_LAG
from finstream.runtime.stream.base import STALLED, EngineBase


class KafkaProbe(EngineBase):
    """The engine's readiness check, and the Kafka probe the health server runs."""

    def _readiness(self) -> str | None:
        if self._problem:
            return self._problem
        if self._stalled > self.settings.stream_stall_seconds:
            return (
                f"stalled: no progress committed for {self._stalled:.0f}s "
                f"while {self._lag} records wait"
            )
        return None

    async def _probe_kafka(self) -> None:
        await asyncio.to_thread(self._probe_kafka_sync)

    def _probe_kafka_sync(self) -> None:
        """Ask the broker for the group's committed offsets and the ends of its partitions.

        Independent of the engine's own thread, so it answers (and the lag
        gauge moves) exactly when that thread is stuck. Raises when Kafka
        does not answer within the probe timeout: readiness then says so.
        Consumers of its own that never join the group (librdkafka's admin
        client aborted the process on a coordinator lookup that timed out
        while the broker restarted).
        """
        timeout = self.settings.health_probe_timeout
        if self._probe_clients is None:
            offsets = consumer_config(self.settings, self.group)
            # A read_committed consumer asks for committed offsets with
            # require_stable (librdkafka ties the two, KIP-447): while the
            # role's own transaction holds new offsets, the broker answers
            # "unstable" and librdkafka retries until the deadline. Under load
            # that timed out and flipped readiness red for a healthy role; the
            # probe wants the last committed offsets, not stable ones.
            offsets["isolation.level"] = "read_uncommitted"
            self._probe_clients = (
                Consumer(offsets),
                Consumer(consumer_config(self.settings, self.group)),
            )
        offsets_client, ends_client = self._probe_clients
        owned = self._assignment
        tps = [TopicPartition(t, p) for t in self._inputs for p in sorted(owned)]
        now = time.monotonic()
        if not tps:
            ends_client.list_topics(topic=next(iter(self._inputs)), timeout=timeout)
            self._record_progress(now, owned, 0, 0, {})
            return
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in offsets_client.committed(tps, timeout=timeout)
        }
        # Timestamp -1 asks for the latest offset: one request per leader, and
        # read_committed (this consumer's isolation) answers the last stable offset.
        latest = [TopicPartition(tp.topic, tp.partition, -1) for tp in tps]
        lags: dict[tuple[str, str], int] = {}
        total_committed = 0
        for tp in ends_client.offsets_for_times(latest, timeout=timeout):
            done = max(committed.get((tp.topic, tp.partition), -1), 0)
            total_committed += done
            lags[(tp.topic, str(tp.partition))] = max(tp.offset - done, 0)
        self._record_progress(now, owned, sum(lags.values()), total_committed, lags)

    def _close_probe_clients(self) -> None:
        clients, self._probe_clients = self._probe_clients, None
        if clients is None:
            return
        offsets_client, ends_client = clients
        # The second is closed even when closing the first raised.
        try:
            offsets_client.close()
        finally:
            ends_client.close()

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
