"""Digests: low-priority (or over-cap) messages of one user and category, sent as one.

The first message folded into a user's digest for a category opens a buffer
due ``window`` seconds later; every message folded before then joins it. When
it is due, the router turns the buffer into one ``NotificationRequest`` of the
same category with the ``digest`` template, whose data lists the items as
JSON (``items_json``), so that a digest held by quiet hours is an ordinary
held request. At most ``max_items`` are listed; the rest are counted
(``more``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finstream.domain.time import from_micros, to_micros

DIGEST_TEMPLATE = "digest"
DIGEST_SOURCE = "router.digest"
ITEM_TEXT_CHARS = 280


@dataclass
class DigestBuffer:
    category: str
    opened_at: int  # epoch micros
    due: int  # epoch micros
    items: list[dict[str, str]] = field(default_factory=list)
    total: int = 0
    request_ids: list[str] = field(default_factory=list)

    def copy(self) -> DigestBuffer:
        return DigestBuffer(
            self.category,
            self.opened_at,
            self.due,
            [dict(i) for i in self.items],
            self.total,
            list(self.request_ids),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "opened_at": self.opened_at,
            "due": self.due,
            "items": self.items,
            "total": self.total,
            "request_ids": self.request_ids,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DigestBuffer:
        return cls(
            category=str(raw["category"]),
            opened_at=int(raw["opened_at"]),
            due=int(raw["due"]),
            items=[dict(i) for i in raw.get("items", [])],
            total=int(raw.get("total", 0)),
            request_ids=[str(r) for r in raw.get("request_ids", [])],
        )


def fold(
    buffer: DigestBuffer | None,
    *,
    category: str,
    request_id: str,
    subject: str | None,
    text: str,
    at: datetime,
    now: datetime,
    window_seconds: float,
    max_items: int,
) -> DigestBuffer:
    """Add one message to the user's digest for ``category`` (opening one if none)."""
    if buffer is None:
        opened = to_micros(now)
        buffer = DigestBuffer(category, opened, opened + int(window_seconds * 1_000_000))
    buffer.total += 1
    if len(buffer.items) < max_items:
        short = text if len(text) <= ITEM_TEXT_CHARS else text[: ITEM_TEXT_CHARS - 1] + "…"
        buffer.items.append({"subject": subject or "", "text": short, "at": at.isoformat()})
    # Kept to recognise a request folded twice (a redelivery), bounded like the items.
    if len(buffer.request_ids) < max_items * 4:
        buffer.request_ids.append(request_id)
    return buffer


def digest_request_id(user_id: str, buffer: DigestBuffer) -> str:
    """Deterministic: a digest released twice (a restart mid-release) keeps its id."""
    digest = hashlib.sha256(
        f"{user_id}\x1f{buffer.category}\x1f{buffer.opened_at}".encode()
    ).hexdigest()
    return f"digest-{digest[:32]}"


def digest_request(
    user_id: str, buffer: DigestBuffer, now: datetime, correlation_id: str | None = None
) -> dict[str, Any]:
    """The NotificationRequest record that sends a due digest."""
    return {
        "request_id": digest_request_id(user_id, buffer),
        "user_id": user_id,
        "category": buffer.category,
        "priority": "NORMAL",
        "template": DIGEST_TEMPLATE,
        "data": {
            "category": buffer.category,
            "count": str(buffer.total),
            "more": str(max(buffer.total - len(buffer.items), 0)),
            "items_json": json.dumps(buffer.items, ensure_ascii=False, separators=(",", ":")),
            "window_start": from_micros(buffer.opened_at).isoformat(),
        },
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": now,
        "source": DIGEST_SOURCE,
        "correlation_id": correlation_id,
    }
