"""Scheduled items: listing what is held, commands on it, and what to publish."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.codec import Codec
from finstream.domain.notify import scheduled as sched
from finstream.domain.notify.digest import digest_request_id, fold
from finstream.domain.notify.routing_state import DONE, HELD, Hold, Holds, UserState
from finstream.domain.time import from_micros, to_micros

NOW = datetime(2025, 6, 11, 12, 0, tzinfo=UTC)
HOUR = 3_600_000_000


def describe(raw: bytes) -> sched.Described:
    d = json.loads(raw)
    return sched.Described(d["category"], d["template"], "NORMAL", tuple(d.get("channels", ())))


def hold(rid: str, due: datetime, reason: str = "deliver_at") -> Hold:
    raw = json.dumps({"category": "account", "template": "welcome", "channels": ["email"]})
    return Hold(rid, to_micros(due), reason, raw.encode())


def command(
    item: str, action: str = "CANCEL", at: datetime | None = None, **over: Any
) -> sched.Command:
    record: dict[str, Any] = {
        "command_id": f"c-{item}-{action}",
        "user_id": "u1",
        "item_id": item,
        "action": action,
        "deliver_at": at,
        "requested_at": NOW,
        "requested_by": "user:u1",
        "correlation_id": None,
    }
    record.update(over)
    return sched.Command.from_record(record)


def holds_with(*hs: Hold) -> tuple[Holds, UserState]:
    holds = Holds({h.request_id: h for h in hs})
    state = UserState(seen={h.request_id: (HELD, h.due / 1e6 + 3600) for h in hs})
    return holds, state


def run(cmd: sched.Command, holds: Holds, state: UserState) -> sched.Result:
    return sched.apply(cmd, holds, state, NOW, describe=describe, dedupe_seconds=3600)


def test_items_list_held_requests_and_open_digests() -> None:
    holds, _ = holds_with(hold("r1", NOW + timedelta(hours=1)))
    holds.digests["news"] = fold(
        None,
        category="news",
        request_id="n1",
        subject="s",
        text="t",
        at=NOW,
        now=NOW,
        window_seconds=600,
        max_items=5,
    )
    found = sched.items("u1", holds, describe)
    digest_id = digest_request_id("u1", holds.digests["news"])
    assert set(found) == {"r1", digest_id}
    assert found["r1"].kind == "REQUEST"
    assert found["r1"].channels == ("email",)
    assert found[digest_id].kind == "DIGEST"
    assert found[digest_id].due == to_micros(NOW + timedelta(minutes=10))
    assert found[digest_id].count == 1


def test_cancel_drops_the_hold_and_remembers_the_id() -> None:
    holds, state = holds_with(hold("r1", NOW + timedelta(hours=1)))
    result = run(command("r1"), holds, state)
    assert result.outcome == sched.OUTCOME_CANCELLED
    assert result.before is not None
    assert result.before.item_id == "r1"
    assert holds.empty()
    assert state.seen["r1"][0] == sched.CANCELLED
    again = run(command("r1", command_id="c-2"), holds, state)
    assert (again.outcome, again.reason) == (sched.ALREADY_CANCELLED, "already cancelled")


def test_cancel_after_the_release_is_already_released() -> None:
    holds, state = Holds(), UserState(seen={"r1": (DONE, NOW.timestamp() + 60)})
    result = run(command("r1"), holds, state)
    assert (result.outcome, result.reason) == (sched.ALREADY_RELEASED, "already released")
    assert not result.applied


def test_unknown_ids_are_not_found() -> None:
    holds, state = holds_with(hold("r1", NOW + timedelta(hours=1)))
    result = run(command("nope"), holds, state)
    assert result.outcome == sched.NOT_FOUND
    assert "r1" in holds.requests


def test_reschedule_moves_the_due_time_only() -> None:
    h = hold("r1", NOW + timedelta(hours=1))
    holds, state = holds_with(h)
    later = NOW + timedelta(hours=5)
    result = run(command("r1", "RESCHEDULE", later), holds, state)
    assert result.outcome == sched.OUTCOME_RESCHEDULED
    assert holds.requests["r1"].due == to_micros(later)
    assert holds.requests["r1"].request == h.request
    assert h.due == to_micros(NOW + timedelta(hours=1)), "the stored hold is not changed in place"
    assert state.seen["r1"] == (HELD, later.timestamp() + 3600)


def test_a_reschedule_to_a_time_gone_by_releases_at_once() -> None:
    holds, state = holds_with(hold("r1", NOW + timedelta(hours=1)))
    result = run(command("r1", "RESCHEDULE", NOW - timedelta(minutes=1)), holds, state)
    assert result.due == to_micros(NOW)


def test_commands_on_digests() -> None:
    holds = Holds()
    holds.digests["news"] = fold(
        None,
        category="news",
        request_id="n1",
        subject=None,
        text="t",
        at=NOW,
        now=NOW,
        window_seconds=600,
        max_items=5,
    )
    digest_id = digest_request_id("u1", holds.digests["news"])
    state = UserState()
    later = NOW + timedelta(hours=2)
    assert run(command(digest_id, "RESCHEDULE", later), holds, state).applied
    assert holds.digests["news"].due == to_micros(later)
    assert run(command(digest_id), holds, state).outcome == sched.OUTCOME_CANCELLED
    assert not holds.digests


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"action": "PAUSE"}, "action: unknown"),
        ({"action": "RESCHEDULE"}, "a reschedule needs the new time"),
        ({"deliver_at": NOW + timedelta(hours=1)}, "a cancel takes no time"),
        ({"item_id": ""}, "item_id"),
        ({"command_id": " "}, "command_id"),
        (
            {"action": "RESCHEDULE", "deliver_at": NOW + timedelta(days=400)},
            "at most 366 days",
        ),
    ],
)
def test_malformed_commands_say_why(over: dict[str, Any], message: str) -> None:
    with pytest.raises(sched.InvalidCommand, match=message):
        command("r1", **over)


def test_the_edge_checks_new_times() -> None:
    with pytest.raises(sched.InvalidCommand, match="not in the future"):
        sched.check_deliver_at(NOW - timedelta(seconds=1), NOW)
    with pytest.raises(sched.InvalidCommand, match="time zone"):
        sched.check_deliver_at(datetime(2030, 1, 1), NOW)
    with pytest.raises(sched.InvalidCommand, match="366 days"):
        sched.check_deliver_at(NOW + timedelta(days=367), NOW)
    assert sched.check_deliver_at(NOW + timedelta(days=1), NOW) == NOW + timedelta(days=1)


def test_changes_name_what_left_and_why() -> None:
    a = sched.Item("a", "u1", "REQUEST", "deliver_at", 1, "account")
    b = sched.Item("b", "u1", "REQUEST", "deliver_at", 2, "account")
    c = sched.Item("c", "u1", "REQUEST", "quiet_hours", 3, "account")
    moved = sched.Item("b", "u1", "REQUEST", "deliver_at", 9, "account")
    out = sched.changes(
        {"a": a, "b": b, "c": c},
        {"b": moved, "d": a},
        cancelled={"a": "cmd-1"},
        rescheduled={"b": "cmd-2"},
    )
    assert [(x.item_id, x.state, x.command_id) for x in out] == [
        ("a", "cancelled", "cmd-1"),
        ("c", "released", None),
        ("b", "RESCHEDULED", "cmd-2"),
        ("d", "HELD", None),
    ]
    assert sched.changes({"a": a}, {"a": a}) == []
    assert [x.state for x in sched.changes({"a": a}, {}, forgotten=True)] == ["forgotten"]


def test_records_and_audit_events_fit_their_schemas() -> None:
    codec = Codec()
    item = sched.Item("r1", "u1", "REQUEST", "deliver_at", to_micros(NOW), "account", "welcome")
    record = item.record("RESCHEDULED", NOW, "cmd-1")
    assert codec.decode(codec.encode("ScheduledItem", record), "ScheduledItem") == record
    cmd = command("r1", "RESCHEDULE", NOW + timedelta(hours=1))
    assert (
        sched.Command.from_record(
            codec.decode(codec.encode("ScheduleCommand", cmd.record()), "ScheduleCommand")
        )
        == cmd
    )
    holds, state = holds_with(hold("r1", NOW + timedelta(minutes=5)))
    event = sched.audit_event(cmd, run(cmd, holds, state), NOW)
    codec.encode("AuditEvent", event)
    assert event["action"] == "rescheduled"
    assert event["subject_id"] == "r1"
    assert event["details"]["command_id"] == cmd.command_id
    assert event["details"]["release_at"] == (NOW + timedelta(minutes=5)).isoformat()
    refused = sched.audit_event(cmd, run(command("zz", "RESCHEDULE", NOW), holds, state), NOW)
    assert (refused["action"], refused["details"]["outcome"]) == ("command_refused", "not_found")


def test_keys_split_back() -> None:
    assert sched.split_key(sched.item_key("u1", "r/1")) == ("u1", "r/1")


# -- the race, as the router serializes it on one partition -------------------------------


def release(holds: Holds, state: UserState, now_us: int, sent: list[str]) -> None:
    """What the router's release timer does with due holds (routing.decide aside)."""
    for h in sorted(holds.requests.values(), key=lambda h: h.due):
        if h.due <= now_us:
            del holds.requests[h.request_id]
            state.seen[h.request_id] = (DONE, now_us / 1e6 + 3600)
            sent.append(h.request_id)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(0, 4)),
        st.tuples(st.just("cancel"), st.sampled_from(["r0", "r1", "r2"])),
        st.tuples(st.just("reschedule"), st.sampled_from(["r0", "r1", "r2"]), st.integers(1, 6)),
    ),
    max_size=25,
)


