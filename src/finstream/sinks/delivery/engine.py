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

A fourth loop relays the transactional outbox (results, dead letters, audit
events) to Kafka. A refusal that says something about the recipient (an
unregistered token, a STOP) is named in its result's ``error_class``; the
feedback role changes the preferences.

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

Layout: :mod:`.intake`, :mod:`.dispatch` (with :mod:`.slots`), :mod:`.reconcile`
and :mod:`.outbox` each hold one part; this module composes them and runs the
loops. Every move of a row is decided by
:func:`finstream.domain.delivery.lifecycle.settle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain.delivery import RetryPolicy
from finstream.domain.delivery.lifecycle import Policy
from finstream.domain.resilience import Backoff
from finstream.runtime.deadletters import DeadLetters
from finstream.runtime.kafka import KafkaPublisher
from finstream.runtime.logging import get_logger
from finstream.settings import Settings
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.base import CHANNEL_TOPICS, Provider
from finstream.sinks.delivery.intake import Intake
from finstream.sinks.delivery.privacy import DeliveryPrivacy
from finstream.sinks.delivery.reconcile import Reconciler
from finstream.sinks.delivery.records import DeliveryStorePort, Job
from finstream.sinks.delivery.slots import Breaker, ProviderSlot
from finstream.sinks.delivery.store import DeliveryStore
from finstream.topics import contract

log = get_logger(__name__)

BACKLOG_EVERY = 5.0  # seconds between backlog counts

__all__ = ["Breaker", "DeliveryEngine", "ProviderSlot"]


class DeliveryEngine(Intake, Reconciler):
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
        # Unit tests hand in the in-memory twin (finstream.testing.delivery).
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
        self.audit_topic = contract("audit.events", ns, codec)
        self.topics = {
            "results": self.results_topic.name,
            "dlq": settings.topic("dlq"),
            "audit": self.audit_topic.name,
        }
        self._outbox_ready = asyncio.Event()
        self._finished: list[tuple[str, str]] = []
        self.inflight = 0

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
