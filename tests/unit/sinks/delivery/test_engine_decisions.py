"""The delivery engine's decisions against the in-memory store and scripted providers.

No PostgreSQL, Redis or Kafka: the engine runs its real dispatch and
reconciliation code, the twin (finstream.testing.delivery) keeps
the store's conditional moves, and each fake provider answers from a script
(tests/unit/sinks/delivery/rig.py).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.sinks.delivery.base import Sent
from tests.unit.sinks.delivery.rig import Rig, ScriptedProvider, transient


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
