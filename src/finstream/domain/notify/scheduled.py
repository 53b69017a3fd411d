"""Scheduled notifications under control: list, reschedule and cancel what the router holds.

A user's *scheduled items* are what the router's ``holds`` store keeps for
them: each held request (``deliver_at``, quiet hours; its id is the request
id) and each open digest (its id is the digest's request id, ``digest-...``).
:func:`items` lists them; :func:`changes` compares the items before and after a
batch and says what to publish on ``notify.scheduled.items`` (held,
rescheduled, or gone: released, cancelled, forgotten).

Commands (``notify.scheduled.commands``, keyed by user id) are consumed by the
router in the same exactly-once engine as the requests and the release timer,
so a command and the release of the same hold are serialized: whichever is
first wins, and :func:`apply` says what happened to the other:

* ``cancelled``        the hold is dropped; nothing of it is ever sent, and the
  request id is remembered as cancelled (a copy sent again is a duplicate);
* ``rescheduled``      the hold's due time is the new one (quiet hours still
  apply when it is released: a time inside them is held again until they end);
* ``already_released`` the hold was released before the command arrived;
* ``already_cancelled`` a cancel came first;
* ``not_found``        the router holds nothing of that id for the user.

Everything here is pure: the router supplies the state and the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from finstream.domain.notify.digest import digest_request_id
from finstream.domain.notify.routing_state import DONE, HELD, Holds, UserState
from finstream.domain.time import from_micros, to_micros

ACTIONS = ("CANCEL", "RESCHEDULE")
CANCELLED = "cancelled"  # a UserState.seen status: the request was cancelled while held
# How far ahead a notification may be rescheduled.
MAX_AHEAD = timedelta(days=366)
ITEM_ID_MAX = 200

# Outcomes of a command.
OUTCOME_CANCELLED = "cancelled"
OUTCOME_RESCHEDULED = "rescheduled"
ALREADY_RELEASED = "already_released"
ALREADY_CANCELLED = "already_cancelled"
NOT_FOUND = "not_found"
OUTCOMES = (OUTCOME_CANCELLED, OUTCOME_RESCHEDULED, ALREADY_RELEASED, ALREADY_CANCELLED, NOT_FOUND)

# States of an item on notify.scheduled.items: HELD/RESCHEDULED are records, the rest tombstones.
STATES = ("HELD", "RESCHEDULED")
GONE = ("released", "cancelled", "forgotten")


class InvalidCommand(ValueError):
    """A decodable command that cannot be applied (names the field)."""


def check_deliver_at(value: datetime, now: datetime) -> datetime:
    """A new release time as the edge (API, CLI) accepts it: aware, future, within a year."""
    if value.tzinfo is None:
        raise InvalidCommand("deliver_at: needs a time zone (e.g. Z or +01:00)")
    if value <= now:
        raise InvalidCommand(f"deliver_at: {value.isoformat()} is not in the future")
    if value > now + MAX_AHEAD:
        raise InvalidCommand(f"deliver_at: at most {MAX_AHEAD.days} days ahead")
    return value


def check_item_id(value: str) -> str:
    if not value.strip() or len(value) > ITEM_ID_MAX:
        raise InvalidCommand(f"item_id: must be 1 to {ITEM_ID_MAX} characters")
    return value


@dataclass(frozen=True)
class Command:
    command_id: str
    user_id: str
    item_id: str
    action: str  # CANCEL | RESCHEDULE
    deliver_at: datetime | None
    requested_at: datetime
    requested_by: str
    correlation_id: str | None = None

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Command:
        for name in ("command_id", "user_id", "requested_by"):
            value = record.get(name)
            if not isinstance(value, str) or not value.strip() or len(value) > 200:
                raise InvalidCommand(f"{name}: must be a non-empty string of at most 200")
        item_id = check_item_id(str(record.get("item_id") or ""))
        action = str(record.get("action") or "")
        if action not in ACTIONS:
            raise InvalidCommand(f"action: unknown {action!r}")
        deliver_at = record.get("deliver_at")
        if action == "RESCHEDULE" and deliver_at is None:
            raise InvalidCommand("deliver_at: a reschedule needs the new time")
        if action == "CANCEL" and deliver_at is not None:
            raise InvalidCommand("deliver_at: a cancel takes no time")
        requested_at = record.get("requested_at")
        if not isinstance(requested_at, datetime):
            raise InvalidCommand("requested_at: must be a time")
        if deliver_at is not None and deliver_at > requested_at + MAX_AHEAD:
            raise InvalidCommand(f"deliver_at: at most {MAX_AHEAD.days} days ahead")
        return cls(
            command_id=record["command_id"],
            user_id=record["user_id"],
            item_id=item_id,
            action=action,
            deliver_at=deliver_at,
            requested_at=requested_at,
            requested_by=record["requested_by"],
            correlation_id=record.get("correlation_id"),
        )

    def record(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "action": self.action,
            "deliver_at": self.deliver_at,
            "requested_at": self.requested_at,
            "requested_by": self.requested_by,
            "correlation_id": self.correlation_id,
        }


@dataclass(frozen=True)
class Item:
    """One held notification of a user, as listed and published."""

    item_id: str
    user_id: str
    kind: str  # REQUEST | DIGEST
    reason: str  # deliver_at | quiet_hours | digest
    due: int  # epoch micros
    category: str
    template: str | None = None
    priority: str | None = None
    channels: tuple[str, ...] = ()
    count: int = 1

    def record(self, state: str, now: datetime, command_id: str | None = None) -> dict[str, Any]:
        """The ScheduledItem record of this item."""
        return {
            "item_id": self.item_id,
            "user_id": self.user_id,
            "kind": self.kind,
            "state": state,
            "reason": self.reason,
            "due": from_micros(self.due),
            "category": self.category,
            "template": self.template,
            "priority": self.priority,
            "channels": list(self.channels),
            "items": self.count,
            "command_id": command_id,
            "updated_at": now,
        }


@dataclass(frozen=True)
class Described:
    """What a held request is about (read from its bytes by the caller)."""

    category: str
    template: str | None
    priority: str | None
    channels: tuple[str, ...]


def items(
    user: str, holds: Holds | None, describe: Callable[[bytes], Described]
) -> dict[str, Item]:
    """Every scheduled item of the user, by id."""
    out: dict[str, Item] = {}
    if holds is None:
        return out
    for buffer in holds.digests.values():
        item_id = digest_request_id(user, buffer)
        out[item_id] = Item(
            item_id, user, "DIGEST", "digest", buffer.due, buffer.category, count=buffer.total
        )
    for hold in holds.requests.values():
        try:
            d = describe(hold.request)
        except ValueError:
            d = Described("?", None, None, ())
        out[hold.request_id] = Item(
            hold.request_id,
            user,
            "REQUEST",
            hold.reason,
            hold.due,
            d.category,
            d.template,
            d.priority,
            d.channels,
        )
    return out


def changed_holds(before: Holds | None, after: Holds | None) -> tuple[Holds, Holds]:
    """``before`` and ``after`` narrowed to the held requests that differ (and all digests:
    one per category), so that only those are described (their bytes decoded)."""
    b, a = before or Holds(), after or Holds()
    ids = {
        k for k in b.requests.keys() | a.requests.keys() if b.requests.get(k) != a.requests.get(k)
    }
    return (
        Holds({k: h for k, h in b.requests.items() if k in ids}, b.digests),
        Holds({k: h for k, h in a.requests.items() if k in ids}, a.digests),
    )


def item_key(user: str, item_id: str) -> bytes:
    """The notify.scheduled.items key (compaction keeps one record per item)."""
    return f"{user}/{item_id}".encode()


def split_key(key: bytes) -> tuple[str, str]:
    """(user, item id) of a notify.scheduled.items key (user ids contain no ``/``)."""
    user, _, item_id = key.decode("utf-8", "replace").partition("/")
    return user, item_id


@dataclass(frozen=True)
class Change:
    item_id: str
    state: str  # HELD | RESCHEDULED | released | cancelled | forgotten
    item: Item | None  # None: gone (a tombstone)
    command_id: str | None = None


def changes(
    before: Mapping[str, Item],
    after: Mapping[str, Item],
    *,
    cancelled: Mapping[str, str] | None = None,
    rescheduled: Mapping[str, str] | None = None,
    forgotten: bool = False,
) -> list[Change]:
    """What to publish for one user: items that left the hold, then new and changed ones.

    ``cancelled`` and ``rescheduled`` map the item ids that commands changed
    to the command ids; an item that left otherwise was released (or, with
    ``forgotten``, the user was forgotten).
    """
    cancelled = cancelled or {}
    rescheduled = rescheduled or {}
    out: list[Change] = []
    for item_id in sorted(set(before) - set(after)):
        if item_id in cancelled:
            out.append(Change(item_id, "cancelled", None, cancelled[item_id]))
        else:
            out.append(Change(item_id, "forgotten" if forgotten else "released", None))
    for item_id in sorted(after):
        item = after[item_id]
        if before.get(item_id) == item:
            continue
        if item_id in rescheduled:
            out.append(Change(item_id, "RESCHEDULED", item, rescheduled[item_id]))
        else:
            out.append(Change(item_id, "HELD", item))
    return out


@dataclass(frozen=True)
class Result:
    outcome: str
    reason: str
    before: Item | None = None  # the item the command found
    due: int | None = None  # the new due time (rescheduled)

    @property
    def applied(self) -> bool:
        return self.outcome in (OUTCOME_CANCELLED, OUTCOME_RESCHEDULED)


def apply(
    command: Command,
    holds: Holds,
    state: UserState,
    now: datetime,
    *,
    describe: Callable[[bytes], Described],
    dedupe_seconds: float,
) -> Result:
    """Apply one command to the user's holds and state (changed in place), or say why not."""
    found = items(command.user_id, holds, describe).get(command.item_id)
    if found is None:
        seen = state.seen.get(command.item_id)
        if seen is not None and seen[0] == CANCELLED:
            return Result(ALREADY_CANCELLED, "already cancelled")
        if seen is not None and seen[0] in (DONE, HELD):
            return Result(ALREADY_RELEASED, "already released")
        return Result(NOT_FOUND, "nothing of that id is held for the user")
    now_us = to_micros(now)
    if command.action == "CANCEL":
        if found.kind == "DIGEST":
            holds.digests.pop(found.category, None)
        else:
            holds.requests.pop(found.item_id, None)
        until = now.timestamp() + dedupe_seconds
        state.seen[found.item_id] = (CANCELLED, until)
        return Result(OUTCOME_CANCELLED, f"cancelled by {command.requested_by}", found)
    assert command.deliver_at is not None
    # A time already past (the clock moved on since the edge checked it): released at once.
    due = max(to_micros(command.deliver_at), now_us)
    if found.kind == "DIGEST":
        holds.digests[found.category].due = due
    else:
        holds.requests[found.item_id] = replace(holds.requests[found.item_id], due=due)
    seen = state.seen.get(found.item_id)
    if seen is not None and seen[0] == HELD:
        state.seen[found.item_id] = (HELD, max(seen[1], due / 1e6 + dedupe_seconds))
    return Result(
        OUTCOME_RESCHEDULED,
        f"rescheduled by {command.requested_by} to {from_micros(due).isoformat()}",
        found,
        due,
    )


