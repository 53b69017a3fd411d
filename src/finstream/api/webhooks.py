"""Delivery status webhooks of Twilio and SendGrid: signatures and mapping to DeliveryResult.

Pure functions; the routes in ``routes/webhooks.py`` do the I/O.

**Twilio** status callbacks are form posts signed with ``X-Twilio-Signature``
(HMAC over the full URL Twilio called plus the sorted form fields, keyed with
the account's auth token; checked with the ``twilio`` package's
``RequestValidator``). The URL must be the one Twilio was given, so behind a
proxy set ``FINSTREAM_API_PUBLIC_URL``.

**SendGrid** Event Webhook posts a JSON array of events, signed with ECDSA
P-256/SHA-256 over ``timestamp + raw body``
(``X-Twilio-Email-Event-Webhook-Signature``, base64 DER;
``X-Twilio-Email-Event-Webhook-Timestamp``), verified with the public key from
SendGrid's settings.

Attribution: a DeliveryResult names our message, request and user. The
sender attaches what it knows: the ``StatusCallback`` URL's query for Twilio
(signed as part of the URL, so unforgeable), ``custom_args`` for SendGrid
(copied into each event). At least ``message_id`` is expected; ids not
attached are looked up in the delivery workers' ``deliveries`` table, by
message id or else by the provider's message id. An event that cannot be
attributed goes to ``dlq``.

Result ids are derived from the provider's event identity, so a provider's
retry of the same callback yields the same ``result_id`` and consumers can
drop the duplicate.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
TWILIO_SIGNATURE = "X-Twilio-Signature"
TWILIO_SIGNATURE_SETTINGS = "X-Twilio-Webhooks-Signature-Settings"

ID_FIELDS = ("message_id", "request_id", "user_id")
_MAX_ID = 200


@dataclass(frozen=True)
class Unattributable:
    """A genuine event we cannot turn into a DeliveryResult; it is dead-lettered."""

    reason: str


@dataclass(frozen=True)
class ProviderEvent:
    """A delivery outcome a provider reported, before it is tied to our message."""

    provider: str
    channel: str
    status: str
    identity: str  # the provider's identity of this event: same event, same result id
    provider_message_id: str | None
    error_class: str | None
    error: str | None
    at: datetime

    def result(self, ids: Mapping[str, str], attempt: int = 1) -> dict[str, Any]:
        """The DeliveryResult record (schemas/DeliveryResult.avsc)."""
        return {
            "result_id": _result_id(self.provider, self.identity),
            "message_id": ids["message_id"],
            "request_id": ids["request_id"],
            "user_id": ids["user_id"],
            "channel": self.channel,
            "provider": self.provider,
            "status": self.status,
            "attempt": attempt,
            "provider_message_id": self.provider_message_id,
            "error_class": self.error_class,
            "error": self.error,
            "latency_ms": None,
            "at": self.at,
        }


def _result_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def known_ids(source: Mapping[str, Any]) -> dict[str, str]:
    """The message, request and user ids the sender attached (those present and sane)."""
    ids = {}
    for name in ID_FIELDS:
        value = source.get(name)
        if isinstance(value, str) and value and len(value) <= _MAX_ID and value.isprintable():
            ids[name] = value
    return ids


def attempt_of(value: Any) -> int:
    try:
        attempt = int(value)
    except (TypeError, ValueError):
        return 1
    return attempt if 1 <= attempt <= 1000 else 1


# -- Twilio ---------------------------------------------------------------------------

_TWILIO_STATUS = {
    "sent": "SENT",
    "delivery_unknown": "SENT",
    "delivered": "DELIVERED",
    "partially_delivered": "DELIVERED",
    "read": "READ",
    "undelivered": "FAILED",
    "failed": "FAILED",
    "canceled": "FAILED",
}
# Statuses on the way to an outcome: acknowledged and counted, no result.
TWILIO_INTERIM = frozenset({"queued", "accepted", "scheduled", "sending", "receiving", "received"})
_TWILIO_ERRORS = {
    "21211": "invalid_recipient",  # invalid To number
    "21614": "invalid_recipient",  # not a mobile number
    "21610": "opted_out",  # the recipient replied STOP
    "30003": "transient",  # handset unreachable
    "30004": "permanent",  # message blocked
    "30005": "invalid_recipient",  # unknown destination
    "30006": "invalid_recipient",  # landline or unreachable carrier
    "30007": "permanent",  # carrier filtering
    "30008": "transient",  # unknown error
    "30034": "permanent",  # unregistered 10DLC sender
}


def twilio_event(form: Mapping[str, str], now: datetime) -> ProviderEvent | Unattributable | None:
    """The outcome in a status callback's form; None for an interim status."""
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").lower()
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    if status in TWILIO_INTERIM:
        return None
    mapped = _TWILIO_STATUS.get(status)
    if mapped is None:
        return Unattributable(f"unknown MessageStatus {status!r}")
    if not sid or len(sid) > _MAX_ID:
        return Unattributable("no usable MessageSid")
    code = (form.get("ErrorCode") or "").strip()[:10]
    error_class = None
    error = None
    if mapped == "FAILED":
        error_class = _TWILIO_ERRORS.get(code, "permanent" if code else "unknown")
        error = f"twilio {status}" + (f" (error {code})" if code else "")
    return ProviderEvent("twilio", "SMS", mapped, f"{sid}:{status}", sid, error_class, error, now)


