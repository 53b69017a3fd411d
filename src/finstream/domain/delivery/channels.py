"""What each channel's message and recipient must be, before any provider sees them.

SMS segment counting (GSM-7 / UCS-2) and E.164 numbers; email addresses,
headers (List-Unsubscribe, Message-ID) and the parts every email provider
sends; push payload limits and the stable apns-id; recipients masked for logs
and error texts (:func:`mask`, :func:`scrub_contacts`); and
:func:`validate_outbound`, which refuses a message no provider could take.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import phonenumbers

from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.resilience import ErrorClass

# -- SMS ----------------------------------------------------------------------------------

# GSM 03.38 default alphabet, and the extension table (each costs two septets:
# the escape character plus the character).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")
SMS_MAX_BODY_CHARS = 1600  # Twilio's limit on Body


@dataclass(frozen=True)
class SmsSegments:
    encoding: str  # "GSM-7" or "UCS-2"
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def is_gsm7(text: str) -> bool:
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def sms_segments(text: str) -> SmsSegments:
    """How many SMS segments ``text`` takes, as a carrier counts them.

    One segment holds 160 GSM-7 septets or 70 UCS-2 units; a concatenated
    message loses room to its header (153 / 67 per segment), and a segment
    never splits an escape sequence or a surrogate pair.
    """
    if is_gsm7(text):
        costs = [2 if c in GSM7_EXTENSION else 1 for c in text]
        return SmsSegments("GSM-7", sum(costs), _count(costs, 160, 153))
    costs = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return SmsSegments("UCS-2", sum(costs), _count(costs, 70, 67))


def _count(costs: Sequence[int], single: int, multi: int) -> int:
    total = sum(costs)
    if total <= single:
        return 1
    segments, used = 1, 0
    for cost in costs:
        if used + cost > multi:
            segments += 1
            used = 0
        used += cost
    return segments


class RecipientError(ValueError):
    pass


def normalize_e164(number: str) -> str:
    """The E.164 form of a phone number; raises RecipientError if it is not a valid one."""
    candidate = number.strip()
    if not candidate.startswith("+"):
        raise RecipientError(f"not in E.164 form (no leading +): {mask(candidate)}")
    try:
        parsed = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException as exc:
        raise RecipientError(f"not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise RecipientError(f"not a valid phone number: {mask(candidate)}")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def same_phone(a: str, b: str) -> bool:
    try:
        return normalize_e164(a) == normalize_e164(b)
    except RecipientError:
        return a.strip() == b.strip()


def mask(value: str, keep: int = 4) -> str:
    """A recipient for logs and audit: only the last characters."""
    return ("*" * max(len(value) - keep, 0)) + value[-keep:] if value else value


_EMAIL_IN_TEXT = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE_IN_TEXT = re.compile(r"\+\d[\d ()-]{6,18}\d")


def scrub_contacts(text: str) -> str:
    """Provider error texts with addresses and numbers masked.

    Providers quote the recipient in their errors (SES: "...failed the check
    ...: ann@example.com"); results, dead-letter reasons and audit events are
    read far more widely than the message itself.
    """
    text = _EMAIL_IN_TEXT.sub(lambda m: mask(m.group(0), 6), text)
    return _PHONE_IN_TEXT.sub(lambda m: mask(m.group(0), 4), text)


# -- email -----------------------------------------------------------------------------

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")
MAX_EMAIL_LENGTH = 254


def validate_email_address(address: str) -> str:
    if len(address) > MAX_EMAIL_LENGTH or not _EMAIL.match(address) or ".." in address:
        raise RecipientError(f"not an email address: {mask(address, 8)}")
    local, _, domain = address.rpartition("@")
    if len(local) > 64 or "." not in domain:
        raise RecipientError(f"not an email address: {mask(address, 8)}")
    return address


def unsubscribe_headers(
    message_id: str, url_template: str | None, mailto: str | None, token: str | None = None
) -> dict[str, str]:
    """RFC 2369 List-Unsubscribe and RFC 8058 one-click headers (empty if none configured).

    ``url_template`` names ``{token}`` (the signed link the API serves) or, as
    before, ``{message_id}``; a template that needs a token is left out
    without one.
    """
    targets = []
    if url_template and (token or "{token}" not in url_template):
        targets.append(f"<{url_template.format(message_id=message_id, token=token or '')}>")
    if mailto:
        targets.append(f"<mailto:{mailto}?subject=unsubscribe%20{message_id}>")
    if not targets:
        return {}
    headers = {"List-Unsubscribe": ", ".join(targets)}
    if url_template and (token or "{token}" not in url_template):
        headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return headers


def email_message_id(message_id: str, domain: str) -> str:
    """The RFC 5322 Message-ID for an outbound message: the same on every try."""
    return f"<{message_id}@{domain}>"


@dataclass(frozen=True)
class EmailParts:
    """What every email provider sends, whatever its wire format."""

    from_name: str
    from_address: str
    to: str
    subject: str
    text: str
    html: str | None
    headers: dict[str, str]  # extra headers: X-Entity-Ref-ID, List-Unsubscribe, ...

    @property
    def domain(self) -> str:
        return self.from_address.rpartition("@")[2] or "localhost"


def email_parts(
    message: Mapping[str, Any],
    sender: str,
    unsubscribe_url: str | None,
    unsubscribe_mailto: str | None,
) -> EmailParts:
    """The parts of an email; non-transactional mail carries List-Unsubscribe."""
    from email.utils import parseaddr

    name, address = parseaddr(sender)
    if not address or "@" not in address:
        raise DeliveryError(
            ErrorClass.AUTH, f"delivery_email_from is not an address: {sender!r}", provider="email"
        )
    headers = {"X-Entity-Ref-ID": str(message["message_id"])}
    if not message.get("transactional", True):
        headers.update(
            unsubscribe_headers(
                str(message["message_id"]),
                unsubscribe_url,
                unsubscribe_mailto,
                message.get("unsubscribe_token"),
            )
        )
    return EmailParts(
        from_name=name,
        from_address=address,
        to=str(message["recipient"]),
        subject=str(message.get("subject") or ""),
        text=str(message.get("body_text") or ""),
        html=message.get("body_html") or None,
        headers=headers,
    )


# -- push -----------------------------------------------------------------------------

PUSH_MAX_PAYLOAD_BYTES = 4096  # APNs and FCM both cap the notification payload at 4 KB
_APNS_NAMESPACE = uuid.UUID("6f1f6a4e-6d2c-4f0e-9a59-5a5d1b0e7c11")


def apns_id(message_id: str) -> str:
    """A stable apns-id for a message: every try of one message carries the same id."""
    return str(uuid.uuid5(_APNS_NAMESPACE, message_id))


# -- validation before any provider call ----------------------------------------------


def validate_outbound(message: Mapping[str, Any], channel: str) -> None:
    """Raise DeliveryError (permanent / invalid recipient) for a message no provider can take."""

    def reject(cls: ErrorClass, text: str) -> DeliveryError:
        return DeliveryError(cls, text, provider="validation")

    if message.get("channel") != channel:
        raise reject(
            ErrorClass.PERMANENT,
            f"message for channel {message.get('channel')} on the {channel} topic",
        )
    if not message.get("message_id"):
        raise reject(ErrorClass.PERMANENT, "empty message_id (the idempotency key)")
    recipient = str(message.get("recipient") or "")
    body = str(message.get("body_text") or "")
    try:
        if channel == "EMAIL":
            validate_email_address(recipient)
            if not (message.get("subject") or "").strip():
                raise reject(ErrorClass.PERMANENT, "email without a subject")
            if any(c in (message.get("subject") or "") for c in "\r\n"):
                raise reject(ErrorClass.PERMANENT, "line break in the subject")
        elif channel == "SMS":
            normalize_e164(recipient)
            if not body.strip():
                raise reject(ErrorClass.PERMANENT, "empty SMS body")
            if len(body) > SMS_MAX_BODY_CHARS:
                raise reject(
                    ErrorClass.PERMANENT,
                    f"SMS body of {len(body)} characters (at most {SMS_MAX_BODY_CHARS})",
                )
        elif channel == "PUSH":
            if message.get("platform") not in ("FCM", "APNS"):
                raise reject(
                    ErrorClass.PERMANENT,
                    f"push platform {message.get('platform')!r} (expected FCM or APNS)",
                )
            if not recipient or len(recipient) > 4096 or any(c.isspace() for c in recipient):
                raise reject(ErrorClass.INVALID_RECIPIENT, "malformed push token")
        elif channel == "INAPP" and not recipient:
            raise reject(ErrorClass.INVALID_RECIPIENT, "in-app message without a user")
    except RecipientError as exc:
        raise reject(ErrorClass.INVALID_RECIPIENT, str(exc)) from None
