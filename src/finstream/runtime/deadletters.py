"""Dead letters: a record that cannot be processed goes to the ``dlq`` topic with
the reason and where it came from (:class:`finstream.domain.deadletter.DeadLetter`),
and the dead-letter and failure counters move."""

from __future__ import annotations

from typing import Any

from finstream.domain.deadletter import DeadLetter
from finstream.domain.time import utcnow
from finstream.runtime.kafka import Headers, Publisher
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import DEAD_LETTERS, EVENTS_FAILED
from finstream.settings import Settings

log = get_logger(__name__)


class DeadLetters:
    """Builds dead letters for the dlq topic and moves the counters."""

    def __init__(self, publisher: Publisher | None, settings: Settings, role: str) -> None:
        self._publisher = publisher
        self.topic = settings.topic("dlq")
        self._role = role

    def letter(
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
    ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """The dlq record (key, value, headers) for one failed message; counts it."""
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
        return key, value, letter.headers()

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
        assert self._publisher is not None, "DeadLetters without a publisher cannot send"
        k, v, h = self.letter(
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
        await self._publisher.send(self.topic, k, v, h)

    async def send_message(
        self,
        message: Any,
        error: BaseException | str,
        *,
        error_class: str | None = None,
        attempts: int | None = None,
    ) -> None:
        """Dead-letter a consumed record (anything with topic/partition/offset/key/value/headers)."""
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


def message_header_pairs(headers: Any) -> list[tuple[str, bytes]]:
    """Headers of a consumed record as (name, bytes) pairs."""
    pairs = headers.items() if isinstance(headers, dict) else (headers or ())
    return [(k, v.encode() if isinstance(v, str) else bytes(v or b"")) for k, v in pairs]
