"""The stream engine's metrics, and the state its parts (the mixins of this package) share."""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from finstream.domain.resilience import Backoff
from finstream.runtime.health import HealthServer
from finstream.runtime.logging import get_logger
from finstream.runtime.state import Store
from finstream.runtime.stream.events import EngineOptions, Input, Output, Processor
from finstream.settings import Settings

# Every part logs as the engine did before it was split: one logger name to filter on.
log = get_logger("finstream.runtime.engine")

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

EOF = KafkaError._PARTITION_EOF
# A topic just created, or a broker just restarted: its partitions have no leader yet.
NOT_READY = (
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
)


class EngineBase:
    """The engine's state, declared once for the mixins that read and change it.

    ``StreamEngine.__init__`` sets every attribute; the mixins only declare
    what they use, so that each part type-checks on its own.
    """

    settings: Settings
    role: str
    processor: Processor
    health: HealthServer
    options: EngineOptions
    group: str
    exactly_once: bool
    stores: list[Store[Any]]
    state_partitions: int
    out: Output
    instance_id: str
    _inputs: dict[str, Input]
    _executor: ThreadPoolExecutor
    _loop: asyncio.AbstractEventLoop | None
    _consumer: Any
    _producer: Any
    _restorer: Any
    _hwm: Any
    _in_txn: bool
    _produced: Tally[str]
    _delivery_errors: list[str]
    _committed: dict[tuple[str, int], int]
    _assignment: frozenset[int]
    _restored: set[int]
    _pending: tuple[frozenset[int], bool] | None
    _needs_rewind: bool
    _txn_started: float
    _last_commit: float
    _last_punctuate: float
    _failures: int
    _failed_at: float
    _failure: str
    _backoff: Backoff
    _probe_clients: tuple[Any, Any] | None
    _probe_committed: tuple[frozenset[int], int] | None
    _progress_at: float
    _stalled: float
    _lag: int
    _lag_labels: set[tuple[str, str]]
    _stopping: bool
    _processing_seconds: Histogram
    _in_counters: dict[str, Counter]
    _problem: str | None

    def _failure_problem(self) -> str | None:
        return f"recovering from {self._failure}" if self._failures else None

    def _forget_state(self) -> None:
        for store in self.stores:
            store.drop(store.partitions)
        self._restored = set()

    def _call_processor(self, coro: Any) -> None:
        """Run a processor hook on the event loop from the Kafka thread and wait for it."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()
