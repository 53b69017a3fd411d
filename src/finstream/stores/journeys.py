"""Reads a notification's journey from PostgreSQL (audit_events, deliveries, delivery_results).

The API and ``finstream journey`` share this; :mod:`finstream.domain.notify.journey`
puts the rows in order. Recipients are masked (:func:`~finstream.domain.delivery.channels.mask`)
and message bodies are not returned: the journey is for explaining what
happened, not for reading someone's mail.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg

from finstream.codec import Codec
from finstream.domain.notify import journey as j

Conn = asyncpg.Connection | asyncpg.Pool


def _details(raw: Any) -> dict[str, str]:
    if isinstance(raw, str):
        raw = json.loads(raw)
    return {str(k): str(v) for k, v in (raw or {}).items()}


def _audit(row: asyncpg.Record) -> j.AuditRow:
    return j.AuditRow(
        at=row["at"],
        actor=row["actor"],
        action=row["action"],
        subject_type=row["subject_type"],
        subject_id=row["subject_id"],
        user_id=row["user_id"],
        reason=row["reason"],
        details=_details(row["details"]),
    )


async def _table_exists(conn: Conn, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


async def journey(
    conn: Conn,
    codec: Codec,
    request_id: str,
    *,
    subject_of: Callable[[str, str], Awaitable[str | None]] | None = None,
) -> dict[str, Any] | None:
    """One request's journey, or None when nothing is recorded about it.

    A message's subject is kept sealed (``deliveries.content``, issue 14):
    ``subject_of(user_id, content)`` opens it; without it, no subject is shown.
    """
    events = [
        _audit(r)
        for r in await conn.fetch(
            "SELECT at, actor, action, subject_type, subject_id, user_id, reason, details "
            "FROM audit_events WHERE subject_type = 'request' AND subject_id = $1 ORDER BY seq",
            request_id,
        )
    ]
    message_ids: set[str] = set()
    for e in events:
        message_ids.update(i for i in e.details.get("message_ids", "").split(",") if i)
    messages: list[j.MessageRow] = []
    attempts: list[j.AttemptRow] = []
    if await _table_exists(conn, "deliveries"):
        for r in await conn.fetch(
            "SELECT message_id, channel, state, attempts, provider, created_at, finished_at, "
            "last_error, locale, subject, recipient_masked, user_id, content FROM deliveries "
            "WHERE request_id = $1",
            request_id,
        ):
            message_ids.add(r["message_id"])
            locale, subject, recipient = r["locale"], r["subject"], r["recipient_masked"]
            if subject is None and r["content"] and subject_of is not None:
                subject = await subject_of(r["user_id"], r["content"])
            messages.append(
                j.MessageRow(
                    message_id=r["message_id"],
                    channel=str(r["channel"]).lower(),
                    state=r["state"],
                    attempts=r["attempts"],
                    provider=r["provider"],
                    created_at=r["created_at"],
                    finished_at=r["finished_at"],
                    last_error=r["last_error"],
                    locale=locale,
                    subject=subject,
                    recipient=recipient,
                )
            )
        attempts = [
            j.AttemptRow(
                message_id=r["message_id"],
                channel=str(r["channel"]).lower(),
                provider=r["provider"],
                status=r["status"],
                attempt=r["attempt"],
                latency_ms=r["latency_ms"],
                error_class=r["error_class"],
                error=r["error"],
                at=r["at"],
            )
            for r in await conn.fetch(
                "SELECT message_id, channel, provider, status, attempt, latency_ms, error_class, "
                "error, at FROM delivery_results WHERE request_id = $1 ORDER BY at, attempt",
                request_id,
            )
        ]
    if message_ids:
        events += [
            _audit(r)
            for r in await conn.fetch(
                "SELECT at, actor, action, subject_type, subject_id, user_id, reason, details "
                "FROM audit_events WHERE subject_type = 'message' AND subject_id = ANY($1::text[]) "
                "ORDER BY seq",
                sorted(message_ids),
            )
        ]
    return j.build(request_id, events, messages, attempts)


async def search(
    conn: Conn, user_id: str, start: datetime, end: datetime, limit: int = 100
) -> list[dict[str, Any]]:
    """A user's requests routed in [start, end), newest first, with their last decision."""
    rows = await conn.fetch(
        """
        SELECT subject_id AS request_id,
               min(at) AS first_at,
               max(at) AS last_at,
               (array_agg(action ORDER BY seq DESC))[1] AS last_action,
               (array_agg(details->>'category' ORDER BY seq))[1] AS category,
               (array_agg(details->>'template' ORDER BY seq))[1] AS template,
               count(*) AS decisions
        FROM audit_events
        WHERE user_id = $1 AND subject_type = 'request' AND at >= $2 AND at < $3
        GROUP BY subject_id
        ORDER BY min(at) DESC
        LIMIT $4
        """,
        user_id,
        start,
        end,
        limit,
    )
    return [
        {
            "request_id": r["request_id"],
            "first_at": r["first_at"].isoformat(),
            "last_at": r["last_at"].isoformat(),
            "last_action": r["last_action"],
            "category": r["category"],
            "template": r["template"],
            "decisions": r["decisions"],
        }
        for r in rows
    ]
