"""Intake, duplicates and redrives against the in-memory store and scripted providers.

Each batch goes through the engine's real intake (decode, seal, claim, queue)
and each queued job through its real dispatch; the twin
(finstream.testing.delivery) keeps the store's rows, and Redis is
unreachable, so the store alone recognizes a message seen before
(tests/unit/sinks/delivery/rig.py).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from finstream.domain.time import utcnow
from finstream.sinks.delivery.base import Sent
from finstream.sinks.delivery.redrive import REOPENED
from tests.unit.sinks.delivery.rig import Rig, ScriptedProvider, sms, transient


def duplicates(rig: Rig, message_id: str = "m1") -> list[str]:
    """Why each DUPLICATE result of the message was recognized as one."""
    return [
        r.error or ""
        for r in rig.store.results
        if r.message_id == message_id and r.status == "DUPLICATE"
    ]


# -- intake ------------------------------------------------------------------------------


async def test_a_new_message_is_recorded_sealed_and_queued_without_a_provider_call(
    tmp_path: Path,
) -> None:
    only = ScriptedProvider("only", [Sent("pm-1")])
    rig = Rig(tmp_path, only)
    message = sms("m1")
    (job,) = await rig.intake(message)
    row = rig.store.rows["m1"]
    assert (job.message_id, job.state, job.attempts) == ("m1", "queued", 0)
    assert (row.state, row.claim_token, row.attempts) == ("queued", job.token, 0)
    max_age = timedelta(seconds=rig.settings.delivery_max_age)
    assert row.new.deadline == message["created_at"] + max_age
    stored = rig.engine.outbound.decode_record(row.new.raw)
    assert stored["body_text"] == ""  # the stored message keeps its body sealed only
    assert row.new.content == stored["sealed"]
    assert row.new.content
    assert job.message["body_text"] == message["body_text"]  # opened in memory, to send
    assert only.sent == []
    assert rig.store.results == []


async def test_a_new_message_is_sent_once(tmp_path: Path) -> None:
    only = ScriptedProvider("only", [Sent("pm-1")])
    rig = Rig(tmp_path, only)
    await rig.deliver(sms("m1"))
    assert only.sent == ["m1"]
    assert rig.history() == ["queued", "sending", "sent"]
    assert rig.statuses() == ["SENT"]


# -- duplicates ----------------------------------------------------------------------------


async def test_a_finished_message_delivered_again_is_recorded_once_and_not_sent_again(
    tmp_path: Path,
) -> None:
    only = ScriptedProvider("only", [Sent("pm-1"), Sent("never")])
    rig = Rig(tmp_path, only)
    message = sms("m1")
    await rig.deliver(message)
    assert await rig.deliver(message) == []  # Kafka handed the same record over again
    assert only.sent == ["m1"]
    assert list(rig.store.rows) == ["m1"]
    assert rig.history() == ["queued", "sending", "sent"]
    assert rig.statuses() == ["SENT", "DUPLICATE"]
    assert duplicates(rig) == ["already handled (recognized by postgres)"]


async def test_a_message_id_twice_in_one_batch_is_recorded_once_and_sent_once(
    tmp_path: Path,
) -> None:
    only = ScriptedProvider("only", [Sent("pm-1"), Sent("never")])
    rig = Rig(tmp_path, only)
    jobs = await rig.deliver(sms("m1"), sms("m1"))
    assert [j.message_id for j in jobs] == ["m1"]
    assert only.sent == ["m1"]
    assert rig.history() == ["queued", "sending", "sent"]
    assert sorted(rig.statuses()) == ["DUPLICATE", "SENT"]
    assert duplicates(rig) == ["already handled (recognized by batch)"]


async def test_a_message_in_progress_seen_again_is_not_queued_again_nor_a_duplicate(
    tmp_path: Path,
) -> None:
    only = ScriptedProvider("only", [Sent("never")])
    rig = Rig(tmp_path, only)
    (first,) = await rig.intake(sms("m1"))
    assert await rig.intake(sms("m1")) == []  # a rebalance: the first claim still holds it
    assert rig.store.rows["m1"].claim_token == first.token
    assert rig.history() == ["queued"]
    assert rig.store.results == []
    assert only.sent == []


# -- reopening by a redrive ---------------------------------------------------------------


async def test_a_failed_message_redriven_is_reopened_and_sent_once_more(tmp_path: Path) -> None:
    only = ScriptedProvider("only", [transient(), Sent("pm-2")])
    rig = Rig(tmp_path, only, delivery_max_attempts=1)
    message = sms("m1")
    await rig.deliver(message)
    assert rig.store.state("m1") == "failed"
    assert await rig.store.redrive("m1") == REOPENED
    await rig.deliver(message)  # the dead letter, back on the outbound topic
    # Counted afresh: one attempt is allowed, and the reopened message had it.
    assert rig.store.rows["m1"].attempts == 1
    assert only.sent == ["m1", "m1"]
    assert rig.history() == ["queued", "sending", "failed", "redrive", "queued", "sending", "sent"]
    assert rig.statuses() == ["FAILED", "SENT"]
    assert rig.store.rows["m1"].provider_message_id == "pm-2"


async def test_an_expired_message_redriven_gets_a_fresh_deadline_and_is_sent(
    tmp_path: Path,
) -> None:
    only = ScriptedProvider("only", [Sent("pm-1")])
    rig = Rig(tmp_path, only)
    message = sms("m1", created_at=utcnow() - timedelta(days=2))  # past max_age
    await rig.deliver(message)
    assert rig.store.state("m1") == "expired"
    assert only.sent == []
    assert await rig.store.redrive("m1") == REOPENED
    (job,) = await rig.deliver(message)
    assert job.deadline > utcnow()
    assert only.sent == ["m1"]
    assert rig.history() == ["queued", "expired", "redrive", "queued", "sending", "sent"]
    assert rig.statuses() == ["EXPIRED", "SENT"]


async def test_a_delivered_message_is_not_reopened_by_a_redrive(tmp_path: Path) -> None:
    only = ScriptedProvider("only", [Sent("pm-1"), Sent("never")])
    rig = Rig(tmp_path, only)
    message = sms("m1")
    await rig.deliver(message)
    assert await rig.store.redrive("m1") == "already delivered"
    assert await rig.deliver(message) == []
    assert only.sent == ["m1"]
    assert rig.history() == ["queued", "sending", "sent"]
    assert rig.statuses() == ["SENT", "DUPLICATE"]


async def test_a_message_redriven_twice_is_reopened_once_and_sent_once_more(
    tmp_path: Path,
) -> None:
    only = ScriptedProvider("only", [transient(), Sent("pm-2"), Sent("never")])
    rig = Rig(tmp_path, only, delivery_max_attempts=1)
    message = sms("m1")
    await rig.deliver(message)
    assert await rig.store.redrive("m1") == REOPENED
    assert await rig.store.redrive("m1") == "already redriven, not yet taken"
    await rig.deliver(message)  # the first redriven record: reopened
    assert await rig.deliver(message) == []  # that record again: sent by now
    assert only.sent == ["m1", "m1"]
    assert rig.history() == ["queued", "sending", "failed", "redrive", "queued", "sending", "sent"]
    assert rig.statuses() == ["FAILED", "SENT", "DUPLICATE"]
