"""Audit writer (the ``audit`` role, :mod:`finstream.agents.audit`): audit.events -> PostgreSQL
``audit_events``, hash-chained and tamper-evident.

Every row carries ``prev_hash`` (the hash of the row before it) and
``hash = sha256(prev_hash + canonical(row))``, the canonical form being the
row's sequence number and event fields as sorted, compact, ASCII JSON
(:func:`canonical`). :func:`verify` walks the chain and names the first row
that was edited, inserted or removed; ``audit_chain_head`` keeps the last
sequence number and hash, so a truncated tail shows as well.

Appending: in one transaction per batch, lock the head row (``SELECT ... FOR
UPDATE``), skip events already stored (``event_id`` is the idempotency key:
a redelivered batch stores nothing twice), chain the new ones from the head,
insert them and move the head. The row lock makes concurrent replicas take
turns, so the chain never forks. The stream engine commits offsets after the
transaction (at-least-once), and the event-id check makes the replay harmless.

Text that PostgreSQL cannot store (NUL characters) is replaced before
hashing, so that what is hashed is what is stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from finstream.domain.time import to_micros
from finstream.runtime.logging import get_logger

log = get_logger(__name__)

GENESIS = "0" * 64
FIELDS = (
    "event_id",
    "at",
    "actor",
    "action",
    "subject_type",
    "subject_id",
    "user_id",
    "reason",
    "details",
    "correlation_id",
)
COLUMNS = ("seq", *FIELDS, "prev_hash", "hash")


def _clean(value: str | None) -> str | None:
    return None if value is None else value.replace("\x00", "\ufffd")


def normalize(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event as it will be stored (and hashed)."""
    out: dict[str, Any] = {
        name: _clean(event.get(name)) for name in FIELDS if name not in ("at", "details")
    }
    out["at"] = event["at"]
    out["details"] = {
        str(_clean(str(k))): str(_clean(str(v))) for k, v in (event.get("details") or {}).items()
    }
    return out


def canonical(seq: int, event: Mapping[str, Any]) -> bytes:
    """Sorted, compact, ASCII JSON of a stored row's sequence number and fields."""
    body = {name: event[name] for name in FIELDS}
    body["at"] = to_micros(event["at"])
    body["seq"] = seq
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def chain_hash(prev_hash: str, seq: int, event: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(seq, event)).hexdigest()


class AuditWriter:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def append(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Chain and store the events not stored yet; return how many were new."""
        unique: dict[str, dict[str, Any]] = {}
        for e in events:
            unique.setdefault(e["event_id"], normalize(e))
        if not unique:
            return 0
        async with self._pool.acquire() as conn, conn.transaction():
            head = await conn.fetchrow(
                "SELECT seq, hash FROM audit_chain_head WHERE id = 1 FOR UPDATE"
            )
            if head is None:
                raise RuntimeError("audit_chain_head is missing; run `finstream db migrate`")
            stored = await conn.fetch(
                "SELECT event_id FROM audit_events WHERE event_id = ANY($1::text[])",
                list(unique),
            )
            for row in stored:
                unique.pop(row["event_id"], None)
            if not unique:
                return 0
            seq, prev = int(head["seq"]), str(head["hash"])
            rows = []
            for event in unique.values():
                seq += 1
                digest = chain_hash(prev, seq, event)
                rows.append(
                    (
                        seq,
                        *(json.dumps(event[f]) if f == "details" else event[f] for f in FIELDS),
                        prev,
                        digest,
                    )
                )
                prev = digest
            await conn.executemany(
                f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES "
                f"({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})",
                [tuple(r) for r in rows],
            )
            await conn.execute(
                "UPDATE audit_chain_head SET seq = $1, hash = $2, updated_at = now() WHERE id = 1",
                seq,
                prev,
            )
        return len(rows)


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    head_seq: int
    problem: str | None = None
    seq: int | None = None  # the first row found wrong

    def render(self) -> str:
        if self.ok:
            return f"audit chain intact: {self.checked} events, head at seq {self.head_seq}"
        where = f" at seq {self.seq}" if self.seq is not None else ""
        return f"audit chain BROKEN{where}: {self.problem} ({self.checked} events checked)"


def _row_event(row: Any) -> dict[str, Any]:
    event = {name: row[name] for name in FIELDS}
    details = row["details"]
    event["details"] = json.loads(details) if isinstance(details, str) else dict(details)
    at: datetime = row["at"]
    event["at"] = at
    return event


async def verify(conn: asyncpg.Connection | Any, page: int = 5000) -> Verification:
    """Walk the whole chain; report the first row that does not fit.

    The head and the rows are read in one snapshot, so a verification running
    beside the audit role's appends (the retention role's schedule) sees a chain
    and a head that belong together.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow("SELECT * FROM audit_chain_head WHERE id = 1")
        if head is None:
            return Verification(False, 0, 0, "audit_chain_head row is missing")
        head_seq, head_hash = int(head["seq"]), str(head["hash"])
        # Retention may have removed the oldest rows: the chain then starts after base_seq.
        base = int(head.get("base_seq") or 0)
        prev, expected, checked = str(head.get("base_hash") or GENESIS), base + 1, 0
        last = base
        while True:
            rows = await conn.fetch(
                f"SELECT {', '.join(COLUMNS)} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
                last,
                page,
            )
            if not rows:
                break
            for row in rows:
                seq = int(row["seq"])
                if seq != expected:
                    kind = "missing" if seq > expected else "out of sequence"
                    return Verification(
                        False, checked, head_seq, f"row {expected} is {kind}", expected
                    )
                if row["prev_hash"] != prev:
                    return Verification(
                        False, checked, head_seq, "prev_hash does not match the row before", seq
                    )
                if chain_hash(prev, seq, _row_event(row)) != row["hash"]:
                    return Verification(
                        False, checked, head_seq, "row content does not match its hash", seq
                    )
                prev, expected, checked = row["hash"], seq + 1, checked + 1
                last = seq
    if base + checked != head_seq or (checked and prev != head_hash):
        return Verification(
            False,
            checked,
            head_seq,
            f"chain head says seq {head_seq}, the table ends at {base + checked} (rows removed at the end?)",
            base + checked + 1,
        )
    return Verification(True, checked, head_seq)
