"""Pure decisions of the API: who may touch whose data, what a user may set, how to merge.

No I/O here, so every rule of access and every merge is unit-tested directly.

Access (``/v1/users/{user_id}/...``, where ``me`` is the caller):

* a ``user`` reads and writes their own resources;
* an ``operator`` reads anyone's (read-only views for support), writes none
  but their own if they are also a user;
* a ``service`` has no business in users' resources (it posts notifications);
* anyone else's resource is "not found", exactly like one that does not
  exist, so ids cannot be probed. Role refusals (a service reading a user's
  rules, an operator writing) are 403: they reveal nothing about the data.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from finstream.api.auth import Principal
from finstream.api.problems import Problem, not_found
from finstream.domain.verification import new_contact_id


def resolve_user(principal: Principal, path_user: str, *, write: bool) -> str:
    """The user id a request under ``/v1/users/{path_user}`` acts on, or a refusal."""
    user = principal.subject if path_user == "me" else path_user
    own = user == principal.subject
    if own and principal.has("user"):
        return user
    if principal.has("operator"):
        if not write:
            return user
        raise Problem(403, "Operators have read-only access to users' resources.")
    if principal.has("user"):
        # Someone else's: indistinguishable from a user that has nothing.
        raise not_found()
    raise Problem(403, "This token's roles do not give access to users' resources.")


def require_role(principal: Principal, role: str, action: str) -> None:
    if not principal.has(role):
        raise Problem(403, f"Only a token with the {role!r} role may {action}.")


def next_version(now: datetime, previous: datetime | None) -> datetime:
    """A version time after ``previous`` even when clocks (or replicas) disagree."""
    if previous is None or now > previous:
        return now
    return previous + timedelta(microseconds=1)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch: objects merge recursively, null deletes, the rest replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def to_json(value: Any) -> Any:
    """A decoded Avro record as JSON: decimals as plain strings, times in ISO 8601 UTC."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Decimal):
        return f"{value.normalize():f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    return value


def protect_preferences(
    parsed: dict[str, Any], stored: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """Keep the fields a user must not set themselves as the platform recorded them.

    ``verified`` comes from a verification flow; ``bounced``, ``complained``,
    ``opted_out`` and ``invalid`` from providers' feedback. Letting a user set
    them would let them mark an unverified address deliverable or undo a
    carrier-level STOP. Contacts already stored keep their flags and their id;
    new ones start unverified and clean, with a new id (a client cannot pick
    one). Consents the record did not hold before are stamped with the
    server's time and source ``api``: a client cannot backdate consent.
    ``stored`` is the current version with its contacts opened.
    """
    result = copy.deepcopy(parsed)
    old = stored or {}
    emails = {e["address"].lower(): e for e in old.get("emails") or ()}
    for e in result.get("emails") or ():
        before = emails.get(e["address"].lower())
        e["verified"] = bool(before and before.get("verified"))
        e["bounced"] = bool(before and before.get("bounced"))
        e["complained"] = bool(before and before.get("complained"))
        e["id"] = (before or {}).get("id") or new_contact_id()
    phones = {p["number"]: p for p in old.get("phones") or ()}
    for p in result.get("phones") or ():
        before = phones.get(p["number"])
        p["verified"] = bool(before and before.get("verified"))
        p["opted_out"] = bool(before and before.get("opted_out"))
        p["id"] = (before or {}).get("id") or new_contact_id()
    tokens = {(t["platform"], t["token"]): t for t in old.get("push_tokens") or ()}
    for t in result.get("push_tokens") or ():
        before = tokens.get((t["platform"], t["token"]))
        t["invalid"] = bool(before and before.get("invalid"))
    known = {_consent_key(c) for c in old.get("consents") or ()}
    for c in result.get("consents") or ():
        if _consent_key(c) not in known:
            c["at"] = now
            c["source"] = "api"
    return result


def new_contacts(
    record: Mapping[str, Any], stored: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """(contact id, channel) of the addresses and numbers ``record`` adds to ``stored``:
    each gets a verification code."""
    known = {
        c.get("id")
        for field in ("emails", "phones")
        for c in (stored or {}).get(field) or ()
        if c.get("id")
    }
    added = [(str(e["id"]), "email") for e in record.get("emails") or () if e["id"] not in known]
    added += [(str(p["id"]), "sms") for p in record.get("phones") or () if p["id"] not in known]
    return added


def _consent_key(c: Mapping[str, Any]) -> tuple[Any, ...]:
    at = c.get("at")
    return (c.get("purpose"), bool(c.get("granted")), at, c.get("source"))
