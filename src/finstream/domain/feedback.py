"""The feedback loop: what delivery outcomes mean for the funnel and for users' preferences.

Pure. The ``feedback`` role (``finstream.agents.feedback``) reads every
DeliveryResult (the delivery workers' attempts and the providers' webhooks:
SendGrid events, Twilio status callbacks, SES notifications through SNS) and
the router's audit events, and uses these functions to

* keep the **funnel** (``notification_funnel``): one row per request,
  channel and contact the router decided about, with the time of each stage:
  requested, suppressed, sent, delivered, opened, clicked, bounced, failed
  (plus complained and unsubscribed). Opened, clicked and delivered are
  distinct stages, never folded into one;
* change **preferences**: a hard bounce marks the address ``bounced`` and a
  spam complaint ``complained`` (neither is mailed again), a provider's
  unsubscribe opts the user out of the message's category, a carrier STOP
  (a status callback, or a delivery worker's send refused with Twilio's
  21610) marks the number ``opted_out``, a push token the provider no longer
  knows (FCM UNREGISTERED, APNs 410) is marked ``invalid``. Each change is
  audited, old -> new. The delivery workers only say so, in the result's
  ``error_class`` (:attr:`finstream.domain.delivery.errors.Feedback.error_class`):
  every preference change from feedback is made here, under the user's lock.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any


class Stage(StrEnum):
    REQUESTED = "requested"
    SUPPRESSED = "suppressed"
    SENT = "sent"
    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"
    FAILED = "failed"


# The funnel as analytics report it, in order.
FUNNEL: tuple[Stage, ...] = tuple(Stage)

_RESULT_STAGES = {
    "SENT": Stage.SENT,
    "DELIVERED": Stage.DELIVERED,
    "READ": Stage.OPENED,
    "OPENED": Stage.OPENED,
    "CLICKED": Stage.CLICKED,
    "BOUNCED": Stage.BOUNCED,
    "COMPLAINED": Stage.COMPLAINED,
    "UNSUBSCRIBED": Stage.UNSUBSCRIBED,
    "FAILED": Stage.FAILED,
    "REJECTED": Stage.FAILED,
    "EXPIRED": Stage.FAILED,
}
GROUP_BY = ("channel", "provider", "template", "category")


class Change(StrEnum):
    """A change of the user's preferences a delivery outcome calls for."""

    BOUNCED = "email_bounced"
    COMPLAINED = "email_complained"
    UNSUBSCRIBED = "unsubscribed"
    OPTED_OUT = "phone_opted_out"
    TOKEN_INVALID = "push_token_invalidated"  # noqa: S105 (not a secret)


def result_stage(status: str) -> Stage | None:
    return _RESULT_STAGES.get(status)


def change_for(result: Mapping[str, Any]) -> Change | None:
    status = str(result.get("status") or "")
    channel = str(result.get("channel") or "").upper()
    error_class = result.get("error_class")
    if status == "COMPLAINED":
        return Change.COMPLAINED
    if status == "UNSUBSCRIBED":
        return Change.UNSUBSCRIBED
    if channel == "EMAIL" and (
        status == "BOUNCED"
        or (status in ("FAILED", "REJECTED") and error_class == "invalid_recipient")
    ):
        return Change.BOUNCED
    if channel == "SMS" and status in ("FAILED", "REJECTED") and error_class == "opted_out":
        return Change.OPTED_OUT
    if channel == "PUSH" and status in ("FAILED", "REJECTED") and error_class == "token_invalid":
        return Change.TOKEN_INVALID
    return None


# -- the funnel ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunnelRow:
    item_key: str
    request_id: str
    user_id: str
    channel: str
    stage: Stage
    at: datetime
    message_id: str | None = None
    template: str | None = None
    category: str | None = None
    provider: str | None = None


def rows_from_result(result: Mapping[str, Any]) -> list[FunnelRow]:
    stage = result_stage(str(result.get("status") or ""))
    if stage is None or not result.get("message_id"):
        return []
    provider = str(result.get("provider") or "") or None
    return [
        FunnelRow(
            item_key=str(result["message_id"]),
            request_id=str(result.get("request_id") or ""),
            user_id=str(result.get("user_id") or ""),
            channel=str(result.get("channel") or "").lower() or "none",
            stage=stage,
            at=result["at"],
            message_id=str(result["message_id"]),
            provider=None if provider in (None, "none", "validation") else provider,
        )
    ]


