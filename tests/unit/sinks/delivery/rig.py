"""The delivery engine against the in-memory store, scripted providers and in-memory keys.

No PostgreSQL, Redis or Kafka: the engine runs its real intake, dispatch and
reconciliation code; the twin (:class:`finstream.testing.delivery.MemoryStore`)
keeps the store's conditional moves, each fake provider answers from a script,
and Redis is unreachable at once (its fast path is optional: the store decides).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from finstream.codec import Codec
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.envelope import UserKeys, new_data_key
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.runtime.stream.events import Event
from finstream.settings import Settings
from finstream.sinks.delivery.base import Message, Sent
from finstream.sinks.delivery.engine import DeliveryEngine
from finstream.sinks.delivery.privacy import DeliveryPrivacy
from finstream.sinks.delivery.records import Job, NewDelivery
from finstream.testing.delivery import MemoryStore

Answer = Sent | DeliveryError | None


class ScriptedProvider:
    """A provider that answers each send (and lookup) with the next scripted answer."""

    channel = "SMS"
    rate = 1000.0

    def __init__(
        self,
        name: str,
        answers: Iterable[Answer],
        *,
        reconcile: Reconcile = Reconcile.NONE,
        lookups: Iterable[Answer] = (),
    ) -> None:
        self.name = name
        self.reconcile = reconcile
        self.answers = list(answers)
        self.lookups = list(lookups)
        self.sent: list[str] = []
        self.looked_up: list[str] = []

    def supports(self, message: Message) -> bool:
        return True

    async def send(self, message: Message) -> Sent:
        self.sent.append(str(message["message_id"]))
        answer = self.answers.pop(0)
        if isinstance(answer, DeliveryError):
            raise answer
        assert answer is not None
        return answer

    async def lookup(self, message: Message, since: datetime) -> Sent | None:
        self.looked_up.append(str(message["message_id"]))
        answer = self.lookups.pop(0)
        if isinstance(answer, DeliveryError):
            raise answer
        return answer

    async def close(self) -> None:
        pass


def transient(*, ambiguous: bool = False) -> DeliveryError:
    return DeliveryError(ErrorClass.TRANSIENT, "503 unavailable", ambiguous=ambiguous)


class KeysInMemory(DeliveryPrivacy):
    """The delivery path's sealing with data keys held in memory (no key table)."""

    def __init__(self, settings: Settings, codec: Codec) -> None:
        super().__init__(settings, codec, None, "SMS")  # type: ignore[arg-type]
        self.held: dict[str, UserKeys] = {}

    async def prepare(self, users: Iterable[str]) -> None:
        pass

    async def keys(self, user: str) -> UserKeys:
        return self.held.setdefault(user, UserKeys.from_raw(user, {1: new_data_key()}))


def sms(message_id: str = "m1", **over: Any) -> dict[str, Any]:
    """An OutboundMessage for the SMS channel, in clear (intake seals it)."""
    message: dict[str, Any] = {
        "message_id": message_id,
        "request_id": f"r-{message_id}",
        "user_id": "u1",
        "channel": "SMS",
        "category": "price_alert",
        "priority": "HIGH",
        "recipient": "+14155552671",
        "platform": None,
        "locale": "en",
        "subject": None,
        "body_text": f"AAPL crossed 200 [{message_id}]",
        "body_html": None,
        "data": {"symbol": "AAPL"},
        "transactional": True,
        "created_at": utcnow(),
        "expires_at": None,
        "attempt": 0,
        "correlation_id": f"c-{message_id}",
    }
    message.update(over)
    return message


class Rig:
    def __init__(self, tmp_path: Path, *chain: ScriptedProvider, **settings: Any) -> None:
        self.settings = Settings(
            stack_dir=tmp_path,
            delivery_backoff_base=0.01,
            delivery_backoff_cap=0.05,
            delivery_reconcile_delay=0.0,
            delivery_rate_wait_max=0.0,
            **settings,
        )
        self.store = MemoryStore(self.settings.delivery_lease_seconds)
        self.engine = DeliveryEngine(
            settings=self.settings,
            codec=Codec(),
            channel="SMS",
            role="delivery-sms",
            chain=list(chain),  # type: ignore[arg-type]
            pool=None,  # type: ignore[arg-type]
            # Unreachable, and said at once (no retries): intake's fast path is skipped.
            redis=aioredis.Redis(port=1, retry=Retry(NoBackoff(), 0)),
            publisher=None,  # type: ignore[arg-type]
            rng=random.Random(7),
            store=self.store,
        )
        self.engine.privacy = KeysInMemory(self.settings, self.engine.codec)
        self.offset = 0

    async def claim(self, message_id: str = "m1") -> Job:
        row = NewDelivery(
            message_id=message_id,
            channel="SMS",
            user_id="u1",
            request_id="r1",
            deadline=utcnow() + timedelta(hours=1),
            correlation_id=None,
            source_topic="notify.outbound.sms",
            source_partition=0,
            source_offset=1,
            raw=b"raw",
        )
        token = uuid.uuid4()
        new, _ = await self.store.claim_new([row], token)
        assert new == [message_id]
        message = {"message_id": message_id, "user_id": "u1", "recipient": "+15005550006"}
        return self.engine._new_job(row, message, token)

    async def due(self) -> Job:
        """The next due job, as the schedule loop claims it (its clock moved past the backoff)."""
        self.store.clock = lambda: utcnow() + timedelta(minutes=5)
        (job,) = await self.store.claim_due("SMS", 10, uuid.uuid4())
        job.message = {"message_id": job.message_id, "user_id": "u1", "recipient": "+1500555"}
        return job

    def event(self, message: dict[str, Any]) -> Event:
        """A consumed record of the outbound topic, as the stream engine hands it to intake."""
        self.offset += 1
        topic = self.engine.outbound.name
        return Event(
            topic=topic,
            source="notify.outbound.sms",
            partition=0,
            offset=self.offset,
            key=str(message["user_id"]).encode(),
            value=self.engine.outbound.encode(message),
            item=message,
            headers=None,
            timestamp=0,
        )

    async def intake(self, *messages: dict[str, Any]) -> list[Job]:
        """One consumed batch through intake; the jobs it queued for dispatch."""
        await self.engine.intake([self.event(m) for m in messages])
        jobs = []
        while not self.engine.queue.empty():
            jobs.append(self.engine.queue.get_nowait())
        return jobs

    async def deliver(self, *messages: dict[str, Any]) -> Sequence[Job]:
        """One batch through intake, then each job it queued through dispatch."""
        jobs = await self.intake(*messages)
        for job in jobs:
            await self.engine.process(job)
        return jobs

    def statuses(self, message_id: str = "m1") -> list[str]:
        return [r.status for r in self.store.results if r.message_id == message_id]

    def history(self, message_id: str = "m1") -> list[str]:
        return self.store.rows[message_id].history

    def dead_letters(self) -> int:
        return sum(1 for o in self.store.outbox if o.topic == self.settings.topic("dlq"))
