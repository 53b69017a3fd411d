"""State restore: the stores of assigned partitions read back from their changelog topics."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from finstream.runtime.kafka import client_config, consumer_config, kafka_error
from finstream.runtime.stream.base import (
    EOF,
    NOT_READY,
    RESTORE_SECONDS,
    RESTORED_RECORDS,
    EngineBase,
    log,
)


class Restore(EngineBase):
    """Reads changelogs into the stores, and creates the changelog topics (Kafka thread)."""

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
                            if err.code() == EOF:
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
                if err is None or not (err.retriable() or err.code() in NOT_READY):
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
