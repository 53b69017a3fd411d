"""Decoding at the edge: each record decoded once by its topic's contract, bad ones dead-lettered."""

from __future__ import annotations

from collections import Counter as Tally
from datetime import timedelta
from typing import Any

from finstream.domain.time import utcnow
from finstream.runtime.stream.base import EOF, EngineBase, log
from finstream.runtime.stream.events import Event
from finstream.topics import DecodeContext


class Decoding(EngineBase):
    """Turns consumed records into :class:`Event` objects for the processor."""

    def _decode(self, messages: list[Any]) -> list[Event]:
        ctx = DecodeContext(utcnow(), timedelta(seconds=self.settings.tick_max_future_seconds))
        events: list[Event] = []
        counts = Tally[str]()
        inputs = self._inputs
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() != EOF:
                    log.warning("consumer error", error=str(err))
                continue
            topic = m.topic()
            spec = inputs[topic]
            counts[topic] += 1
            value = m.value()
            headers = m.headers()
            if value is None:
                if not spec.tombstones:
                    self._letter_raw(m, "message has no value", "DecodeError")
                    continue
                item = None
            else:
                try:
                    item = spec.contract.decode(value, ctx)
                except ValueError as exc:
                    self._letter_raw(m, exc, None)
                    continue
            events.append(
                Event(
                    topic,
                    spec.contract.spec.name,
                    m.partition(),
                    m.offset(),
                    m.key(),
                    value,
                    item,
                    headers,
                    m.timestamp()[1],
                )
            )
        for topic, n in counts.items():
            self._in_counters[topic].inc(n)
        return events

    def _letter_raw(self, m: Any, error: BaseException | str, error_class: str | None) -> None:
        self.out.dead_letter_record(
            source_topic=m.topic(),
            partition=m.partition(),
            offset=m.offset(),
            key=m.key(),
            value=m.value(),
            headers=m.headers() or (),
            error=error,
            error_class=error_class,
        )
