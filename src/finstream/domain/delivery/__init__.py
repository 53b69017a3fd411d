"""Delivery policy, pure: what a provider's answer means and what to do next.

Everything here is I/O free and clock-injected, so it is tested exhaustively:

* :class:`DeliveryError` (a :class:`~finstream.domain.resilience.ProviderError`
  that also says whether the outcome is *ambiguous* and what feedback the
  answer carries for the user's preferences), and the helpers every
  provider's ``classify()`` shares (:func:`by_status`, :func:`throttle_delay`);
  each provider's classification of its documented answers lives beside it,
  in its module of :mod:`finstream.sinks.delivery`;
* the retry schedule (:class:`RetryPolicy`): exponential backoff with full
  jitter, never earlier than the provider's ``Retry-After`` / rate-limit reset,
  never past the message's deadline;
* SMS segment counting (GSM-7 / UCS-2) and E.164 checks;
* validation of an outbound message before any provider sees it;
* preference feedback (:func:`apply_feedback`): unregistered push tokens and
  opted-out phone numbers, with a monotonic ``updated_at``.

An *ambiguous* error is one after which the provider may or may not have
accepted the message (a read timeout, a dropped connection after the request
was written, a 2xx answer without the documented shape). Retrying it blindly
could send twice, so the engine reconciles it instead (see
:mod:`finstream.sinks.delivery.engine`).
"""

from __future__ import annotations

import copy
import enum
import json
import math
import random
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import phonenumbers

from finstream.domain.resilience import Backoff, ErrorClass, ProviderError, parse_retry_after

# -- errors ----------------------------------------------------------------------


class Feedback(enum.StrEnum):
    """What a provider's answer says about the recipient, for the user's preferences."""

    TOKEN_INVALID = "push_token_invalidated"  # noqa: S105 (not a secret) FCM UNREGISTERED, APNs 410 Unregistered
    PHONE_OPTED_OUT = "phone_opted_out"  # Twilio 21610: the recipient replied STOP


class DeliveryError(ProviderError):
    """A classified delivery failure.

    ``ambiguous``: the provider may have accepted the message (do not resend
    blindly). ``feedback``: what to record in the user's preferences.
    """

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        provider: str = "",
        retry_after: float | None = None,
        status: int | None = None,
        code: str | None = None,
        ambiguous: bool = False,
        feedback: Feedback | None = None,
    ) -> None:
        super().__init__(
            error_class,
            message,
            provider=provider,
            retry_after=retry_after,
            status=status,
            code=code,
        )
        self.ambiguous = ambiguous
        self.feedback = feedback

    @property
    def message_level(self) -> bool:
        """The message itself is undeliverable: no other provider would take it either."""
        return self.error_class in (ErrorClass.INVALID_RECIPIENT, ErrorClass.PERMANENT)

    def detail(self) -> str:
        """The message with its status and code, without provider and class (shown beside)."""
        text = str(self.args[0])
        if self.status is not None:
            text += f" (status {self.status})"
        if self.code:
            text += f" [{self.code}]"
        if self.ambiguous:
            text += " (outcome unknown)"
        return text

    def __str__(self) -> str:
        where = f"{self.provider}: " if self.provider else ""
        return f"{where}{self.error_class.value}: {self.detail()}"


MAX_WAIT_SECONDS = 24 * 3600.0


