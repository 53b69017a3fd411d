"""Durability ordering for faust agents that publish and keep state.

Two rules make a stateful agent exactly-once in effect with at-least-once
Kafka, without waiting on the broker in the processing path:

1. A state write that records an output (an alert fired, a bar published)
   must not become durable before the output does. Otherwise a crash in
   between leaves a state that says "done" for an output nobody received.
   :class:`KeyedWrites` holds such writes back, per key and in order, until
   the outputs' delivery futures complete; later writes of the same key
   queue behind them.
2. An input's offset must not be committed before everything it caused is
   durable. faust commits the offsets of *acked* events after flushing its
   producer, but its buffer flush gives up after 0.1 s without a send
   (``ProducerBuffer.flush_atmost``), so a commit can overtake changelog
   writes. The agents therefore consume with ``stream.noack()`` and
   :class:`EventAck` acks an event only when the delivery futures of all its
   outputs and table writes have completed.

A crash replays from the last committed offset; the handlers recognise what
was already applied (stale or duplicate ticks, offsets already in a state) and
re-send outputs only under the same deterministic ids.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from finstream.runtime.logging import get_logger

log = get_logger(__name__)

Future = Any  # asyncio.Future or faust FutureMessage: anything with done()/add_done_callback()


class EventAck:
    """Acks one faust event when it is sealed, unheld and all its futures are done."""

    __slots__ = ("_failed", "_holds", "_on_failure", "_pending", "_sealed", "event")

    def __init__(self, event: Any, on_failure: Callable[[BaseException], None]) -> None:
        self.event = event
        self._pending = 0
        self._holds = 0
        self._sealed = False
        self._failed = False
        self._on_failure = on_failure

    def wait_for(self, fut: Future) -> None:
        if fut.done():
            self._check(fut)
            return
        self._pending += 1
        fut.add_done_callback(self._done)

    def hold(self) -> None:
        self._holds += 1

    def unhold(self) -> None:
        self._holds -= 1
        self._maybe_ack()

    def seal(self) -> None:
        """Processing of the event is over; nothing more will be added."""
        self._sealed = True
        self._maybe_ack()

    def _done(self, fut: Future) -> None:
        self._pending -= 1
        self._check(fut)
        self._maybe_ack()

    def _check(self, fut: Future) -> None:
        if fut.cancelled():
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = fut.exception()
        if exc is not None and not self._failed:
            # Never acked: its offset is not committed and the event is
            # processed again after the restart that on_failure causes.
            self._failed = True
            self._on_failure(exc)

    def _maybe_ack(self) -> None:
        if self._sealed and not self._pending and not self._holds and not self._failed:
            self.event.ack()


@dataclass
class _Held:
    partition: int
    after: list[Future]
    writes: list[Callable[[], Future]]
    ack: EventAck | None
    on_applied: Callable[[], None] | None
    waiting: int = 0


@dataclass
class KeyedWrites:
    """Table writes held per key until the outputs they depend on are delivered."""

    _queues: dict[Any, deque[_Held]] = field(default_factory=dict)

    def blocked(self, key: Any) -> bool:
        return bool(self._queues.get(key))

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def hold(
        self,
        key: Any,
        partition: int,
        after: Iterable[Future],
        writes: list[Callable[[], Future]],
        ack: EventAck | None,
        *,
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        """Apply ``writes`` (each returns its delivery future) once ``after`` are done.

        Entries of one key are applied in the order they were held.
        """
        entry = _Held(partition, [f for f in after if not f.done()], writes, ack, on_applied)
        if ack is not None:
            ack.hold()
        self._queues.setdefault(key, deque()).append(entry)
        for fut in entry.after:
            entry.waiting += 1
            fut.add_done_callback(lambda _f, e=entry, k=key: self._one_done(k, e))
        self._release(key)

    def _one_done(self, key: Any, entry: _Held) -> None:
        entry.waiting -= 1
        if entry.waiting == 0:
            self._release(key)

    def _release(self, key: Any) -> None:
        queue = self._queues.get(key)
        while queue and queue[0].waiting == 0:
            entry = queue.popleft()
            for write in entry.writes:
                fut = write()
                if entry.ack is not None:
                    entry.ack.wait_for(fut)
            if entry.on_applied is not None:
                entry.on_applied()
            if entry.ack is not None:
                entry.ack.unhold()
        if queue is not None and not queue:
            del self._queues[key]

    def drop_partitions(self, partitions: set[int]) -> list[Any]:
        """Forget what is held for these partitions (revoked: their events will be replayed)."""
        dropped = []
        for key, queue in list(self._queues.items()):
            kept = deque(e for e in queue if e.partition not in partitions)
            if len(kept) != len(queue):
                dropped.append(key)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        return dropped


def table_write(table: Any, partition: int, key: bytes, value: bytes) -> Callable[[], Future]:
    """A write of ``table[key] = value`` whose changelog goes to ``partition``.

    Mirrors faust's ``Table.__setitem__`` (changelog first, then the store)
    but works outside the event being processed, and returns the changelog
    message's delivery future.
    """

    def write() -> Future:
        fut = table.send_changelog(partition, key, value)
        table.data[key] = value
        return fut

    return write


def table_delete(table: Any, partition: int, key: bytes) -> Callable[[], Future]:
    """A delete of ``table[key]`` (a changelog tombstone), like :func:`table_write`."""

    def write() -> Future:
        fut = table.send_changelog(partition, key, None, value_serializer="raw")
        table.data.pop(key, None)
        return fut

    return write
