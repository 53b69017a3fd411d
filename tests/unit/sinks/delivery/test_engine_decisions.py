"""The delivery engine's decisions against the in-memory store and scripted providers.

No PostgreSQL, Redis or Kafka: the engine runs its real dispatch and
reconciliation code, the twin (finstream.testing.delivery) keeps
the store's conditional moves, and each fake provider answers from a script.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.settings import Settings
from finstream.sinks.delivery.base import Message, Sent
from finstream.sinks.delivery.engine import DeliveryEngine
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
            redis=aioredis.Redis(port=1),  # never connected: no marker is flushed here
            publisher=None,  # type: ignore[arg-type]
            rng=random.Random(7),
            store=self.store,
        )

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

    def statuses(self, message_id: str = "m1") -> list[str]:
        return [r.status for r in self.store.results if r.message_id == message_id]

    def history(self, message_id: str = "m1") -> list[str]:
        return self.store.rows[message_id].history

    def dead_letters(self) -> int:
        return sum(1 for o in self.store.outbox if o.topic == self.settings.topic("dlq"))


async def test_a_transient_failure_fails_over_to_the_next_provider(tmp_path: Path) -> None:
    first = ScriptedProvider("first", [transient()])
    second = ScriptedProvider("second", [Sent("pm-2")])
    rig = Rig(tmp_path, first, second)
    await rig.engine.process(await rig.claim())
    assert (first.sent, second.sent) == (["m1"], ["m1"])
    assert rig.history() == ["queued", "sending", "queued", "sending", "sent"]
    assert rig.statuses() == ["RETRYING", "SENT"]
    assert rig.store.rows["m1"].provider_message_id == "pm-2"


async def test_the_last_provider_failing_schedules_a_retry_with_backoff(tmp_path: Path) -> None:
    only = ScriptedProvider("only", [transient(), Sent("pm-1")])
    rig = Rig(tmp_path, only)
    await rig.engine.process(await rig.claim())
    row = rig.store.rows["m1"]
    assert (row.state, row.rounds, row.claim_token) == ("retry", 1, None)
    assert row.next_attempt_at > utcnow() - timedelta(seconds=1)
    await rig.engine.process(await rig.due())
    assert only.sent == ["m1", "m1"]
    assert rig.history() == ["queued", "sending", "retry", "queued", "sending", "sent"]
    assert rig.statuses() == ["RETRYING", "SENT"]


async def test_a_message_level_error_is_dead_lettered_without_failover(tmp_path: Path) -> None:
    first = ScriptedProvider("first", [DeliveryError(ErrorClass.INVALID_RECIPIENT, "21211")])
    second = ScriptedProvider("second", [Sent("never")])
    rig = Rig(tmp_path, first, second)
    await rig.engine.process(await rig.claim())
    assert rig.store.state("m1") == "rejected"
    assert second.sent == []
    assert rig.statuses() == ["REJECTED"]
    assert rig.dead_letters() == 1


async def test_gives_up_after_the_attempt_limit(tmp_path: Path) -> None:
    only = ScriptedProvider("only", [transient(), transient(), Sent("never")])
    rig = Rig(tmp_path, only, delivery_max_attempts=2)
    await rig.engine.process(await rig.claim())
    await rig.engine.process(await rig.due())
    assert only.sent == ["m1", "m1"]
    assert rig.store.state("m1") == "failed"
    assert rig.statuses() == ["RETRYING", "FAILED"]
    assert rig.dead_letters() == 1


async def test_an_unknown_outcome_is_looked_up_and_never_sent_twice(tmp_path: Path) -> None:
    asked = ScriptedProvider(
        "asked", [transient(ambiguous=True)], reconcile=Reconcile.LOOKUP, lookups=[Sent("pm-a")]
    )
    spare = ScriptedProvider("spare", [Sent("never")])
    rig = Rig(tmp_path, asked, spare)
    await rig.engine.process(await rig.claim())
    assert rig.store.state("m1") == "unknown"
    assert spare.sent == []  # not the next provider: the first may have it
    await rig.engine.process(await rig.due())
    assert (asked.sent, asked.looked_up, spare.sent) == (["m1"], ["m1"], [])
    assert rig.history() == ["queued", "sending", "unknown", "sent"]
    assert rig.store.rows["m1"].provider_message_id == "pm-a"


async def test_an_unknown_outcome_not_found_is_sent_once_more(tmp_path: Path) -> None:
    asked = ScriptedProvider(
        "asked",
        [transient(ambiguous=True), Sent("pm-2")],
        reconcile=Reconcile.LOOKUP,
        lookups=[None],
    )
    rig = Rig(tmp_path, asked)
    await rig.engine.process(await rig.claim())
    await rig.engine.process(await rig.due())
    assert asked.sent == ["m1", "m1"]
    assert rig.history() == ["queued", "sending", "unknown", "queued", "sending", "sent"]


async def test_an_unknown_outcome_that_cannot_be_asked_is_dead_lettered(tmp_path: Path) -> None:
    mute = ScriptedProvider("mute", [transient(ambiguous=True)])
    spare = ScriptedProvider("spare", [Sent("never")])
    rig = Rig(tmp_path, mute, spare)
    await rig.engine.process(await rig.claim())
    assert rig.store.state("m1") == "failed"
    assert rig.store.rows["m1"].last_error_class == "unknown_outcome"
    assert (mute.sent, spare.sent) == (["m1"], [])
    assert rig.dead_letters() == 1


async def test_a_worker_stopped_mid_call_is_reconciled_not_resent(tmp_path: Path) -> None:
    mute = ScriptedProvider("mute", [Sent("never")])
    rig = Rig(tmp_path, mute)
    job = await rig.claim()
    assert await rig.store.start_sending(job, "mute", hold_seconds=1.0)
    # The worker dies here, before the provider's answer is recorded.
    rig.store.clock = lambda: utcnow() + timedelta(minutes=5)
    assert await rig.store.sweep_lapsed("SMS", 0.0) == 1
    await rig.engine.process(await rig.due())
    assert mute.sent == []
    assert rig.store.state("m1") == "failed"
    assert rig.history() == ["queued", "sending", "unknown", "failed"]


async def test_a_lost_claim_moves_nothing(tmp_path: Path) -> None:
    only = ScriptedProvider("only", [Sent("pm-1")])
    rig = Rig(tmp_path, only)
    job = await rig.claim()
    rig.store.rows["m1"].claim_token = uuid.uuid4()  # another worker took the row over
    await rig.engine.process(job)
    assert only.sent == []
    assert rig.store.state("m1") == "queued"
    assert rig.store.results == []
