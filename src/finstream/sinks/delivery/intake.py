"""Intake: the BatchConsumer handler that claims new messages and queues them.

It decodes and validates each OutboundMessage, recognizes a redelivery
(Redis first, PostgreSQL for truth, the life cycle for what it means), claims
new messages in the store and queues them; it never calls a provider, so
consumption never waits on one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from finstream.domain.delivery import dead_letter_reason
from finstream.domain.delivery.channels import mask, scrub_contacts, validate_outbound
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import (
    Redelivery,
    State,
    on_redelivery,
    redriven_deadline,
)
from finstream.domain.envelope import EnvelopeError, UserErased
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.runtime.logging import correlation_from_headers, get_logger
from finstream.runtime.stream.events import Event
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.outbox import Outbox
from finstream.sinks.delivery.records import Job, NewDelivery, ResultRow

log = get_logger(__name__)


class Intake(Outbox):
    async def intake(self, records: Sequence[Event]) -> None:
        """One batch of the stream engine: claim what is new, queue it; never calls a provider."""
        token = uuid.uuid4()
        await self.privacy.prepare(r.item["user_id"] for r in records if r.item)
        fresh: dict[str, tuple[NewDelivery, dict[str, Any]]] = {}
        duplicates: list[tuple[NewDelivery, dict[str, Any], str]] = []
        for r in records:
            parsed = await self._parse(r)
            if parsed is None:
                continue
            row, message = parsed
            if row.message_id in fresh:
                duplicates.append((row, message, "batch"))
            else:
                fresh[row.message_id] = (row, message)
        if not fresh and not duplicates:
            return
        finished = await self._redis_markers(list(fresh))
        for mid, marker in finished.items():
            row, message = fresh.pop(mid)
            duplicates.append((row, message, f"redis:{marker}"))
        new_ids, existing = await self.store.claim_new([row for row, _ in fresh.values()], token)
        jobs: list[Job] = [self._new_job(*fresh[mid], token) for mid in new_ids]
        for mid, state in existing.items():
            row, message = fresh[mid]
            seen = on_redelivery(state)
            if seen is Redelivery.DUPLICATE:
                duplicates.append((row, message, "postgres"))
            elif seen is Redelivery.REOPEN:
                renewed = redriven_deadline(row.deadline, utcnow(), self.policy)
                job = await self.store.reopen_redriven(replace(row, deadline=renewed), token)
                if job is not None:
                    job.message = message
                    jobs.append(job)
            else:
                # Claimed by a live or dead worker; the schedule takes it from there.
                log.info("message already in progress", message_id=mid, state=state)
        await self._record_duplicates(duplicates)
        for job in jobs:
            await self.queue.put(job)  # waits when dispatch is behind: backpressure

    async def _parse(self, r: Event) -> tuple[NewDelivery, dict[str, Any]] | None:
        headers = r.headers or ()
        message: dict[str, Any] = r.item  # decoded by the stream engine
        if not message["message_id"]:
            await self.dead_letters.send_message(
                r,
                "empty message_id: no idempotency key, refusing to send",
                error_class=ErrorClass.PERMANENT.value,
            )
            return None
        # -- privacy (issue 14): open what the router sealed, seal what came in clear ----
        raw, content, unreadable = r.value or b"", None, None
        try:
            opened = await self.privacy.open_intake(message, raw)
            message, raw, content = opened.message, opened.raw, opened.content
        except UserErased:
            await self._drop_erased(r, message)
            return None
        except EnvelopeError as exc:
            unreadable = DeliveryError(ErrorClass.PERMANENT, f"sealed message does not open: {exc}")
        # -----------------------------------------------------------------------------------
        cid = message.get("correlation_id") or correlation_from_headers(headers)
        row = NewDelivery(
            message_id=message["message_id"],
            channel=self.channel,
            user_id=message["user_id"],
            request_id=message["request_id"],
            deadline=self.policy.deadline(message["created_at"], message.get("expires_at")),
            correlation_id=cid,
            source_topic=r.topic,
            source_partition=r.partition,
            source_offset=r.offset,
            raw=raw,  # sealed; never empty: outbound messages are not compacted
            locale=message.get("locale"),
            subject=None,  # in content, sealed
            recipient_masked=mask(str(message.get("recipient") or "")) or None,
            content=content,
        )
        if unreadable is not None:
            await self._reject_invalid(row, message, unreadable)
            return None
        try:
            validate_outbound(message, self.channel)
        except DeliveryError as err:
            await self._reject_invalid(row, message, err)
            return None
        return row, message

    def _new_job(self, row: NewDelivery, message: dict[str, Any], token: uuid.UUID) -> Job:
        return Job(
            message_id=row.message_id,
            token=token,
            state=State.QUEUED,
            channel=row.channel,
            user_id=row.user_id,
            request_id=row.request_id,
            attempts=0,
            rounds=0,
            provider=None,
            sending_at=None,
            deadline=row.deadline,
            correlation_id=row.correlation_id,
            source_topic=row.source_topic,
            source_partition=row.source_partition,
            source_offset=row.source_offset,
            raw=row.raw,
            message=message,
        )

    async def _record_duplicates(
        self, duplicates: list[tuple[NewDelivery, dict[str, Any], str]]
    ) -> None:
        if not duplicates:
            return
        results, outbox = [], []
        for row, _message, source in duplicates:
            m.DUPLICATES.labels(self.channel, source.split(":", 1)[0]).inc()
            result = ResultRow(
                result_id=uuid.uuid4().hex,
                message_id=row.message_id,
                request_id=row.request_id,
                user_id=row.user_id,
                channel=self.channel,
                provider="none",
                status="DUPLICATE",
                attempt=0,
                provider_message_id=None,
                error_class=None,
                error=f"already handled (recognized by {source})",
                latency_ms=None,
                at=utcnow(),
            )
            results.append(result)
            outbox.append(self._result_record(result, row.correlation_id))
            log.info("duplicate not sent again", message_id=row.message_id, source=source)
        await self.store.record_duplicates(results, outbox)
        self._outbox_ready.set()

    async def _drop_erased(self, r: Event, message: dict[str, Any]) -> None:
        """A message of an erased user: not sent, nothing stored, audited (issue 14)."""
        record = self._audit_record(
            "dropped",
            str(message["message_id"]),
            user_id=str(message["user_id"]),
            reason="user erased: their data keys are destroyed",
            details={"channel": self.channel, "stage": "intake"},
            correlation_id=message.get("correlation_id"),
        )
        await self.publisher.send(record.topic, record.key, record.value, list(record.headers))
        log.info("message of an erased user dropped", message_id=message["message_id"])

    async def _reject_invalid(
        self, row: NewDelivery, message: dict[str, Any], err: DeliveryError
    ) -> None:
        result = self._result_row(row, "none", "REJECTED", attempt=0, error=err)
        reason = dead_letter_reason(f"rejected before any provider call: {err}", [])
        outbox = [
            self._result_record(result, row.correlation_id),
            self._dead_letter_record(
                row, error_class=err.error_class.value, reason=reason, attempts=0
            ),
            self._audit_record(
                "delivery_rejected",
                row.message_id,
                user_id=row.user_id,
                reason=scrub_contacts(str(err)),
                details={"channel": self.channel, "stage": "validation"},
                correlation_id=row.correlation_id,
            ),
        ]
        if await self.store.record_rejection(row, State.REJECTED, result, outbox):
            m.OUTCOMES.labels(self.channel, "REJECTED").inc()
            self._count_dead_letter(row.source_topic, err.error_class.value)
        else:
            await self._record_duplicates([(row, message, "postgres")])
        self._outbox_ready.set()
