"""The view of a user's preferences that the router decides with.

:class:`Preferences` is built from a decoded UserPreferences record (the
wire record :func:`~finstream.domain.notify.preferences.parse_preferences`
validates); it answers the router's questions: consent per purpose, usable
contacts per channel, quiet hours and frequency caps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, time
from typing import Any

from finstream.domain.notify.preferences import (
    DEFAULT_LOCALE,
    PreferencesValidationError,
    _zones,
    parse_hhmm,
)


@dataclass(frozen=True)
class CategoryPreference:
    enabled: bool = True
    channels: tuple[str, ...] | None = None
    digest: bool = False


@dataclass(frozen=True)
class QuietWindow:
    days: frozenset[int]
    start: time
    end: time | None  # None: 24:00, the end of the day

    @property
    def overnight(self) -> bool:
        return self.end is not None and self.end <= self.start


@dataclass(frozen=True)
class Cap:
    channel: str | None
    category: str | None
    limit: int
    window_seconds: int

    def applies(self, channel: str, category: str) -> bool:
        return (self.channel is None or self.channel == channel) and (
            self.category is None or self.category == category
        )


@dataclass(frozen=True)
class Contact:
    """One address of a user on one channel (``platform`` for push)."""

    channel: str
    recipient: str
    platform: str | None = None
    contact_id: str | None = None


# Slots: the router keeps the decoded preferences of every user it routes for,
# and an instance dict each (materialized by a copy) was one more long-lived
# object for the collector to walk (bench/RESULTS.md, the router's heap).
@dataclass(frozen=True, slots=True)
class Preferences:
    user_id: str
    locale: str = DEFAULT_LOCALE
    timezone: str = "UTC"
    emails: tuple[dict[str, Any], ...] = ()
    phones: tuple[dict[str, Any], ...] = ()
    push_tokens: tuple[dict[str, Any], ...] = ()
    channels: Mapping[str, bool] = field(default_factory=dict)
    categories: Mapping[str, CategoryPreference] = field(default_factory=dict)
    global_opt_out: bool = False
    consents: Mapping[str, bool] = field(default_factory=dict)  # latest decision per purpose
    quiet_hours: tuple[QuietWindow, ...] = ()
    caps: tuple[Cap, ...] = ()
    known: bool = True  # False: the user has no preferences record (defaults apply)
    updated_at: datetime | None = None  # the record's version: a newer one replaces it

    def with_contacts(self, contacts: Mapping[str, tuple[dict[str, Any], ...]]) -> Preferences:
        """A copy with some of ``emails``, ``phones``, ``push_tokens`` replaced.

        The router opens a user's sealed contacts into a copy for every request
        of a user it has not seen lately; ``dataclasses.replace`` runs
        ``__init__`` over every field and its checks: this copy sets the slots.
        """
        unknown = contacts.keys() - _CONTACT_LISTS
        if unknown:
            raise ValueError(f"not contact lists: {sorted(unknown)}")
        copy = object.__new__(type(self))
        set_ = object.__setattr__
        for name in _FIELDS:
            set_(copy, name, contacts[name] if name in contacts else getattr(self, name))
        return copy

    @classmethod
    def default(cls, user_id: str) -> Preferences:
        return cls(user_id=user_id, known=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Preferences:
        """The view of a decoded UserPreferences record (trusted: it passed the codec)."""
        latest: dict[str, tuple[datetime, bool]] = {}
        for c in record.get("consents") or ():
            prev = latest.get(c["purpose"])
            if prev is None or c["at"] >= prev[0]:
                latest[c["purpose"]] = (c["at"], bool(c["granted"]))
        windows = []
        for w in record.get("quiet_hours") or ():
            try:
                start = parse_hhmm(w["start"], "start")
                end = parse_hhmm(w["end"], "end", allow_24=True)
            except PreferencesValidationError:
                continue  # written by something that skipped validation; ignore the window
            if start is None or start == end:
                continue
            windows.append(QuietWindow(frozenset(d for d in w["days"] if 1 <= d <= 7), start, end))
        timezone = record.get("timezone") or "UTC"
        if timezone not in _zones():
            timezone = "UTC"
        return cls(
            user_id=record["user_id"],
            locale=record.get("locale") or DEFAULT_LOCALE,
            timezone=timezone,
            emails=tuple(record.get("emails") or ()),
            phones=tuple(record.get("phones") or ()),
            push_tokens=tuple(record.get("push_tokens") or ()),
            channels={k.lower(): bool(v) for k, v in (record.get("channels") or {}).items()},
            categories={
                name: CategoryPreference(
                    enabled=bool(p.get("enabled", True)),
                    channels=None
                    if p.get("channels") is None
                    else tuple(c.lower() for c in p["channels"]),
                    digest=bool(p.get("digest", False)),
                )
                for name, p in (record.get("categories") or {}).items()
            },
            global_opt_out=bool(record.get("global_opt_out", False)),
            consents={purpose: granted for purpose, (_, granted) in latest.items()},
            quiet_hours=tuple(windows),
            caps=tuple(
                Cap(c.get("channel"), c.get("category"), int(c["limit"]), int(c["window_seconds"]))
                for c in record.get("caps") or ()
                if int(c["limit"]) > 0 and int(c["window_seconds"]) > 0
            ),
            updated_at=record.get("updated_at"),
        )

    def consent(self, purpose: str) -> bool | None:
        """The user's latest decision for a purpose; None when never asked."""
        return self.consents.get(purpose)

    def contacts(self, channel: str, only: str | None = None) -> tuple[list[Contact], str | None]:
        """Usable contacts on a channel, or none and the reason why.

        ``only``: just the contact with this id, verified or not (a verification
        code goes to the address being verified); never one that bounced,
        complained or opted out.
        """
        if only is not None:
            return self._contact(channel, only)
        if channel == "inapp":
            return [Contact("inapp", self.user_id)], None
        if channel == "email":
            verified = [e for e in self.emails if e.get("verified")]
            usable = [e for e in verified if _deliverable(e)]
            if not usable:
                if not verified:
                    return [], "no verified email address"
                # The audit trail says why mail stopped: what the provider reported.
                causes = [c for c in ("bounced", "complained") if any(e.get(c) for e in verified)]
                return [], f"every verified email address {' or '.join(causes)}"
            return [Contact("email", e["address"], None, e.get("id")) for e in usable], None
        if channel == "sms":
            usable = [p for p in self.phones if p.get("verified") and not p.get("opted_out")]
            if not usable:
                return [], "no verified phone number that has not opted out"
            return [Contact("sms", p["number"], None, p.get("id")) for p in usable], None
        if channel == "push":
            usable = [t for t in self.push_tokens if not t.get("invalid")]
            if not usable:
                return [], "no valid push token"
            return [Contact("push", t["token"], str(t["platform"])) for t in usable], None
        return [], f"unknown channel {channel}"

    def contact_channel(self, contact_id: str) -> str | None:
        """The channel of the email address or phone number with this id."""
        if any(e.get("id") == contact_id for e in self.emails):
            return "email"
        if any(p.get("id") == contact_id for p in self.phones):
            return "sms"
        return None

    def _contact(self, channel: str, contact_id: str) -> tuple[list[Contact], str | None]:
        if channel == "email":
            for e in self.emails:
                if e.get("id") == contact_id:
                    if not _deliverable(e):
                        return [], f"contact {contact_id} bounced or complained"
                    return [Contact("email", e["address"], None, contact_id)], None
        elif channel == "sms":
            for p in self.phones:
                if p.get("id") == contact_id:
                    if p.get("opted_out"):
                        return [], f"contact {contact_id} opted out"
                    return [Contact("sms", p["number"], None, contact_id)], None
        return [], f"no {channel} contact {contact_id}"


_FIELDS = tuple(f.name for f in fields(Preferences))
# The contact list each channel addresses (in-app messages need none).
CHANNEL_CONTACTS: Mapping[str, str] = {"email": "emails", "sms": "phones", "push": "push_tokens"}
_CONTACT_LISTS = frozenset(CHANNEL_CONTACTS.values())


def _deliverable(email: Mapping[str, Any]) -> bool:
    return not email.get("bounced") and not email.get("complained")
