"""Exporting everything finstream holds about a user, as one JSON document.

``GET /v1/users/me/export`` (and an operator's ``/v1/users/{id}/export``,
``finstream users export USER``) return:

* ``preferences``: the current version, contact points in clear, with
  ``consents`` (purpose, decision, time, source) also listed on their own;
* ``contact_verifications``: each contact's verification state (no code);
* ``rules``: the user's alert rules;
* ``inbox``: every in-app message, opened, with read/archived state;
* ``deliveries``: every message sent or attempted (channel, state, provider,
  attempts, times), its content opened (recipient, subject, bodies), and each
  attempt's result;
* ``audit``: the audit trail about the user (at most ``AUDIT_LIMIT`` newest
  entries; ``audit_truncated`` says so), contact points masked as stored.

Everything is read and opened in the API process; nothing of it is written
anywhere. An export is audited (``user_exported``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain.envelope import EnvelopeError, open_contacts
from finstream.domain.time import utcnow
from finstream.privacy.keys import KeyRing
from finstream.settings import Settings
from finstream.stores.inbox import Inbox, open_entry
from finstream.stores.read_models import PreferencesStore, RulesStore

AUDIT_LIMIT = 50_000
INBOX_PAGE = 200


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return f"{value.normalize():f}"
    if isinstance(value, bytes):
        return value.hex()
    return value


@dataclass
class Sources:
    settings: Settings
    codec: Codec
    pg: asyncpg.Pool
    redis: aioredis.Redis
    keys: KeyRing


async def export(s: Sources, user: str) -> dict[str, Any]:
    keys = await s.keys.get(user)
    prefs = await PreferencesStore(s.redis, s.settings, s.codec).get(user)
    opened = open_contacts(prefs, keys) if prefs is not None else None
    rules = await RulesStore(s.redis, s.settings, s.codec).list_for_user(user)
    inbox = Inbox(s.redis, s.settings)
    messages: list[dict[str, Any]] = []
    before: float | None = None
    while True:
        page = await inbox.page(user, limit=INBOX_PAGE, before=before, include_archived=True)
        messages.extend(open_entry(m, keys) for m in page.messages)
        if len(page.messages) < INBOX_PAGE:
            break
        before = datetime.fromisoformat(str(page.messages[-1]["created_at"])).timestamp()
    deliveries = []
    async with s.pg.acquire() as conn:
        rows = await conn.fetch(
            """SELECT message_id, request_id, channel, state, attempts, provider, created_at,
                      finished_at, last_error, locale, recipient_masked, content
               FROM deliveries WHERE user_id = $1 ORDER BY created_at""",
            user,
        )
        results = await conn.fetch(
            """SELECT message_id, provider, status, attempt, error_class, error, latency_ms, at
               FROM delivery_results WHERE user_id = $1 ORDER BY at""",
            user,
        )
        verifications = await conn.fetch(
            """SELECT contact_id, channel, sent_at, expires_at, attempts, verified_at
               FROM contact_verifications WHERE user_id = $1 ORDER BY sent_at""",
            user,
        )
        audit = await conn.fetch(
            """SELECT at, actor, action, subject_type, subject_id, reason, details
               FROM audit_events WHERE user_id = $1 ORDER BY seq DESC LIMIT $2""",
            user,
            AUDIT_LIMIT + 1,
        )
    by_message: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_message.setdefault(r["message_id"], []).append(
            {k: r[k] for k in ("provider", "status", "attempt", "error_class", "error", "at")}
        )
    for r in rows:
        content: Any = None
        if r["content"]:
            try:
                content = keys.open_json(r["content"])
            except EnvelopeError:
                content = None
        deliveries.append(
            {
                **{k: v for k, v in r.items() if k != "content"},
                "content": content,
                "results": by_message.get(r["message_id"], []),
            }
        )
    audit_rows = [
        {
            **{k: v for k, v in r.items() if k != "details"},
            "details": json.loads(r["details"])
            if isinstance(r["details"], str)
            else dict(r["details"] or {}),
        }
        for r in audit[:AUDIT_LIMIT]
    ]
    bundle = {
        "user_id": user,
        "exported_at": utcnow(),
        "preferences": opened,
        "consents": list((opened or {}).get("consents") or []),
        "contact_verifications": [dict(r) for r in verifications],
        "rules": rules,
        "inbox": messages,
        "deliveries": deliveries,
        "audit": list(reversed(audit_rows)),
        "audit_truncated": len(audit) > AUDIT_LIMIT,
    }
    out: dict[str, Any] = _json(bundle)
    return out
