"""The rows delivery works with, whatever stores them.

A claimed :class:`Job`, a :class:`NewDelivery` to claim, the
:class:`ResultRow` of an attempt and the :class:`OutboxRecord` relayed to
Kafka; and :class:`DeliveryStorePort`, what the engine needs of a store
(:class:`~finstream.sinks.delivery.store.DeliveryStore` in PostgreSQL,
:class:`~finstream.testing.delivery.MemoryStore` in unit tests).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from finstream.domain.delivery.lifecycle import Transition


@dataclass
class Job:
    """A claimed delivery row, as the dispatcher works on it."""

    message_id: str
    token: uuid.UUID
    state: str  # 'queued' (attempt it) or 'unknown' (reconcile it)
    channel: str
    user_id: str
    request_id: str
    attempts: int
    rounds: int
    provider: str | None
    sending_at: datetime | None
    deadline: datetime
    correlation_id: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    raw: bytes
    message: dict[str, Any] = field(default_factory=dict)
    last_error_class: str | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class NewDelivery:
    message_id: str
    channel: str
    user_id: str
    request_id: str
    deadline: datetime
    correlation_id: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    raw: bytes
    # What a journey shows of the message without its body (the API may read these).
    locale: str | None = None
    subject: str | None = None
    recipient_masked: str | None = None
    # The message's personal part, sealed under the user's key (issue 14).
    content: str | None = None


@dataclass(frozen=True)
class OutboxRecord:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()

    def headers_json(self) -> str:
        return json.dumps([[k, bytes(v).hex()] for k, v in self.headers])


@dataclass(frozen=True)
class ResultRow:
    result_id: str
    message_id: str
    request_id: str
    user_id: str
    channel: str
    provider: str
    status: str
    attempt: int
    provider_message_id: str | None
    error_class: str | None
    error: str | None
    latency_ms: float | None
    at: datetime


class LostClaim(RuntimeError):
    """The row is no longer ours (lease ran out and another worker took it)."""


# The relay hands a batch to this and deletes it only once it returns (Kafka acked it).
Publish = Callable[[Sequence[OutboxRecord]], Awaitable[None]]


class DeliveryStorePort(Protocol):
    """What the engine needs of the ``deliveries`` state, its results and its outbox.

    Every method that moves a row is conditional on the claim the worker
    holds (its token and the state it holds the row in): a worker that lost
    its claim cannot move the row any more (:class:`LostClaim`).
    """

    async def claim_new(
        self, rows: Sequence[NewDelivery], token: uuid.UUID
    ) -> tuple[list[str], dict[str, str]]: ...
    async def reopen_redriven(self, row: NewDelivery, token: uuid.UUID) -> Job | None: ...
    async def sweep_lapsed(self, channel: str, reconcile_delay: float) -> int: ...
    async def claim_due(self, channel: str, limit: int, token: uuid.UUID) -> list[Job]: ...
    async def backlog(self, channel: str) -> dict[str, int]: ...
    async def release(self, tokens: Sequence[uuid.UUID]) -> None: ...
    async def start_sending(self, job: Job, provider: str, hold_seconds: float) -> bool: ...
    async def requeue(self, job: Job) -> bool: ...
    async def provider_id_taken(
        self, provider: str, provider_message_id: str, message_id: str
    ) -> bool: ...
    async def transition(
        self,
        job: Job,
        change: Transition,
        result: ResultRow | None,
        outbox: Sequence[OutboxRecord],
    ) -> None: ...
    async def results_of(self, message_id: str) -> list[ResultRow]: ...
    async def record_rejection(
        self, row: NewDelivery, state: str, result: ResultRow, outbox: Sequence[OutboxRecord]
    ) -> bool: ...
    async def record_duplicates(
        self, results: Sequence[ResultRow], outbox: Sequence[OutboxRecord]
    ) -> None: ...
    async def relay(self, limit: int, publish: Publish) -> int: ...
