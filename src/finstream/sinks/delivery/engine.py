"""The delivery engine: one per channel worker, the same for every provider.

Three loops share a bounded in-memory queue of claimed jobs:

* **intake** (the BatchConsumer handler): decode and validate each
  OutboundMessage, recognize a redelivery (Redis first, PostgreSQL for
  truth), claim new messages in PostgreSQL and queue them. Only then are the
  Kafka offsets committed, so consumption never waits on a provider: a
  message is durable in ``deliveries`` before its offset moves.
* **dispatch** (``delivery_concurrency`` tasks): walk the channel's provider
  chain, skipping open circuits and exhausted rate limits; move the row to
  'sending' in a conditional UPDATE (the claim that guards every provider
  call), call the provider, and record the outcome with its DeliveryResult in
  one transaction. Transient errors fail over to the next provider at once,
  and when none is left the row is parked as 'retry' with backoff and jitter,
  never before the provider's Retry-After / reset time.
* **schedule**: every ``delivery_poll_interval``, claim due retries and
  reconciliations and take over claims whose lease ran out (a dead worker),
  with ``FOR UPDATE SKIP LOCKED`` so that replicas share them.

A fourth loop relays the transactional outbox (results, dead letters,
preference feedback, audit events) to Kafka.

Never twice
-----------
At intake, Redis ``SET dlv:<id> claimed NX GET`` (Redis 7.0+; on older
servers the fast path is skipped with a warning) answers "already finished"
without a PostgreSQL round trip (the marker is overwritten with the final
state only after PostgreSQL recorded it); everything else is decided by the
``deliveries`` primary key and the conditional state transitions, so a
redelivered batch, a restart or a rebalance never reaches a provider twice.

The remaining window is between the provider accepting a message and the
transaction recording it (a crash, or a lost answer: read timeout, dropped
connection, a 2xx without the documented body). Such a row is 'unknown' and
is reconciled, never resent blindly:

* providers that can be asked (SendGrid's activity API by ``custom_args``,
  Twilio's message list by recipient and body) are asked, after
  ``delivery_reconcile_delay``; found is recorded as sent, not found is sent;
* providers where a resend cannot show twice (in-app inbox: message id;
  APNs/FCM: the same apns-id / collapse id replaces the notification) are
  sent again;
* the others (SES, SMTP) follow ``delivery_unknown_outcome``: dead-lettered
  with the reason by default (an operator can redrive), or resent.

So the window is closed for in-app and push, bounded to a lookup for
SendGrid and Twilio, and turned into a visible dead letter for SES and SMTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from finstream.codec import Codec, DecodeError, EncodeError
from finstream.domain.deadletter import DeadLetter
from finstream.domain.delivery import (
    AttemptSummary,
    DeliveryError,
    Feedback,
    RetryPolicy,
    apply_feedback,
    dead_letter_reason,
    mask,
    scrub_contacts,
    validate_outbound,
)
from finstream.domain.delivery.lifecycle import (
    FINAL_STATES,
    Accepted,
    Attempted,
    Delivered,
    Failed,
    LookupFailed,
    NoProvider,
    NotAsked,
    NotFound,
    Outcome,
    Policy,
    Ready,
    Reconcile,
    Redelivery,
    State,
    Step,
    Then,
    Transition,
    Unavailable,
    Undeliverable,
    Unreadable,
    on_redelivery,
    redriven_deadline,
    settle,
)
from finstream.domain.envelope import EnvelopeError, UserErased, mask_recipient
from finstream.domain.resilience import (
    Backoff,
    CircuitBreaker,
    CircuitState,
    ErrorClass,
    RateLimiter,
)
from finstream.domain.time import utcnow
from finstream.runtime.deadletters import DeadLetters
from finstream.runtime.engine import Event
from finstream.runtime.kafka import KafkaPublisher, correlation_header
from finstream.runtime.logging import correlation, correlation_from_headers, get_logger
from finstream.runtime.metrics import DEAD_LETTERS, EVENTS_FAILED
from finstream.settings import Settings
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.base import CHANNEL_TOPICS, Provider, Sent
from finstream.sinks.delivery.privacy import DeliveryPrivacy
from finstream.sinks.delivery.records import (
    DeliveryStorePort,
    Job,
    LostClaim,
    NewDelivery,
    OutboxRecord,
    ResultRow,
)
from finstream.sinks.delivery.store import DeliveryStore
from finstream.stores.read_models import PreferencesStore
from finstream.topics import contract

log = get_logger(__name__)

OUTBOX_BATCH = 500
BACKLOG_EVERY = 5.0  # seconds between backlog counts
REDIS_CLAIMED = b"claimed"


# The shared breaker hands back a probe that was not used (a lost claim or a failed
# claim: no call happens, and nothing else would resolve the probe); kept under this
# name for callers.
Breaker = CircuitBreaker


class ProviderSlot:
    """A provider with its own circuit breaker and rate limiter."""

    def __init__(
        self, provider: Provider, settings: Settings, channel: str, probe_lease: float | None = None
    ) -> None:
        self.provider = provider
        self.channel = channel
        self.breaker = Breaker(
            failure_threshold=settings.delivery_circuit_failures,
            reset_timeout=settings.delivery_circuit_reset,
            probe_lease=probe_lease,
        )
        self.limiter = RateLimiter(rate=provider.rate, burst=max(1.0, provider.rate))
        self.publish_state()

    @property
    def name(self) -> str:
        return self.provider.name

    def publish_state(self) -> None:
        state = self.breaker.state(time.monotonic())
        m.CIRCUIT.labels(self.channel, self.name).set(m.CIRCUIT_VALUE[state])


class DeliveryEngine:
    def __init__(
        self,
        *,
        settings: Settings,
        codec: Codec,
        channel: str,
        role: str,
        chain: Sequence[Provider],
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        publisher: KafkaPublisher,
        rng: random.Random | None = None,
        store: DeliveryStorePort | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.channel = channel
        self.role = role
        self.actor = f"delivery.{channel.lower()}"
        self.redis = redis
        self.publisher = publisher
        self.dead_letters = DeadLetters(publisher, settings, role)
        self.prefs = PreferencesStore(redis, settings, codec)
        # Unit tests hand in the in-memory twin (sinks/delivery/memory_store.py).
        self.store: DeliveryStorePort = store or DeliveryStore(
            pool, settings.delivery_lease_seconds
        )
        self.privacy = DeliveryPrivacy(settings, codec, pool, channel)  # issue 14: seal, open
        # A call may take the whole timeout twice (FCM: token fetch, then the send).
        self.call_timeout = settings.delivery_timeout * 2 + 1.0
        # 'sending' is held long enough for a live worker to always record first.
        self.sending_hold = self.call_timeout + settings.delivery_lease_seconds
        # A half-open probe that was never reported (a bug, a crash of the job) is
        # written off when a send would have been: the circuit cannot stay half-open.
        self.slots = [ProviderSlot(p, settings, channel, self.sending_hold) for p in chain]
        self.by_name = {s.name: s for s in self.slots}
        self.policy = RetryPolicy(
            max_attempts=settings.delivery_max_attempts,
            backoff=Backoff(base=settings.delivery_backoff_base, cap=settings.delivery_backoff_cap),
            max_age=settings.delivery_max_age,
        )
        self.lifecycle = Policy(
            retry=self.policy,
            reconcile_delay=settings.delivery_reconcile_delay,
            unknown_outcome=settings.delivery_unknown_outcome,
        )
        self.rng = rng or random.Random()
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=settings.delivery_concurrency * 4)
        self.ratio = m.Ratio()
        ns = settings.namespace
        self.outbound = contract(CHANNEL_TOPICS[channel], ns, codec)
        self.results_topic = contract("notify.delivery", ns, codec)
        self.prefs_topic = contract("notify.preferences", ns, codec)
        self.audit_topic = contract("audit.events", ns, codec)
        self.topics = {
            "results": self.results_topic.name,
            "dlq": settings.topic("dlq"),
            "preferences": self.prefs_topic.name,
            "audit": self.audit_topic.name,
        }
        self._outbox_ready = asyncio.Event()
        self._finished: list[tuple[str, str]] = []
        self._user_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self.inflight = 0

    # ======================================================================
    # intake
    # ======================================================================
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
            state="queued",
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
        if await self.store.record_rejection(row, "rejected", result, outbox):
            m.OUTCOMES.labels(self.channel, "REJECTED").inc()
            self._count_dead_letter(row.source_topic, err.error_class.value)
        else:
            await self._record_duplicates([(row, message, "postgres")])
        self._outbox_ready.set()

    # ======================================================================
    # dispatch
    # ======================================================================
    async def process(self, job: Job) -> None:
        with correlation(job.correlation_id):
            if not job.message:
                try:
                    job.message = await self.privacy.open_stored(
                        self.outbound.decode_record(job.raw)
                    )
                except (DecodeError, EnvelopeError) as exc:
                    await self._apply(job, self._settle(job, Unreadable(str(exc))))
                    return
            try:
                if job.state == State.UNKNOWN:
                    await self.reconcile(job)
                else:
                    await self.attempt(job)
            except LostClaim as exc:
                log.warning("claim lost; another worker has the message", reason=str(exc))

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
        """A final failure: result, dead letter with the whole story, audit, feedback."""
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
        lock = None
        if error.feedback is not None:
            lock = self._user_locks.setdefault(job.user_id, asyncio.Lock())
            await lock.acquire()
        try:
            update = None
            if error.feedback is not None:
                update, records = await self._feedback(job, error.feedback, provider, error)
                outbox.extend(records)
            await self.store.transition(job, change, result, outbox)
            if update is not None:
                # Write through so the next feedback for this user builds on this one.
                with contextlib.suppress(RedisError):
                    await self.prefs.put(job.user_id, update)
        finally:
            if lock is not None:
                lock.release()
        self._outbox_ready.set()
        await self._mark_finished(job)
        m.OUTCOMES.labels(self.channel, status).inc()
        self._count_dead_letter(job.source_topic, cls)
        log.warning(
            "delivery failed", message_id=job.message_id, status=status, reason=reason[:500]
        )

    async def _feedback(
        self, job: Job, feedback: Feedback, provider: str, error: DeliveryError
    ) -> tuple[bytes | None, list[OutboxRecord]]:
        """The updated UserPreferences (and audit) for a token or number the provider refused."""
        recipient = str(job.message.get("recipient") or "")
        details = {
            "channel": self.channel,
            "provider": provider,
            "message_id": job.message_id,
            "code": error.code or "",
            "recipient": mask_recipient(recipient),
        }
        current = await self.prefs.get(job.user_id)
        if current is None:
            return None, [
                self._audit_record(
                    str(feedback),
                    job.user_id,
                    user_id=job.user_id,
                    reason=scrub_contacts(f"{error}; no preferences record to update"),
                    details=details,
                    correlation_id=job.correlation_id,
                    subject_type="preferences",
                )
            ]
        reveal = await self.privacy.reveal_for(job.user_id)  # contacts are sealed
        updated = apply_feedback(current, feedback, recipient, utcnow(), reveal)
        if updated is None:
            return None, []  # already marked: nothing to do, nothing to audit again
        try:
            value = self.prefs_topic.encode(updated)
        except EncodeError as exc:
            log.error("feedback not encodable", error=str(exc))
            return None, []
        m.FEEDBACK.labels(self.channel, str(feedback)).inc()
        return value, [
            OutboxRecord(
                self.topics["preferences"],
                job.user_id.encode(),
                value,
                correlation_header(job.correlation_id),
            ),
            self._audit_record(
                str(feedback),
                job.user_id,
                user_id=job.user_id,
                reason=scrub_contacts(str(error)),
                details=details,
                correlation_id=job.correlation_id,
                subject_type="preferences",
            ),
        ]

    # ======================================================================
    # reconciliation
    # ======================================================================
    async def reconcile(self, job: Job) -> None:
        """Settle a send of unknown outcome, never by resending blindly."""
        slot = self.by_name.get(job.provider or "")
        mode = slot.provider.reconcile if slot else Reconcile.NONE
        if mode is not Reconcile.LOOKUP or slot is None:
            await self._apply(job, self._settle(job, NotAsked(mode)), slot=slot)
            return
        since = job.sending_at or (utcnow() - timedelta(hours=1))
        try:
            found = await asyncio.wait_for(
                slot.provider.lookup(job.message, since), timeout=self.call_timeout
            )
        except (DeliveryError, TimeoutError) as exc:
            err = (
                exc
                if isinstance(exc, DeliveryError)
                else DeliveryError(ErrorClass.TRANSIENT, "lookup timed out")
            )
            await self._apply(job, self._settle(job, LookupFailed(err)), slot=slot)
            return
        if (
            found is not None
            and found.provider_message_id
            and await self.store.provider_id_taken(
                slot.name, found.provider_message_id, job.message_id
            )
        ):
            found = None  # that one belongs to another message
        if found is None:
            await self._apply(job, self._settle(job, NotFound()), slot=slot)
            return
        accepted = Accepted(
            slot.name,
            found.status,
            found.provider_message_id,
            found.detail,
            how="reconciled: found",
        )
        await self._apply(job, self._settle(job, accepted), slot=slot)

    # ======================================================================
    # records
    # ======================================================================
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

    # ======================================================================
    # loops
    # ======================================================================
    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch, schedule and relay until ``stop``; then finish what is in flight."""
        halt = asyncio.Event()
        tasks = [
            asyncio.create_task(self._dispatch_loop(halt), name=f"dispatch-{i}")
            for i in range(self.settings.delivery_concurrency)
        ]
        scheduler = asyncio.create_task(self._schedule_loop(halt), name="schedule")
        relay = asyncio.create_task(self._relay_loop(halt), name="relay")
        try:
            await stop.wait()
        finally:
            halt.set()
            await asyncio.gather(*tasks, scheduler, return_exceptions=True)
            leftover = []
            while not self.queue.empty():
                leftover.append(self.queue.get_nowait())
            with contextlib.suppress(Exception):
                await self.store.release(list({j.token for j in leftover}))
            await asyncio.gather(relay, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.relay_once()
            with contextlib.suppress(Exception):
                await self.flush_markers()
            for slot in self.slots:
                # Bounded: closing an SMTP session says QUIT, which a dead peer never answers.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(slot.provider.close(), timeout=self.call_timeout)
            with contextlib.suppress(Exception):
                await self.privacy.close()

    async def _dispatch_loop(self, halt: asyncio.Event) -> None:
        while not halt.is_set():
            try:
                job = await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except TimeoutError:
                continue
            self.inflight += 1
            try:
                await self.process(job)
            except Exception:
                # The row keeps its lease and is taken over when it lapses.
                log.exception("delivery job failed", message_id=job.message_id)
            finally:
                self.inflight -= 1

    async def _schedule_loop(self, halt: asyncio.Event) -> None:
        interval = self.settings.delivery_poll_interval
        counted = 0.0
        while not halt.is_set():
            try:
                if time.monotonic() - counted >= BACKLOG_EVERY:
                    counted = time.monotonic()
                    for state, n in (await self.store.backlog(self.channel)).items():
                        m.BACKLOG.labels(self.channel, state).set(n)
                swept = await self.store.sweep_lapsed(
                    self.channel, self.settings.delivery_reconcile_delay
                )
                if swept:
                    log.warning("claims of a stopped worker to reconcile", count=swept)
                room = self.queue.maxsize - self.queue.qsize()
                for job in await self.store.claim_due(self.channel, room, uuid.uuid4()):
                    # Intake may have filled the queue meanwhile: wait, do not drop.
                    await self.queue.put(job)
            except Exception as exc:
                # This loop is what retries and takes over lapsed claims: it must not die.
                log.warning("schedule scan failed", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(halt.wait(), timeout=interval)

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
