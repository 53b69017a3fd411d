"""Contact verification: one-time codes, their digests, attempts, expiry and send limits.

Adding an email address or a phone number gives it an id and sends a
six-digit code to it, through the pipeline itself (a ``verification``
notification for that contact only, critical so that quiet hours do not hold
it). The code is never stored: only an HMAC of it under the platform's token
secret, bound to the user and the contact, so a leaked table cannot be
brute-forced offline. A code expires, allows a few wrong guesses, and a
contact gets only so many codes per hour.

Pure: the caller (``finstream.api.routes.contacts``) reads and writes the
``contact_verifications`` row.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

CODE_DIGITS = 6
SEND_WINDOW = timedelta(hours=1)
VERIFICATION_TEMPLATE = "contact_verification"
VERIFICATION_CATEGORY = "verification"


def new_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def new_contact_id() -> str:
    return f"c-{secrets.token_hex(6)}"


def assign_contact_ids(record: dict[str, Any]) -> dict[str, Any]:
    """Every email address and phone number without an id gets one (in place)."""
    for field in ("emails", "phones"):
        for item in record.get(field) or ():
            if not item.get("id"):
                item["id"] = new_contact_id()
    return record


def code_digest(secret: bytes, user_id: str, contact_id: str, code: str) -> str:
    message = f"verify|{user_id}|{contact_id}|{code}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def code_matches(
    secrets_: list[bytes], digest: str, user_id: str, contact_id: str, code: str
) -> bool:
    """Constant-time, under every configured secret (the first signs; the others still verify)."""
    code = code.strip()
    if len(code) != CODE_DIGITS or not code.isdigit():
        return False
    found = False
    for secret in secrets_:
        found |= hmac.compare_digest(code_digest(secret, user_id, contact_id, code), digest)
    return found


@dataclass(frozen=True)
class Pending:
    """The verification state of one contact (a ``contact_verifications`` row)."""

    code_digest: str
    expires_at: datetime
    attempts: int
    sends: int
    window_start: datetime
    sent_at: datetime
    verified_at: datetime | None = None


class Outcome(StrEnum):
    VERIFIED = "verified"
    WRONG = "wrong_code"
    EXPIRED = "expired"
    EXHAUSTED = "too_many_attempts"
    NO_CODE = "no_code"
    ALREADY = "already_verified"


def check(pending: Pending | None, matches: bool, now: datetime, max_attempts: int) -> Outcome:
    """What a guess does. Wrong guesses count; an exhausted or expired code needs a new one."""
    if pending is None:
        return Outcome.NO_CODE
    if pending.verified_at is not None:
        return Outcome.ALREADY
    if pending.attempts >= max_attempts:
        return Outcome.EXHAUSTED
    if now >= pending.expires_at:
        return Outcome.EXPIRED
    return Outcome.VERIFIED if matches else Outcome.WRONG


@dataclass(frozen=True)
class SendDecision:
    allowed: bool
    sends: int  # codes sent in the window, this one included
    window_start: datetime
    retry_after: float = 0.0  # seconds, when refused


def may_send(pending: Pending | None, now: datetime, per_hour: int) -> SendDecision:
    """Whether another code may go to this contact now (a fixed hourly window per contact)."""
    if pending is None or now - pending.window_start >= SEND_WINDOW:
        return SendDecision(True, 1, now)
    if pending.sends >= per_hour:
        wait = (pending.window_start + SEND_WINDOW - now).total_seconds()
        return SendDecision(False, pending.sends, pending.window_start, max(wait, 1.0))
    return SendDecision(True, pending.sends + 1, pending.window_start)