def _at(details: Mapping[str, str], fallback: datetime) -> datetime:
    text = details.get("requested_at")
    if text:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            return fallback
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return fallback


def rows_from_audit(event: Mapping[str, Any]) -> list[FunnelRow]:
    """The router's decisions as funnel rows: each message requested, each channel suppressed."""
    if event.get("actor") != "router" or event.get("subject_type") != "request":
        return []
    action = event.get("action")
    if action not in ("routed", "suppressed"):
        return []
    details: Mapping[str, str] = event.get("details") or {}
    request_id = str(event.get("subject_id") or "")
    user_id = str(event.get("user_id") or "")
    at = _at(details, event["at"])
    template, category = details.get("template"), details.get("category")
    rows: list[FunnelRow] = []
    if action == "routed":
        ids = [m for m in (details.get("message_ids") or "").split(",") if m]
        channels = [c.split(":", 1)[0] for c in (details.get("contacts") or "").split(",") if c]
        for mid, channel in zip(ids, channels, strict=False):
            rows.append(
                FunnelRow(
                    mid,
                    request_id,
                    user_id,
                    channel,
                    Stage.REQUESTED,
                    at,
                    message_id=mid,
                    template=template,
                    category=category,
                )
            )
    skipped = sorted(k.removeprefix("skipped.") for k in details if k.startswith("skipped."))
    if action == "suppressed" and not skipped:
        skipped = ["none"]
    for channel in skipped:
        rows.append(
            FunnelRow(
                f"{request_id}|{channel}",
                request_id,
                user_id,
                channel,
                Stage.SUPPRESSED,
                at,
                template=template,
                category=category,
            )
        )
    return rows


# -- preferences ---------------------------------------------------------------------------


def _bump(record: dict[str, Any], now: datetime) -> None:
    """``updated_at`` only moves forward, so read models never take this for an older version."""
    previous = record.get("updated_at")
    floor = previous + timedelta(microseconds=1) if isinstance(previous, datetime) else now
    record["updated_at"] = max(now.astimezone(UTC), floor)


def apply_change(
    record: Mapping[str, Any],
    change: Change,
    *,
    recipient: str | None,
    category: str | None,
    now: datetime,
    same_phone: Any = None,
) -> dict[str, Any] | None:
    """The user's (opened) preferences after ``change``; None when nothing changes."""
    updated = copy.deepcopy(dict(record))
    changed = False
    if change in (Change.BOUNCED, Change.COMPLAINED):
        flag = "bounced" if change is Change.BOUNCED else "complained"
        for email in updated.get("emails") or []:
            address = str(email.get("address") or "")
            if recipient and address.lower() == recipient.lower() and not email.get(flag):
                email[flag] = True
                changed = True
    elif change is Change.OPTED_OUT:
        match = same_phone or (lambda a, b: a == b)
        for phone in updated.get("phones") or []:
            number = str(phone.get("number") or "")
            if recipient and match(number, recipient) and not phone.get("opted_out"):
                phone["opted_out"] = True
                changed = True
    elif change is Change.TOKEN_INVALID:
        for token in updated.get("push_tokens") or []:
            if (
                recipient
                and str(token.get("token") or "") == recipient
                and not token.get("invalid")
            ):
                token["invalid"] = True
                changed = True
    elif change is Change.UNSUBSCRIBED and category:
        categories = dict(updated.get("categories") or {})
        current = dict(categories.get(category) or {"channels": None, "digest": False})
        if current.get("enabled", True):
            current["enabled"] = False
            categories[category] = current
            updated["categories"] = categories
            changed = True
    if not changed:
        return None
    _bump(updated, now)
    return updated


def withdraw_consent(
    record: Mapping[str, Any], purpose: str, now: datetime, source: str
) -> dict[str, Any] | None:
    """Consent for ``purpose`` withdrawn (e.g. all marketing); None if already withdrawn."""
    latest = None
    for c in record.get("consents") or ():
        if c.get("purpose") == purpose and (latest is None or c["at"] >= latest["at"]):
            latest = c
    if latest is not None and not latest.get("granted"):
        return None
    updated = copy.deepcopy(dict(record))
    updated["consents"] = [
        *(updated.get("consents") or []),
        {"purpose": purpose, "granted": False, "at": now.astimezone(UTC), "source": source},
    ]
    _bump(updated, now)
    return updated
