"""SES notifications through an SNS HTTP(S) endpoint: signature verification and mapping.

Pure functions; ``routes/webhooks.py`` fetches the signing certificate and
does the I/O.

**SNS** posts a JSON document (``Content-Type: text/plain``) whose
``Type`` is ``Notification``, ``SubscriptionConfirmation`` or
``UnsubscribeConfirmation``, signed by SNS: ``Signature`` is base64 RSA
PKCS#1 v1.5 over a canonical string (the fields below, each as
``name\\nvalue\\n``, in this order, ``Subject`` only when present), SHA1 for
``SignatureVersion`` 1 and SHA256 for 2, verifiable with the X.509
certificate at ``SigningCertURL``. That URL must match
``FINSTREAM_API_SNS_CERT_URL_PATTERN`` (https, an ``sns.<region>.amazonaws.com``
host), and ``TopicArn`` must be one of ``FINSTREAM_API_SNS_TOPIC_ARNS``:
anything else is refused before its content is read.

**SES** (event publishing or identity notifications) puts one event in the
notification's ``Message``: ``eventType`` / ``notificationType`` Send,
Delivery, Bounce (Permanent: a hard bounce), Complaint, Reject, Open, Click,
Rendering Failure, Subscription, DeliveryDelay. ``mail.tags.message_id``
(finstream's SES provider tags every message with its id) names our
message; ``mail.messageId`` (SES's) is looked up otherwise.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from finstream.api.webhooks import ProviderEvent, Unattributable
from finstream.domain.delivery.channels import scrub_contacts

MESSAGE_TYPE_HEADER = "x-amz-sns-message-type"
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")


class SnsError(ValueError):
    """Not a genuine SNS message of a topic we accept (refused with 403)."""


def string_to_sign(doc: Mapping[str, Any]) -> bytes:
    fields = _NOTIFICATION_FIELDS if doc.get("Type") == "Notification" else _CONFIRMATION_FIELDS
    parts = []
    for name in fields:
        if name not in doc:
            if name == "Subject":
                continue
            raise SnsError(f"{name} missing")
        parts.append(f"{name}\n{doc[name]}\n")
    return "".join(parts).encode()


def parse(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise SnsError("the body is not JSON") from None
    if not isinstance(doc, dict) or doc.get("Type") not in TYPES:
        raise SnsError("not an SNS message")
    for name in ("Signature", "SigningCertURL", "SignatureVersion", "TopicArn"):
        if not isinstance(doc.get(name), str):
            raise SnsError(f"{name} missing")
    return doc


def check_origin(doc: Mapping[str, Any], cert_url_pattern: str, topics: set[str]) -> None:
    """The certificate comes from SNS, the topic is ours (before anything is fetched)."""
    if not re.match(cert_url_pattern, str(doc["SigningCertURL"])):
        raise SnsError("SigningCertURL is not an SNS certificate URL")
    if doc["TopicArn"] not in topics:
        raise SnsError(f"topic {doc['TopicArn']} is not configured (FINSTREAM_API_SNS_TOPIC_ARNS)")


def verify(doc: Mapping[str, Any], certificate_pem: bytes) -> None:
    version = str(doc.get("SignatureVersion"))
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()  # noqa: S303 (SNS SignatureVersion 1 is SHA1 by definition)
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise SnsError(f"unknown SignatureVersion {version!r}")
    try:
        signature = base64.b64decode(str(doc["Signature"]), validate=True)
        key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    except (binascii.Error, ValueError):
        raise SnsError("signature or certificate unreadable") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise SnsError("the certificate's key is not RSA")
    try:
        key.verify(signature, string_to_sign(doc), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise SnsError("signature does not match") from None


def same_origin(url: str, cert_url: str) -> bool:
    """A SubscribeURL is followed only on the host that served the signing certificate."""
    match = re.match(r"^(https?://[^/]+)/", url)
    origin = re.match(r"^(https?://[^/]+)/", cert_url)
    return bool(match and origin and match.group(1) == origin.group(1))


# -- SES events -------------------------------------------------------------------------------


def _when(text: Any, fallback: datetime) -> datetime:
    if isinstance(text, str):
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            return fallback
    return fallback


def attached_ids(event: Mapping[str, Any]) -> dict[str, str]:
    """Our ids from the message's SES tags (EmailTags set by finstream's SES provider)."""
    tags = (event.get("mail") or {}).get("tags") or {}
    out = {}
    for name in ("message_id", "request_id", "user_id"):
        value = tags.get(name)
        if isinstance(value, list) and value and isinstance(value[0], str):
            out[name] = value[0]
    return out


def ses_event(
    message: Any, sns_message_id: str, now: datetime
) -> ProviderEvent | Unattributable | None:
    """The outcome an SES event reports; None for interim ones (DeliveryDelay)."""
    if not isinstance(message, Mapping):
        return Unattributable("SES message is not a JSON object")
    kind = str(message.get("eventType") or message.get("notificationType") or "")
    mail = message.get("mail") or {}
    ses_id = mail.get("messageId") if isinstance(mail.get("messageId"), str) else None
    at = now
    error_class = error = None
    if kind == "Bounce":
        bounce = message.get("bounce") or {}
        permanent = bounce.get("bounceType") == "Permanent"
        status = "BOUNCED" if permanent else "FAILED"
        error_class = "invalid_recipient" if permanent else "transient"
        diagnostics = [
            str(r.get("diagnosticCode") or "") for r in bounce.get("bouncedRecipients") or []
        ]
        error = scrub_contacts(
            f"ses {bounce.get('bounceType')}/{bounce.get('bounceSubType')} bounce"
            + (f": {'; '.join(d for d in diagnostics if d)}" if any(diagnostics) else "")
        )[:500]
        at = _when(bounce.get("timestamp"), now)
    elif kind == "Complaint":
        complaint = message.get("complaint") or {}
        status, error_class = "COMPLAINED", "complaint"
        error = f"ses complaint ({complaint.get('complaintFeedbackType') or 'unspecified'})"
        at = _when(complaint.get("timestamp"), now)
    elif kind == "Delivery":
        status = "DELIVERED"
        at = _when((message.get("delivery") or {}).get("timestamp"), now)
    elif kind == "Send":
        status = "SENT"
    elif kind == "Reject":
        status, error_class = "REJECTED", "permanent"
        error = str((message.get("reject") or {}).get("reason") or "rejected by ses")[:500]
    elif kind == "Open":
        status = "OPENED"
        at = _when((message.get("open") or {}).get("timestamp"), now)
    elif kind == "Click":
        status = "CLICKED"
        at = _when((message.get("click") or {}).get("timestamp"), now)
    elif kind == "Subscription":
        status = "UNSUBSCRIBED"
    elif kind == "Rendering Failure":
        status, error_class = "FAILED", "permanent"
        error = str((message.get("failure") or {}).get("errorMessage") or "rendering failure")
    elif kind == "DeliveryDelay":
        return None
    else:
        return Unattributable(f"unknown SES event type {kind!r}")
    return ProviderEvent(
        "ses", "EMAIL", status, f"{sns_message_id}:{kind}", ses_id, error_class, error, at
    )