def throttle_delay(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds to wait from ``Retry-After`` or an ``X-RateLimit-Reset`` epoch (the later).

    ``headers`` must have lower-case names.
    """
    waits: list[float] = []
    after = parse_retry_after(headers.get("retry-after"), now)
    if after is not None:
        waits.append(after)
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            epoch = float(reset.strip())
        except ValueError:
            epoch = math.nan
        if math.isfinite(epoch):
            waits.append(min(max(epoch - now.timestamp(), 0.0), MAX_WAIT_SECONDS))
    return max(waits) if waits else None


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def by_status(
    provider: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
) -> DeliveryError:
    """The class an HTTP status implies when the body says nothing more precise."""
    if status == 429:
        cls = ErrorClass.THROTTLED
    elif status in (401, 403):
        cls = ErrorClass.AUTH
    elif status >= 500 or status in (408, 425):
        cls = ErrorClass.TRANSIENT
    else:
        cls = ErrorClass.PERMANENT
    return DeliveryError(
        cls,
        message,
        provider=provider,
        status=status,
        code=code,
        retry_after=retry_after if cls.retryable else None,
    )


# -- retry schedule -------------------------------------------------------------------


class RetryAction(enum.StrEnum):
    RETRY = "retry"
    FAIL = "fail"
    EXPIRE = "expire"


@dataclass(frozen=True)
class RetryDecision:
    action: RetryAction
    at: datetime | None = None  # when to retry
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed message is tried again, and when it is given up."""

    max_attempts: int = 6
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=300.0))
    max_age: float = 86400.0  # seconds after created_at when no expires_at is given

    def deadline(self, created_at: datetime, expires_at: datetime | None) -> datetime:
        limit = created_at + timedelta(seconds=self.max_age)
        return min(limit, expires_at) if expires_at is not None else limit

    def decide(
        self,
        *,
        attempts: int,
        rounds: int,
        error: ProviderError | None,
        wait_floor: float | None,
        now: datetime,
        deadline: datetime,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """After ``attempts`` provider calls in ``rounds`` scheduled rounds, the last failing.

        ``wait_floor``: the earliest any provider will take a call again
        (Retry-After, a rate-limit reset, an open circuit's cool-down).
        """
        if error is not None and not error.error_class.retryable and not _provider_level(error):
            return RetryDecision(RetryAction.FAIL, reason=f"not retryable: {error}")
        if attempts >= self.max_attempts:
            return RetryDecision(
                RetryAction.FAIL, reason=f"gave up after {attempts} attempts (the maximum)"
            )
        floor = max(wait_floor or 0.0, (error.retry_after or 0.0) if error else 0.0)
        delay = self.backoff.delay(max(rounds, 1), rng, floor=floor)
        at = now + timedelta(seconds=delay)
        if now >= deadline or at > deadline:
            return RetryDecision(
                RetryAction.EXPIRE,
                reason=f"next try at {at.isoformat()} would be past the deadline {deadline.isoformat()}",
            )
        return RetryDecision(RetryAction.RETRY, at=at, reason=f"retry in {delay:.2f}s")


def _provider_level(error: ProviderError) -> bool:
    # AUTH is the provider's problem (credentials, suspended account): another
    # provider, or the same one once fixed, may still deliver the message.
    return error.error_class is ErrorClass.AUTH


def defer_delay(provider_wait: float, rng: random.Random | None = None) -> float:
    """Wait when every provider is closed or rate limited: its wait plus a little jitter."""
    wait = max(provider_wait, 0.05)
    return min(wait + (rng or random).uniform(0, min(1.0, wait * 0.1)), MAX_WAIT_SECONDS)


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


# -- feedback into preferences ---------------------------------------------------------


def apply_feedback(
    preferences: Mapping[str, Any],
    feedback: Feedback,
    recipient: str,
    now: datetime,
    reveal: Callable[[str], str] = str,
) -> dict[str, Any] | None:
    """The user's preferences with the recipient marked; None if nothing changes.

    ``reveal`` opens a sealed contact point (preferences hold them sealed under
    the user's key); the record keeps its tokens, only the flag changes.

    ``updated_at`` only moves forward (at least one microsecond past the
    current record), so the compacted topic and its read models never take the
    update for an older version.
    """
    updated = copy.deepcopy(dict(preferences))
    changed = False
    if feedback is Feedback.TOKEN_INVALID:
        for token in updated.get("push_tokens") or []:
            if reveal(str(token.get("token") or "")) == recipient and not token.get("invalid"):
                token["invalid"] = True
                changed = True
    elif feedback is Feedback.PHONE_OPTED_OUT:
        for phone in updated.get("phones") or []:
            number = reveal(str(phone.get("number") or ""))
            if same_phone(number, recipient) and not phone.get("opted_out"):
                phone["opted_out"] = True
                changed = True
    if not changed:
        return None
    previous = preferences.get("updated_at")
    floor = previous + timedelta(microseconds=1) if isinstance(previous, datetime) else now
    updated["updated_at"] = max(now.astimezone(UTC), floor)
    return updated


# -- dead-letter reason -----------------------------------------------------------------


@dataclass(frozen=True)
class AttemptSummary:
    attempt: int
    provider: str
    status: str
    error_class: str | None
    error: str | None


def dead_letter_reason(verdict: str, attempts: Sequence[AttemptSummary]) -> str:
    """The full story of an undeliverable message, for the dlq.error.message header."""
    lines = [verdict]
    for a in attempts:
        what = f"{a.error_class}: {a.error}" if a.error_class else (a.error or "")
        lines.append(f"#{a.attempt} {a.provider} {a.status} {what}".rstrip())
    return " | ".join(lines)
