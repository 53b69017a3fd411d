"""Keyed state of a stream role: in memory per partition, durable in a changelog topic.

A :class:`Store` holds decoded values (domain objects, never re-parsed on the
hot path) for the partitions this replica owns. Every ``put`` or ``delete``
marks the key dirty; at each commit the engine writes each dirty key once,
serialized, to the store's compacted changelog topic inside the same Kafka
transaction as the role's outputs and consumer offsets. A key changed a
thousand times between two commits costs one changelog record.

When the consumer group gives this replica a partition, the engine reads that
partition of the changelog from its beginning to its end
(:meth:`StreamEngine._restore`) before any input record of the partition is
processed; when a transaction is aborted, every assigned partition is read
again, so memory never holds a change that Kafka does not.

Values are treated as immutable: a role that changes a value puts the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from prometheus_client import Counter

from finstream.runtime.logging import get_logger

log = get_logger(__name__)

V = TypeVar("V")

CORRUPT_STATE = Counter(
    "finstream_state_corrupt_records_total",
    "Changelog records that did not deserialize during a restore (skipped)",
    ["role", "store"],
)


class Store(Generic[V]):
    def __init__(
        self,
        name: str,
        serialize: Callable[[V], bytes],
        deserialize: Callable[[bytes], V],
    ) -> None:
        self.name = name
        self.serialize = serialize
        self.deserialize = deserialize
        self.changelog = ""  # set by the engine that owns the store
        self.role = ""
        self._data: dict[int, dict[bytes, V]] = {}
        self._dirty: dict[int, set[bytes]] = {}
        self._restoring: dict[int, dict[bytes, bytes]] = {}

    # -- what roles use -----------------------------------------------------------------

    def get(self, partition: int, key: bytes) -> V | None:
        data = self._data.get(partition)
        return None if data is None else data.get(key)

    def put(self, partition: int, key: bytes, value: V) -> None:
        self._data.setdefault(partition, {})[key] = value
        dirty = self._dirty.get(partition)
        if dirty is None:
            self._dirty[partition] = {key}
        else:
            dirty.add(key)

    def delete(self, partition: int, key: bytes) -> None:
        data = self._data.get(partition)
        if data is not None and key in data:
            del data[key]
            self._dirty.setdefault(partition, set()).add(key)

    def items(self, partition: int | None = None) -> Iterator[tuple[int, bytes, V]]:
        parts = (
            self._data.items()
            if partition is None
            else [(partition, self._data.get(partition, {}))]
        )
        for p, data in parts:
            for key, value in data.items():
                yield p, key, value

    def __len__(self) -> int:
        return sum(len(d) for d in self._data.values())

    @property
    def partitions(self) -> set[int]:
        return set(self._data)

    # -- what the engine uses -------------------------------------------------------------

    def drain_dirty(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        """Changelog records for what changed since the last drain (None: deleted)."""
        dirty, self._dirty = self._dirty, {}
        for p, keys in dirty.items():
            data = self._data.get(p, {})
            for key in keys:
                value = data.get(key)
                yield p, key, None if value is None else self.serialize(value)

    @property
    def dirty(self) -> bool:
        return any(self._dirty.values())

    def drop(self, partitions: Iterable[int]) -> None:
        for p in list(partitions):
            self._data.pop(p, None)
            self._dirty.pop(p, None)
            self._restoring.pop(p, None)

    def start_restore(self, partition: int) -> None:
        self._data[partition] = {}
        self._dirty.pop(partition, None)
        self._restoring[partition] = {}

    def load(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Apply one changelog record during a restore (latest record of a key wins).

        Values are kept as bytes until :meth:`finish_restore`: a changelog holds
        every version a key had since its last compaction, and only the last
        one needs decoding.
        """
        raw = self._restoring.setdefault(partition, {})
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value

    def finish_restore(self) -> None:
        """Decode what the restore read, once per key."""
        for partition, raw in self._restoring.items():
            data = self._data.setdefault(partition, {})
            for key, value in raw.items():
                try:
                    data[key] = self.deserialize(value)
                except Exception as exc:
                    # A record this version cannot read must not stop the role;
                    # the key starts afresh and the counter tells the operator.
                    CORRUPT_STATE.labels(self.role, self.name).inc()
                    log.error("state record does not deserialize", store=self.name, error=str(exc))
        self._restoring = {}
