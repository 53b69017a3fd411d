"""The engine's records and its transactional outbox.

Every outcome is written with the row's move in one statement: its
DeliveryResult, dead letter and audit event go to the
``delivery_outbox`` table, and the relay publishes them to Kafka, deleting
them only once Kafka acknowledged them. The Redis idempotency markers of
finished messages are written here too, after PostgreSQL has the final state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from finstream.codec import Codec
from finstream.domain.deadletter import DeadLetter
from finstream.domain.delivery import RetryPolicy
from finstream.domain.delivery.channels import scrub_contacts
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import FINAL_STATES, Policy
from finstream.domain.time import utcnow
from finstream.runtime.deadletters import DeadLetters
from finstream.runtime.kafka import KafkaPublisher, correlation_header
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import DEAD_LETTERS, EVENTS_FAILED
from finstream.settings import Settings
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.privacy import DeliveryPrivacy
from finstream.sinks.delivery.records import (
    DeliveryStorePort,
    Job,
    NewDelivery,
    OutboxRecord,
    ResultRow,
)
from finstream.sinks.delivery.slots import ProviderSlot
from finstream.topics import Contract

log = get_logger(__name__)

OUTBOX_BATCH = 500
REDIS_CLAIMED = b"claimed"


class Outbox:
    """The engine's shared state (set by DeliveryEngine.__init__), its records and its outbox."""

    settings: Settings
    codec: Codec
    channel: str
    role: str
    actor: str
    redis: aioredis.Redis
    publisher: KafkaPublisher
    dead_letters: DeadLetters
    store: DeliveryStorePort
    privacy: DeliveryPrivacy
    call_timeout: float
    sending_hold: float
    slots: list[ProviderSlot]
    by_name: dict[str, ProviderSlot]
    policy: RetryPolicy
    lifecycle: Policy
    rng: random.Random
    queue: asyncio.Queue[Job]
    ratio: m.Ratio
    outbound: Contract
    results_topic: Contract
    audit_topic: Contract
    topics: dict[str, str]
    inflight: int
    _outbox_ready: asyncio.Event
    _finished: list[tuple[str, str]]

    def _redis_key(self, message_id: str) -> str:
        return self.settings.redis_key(f"dlv:{message_id}")

    async def _redis_markers(self, ids: list[str]) -> dict[str, str]:
        """SET NX a claim marker per id; return the ids Redis already knows as finished."""
        if not ids:
            return {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for mid in ids:
                    pipe.set(
                        self._redis_key(mid),
                        REDIS_CLAIMED,
                        nx=True,
                        get=True,
                        ex=self.settings.delivery_idempotency_ttl,
                    )
                previous = await pipe.execute()
        except RedisError as exc:
            # Redis is the fast path only; PostgreSQL still decides.
            log.warning("redis idempotency check unavailable", error=str(exc))
            return {}
        found = {}
        for mid, old in zip(ids, previous, strict=True):
            marker = old.decode() if isinstance(old, bytes) else old
            if marker and marker in FINAL_STATES:
                found[mid] = marker
        return found

    async def _mark_finished(self, job: Job) -> None:
        """Queue the Redis marker of a final state (written in batches by the relay loop)."""
        self._finished.append((job.message_id, job.state))
        self._outbox_ready.set()

    async def flush_markers(self) -> None:
        """Write the queued markers: after PostgreSQL has the final state, never before."""
        if not self._finished:
            return
        items, self._finished = self._finished, []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for message_id, state in items:
                    pipe.set(
                        self._redis_key(message_id),
                        state,
                        ex=self.settings.delivery_idempotency_ttl,
                    )
                await pipe.execute()
        except RedisError as exc:
            # Only the fast path suffers: PostgreSQL still recognizes the message.
            log.warning("redis idempotency markers not written", error=str(exc), count=len(items))

    def _result_row(
        self,
        subject: Job | NewDelivery,
        provider: str,
        status: str,
        *,
        attempt: int,
        provider_message_id: str | None = None,
        error: DeliveryError | None = None,
        latency: float | None = None,
        error_class: str | None = None,
        note: str | None = None,
    ) -> ResultRow:
        text = scrub_contacts(error.detail()) if error else None
        if note:
            text = f"{text}; {note}" if text else note
        return ResultRow(
            # Random: a redriven message counts its attempts from 1 again.
            result_id=uuid.uuid4().hex,
            message_id=subject.message_id,
            request_id=subject.request_id,
            user_id=subject.user_id,
            channel=self.channel,
            provider=provider,
            status=status,
            attempt=attempt,
            provider_message_id=provider_message_id,
            error_class=error_class or (error.error_class.value if error else None),
            error=text[:2000] if text else None,
            latency_ms=latency * 1000 if latency is not None else None,
            at=utcnow(),
        )

    def _result_record(self, r: ResultRow, correlation_id: str | None) -> OutboxRecord:
        value = self.results_topic.encode(
            {
                "result_id": r.result_id,
                "message_id": r.message_id,
                "request_id": r.request_id,
                "user_id": r.user_id,
                "channel": r.channel,
                "provider": r.provider,
                "status": r.status,
                "attempt": r.attempt,
                "provider_message_id": r.provider_message_id,
                "error_class": r.error_class,
                "error": r.error,
                "latency_ms": r.latency_ms,
                "at": r.at,
            },
        )
        return OutboxRecord(
            self.topics["results"], r.user_id.encode(), value, correlation_header(correlation_id)
        )

    def _dead_letter_record(
        self, subject: Job | NewDelivery, *, error_class: str, reason: str, attempts: int
    ) -> OutboxRecord:
        letter = DeadLetter(
            source_topic=subject.source_topic,
            source_partition=subject.source_partition,
            source_offset=subject.source_offset,
            error_class=error_class,
            reason=reason,
            role=self.role,
            at=utcnow(),
            key=subject.user_id.encode(),
            value=subject.raw,
            original_headers=tuple(correlation_header(subject.correlation_id)),
            attempts=attempts,
        )
        return OutboxRecord(self.topics["dlq"], letter.key, letter.value, letter.headers())

    def _audit_record(
        self,
        action: str,
        subject_id: str,
        *,
        user_id: str,
        reason: str | None,
        details: dict[str, str],
        correlation_id: str | None,
        subject_type: str = "message",
    ) -> OutboxRecord:
        event = {
            # The outbox keeps the encoded event: a republished record has the same id.
            "event_id": uuid.uuid4().hex,
            "at": utcnow(),
            "actor": self.actor,
            "action": action,
            "subject_type": subject_type,
            "subject_id": subject_id,
            "user_id": user_id,
            "reason": reason,
            "details": details,
            "correlation_id": correlation_id,
        }
        return OutboxRecord(
            self.topics["audit"],
            subject_id.encode(),
            self.audit_topic.encode(event),
            correlation_header(correlation_id),
        )

    def _count_dead_letter(self, source_topic: str, error_class: str) -> None:
        DEAD_LETTERS.labels(self.role, source_topic, error_class).inc()
        EVENTS_FAILED.labels(self.role, source_topic, error_class).inc()

    async def _relay_loop(self, halt: asyncio.Event) -> None:
        while not halt.is_set():
            try:
                await self.flush_markers()
                moved = await self.relay_once()
            except Exception as exc:
                log.warning("outbox relay failed; will retry", error=str(exc))
                moved = 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(halt.wait(), timeout=1.0)
            if moved >= OUTBOX_BATCH:
                continue
            self._outbox_ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_ready.wait(), timeout=0.5)

    async def relay_once(self) -> int:
        """Publish pending outbox records, wait for Kafka's acks, then delete them."""
        return await self.store.relay(OUTBOX_BATCH, self._publish)

    async def _publish(self, records: Sequence[OutboxRecord]) -> None:
        for r in records:
            await self.publisher.send(r.topic, r.key, r.value, list(r.headers))
        await self.publisher.flush()
