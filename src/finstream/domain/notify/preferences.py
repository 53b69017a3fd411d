"""Users' notification preferences: validation and normalization of the wire record.

:func:`parse_preferences` turns what a client sent (the API's PUT/PATCH body,
``finstream prefs set``) into a record for ``schemas/UserPreferences.avsc``,
or raises :class:`PreferencesValidationError` naming the first offending field
(``phones[0].number``, ``quiet_hours[1].start``, ...). It accepts its own
output, so a PATCH can merge onto a stored record and parse the result again.

Normalization: phone numbers to E.164 (``phonenumbers``), email domains to
lower case, channel names to ``email|push|sms|inapp``, push platforms to
``FCM|APNS``, locales to ``ll`` or ``ll-RR``, quiet-hour days sorted.
``updated_at`` is always ``now``: the record is a new version.

The read-only view the router decides with, :class:`Preferences`, is in
:mod:`finstream.domain.notify.preferences_view`.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any

import phonenumbers

CHANNELS: tuple[str, ...] = ("email", "push", "sms", "inapp")
PUSH_PLATFORMS: tuple[str, ...] = ("FCM", "APNS")
# Languages the platform supports; a region variant (de-AT) is accepted and
# templates fall back from it to the language, then to the default locale.
LANGUAGES: frozenset[str] = frozenset(
    {"en", "de", "fr", "es", "it", "nl", "pt", "pl", "sv", "da", "fi", "nb", "ja", "zh", "ko"}
)
DEFAULT_LOCALE = "en"

MAX_EMAILS = 10
MAX_PHONES = 10
MAX_PUSH_TOKENS = 50
MAX_CATEGORIES = 100
MAX_CONSENTS = 200
MAX_QUIET_WINDOWS = 28
MAX_CAPS = 50
MAX_CAP_WINDOW_SECONDS = 31 * 86_400
MAX_CAP_LIMIT = 100_000
MAX_TOKEN_CHARS = 4096
MAX_USER_ID_CHARS = 200
# A consent "given" a little in the future is clock skew; much later is a bug.
CONSENT_CLOCK_SKEW = timedelta(minutes=5)

_FIELDS = frozenset(
    {
        "user_id",
        "locale",
        "timezone",
        "emails",
        "phones",
        "push_tokens",
        "channels",
        "categories",
        "global_opt_out",
        "consents",
        "quiet_hours",
        "caps",
        "updated_at",
    }
)
_SLUG = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_LOCALE = re.compile(r"^([a-zA-Z]{2})(?:[-_]([a-zA-Z]{2}))?$")
_EMAIL_LOCAL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$"
)
_DOMAIN_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_TLD = re.compile(r"^(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})$")


class PreferencesValidationError(ValueError):
    """Invalid preferences; ``field`` is the path of the offending value."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = f"{field}: {message}"
        super().__init__(self.message)


# -- small validators -----------------------------------------------------------------


def _fail(path: str, message: str) -> PreferencesValidationError:
    return PreferencesValidationError(path, message)


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, "must be an object")
    return value


def _list(value: Any, path: str, limit: int) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise _fail(path, "must be a list")
    if len(value) > limit:
        raise _fail(path, f"at most {limit} entries")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "must be true or false")
    return value


def _str(value: Any, path: str, max_len: int = 200) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "must be a non-empty string")
    if len(value) > max_len:
        raise _fail(path, f"at most {max_len} characters")
    return value.strip()


def _int(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, "must be an integer")
    if not low <= value <= high:
        raise _fail(path, f"must be between {low} and {high}")
    return value


def _no_unknown(obj: Mapping[str, Any], allowed: set[str] | frozenset[str], path: str) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _fail(where, "unknown field")


def _slug(value: Any, path: str, what: str) -> str:
    if not isinstance(value, str) or not _SLUG.match(value):
        raise _fail(path, f"{what} must be lower case letters, digits, '_', '.' or '-'")
    return value


