"""What a role sees of the stream engine: its events, its output and the processor it implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from finstream.runtime.deadletters import DeadLetters
from finstream.topics import Contract

if TYPE_CHECKING:
    from finstream.runtime.engine import StreamEngine

Guarantee = Literal["exactly_once", "at_least_once"]


class Rewind(Exception):
    """The open batch or transaction is void: go back to the last commit."""


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
class Input:
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
