"""What an audit event says about a change of a user's data: old -> new, personal data masked.

Audit rows outlive the data they describe (they are hash-chained and kept for
years, an erasure included), so they never hold a contact point: addresses,
numbers and push tokens appear masked (``a***@***.com``, ``*********71``),
consents with their purpose, decision and time.

Pure; the writers (API, feedback role, CLI) publish the AuditEvent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from finstream.domain.envelope import mask_recipient

MAX_VALUE_CHARS = 1000
_CONTACTS = (("emails", "address"), ("phones", "number"), ("push_tokens", "token"))
_SETTINGS = (
    "locale",
    "timezone",
    "channels",
    "categories",
    "global_opt_out",
    "quiet_hours",
    "caps",
)


def _contact(item: Mapping[str, Any], value_field: str) -> str:
    flags = [
        k for k in ("verified", "bounced", "complained", "opted_out", "invalid") if item.get(k)
    ]
    masked = mask_recipient(str(item.get(value_field) or ""))
    label = f"{item['id']}={masked}" if item.get("id") else masked
    return f"{label}({','.join(flags)})" if flags else label


def _consent(c: Mapping[str, Any]) -> str:
    at = c.get("at")
    when = at.isoformat() if isinstance(at, datetime) else str(at)
    return f"{c.get('purpose')}:{'granted' if c.get('granted') else 'withdrawn'}@{when}:{c.get('source')}"


def _plain(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _view(record: Mapping[str, Any] | None) -> dict[str, str]:
    if record is None:
        return {}
    out = {name: "; ".join(_contact(i, f) for i in record.get(name) or ()) for name, f in _CONTACTS}
    out["consents"] = "; ".join(_consent(c) for c in record.get("consents") or ())
    for name in _SETTINGS:
        out[name] = _plain(record.get(name))
    return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def preference_changes(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> dict[str, str]:
    """Audit details of a preferences change (both records opened): each changed part old -> new."""
    before, after = _view(old), _view(new)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    details: dict[str, str] = {"changed": ",".join(changed)}
    for name in changed:
        details[f"{name}.old"] = _clip(before.get(name, "(none)"))
        details[f"{name}.new"] = _clip(after.get(name, "(none)"))
    return details


def rule_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, str]:
    """Audit details of an alert rule created, changed or deleted (rules hold no contact)."""
    skip = {"updated_at", "created_at"}
    before = {k: _plain(v) for k, v in (old or {}).items() if k not in skip}
    after = {k: _plain(v) for k, v in (new or {}).items() if k not in skip}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    details: dict[str, str] = {"changed": ",".join(changed)}
    for name in changed:
        details[f"{name}.old"] = _clip(before.get(name, "(none)"))
        details[f"{name}.new"] = _clip(after.get(name, "(none)"))
    return details


def audit_event_id(*parts: str) -> str:
    """A deterministic event id: a change audited twice (a retry) is stored once."""
    return "a-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