def channel_name(value: Any, path: str) -> str:
    """A channel name normalized to lower case, or an error naming ``path``."""
    if isinstance(value, str) and value.lower() in CHANNELS:
        return value.lower()
    raise _fail(path, f"unknown channel {value!r}; expected one of {', '.join(CHANNELS)}")


def validate_email(value: Any, path: str = "email") -> str:
    text = _str(value, path, 254)
    local, sep, domain = text.rpartition("@")
    if not sep or not local or len(local) > 64 or not _EMAIL_LOCAL.match(local):
        raise _fail(path, "not a valid email address")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise _fail(path, "not a valid email address (domain)")
    if not _TLD.match(labels[-1]):
        raise _fail(path, "not a valid email address (top-level domain)")
    return f"{local}@{domain.lower()}"


def validate_phone(value: Any, path: str = "phone") -> str:
    """An E.164 number (``+`` and country code required), normalized."""
    text = _str(value, path, 40)
    if not text.startswith("+"):
        raise _fail(path, "must be in E.164 form, starting with + and the country code")
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise _fail(path, "not a valid E.164 phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise _fail(path, "not a valid E.164 phone number")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones()) | {"UTC"}


def validate_timezone(value: Any, path: str = "timezone") -> str:
    if not isinstance(value, str) or value not in _zones():
        raise _fail(path, f"unknown IANA time zone {value!r}")
    return value


def validate_locale(value: Any, path: str = "locale") -> str:
    match = _LOCALE.match(value) if isinstance(value, str) else None
    if match is None or match.group(1).lower() not in LANGUAGES:
        raise _fail(path, f"unknown locale {value!r}; languages: {', '.join(sorted(LANGUAGES))}")
    lang = match.group(1).lower()
    return f"{lang}-{match.group(2).upper()}" if match.group(2) else lang


def parse_hhmm(value: Any, path: str, *, allow_24: bool = False) -> time | None:
    """HH:MM as a time; ``24:00`` (end of day) is None when allowed."""
    if allow_24 and value == "24:00":
        return None
    match = _HHMM.match(value) if isinstance(value, str) else None
    if match is None:
        raise _fail(path, "must be a local time HH:MM (00:00 to 23:59)")
    return time(int(match.group(1)), int(match.group(2)))


def _timestamp(value: Any, path: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _fail(path, "must be an ISO-8601 timestamp") from None
    if not isinstance(value, datetime):
        raise _fail(path, "must be an ISO-8601 timestamp")
    if value.tzinfo is None:
        raise _fail(path, "must carry a time zone offset")
    return value.astimezone(UTC)


# -- sections -----------------------------------------------------------------------


def _emails(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(_list(value, "emails", MAX_EMAILS)):
        path = f"emails[{i}]"
        item = _mapping({"address": raw} if isinstance(raw, str) else raw, path)
        _no_unknown(item, {"address", "verified", "bounced", "id", "complained"}, path)
        address = validate_email(item.get("address"), f"{path}.address")
        if address.lower() in seen:
            raise _fail(f"{path}.address", "duplicate address")
        seen.add(address.lower())
        out.append(
            {
                "address": address,
                "verified": _bool(item.get("verified", False), f"{path}.verified"),
                "bounced": _bool(item.get("bounced", False), f"{path}.bounced"),
                "id": _contact_id(item.get("id"), f"{path}.id"),
                "complained": _bool(item.get("complained", False), f"{path}.complained"),
            }
        )
    return out


def _phones(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(_list(value, "phones", MAX_PHONES)):
        path = f"phones[{i}]"
        item = _mapping({"number": raw} if isinstance(raw, str) else raw, path)
        _no_unknown(item, {"number", "verified", "opted_out", "id"}, path)
        number = validate_phone(item.get("number"), f"{path}.number")
        if number in seen:
            raise _fail(f"{path}.number", "duplicate number")
        seen.add(number)
        out.append(
            {
                "number": number,
                "verified": _bool(item.get("verified", False), f"{path}.verified"),
                "opted_out": _bool(item.get("opted_out", False), f"{path}.opted_out"),
                "id": _contact_id(item.get("id"), f"{path}.id"),
            }
        )
    return out


_CONTACT_ID = re.compile(r"^[a-z][a-z0-9_-]{2,39}$")


def _contact_id(value: Any, path: str) -> str | None:
    """A contact's stable id (the platform assigns it); None until it has one."""
    if value is None:
        return None
    if not isinstance(value, str) or not _CONTACT_ID.match(value):
        raise _fail(path, "must be a contact id like c-1a2b3c4d5e6f")
    return value


def _unique_ids(emails: list[dict[str, Any]], phones: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for label, items in (("emails", emails), ("phones", phones)):
        for i, item in enumerate(items):
            cid = item.get("id")
            if cid is not None:
                if cid in seen:
                    raise _fail(f"{label}[{i}].id", "duplicate contact id")
                seen.add(cid)


def _push_tokens(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(_list(value, "push_tokens", MAX_PUSH_TOKENS)):
        path = f"push_tokens[{i}]"
        item = _mapping(raw, path)
        _no_unknown(item, {"platform", "token", "app", "invalid"}, path)
        platform = item.get("platform")
        if not isinstance(platform, str) or platform.upper() not in PUSH_PLATFORMS:
            raise _fail(f"{path}.platform", "must be FCM or APNS")
        token = _str(item.get("token"), f"{path}.token", MAX_TOKEN_CHARS)
        if any(c.isspace() for c in token):
            raise _fail(f"{path}.token", "must not contain whitespace")
        if (platform.upper(), token) in seen:
            raise _fail(f"{path}.token", "duplicate token")
        seen.add((platform.upper(), token))
        app = item.get("app")
        out.append(
            {
                "platform": platform.upper(),
                "token": token,
                "app": None if app is None else _str(app, f"{path}.app"),
                "invalid": _bool(item.get("invalid", False), f"{path}.invalid"),
            }
        )
    return out


def _channels(value: Any) -> dict[str, bool]:
    obj = _mapping(value, "channels")
    out: dict[str, bool] = {}
    for key, flag in obj.items():
        name = channel_name(key, f"channels.{key}")
        out[name] = _bool(flag, f"channels.{key}")
    return out


def _categories(value: Any) -> dict[str, dict[str, Any]]:
    obj = _mapping(value, "categories")
    if len(obj) > MAX_CATEGORIES:
        raise _fail("categories", f"at most {MAX_CATEGORIES} entries")
    out: dict[str, dict[str, Any]] = {}
    for name, raw in obj.items():
        path = f"categories.{name}"
        _slug(name, path, "a category name")
        pref = _mapping(raw, path)
        _no_unknown(pref, {"enabled", "channels", "digest"}, path)
        channels = pref.get("channels")
        if channels is not None:
            names = [
                channel_name(c, f"{path}.channels[{i}]")
                for i, c in enumerate(_list(channels, f"{path}.channels", len(CHANNELS) * 2))
            ]
            channels = [c for c in CHANNELS if c in names]
        out[name] = {
            "enabled": _bool(pref.get("enabled", True), f"{path}.enabled"),
            "channels": channels,
            "digest": _bool(pref.get("digest", False), f"{path}.digest"),
        }
    return out


def _consents(value: Any, now: datetime, default_source: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(_list(value, "consents", MAX_CONSENTS)):
        path = f"consents[{i}]"
        item = _mapping(raw, path)
        _no_unknown(item, {"purpose", "granted", "at", "source"}, path)
        if "granted" not in item:
            raise _fail(f"{path}.granted", "is required")
        at = _timestamp(item["at"], f"{path}.at") if item.get("at") is not None else now
        if at > now + CONSENT_CLOCK_SKEW:
            raise _fail(f"{path}.at", "is in the future")
        out.append(
            {
                "purpose": _slug(item.get("purpose"), f"{path}.purpose", "a consent purpose"),
                "granted": _bool(item["granted"], f"{path}.granted"),
                "at": at,
                "source": _str(item.get("source", default_source), f"{path}.source", 100),
            }
        )
    return out


def _quiet_hours(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(_list(value, "quiet_hours", MAX_QUIET_WINDOWS)):
        path = f"quiet_hours[{i}]"
        item = _mapping(raw, path)
        _no_unknown(item, {"days", "start", "end"}, path)
        days_in = _list(item.get("days", [1, 2, 3, 4, 5, 6, 7]), f"{path}.days", 7)
        if not days_in:
            raise _fail(f"{path}.days", "must name at least one ISO weekday (1-7)")
        days = sorted({_int(d, f"{path}.days[{j}]", 1, 7) for j, d in enumerate(days_in)})
        if len(days) != len(days_in):
            raise _fail(f"{path}.days", "duplicate weekday")
        start = item.get("start")
        end = item.get("end")
        parse_hhmm(start, f"{path}.start")
        parse_hhmm(end, f"{path}.end", allow_24=True)
        if start == end:
            raise _fail(f"{path}.end", "must differ from start (use 00:00-24:00 for a whole day)")
        out.append({"days": days, "start": start, "end": end})
    return out


def _caps(value: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(_list(value, "caps", MAX_CAPS)):
        path = f"caps[{i}]"
        item = _mapping(raw, path)
        _no_unknown(item, {"channel", "category", "limit", "window_seconds"}, path)
        channel = item.get("channel")
        category = item.get("category")
        if "limit" not in item:
            raise _fail(f"{path}.limit", "is required")
        if "window_seconds" not in item:
            raise _fail(f"{path}.window_seconds", "is required")
        out.append(
            {
                "channel": None if channel is None else channel_name(channel, f"{path}.channel"),
                "category": None
                if category is None
                else _slug(category, f"{path}.category", "a category name"),
                "limit": _int(item["limit"], f"{path}.limit", 1, MAX_CAP_LIMIT),
                "window_seconds": _int(
                    item["window_seconds"], f"{path}.window_seconds", 1, MAX_CAP_WINDOW_SECONDS
                ),
            }
        )
    return out


def parse_preferences(
    data: Mapping[str, Any], *, now: datetime, consent_source: str = "api"
) -> dict[str, Any]:
    """Validate and normalize preferences into a UserPreferences record.

    ``now`` (timezone-aware) becomes ``updated_at`` and the time of consents
    given without one; ``consent_source`` is their source when not given.
    Raises :class:`PreferencesValidationError` naming the offending field.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    obj = _mapping(data, "preferences")
    _no_unknown(obj, _FIELDS, "")
    user_id = _str(obj.get("user_id"), "user_id", MAX_USER_ID_CHARS)
    if user_id != obj.get("user_id"):
        raise _fail("user_id", "must not have leading or trailing spaces")
    emails = _emails(obj.get("emails", []))
    phones = _phones(obj.get("phones", []))
    _unique_ids(emails, phones)
    return {
        "user_id": user_id,
        "locale": validate_locale(obj.get("locale", DEFAULT_LOCALE)),
        "timezone": validate_timezone(obj.get("timezone", "UTC")),
        "emails": emails,
        "phones": phones,
        "push_tokens": _push_tokens(obj.get("push_tokens", [])),
        "channels": _channels(obj.get("channels", {})),
        "categories": _categories(obj.get("categories", {})),
        "global_opt_out": _bool(obj.get("global_opt_out", False), "global_opt_out"),
        "consents": _consents(obj.get("consents", []), now, consent_source),
        "quiet_hours": _quiet_hours(obj.get("quiet_hours", [])),
        "caps": _caps(obj.get("caps", [])),
        "updated_at": now,
    }
