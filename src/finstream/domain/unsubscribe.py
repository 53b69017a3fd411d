"""One-click unsubscribe links (RFC 8058): opaque, authenticated, expiring tokens.

A marketing email carries ``List-Unsubscribe: <https://api/v1/unsubscribe/TOKEN>``
and ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The token says
whose subscription to which category it ends and until when it works; it
is sealed (AES-256-GCM under a key derived from the platform's token secret),
so the link reveals nothing (not even the user id) to whoever sees it, and
cannot be forged or altered. A POST of the link opts out without a login.

Pure: the API serves the link, the delivery workers put it in the mail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from finstream.domain.time import from_micros, to_micros

_AAD = b"finstream-unsubscribe-v1"
MAX_TOKEN_CHARS = 600


class Scope(StrEnum):
    CATEGORY = "category"  # this kind of message
    MARKETING = "marketing"  # every marketing message (consent withdrawn)


class InvalidToken(ValueError):
    pass


class ExpiredToken(InvalidToken):
    pass


@dataclass(frozen=True)
class Unsubscribe:
    user_id: str
    category: str
    message_id: str
    expires_at: datetime


def _key(secret: bytes) -> AESGCM:
    return AESGCM(hashlib.sha256(b"finstream-unsubscribe-key|" + secret).digest())


def issue(secret: bytes, user_id: str, category: str, message_id: str, expires_at: datetime) -> str:
    payload = json.dumps(
        {"u": user_id, "c": category, "m": message_id, "e": to_micros(expires_at)},
        separators=(",", ":"),
    ).encode()
    nonce = os.urandom(12)
    blob = nonce + _key(secret).encrypt(nonce, payload, _AAD)
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


def expiry(now: datetime, days: float) -> datetime:
    return now + timedelta(days=days)


def read(secrets: list[bytes], token: str, now: datetime) -> Unsubscribe:
    """The link's content; InvalidToken (forged, altered, another key) or ExpiredToken."""
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken("not an unsubscribe link of ours")
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("not an unsubscribe link of ours") from None
    if len(blob) < 12 + 16:
        raise InvalidToken("not an unsubscribe link of ours")
    for secret in secrets:
        try:
            payload = _key(secret).decrypt(blob[:12], blob[12:], _AAD)
        except InvalidTag:
            continue
        try:
            data = json.loads(payload)
            found = Unsubscribe(
                str(data["u"]), str(data["c"]), str(data["m"]), from_micros(int(data["e"]))
            )
        except (ValueError, KeyError, TypeError):
            raise InvalidToken("malformed unsubscribe link") from None
        if now >= found.expires_at:
            raise ExpiredToken("this unsubscribe link has expired")
        return found
    raise InvalidToken("not an unsubscribe link of ours")