@given(ops)
def test_every_hold_ends_once_and_nothing_cancelled_is_sent(steps: list[tuple[Any, ...]]) -> None:
    holds, state = holds_with(*(hold(f"r{i}", NOW + timedelta(hours=i + 1)) for i in range(3)))
    clock = to_micros(NOW)
    sent: list[str] = []
    cancelled: set[str] = set()
    for n, step in enumerate(steps):
        if step[0] == "tick":
            clock += step[1] * HOUR
            release(holds, state, clock, sent)
            continue
        at = from_micros(clock + step[2] * HOUR) if step[0] == "reschedule" else None
        cmd = command(
            step[1], step[0].upper(), at, command_id=f"c{n}", requested_at=from_micros(clock)
        )
        was_sent, was_cancelled = step[1] in sent, step[1] in cancelled
        result = sched.apply(
            cmd, holds, state, from_micros(clock), describe=describe, dedupe_seconds=3600
        )
        if was_sent:
            assert result.outcome == sched.ALREADY_RELEASED
        elif was_cancelled:
            assert result.outcome == sched.ALREADY_CANCELLED
        else:
            assert result.applied
        if result.outcome == sched.OUTCOME_CANCELLED:
            cancelled.add(step[1])
    release(holds, state, clock + 100 * HOUR, sent)
    assert len(sent) == len(set(sent)), "released once"
    assert not cancelled & set(sent), "a cancelled hold is never sent"
    assert cancelled | set(sent) == {"r0", "r1", "r2"}


