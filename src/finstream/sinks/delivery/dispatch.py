"""Dispatch: walk the provider chain for a claimed job and record each step.

The life cycle (:func:`finstream.domain.delivery.lifecycle.settle`) decides
every move; this module chooses the provider (circuits, rate limits), claims
the row ('sending'), calls the provider and records the step it is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime

from finstream.domain.delivery import AttemptSummary, dead_letter_reason
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import (
    Accepted,
    Attempted,
    Delivered,
    Failed,
    NoProvider,
    Outcome,
    Ready,
    State,
    Step,
    Then,
    Transition,
    Unavailable,
    Undeliverable,
    settle,
)
from finstream.domain.resilience import CircuitState, ErrorClass
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.base import Sent
from finstream.sinks.delivery.outbox import Outbox
from finstream.sinks.delivery.records import Job, OutboxRecord
from finstream.sinks.delivery.slots import ProviderSlot

log = get_logger(__name__)


class Dispatch(Outbox):
    def _settle(self, job: Job, outcome: Outcome) -> Step:
        return settle(job, outcome, self.lifecycle, now=utcnow(), rng=self.rng)

    async def attempt(self, job: Job) -> None:
        """Walk the chain until a provider takes the message or the round ends."""
        candidates = [s for s in self.slots if s.provider.supports(job.message)]
        if not candidates:
            reason = (
                f"no configured {self.channel.lower()} provider takes this message "
                f"(platform {job.message.get('platform')!r}; chain {[s.name for s in self.slots]})"
            )
            await self._apply(job, self._settle(job, NoProvider(reason)))
            return
        tried: set[str] = set()
        last: DeliveryError | None = None
        while True:
            step = self._settle(job, Ready(last))
            if step.then is not Then.SEND:
                await self._apply(job, step)
                return
            slot, wait = await self._choose(candidates, tried)
            if slot is None:
                await self._apply(job, self._settle(job, Unavailable(wait, last)))
                return
            try:
                claimed = await self.store.start_sending(job, slot.name, self.sending_hold)
            except BaseException:
                # PostgreSQL failed us before any call: a probe we hold was not used.
                slot.breaker.release()
                raise
            if not claimed:
                slot.breaker.release()
                log.warning("claim lost before sending", message_id=job.message_id)
                return
            sent, error, latency = await self._call(slot, job)
            if error is None:
                assert sent is not None
                slot.breaker.record_success(time.monotonic())
                slot.publish_state()
                accepted = Accepted(slot.name, sent.status, sent.provider_message_id, sent.detail)
                await self._apply(job, self._settle(job, accepted), slot=slot, latency=latency)
                return
            self._count_failure(slot, error, job)
            tried.add(slot.name)
            others_left = any(s.name not in tried for s in candidates)
            failed = Failed(
                slot.name,
                error,
                slot.provider.reconcile,
                others_left,
                0.0 if others_left else self._earliest(candidates),
            )
            step = self._settle(job, failed)
            await self._apply(job, step, slot=slot, latency=latency)
            if step.then is not Then.SEND:
                return
            last = error

    async def _call(
        self, slot: ProviderSlot, job: Job
    ) -> tuple[Sent | None, DeliveryError | None, float]:
        started = time.perf_counter()
        try:
            sent = await asyncio.wait_for(
                slot.provider.send(job.message), timeout=self.call_timeout
            )
            error = None
        except DeliveryError as err:
            sent, error = None, err
        except TimeoutError:
            sent, error = (
                None,
                DeliveryError(
                    ErrorClass.TRANSIENT,
                    f"no answer within {self.call_timeout:.0f}s",
                    ambiguous=True,
                ),
            )
        except Exception as exc:
            # A bug or an unexpected library error: it may have happened after
            # the request left, so it is treated as an unknown outcome.
            log.exception("provider call raised", provider=slot.name)
            sent, error = (
                None,
                DeliveryError(
                    ErrorClass.TRANSIENT, f"unexpected {type(exc).__name__}: {exc}", ambiguous=True
                ),
            )
        latency = time.perf_counter() - started
        if error is not None and not error.provider:
            error.provider = slot.name
        m.LATENCY.labels(self.channel, slot.name).observe(latency)
        return sent, error, latency

    def _count_failure(self, slot: ProviderSlot, error: DeliveryError, job: Job) -> None:
        now = time.monotonic()
        m.FAILED.labels(self.channel, slot.name, error.error_class.value).inc()
        self.ratio.record(self.channel, slot.name, ok=False)
        if error.error_class.counts_against_provider:
            slot.breaker.record_failure(now)
        else:
            # It answered, clearly, about this message: the provider itself is fine
            # (and a half-open probe must be resolved one way or the other).
            slot.breaker.record_success(now)
        if error.error_class is ErrorClass.THROTTLED:
            slot.limiter.pause_for(error.retry_after if error.retry_after is not None else 1.0, now)
        slot.publish_state()
        log.info(
            "provider call failed",
            message_id=job.message_id,
            provider=slot.name,
            error_class=error.error_class.value,
            error=str(error)[:300],
        )

    async def _choose(
        self, candidates: Sequence[ProviderSlot], tried: set[str]
    ) -> tuple[ProviderSlot | None, float]:
        """The first provider that may take a call now; else how long until one may."""
        waits: list[float] = []
        limit = self.settings.delivery_rate_wait_max
        for slot in candidates:
            if slot.name in tried:
                continue
            if slot.breaker.state(time.monotonic()) is CircuitState.OPEN:
                waits.append(slot.breaker.retry_in(time.monotonic()))
                continue
            acquired = False
            deadline = time.monotonic() + limit
            while True:
                now = time.monotonic()
                wait = slot.limiter.wait_time(now)
                if wait <= 0 and slot.limiter.try_acquire(now):
                    acquired = True
                    break
                if now + wait > deadline:
                    waits.append(wait)
                    break
                await asyncio.sleep(max(wait, 0.001))
            if not acquired:
                continue
            if not slot.breaker.allow(time.monotonic()):
                waits.append(min(1.0, self.settings.delivery_circuit_reset))  # probe in flight
                slot.publish_state()
                continue
            slot.publish_state()
            return slot, 0.0
        return None, min(waits) if waits else 0.0

    def _earliest(self, candidates: Sequence[ProviderSlot]) -> float:
        """Seconds until any candidate takes calls again (circuit or rate limit)."""
        now = time.monotonic()
        return min(max(s.breaker.retry_in(now), s.limiter.wait_time(now)) for s in candidates)

    # -- outcomes ----------------------------------------------------------------
    async def _apply(
        self,
        job: Job,
        step: Step,
        *,
        slot: ProviderSlot | None = None,
        latency: float | None = None,
    ) -> None:
        """Record a step of the life cycle: the row's move with its results and outbox."""
        if step.reconciled is not None:
            m.RECONCILED.labels(self.channel, job.provider or "none", step.reconciled).inc()
        if step.transition is None:
            if step.then is Then.REQUEUE and await self.store.requeue(job):
                await self.attempt(job)
            return
        change = step.transition
        for record in step.records:
            if isinstance(record, Delivered):
                await self._finish_sent(job, record, change, latency)
                return
            if isinstance(record, Undeliverable):
                await self._finish_failed(job, record, change, latency)
                return
        if step.deferred:
            m.DEFERRED.labels(self.channel).inc()
        elif change.state == State.RETRY or step.then is Then.SEND:
            m.RETRIED.labels(self.channel, slot.name if slot else "none").inc()
        result = None
        outbox: list[OutboxRecord] = []
        for record in step.records:
            if isinstance(record, Attempted):
                result = self._result_row(
                    job,
                    record.provider,
                    "RETRYING",
                    attempt=job.attempts,
                    error=record.error,
                    latency=latency,
                    note=record.note,
                )
                outbox.append(self._result_record(result, job.correlation_id))
        await self.store.transition(job, change, result, outbox)
        if outbox or change.add_round:
            self._outbox_ready.set()
        if change.add_round:
            log.info(
                "retry scheduled",
                message_id=job.message_id,
                at=change.next_attempt_at.isoformat() if change.next_attempt_at else None,
                attempts=job.attempts,
            )

    async def _finish_sent(
        self, job: Job, sent: Delivered, change: Transition, latency: float | None
    ) -> None:
        result = self._result_row(
            job,
            sent.provider,
            sent.status,
            attempt=job.attempts,
            provider_message_id=sent.provider_message_id,
            latency=latency,
            note=sent.note,
        )
        outbox = [
            self._result_record(result, job.correlation_id),
            self._audit_record(
                "delivered",
                job.message_id,
                user_id=job.user_id,
                reason=sent.how or None,
                details={
                    "channel": self.channel,
                    "provider": sent.provider,
                    "attempt": str(job.attempts),
                    "provider_message_id": sent.provider_message_id or "",
                },
                correlation_id=job.correlation_id,
            ),
        ]
        await self.store.transition(job, change, result, outbox)
        self._outbox_ready.set()
        await self._mark_finished(job)
        m.SENT.labels(self.channel, sent.provider).inc()
        m.OUTCOMES.labels(self.channel, sent.status).inc()
        if latency is not None:
            self.ratio.record(self.channel, sent.provider, ok=True)
        created = job.message.get("created_at")
        if isinstance(created, datetime):
            m.END_TO_END.labels(self.channel).observe(
                max((utcnow() - created).total_seconds(), 0.0)
            )
        log.info(
            "delivered",
            message_id=job.message_id,
            provider=sent.provider,
            attempt=job.attempts,
            how=sent.how or "sent",
        )

    async def _finish_failed(
        self, job: Job, failure: Undeliverable, change: Transition, latency: float | None
    ) -> None:
        """A final failure: result (its class names any feedback), dead letter with the
        whole story, audit."""
        status, error, cls, provider = (
            failure.status,
            failure.error,
            failure.error_class,
            failure.provider,
        )
        history = await self.store.results_of(job.message_id)
        result = self._result_row(
            job,
            provider,
            status,
            attempt=job.attempts,
            error=error,
            latency=latency,
            error_class=cls,
        )
        summaries = [
            AttemptSummary(r.attempt, r.provider, r.status, r.error_class, r.error)
            for r in [*history, result]
            if r.status != "DUPLICATE"
        ]
        reason = dead_letter_reason(f"{status.lower()}: {failure.verdict}", summaries)
        outbox = [
            self._result_record(result, job.correlation_id),
            self._dead_letter_record(job, error_class=cls, reason=reason, attempts=job.attempts),
            self._audit_record(
                f"delivery_{status.lower()}",
                job.message_id,
                user_id=job.user_id,
                reason=reason[:1000],
                details={
                    "channel": self.channel,
                    "provider": provider,
                    "attempts": str(job.attempts),
                },
                correlation_id=job.correlation_id,
            ),
        ]
        # A refused token or number is named in the result's error_class: the
        # feedback role changes the preferences (domain.feedback), not this worker.
        await self.store.transition(job, change, result, outbox)
        if error.feedback is not None:
            m.FEEDBACK.labels(self.channel, str(error.feedback)).inc()
        self._outbox_ready.set()
        await self._mark_finished(job)
        m.OUTCOMES.labels(self.channel, status).inc()
        self._count_dead_letter(job.source_topic, cls)
        log.warning(
            "delivery failed", message_id=job.message_id, status=status, reason=reason[:500]
        )
