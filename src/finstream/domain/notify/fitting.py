"""Fitting rendered text to a channel: SMS segments (GSM-7 or UCS-2) and the
push payload budget, cut at word boundaries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finstream.domain.notify.templates import Limits

_GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = frozenset("^{}\\[~]|€\f")


def truncate(text: str, limit: int, ellipsis: str = "…") -> str:
    """At most ``limit`` characters, cut at a word boundary when one is near."""
    if len(text) <= limit:
        return text
    room = max(limit - len(ellipsis), 0)
    cut = text[:room]
    space = cut.rfind(" ")
    if space >= room * 0.6:
        cut = cut[:space]
    return cut.rstrip() + ellipsis[: max(limit - len(cut.rstrip()), 0)]


def is_gsm7(text: str) -> bool:
    return all(c in _GSM_BASIC or c in _GSM_EXTENDED for c in text)


def sms_units(text: str) -> int:
    """Length in the units segments are counted in (septets for GSM-7, characters for UCS-2)."""
    if is_gsm7(text):
        return sum(2 if c in _GSM_EXTENDED else 1 for c in text)
    return sum(2 if ord(c) > 0xFFFF else 1 for c in text)  # UTF-16 code units


def sms_max_units(text: str, segments: int) -> int:
    if is_gsm7(text):
        return 160 if segments == 1 else 153 * segments
    return 70 if segments == 1 else 67 * segments


def sms_segments(text: str) -> int:
    units = sms_units(text)
    if is_gsm7(text):
        return 1 if units <= 160 else -(-units // 153)
    return 1 if units <= 70 else -(-units // 67)


def fit_sms(text: str, segments: int) -> str:
    """The text within ``segments`` SMS segments, cut with "..." (GSM-7 safe) if longer."""
    if sms_segments(text) <= segments:
        return text
    limit = sms_max_units(text, segments)
    cut = text
    while cut and sms_units(cut + "...") > limit:
        # Shrink by the overflow (at least one character) and retry at a word boundary.
        over = sms_units(cut + "...") - limit
        cut = truncate(cut, max(len(cut) - over, 0), ellipsis="")
    return cut + "..."


def fit_push(
    title: str | None, body: str, data: Mapping[str, str], limits: Limits
) -> tuple[str | None, str, dict[str, str]]:
    """Title, body and data within the push payload budget; data goes first, then body."""
    title = truncate(title, limits.push_title_chars) if title else title
    body = truncate(body, limits.push_body_chars)
    used = len((title or "").encode()) + len(body.encode())
    kept: dict[str, str] = {}
    for key in sorted(data):
        size = len(key.encode()) + len(data[key].encode()) + 6  # JSON quotes, colon, comma
        if used + size > limits.push_payload_bytes:
            continue
        kept[key] = data[key]
        used += size
    while len(body.encode()) + len((title or "").encode()) > limits.push_payload_bytes and body:
        body = truncate(body, max(len(body) - 50, 1))
    return title, body, kept
