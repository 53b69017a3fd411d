"""The audit event of one routing decision."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from finstream.domain.notify.outbound import Composed, contact_ref
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing import Decision
from finstream.domain.time import to_micros


def audit_event(
    request: Request,
    decision: Decision,
    now: datetime,
    *,
    phase: str,
    actor: str = "router",
    messages: Sequence[Composed] = (),
    skipped: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one decision; contacts appear only as hashes.

    The event id is derived from the request, the decision and the phase, so
    a decision replayed after a crash carries the same id and the audit sink
    stores it once.
    """
    details: dict[str, str] = {
        "category": request.category,
        "priority": request.priority,
        "template": request.template,
        "phase": phase,
    }
    if decision.channels:
        details["channels"] = ",".join(decision.channels)
    if decision.release_at is not None:
        details["release_at"] = decision.release_at.isoformat()
    for channel, why in (skipped or {}).items():
        details[f"skipped.{channel}"] = why
    if messages:
        details["message_ids"] = ",".join(m.message["message_id"] for m in messages)
        details["contacts"] = ",".join(f"{m.channel}:{contact_ref(m.contact)}" for m in messages)
    if messages:
        # The rendered locale per channel (after fallback), for the notification's journey.
        details["locales"] = ",".join(
            dict.fromkeys(f"{m.channel}:{m.message['locale']}" for m in messages)
        )
    if request.collapse_key:
        details["collapse_key"] = request.collapse_key
    created = request.record.get("created_at")
    if isinstance(created, datetime):
        # When the request was made: the journey's first step (and its timings' origin).
        details["requested_at"] = created.isoformat()
    if request.record.get("source"):
        details["source"] = str(request.record["source"])[:200]
    details.update(extra or {})
    seed = f"{request.request_id}\x1f{decision.action}\x1f{phase}\x1f{','.join(decision.channels)}"
    if decision.release_at is not None:
        seed += f"\x1f{to_micros(decision.release_at)}"
    return {
        "event_id": "a-" + hashlib.sha256(seed.encode()).hexdigest()[:40],
        "at": now,
        "actor": actor,
        "action": str(decision.action),
        "subject_type": "request",
        "subject_id": request.request_id,
        "user_id": request.user_id,
        "reason": decision.reason,
        "details": details,
        "correlation_id": request.correlation_id,
    }
