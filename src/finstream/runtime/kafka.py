"""Kafka producing for every role: one small publishing contract, two backends.

Service roles (connectors, sinks, delivery workers) publish with an aiokafka
producer; faust agents publish through the faust app's own producer so that
their sends join faust's flush-before-commit. Both sit behind
:class:`Publisher`, and dead letters go through :class:`DeadLetters`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from finstream.domain.deadletter import DeadLetter
from finstream.domain.time import utcnow
from finstream.runtime.logging import CORRELATION_HEADER, get_logger
from finstream.runtime.metrics import DEAD_LETTERS, EVENTS_FAILED, EVENTS_OUT
from finstream.settings import Settings

log = get_logger(__name__)

Headers = Sequence[tuple[str, bytes]]


class Publisher(Protocol):
    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        """Queue a message; it is durable after :meth:`flush` returns."""

    async def flush(self) -> None: ...


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "request_timeout_ms": 30_000,
    }


class AiokafkaPublisher:
    def __init__(self, settings: Settings, role: str) -> None:
        self.role = role
        self._producer = AIOKafkaProducer(**producer_config(settings))
        self._pending: list[Any] = []

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        try:
            await self.flush()
        finally:
            await self._producer.stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        fut = await self._producer.send(
            topic, value=value, key=key, headers=list(headers) or None, partition=partition
        )
        self._pending.append(fut)
        EVENTS_OUT.labels(self.role, topic).inc()

    async def send_and_wait(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers = ()
    ) -> Any:
        """Send one message and wait for the broker's acknowledgement (its metadata)."""
        meta = await self._producer.send_and_wait(
            topic, value=value, key=key, headers=list(headers) or None
        )
        EVENTS_OUT.labels(self.role, topic).inc()
        return meta

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        for fut in pending:
            # Raises if the broker refused the batch: the caller must not commit.
            await fut

    @property
    def producer(self) -> AIOKafkaProducer:
        return self._producer


class DeadLetters:
    """Writes dead letters to the dlq topic and moves the counters."""

    async def send_message(
        self,
        message: Any,
        error: BaseException | str,
        *,
        error_class: str | None = None,
        attempts: int | None = None,
    ) -> None:
        """Dead-letter a consumed message (an aiokafka record or a faust message) as it is."""
        await self.send(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            error=error,
            error_class=error_class,
            headers=message_header_pairs(message.headers),
            attempts=attempts,
        )

    def __init__(self, publisher: Publisher, settings: Settings, role: str) -> None:
        self._publisher = publisher
        self._topic = settings.topic("dlq")
        self._role = role

    async def send(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: BaseException | str,
        error_class: str | None = None,
        headers: Headers = (),
        attempts: int | None = None,
    ) -> None:
        if isinstance(error, BaseException):
            error_class = error_class or type(error).__name__
            reason = str(error) or type(error).__name__
        else:
            error_class = error_class or "Error"
            reason = error
        letter = DeadLetter(
            source_topic=source_topic,
            source_partition=partition,
            source_offset=offset,
            error_class=error_class,
            reason=reason,
            role=self._role,
            at=utcnow(),
            key=key,
            value=value,
            original_headers=tuple((k, bytes(v or b"")) for k, v in headers),
            attempts=attempts,
        )
        await self._publisher.send(self._topic, key, value, letter.headers())
        DEAD_LETTERS.labels(self._role, source_topic, error_class).inc()
        EVENTS_FAILED.labels(self._role, source_topic, error_class).inc()
        log.warning(
            "dead letter",
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            error_class=error_class,
            reason=reason[:300],
        )


def message_header_pairs(headers: Any) -> list[tuple[str, bytes]]:
    """Headers of an aiokafka record or a faust message as (name, bytes) pairs."""
    pairs = headers.items() if isinstance(headers, dict) else (headers or ())
    return [(k, v.encode() if isinstance(v, str) else bytes(v or b"")) for k, v in pairs]


def correlation_header(correlation_id: str | None) -> list[tuple[str, bytes]]:
    return [(CORRELATION_HEADER, correlation_id.encode())] if correlation_id else []