# -- the journey of a held request that was rescheduled, then cancelled --------------------


def test_the_journey_shows_commands_on_a_hold() -> None:
    from finstream.domain.notify import journey

    holds, state = holds_with(hold("r1", NOW + timedelta(hours=1)))
    held = journey.AuditRow(
        NOW,
        "router",
        "scheduled",
        "request",
        "r1",
        "u1",
        "deliver_at",
        {
            "phase": "intake",
            "channels": "email",
            "release_at": (NOW + timedelta(hours=1)).isoformat(),
        },
    )

    def row(cmd: sched.Command, at: datetime) -> journey.AuditRow:
        e = sched.audit_event(cmd, run(cmd, holds, state), at)
        return journey.AuditRow(
            e["at"], e["actor"], e["action"], e["subject_type"], e["subject_id"], e["user_id"],
            e["reason"], e["details"],
        )  # fmt: skip

    later = NOW + timedelta(hours=3)
    moved = row(command("r1", "RESCHEDULE", later), NOW + timedelta(seconds=1))
    cancelled = row(command("r1"), NOW + timedelta(seconds=2))
    refused = row(command("r1", command_id="again"), NOW + timedelta(seconds=3))
    j = journey.build("r1", [held, moved], [], [])
    assert j is not None
    assert j["state"] == "held"
    assert j["channels"]["email"]["held_until"] == later.isoformat()
    j = journey.build("r1", [held, moved, cancelled, refused], [], [])
    assert j is not None
    assert j["state"] == "cancelled"
    assert j["channels"]["email"]["decision"] == "cancelled"
    summaries = [s["summary"] for s in j["steps"]]
    assert f"rescheduled to {later.isoformat()} by user:u1" in summaries
    assert "cancelled by user:u1" in summaries
    assert "cancel by user:u1: already cancelled" in summaries


@given(
    st.sets(st.sampled_from(["a", "b", "c", "d"])),
    st.sets(st.sampled_from(["a", "b", "c", "d"])),
    st.sets(st.sampled_from(["a", "b", "c", "d"])),
)
def test_narrowing_to_what_changed_loses_no_change(
    before_ids: set[str], after_ids: set[str], moved: set[str]
) -> None:
    before = Holds({r: hold(r, NOW + timedelta(hours=1)) for r in before_ids})
    after = Holds({r: hold(r, NOW + timedelta(hours=2 if r in moved else 1)) for r in after_ids})
    full = sched.changes(sched.items("u1", before, describe), sched.items("u1", after, describe))
    old, new = sched.changed_holds(before, after)
    narrow = sched.changes(sched.items("u1", old, describe), sched.items("u1", new, describe))
    assert narrow == full