class SignatureError(ValueError):
    pass


@functools.lru_cache(maxsize=4)
def load_sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it (base64 DER) or as PEM."""
    raw = text.strip()
    try:
        if raw.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(raw.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"the SendGrid verification key cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the SendGrid verification key is not an ECDSA public key")
    return key


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey, signature: str | None, timestamp: str | None, body: bytes
) -> None:
    if not signature or not timestamp:
        raise SignatureError("signature or timestamp header missing")
    try:
        der = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        raise SignatureError("signature is not base64") from None
    try:
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("signature does not match") from None


def sign_sendgrid(key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    """What SendGrid does (used by tests and the local fake)."""
    return base64.b64encode(key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()


# Opened, clicked and delivered stay distinct; a bounce (hard) and a spam report
# suppress the address, an unsubscribe updates the user's preferences (the
# feedback role acts on them).
_SENDGRID_EVENTS = {
    "processed": ("SENT", None),
    "delivered": ("DELIVERED", None),
    "open": ("OPENED", None),
    "click": ("CLICKED", None),
    "deferred": ("RETRYING", "transient"),
    "bounce": ("BOUNCED", "invalid_recipient"),
    "blocked": ("FAILED", "permanent"),
    "dropped": ("REJECTED", "permanent"),
    "spamreport": ("COMPLAINED", "complaint"),
    "unsubscribe": ("UNSUBSCRIBED", None),
    "group_unsubscribe": ("UNSUBSCRIBED", "group"),
}
# Re-subscribing through SendGrid's page is not how a user grants consent here:
# acknowledged and counted.
SENDGRID_IGNORED = frozenset({"group_resubscribe"})


def sendgrid_event(event: Any, now: datetime) -> ProviderEvent | Unattributable | None:
    """The outcome one Event Webhook event reports; None for subscription changes."""
    if not isinstance(event, Mapping):
        return Unattributable("event is not a JSON object")
    kind = str(event.get("event") or "")
    if kind in SENDGRID_IGNORED:
        return None
    if kind == "bounce" and event.get("type") == "blocked":
        kind = "blocked"
    mapped = _SENDGRID_EVENTS.get(kind)
    if mapped is None:
        return Unattributable(f"unknown event type {kind!r}")
    status, error_class = mapped
    raw_id = event.get("sg_message_id")
    sg_message_id = str(raw_id)[:_MAX_ID] if isinstance(raw_id, str) and raw_id else None
    event_id = event.get("sg_event_id")
    identity = (
        event_id
        if isinstance(event_id, str) and event_id
        else f"{sg_message_id}:{kind}:{event.get('timestamp')}"
    )
    at = now
    ts = event.get("timestamp")
    if isinstance(ts, int | float) and not isinstance(ts, bool) and 0 < ts < 32_503_680_000:
        at = datetime.fromtimestamp(ts, UTC)
    error = None
    if error_class is not None:
        error = str(event.get("reason") or event.get("response") or kind)[:500]
    return ProviderEvent(
        "sendgrid", "EMAIL", status, identity, sg_message_id, error_class, error, at
    )