def audit_event(command: Command, result: Result, now: datetime) -> dict[str, Any]:
    """The AuditEvent of a command's outcome (its id derives from the command: stored once)."""
    import hashlib

    details: dict[str, str] = {
        "phase": "command",
        "command_id": command.command_id,
        "command": command.action.lower(),
        "outcome": result.outcome,
        "requested_by": command.requested_by,
        "requested_at": command.requested_at.isoformat(),
    }
    if result.before is not None:
        details["kind"] = result.before.kind.lower()
        details["category"] = result.before.category
        details["hold_reason"] = result.before.reason
        details["release_at"] = from_micros(result.before.due).isoformat()
        if result.before.channels:
            details["channels"] = ",".join(result.before.channels)
        if result.before.template:
            details["template"] = result.before.template
    if command.deliver_at is not None:
        details["deliver_at"] = command.deliver_at.isoformat()
    if result.due is not None:
        details["new_release_at"] = from_micros(result.due).isoformat()
    seed = f"{command.command_id}\x1f{result.outcome}"
    return {
        "event_id": "a-" + hashlib.sha256(seed.encode()).hexdigest()[:40],
        "at": now,
        "actor": "router",
        "action": result.outcome if result.applied else "command_refused",
        "subject_type": "request",
        "subject_id": command.item_id,
        "user_id": command.user_id,
        "reason": result.reason,
        "details": details,
        "correlation_id": command.correlation_id,
    }
