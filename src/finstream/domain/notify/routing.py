"""The routing policy: which channels, now or later, once — pure and deterministic.

For one request, one user's preferences and that user's routing state, at
one instant, :func:`decide` returns what to do. In order:

1. **duplicate** — the request id was seen within the dedupe window;
2. **expired** — ``expires_at`` has passed (also checked again on release);
3. **collapsed** — another request with the same collapse key went out (or
   is held, or was digested) within the collapse window;
4. **scheduled** — ``deliver_at`` is in the future: held whole until then;
5. channels: the request's override, else the user's channels for the
   category, else the category's defaults; a request override is narrowed by
   the user's own choice for the category; then, per channel, the user's
   channel opt-out, channel consent (SMS), and a usable contact;
   **suppressed** when the user opted out globally or of the category, lacks
   the category's consent (marketing), or no channel is left;
6. **digested** — low priority in a category the user digests;
7. frequency caps (rolling windows): what exceeds a cap is **digested** when
   the user digests the category, else those channels are **suppressed**;
8. quiet hours: channels that interrupt (email, push, SMS by default) are
   **scheduled** for the next allowed moment; the others are **routed** now.

Critical requests skip 6-8 (they break quiet hours and caps) but never 5:
consent, opt-outs and a global opt-out always win. A released hold runs
2 and 5-8 again (preferences may have changed while it waited).

:func:`apply` records an outcome in the user's state once its messages are
composed (a request that fails to render is not marked seen, so that a
redriven copy after a template fix is not taken for a duplicate).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from finstream.domain.envelope import mask_recipient
from finstream.domain.notify import caps as caps_
from finstream.domain.notify.digest import DigestBuffer
from finstream.domain.notify.fitting import fit_push
from finstream.domain.notify.ids import outbound_message_id
from finstream.domain.notify.preferences import CHANNELS, Contact, Preferences
from finstream.domain.notify.quiet_hours import is_quiet, next_allowed
from finstream.domain.notify.templates import ChannelNotAvailable, Rendered, Templates
from finstream.domain.time import to_micros


class Action(StrEnum):
    ROUTED = "routed"
    SCHEDULED = "scheduled"
    SUPPRESSED = "suppressed"
    DIGESTED = "digested"
    DROPPED = "dropped"
    DUPLICATE = "duplicate"
    COLLAPSED = "collapsed"
    EXPIRED = "expired"


PRIORITIES = ("CRITICAL", "HIGH", "NORMAL", "LOW")
# Request data ends up in every outbound message; keep them well inside Kafka's 1 MB.
MAX_DATA_BYTES = 64 * 1024


@dataclass(frozen=True)
class CategoryPolicy:
    channels: tuple[str, ...]
    transactional: bool = True
    consent: str | None = None  # a purpose the user must have granted


DEFAULT_CATEGORIES: Mapping[str, CategoryPolicy] = {
    "security": CategoryPolicy(("email", "push", "sms", "inapp")),
    "account": CategoryPolicy(("email", "inapp")),
    "price_alert": CategoryPolicy(("push", "inapp")),
    "digest": CategoryPolicy(("email", "inapp")),
    "marketing": CategoryPolicy(
        ("email", "push", "inapp"), transactional=False, consent="marketing"
    ),
    "product": CategoryPolicy(("email", "inapp"), transactional=False, consent="marketing"),
    # One-time codes to a contact being verified (the request names it: contact_id).
    "verification": CategoryPolicy(("email", "sms")),
}


@dataclass(frozen=True)
class Policy:
    categories: Mapping[str, CategoryPolicy] = field(default_factory=lambda: DEFAULT_CATEGORIES)
    fallback: CategoryPolicy = CategoryPolicy(("inapp",))
    # Channels that need the user's consent for a purpose, whatever the category.
    channel_consent: Mapping[str, str] = field(default_factory=lambda: {"sms": "sms"})
    quiet_channels: frozenset[str] = frozenset({"email", "push", "sms"})
    dedupe_seconds: float = 86_400.0
    collapse_seconds: float = 60.0
    digest_seconds: float = 3_600.0
    digest_max_items: int = 20
    max_seen: int = 2_000

    def category(self, name: str) -> CategoryPolicy:
        return self.categories.get(name, self.fallback)


# -- requests ------------------------------------------------------------------------


class InvalidRequest(ValueError):
    """A decodable request that cannot be routed (names the field)."""


@dataclass(frozen=True)
class Request:
    record: dict[str, Any]
    request_id: str
    user_id: str
    category: str
    priority: str
    template: str
    data: dict[str, str]
    channels: tuple[str, ...]
    deliver_at: datetime | None
    expires_at: datetime | None
    collapse_key: str | None
    correlation_id: str | None
    contact_id: str | None = None  # send to this contact only, verified or not

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Request:
        for name in ("request_id", "user_id", "category", "template"):
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequest(f"{name}: must be a non-empty string")
            if len(value) > 200:
                raise InvalidRequest(f"{name}: at most 200 characters")
        priority = str(record.get("priority") or "NORMAL")
        if priority not in PRIORITIES:
            raise InvalidRequest(f"priority: unknown {priority!r}")
        data = record.get("data") or {}
        size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
        if size > MAX_DATA_BYTES:
            raise InvalidRequest(f"data: {size} bytes, at most {MAX_DATA_BYTES}")
        channels = tuple(str(c).lower() for c in record.get("channels") or ())
        for c in channels:
            if c not in CHANNELS:
                raise InvalidRequest(f"channels: unknown channel {c!r}")
        return cls(
            record=record,
            request_id=record["request_id"],
            user_id=record["user_id"],
            category=record["category"],
            priority=priority,
            template=record["template"],
            data=dict(data),
            channels=tuple(c for c in CHANNELS if c in channels),
            deliver_at=record.get("deliver_at"),
            expires_at=record.get("expires_at"),
            collapse_key=record.get("collapse_key") or None,
            correlation_id=record.get("correlation_id"),
            contact_id=record.get("contact_id") or None,
        )

    @property
    def critical(self) -> bool:
        return self.priority == "CRITICAL"

    def with_channels(self, channels: Sequence[str]) -> dict[str, Any]:
        """The record narrowed to some channels (a hold releases only what it held)."""
        return {**self.record, "channels": [c.upper() for c in CHANNELS if c in channels]}


# -- per-user state ------------------------------------------------------------------------


HELD = "held"
DONE = "done"


@dataclass
class UserState:
    """What the router remembers about one user between requests (its state store value)."""

    seen: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (status, until)
    collapse: dict[str, float] = field(default_factory=dict)  # key -> until (epoch s)
    sends: caps_.SendLog = field(default_factory=caps_.SendLog)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "seen": {k: [s, round(u, 3)] for k, (s, u) in self.seen.items()},
                "collapse": {k: round(u, 3) for k, u in self.collapse.items()},
                "sends": [[round(t, 3), ch, cat] for t, ch, cat in self.sends.entries],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> UserState:
        if not raw:
            return cls()
        obj = json.loads(raw)
        return cls(
            seen={k: (str(v[0]), float(v[1])) for k, v in obj.get("seen", {}).items()},
            collapse={k: float(v) for k, v in obj.get("collapse", {}).items()},
            sends=caps_.SendLog([(float(t), str(c), str(k)) for t, c, k in obj.get("sends", [])]),
        )

    def copy(self) -> UserState:
        """An independent copy (a batch changes its copy; the stored one stays as committed)."""
        return UserState(
            dict(self.seen), dict(self.collapse), caps_.SendLog(list(self.sends.entries))
        )

    def prune(self, now: float, prefs: Preferences, max_seen: int) -> None:
        self.seen = {k: v for k, v in self.seen.items() if v[0] == HELD or v[1] > now}
        if len(self.seen) > max_seen:
            # Forget the done ones that expire first; held ones stay until released.
            done = sorted((v[1], k) for k, v in self.seen.items() if v[0] != HELD)
            for _, key in done[: len(self.seen) - max_seen]:
                del self.seen[key]
        self.collapse = {k: u for k, u in self.collapse.items() if u > now}
        self.sends.prune(now, prefs.caps)


@dataclass
class Hold:
    request_id: str
    due: int  # epoch micros
    reason: str
    request: bytes  # the NotificationRequest (Avro), narrowed to the held channels
    bypass_caps: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "due": self.due,
            "reason": self.reason,
            "request": base64.b64encode(self.request).decode(),
            "bypass_caps": self.bypass_caps,
        }

    @classmethod
    def from_json(cls, request_id: str, raw: dict[str, Any]) -> Hold:
        return cls(
            request_id,
            int(raw["due"]),
            str(raw["reason"]),
            base64.b64decode(raw["request"]),
            bool(raw.get("bypass_caps", False)),
        )


@dataclass
class Holds:
    """A user's held requests and open digests: everything released by time."""

    requests: dict[str, Hold] = field(default_factory=dict)
    digests: dict[str, DigestBuffer] = field(default_factory=dict)

    def next_due(self) -> int | None:
        dues = [h.due for h in self.requests.values()] + [d.due for d in self.digests.values()]
        return min(dues) if dues else None

    def empty(self) -> bool:
        return not self.requests and not self.digests

    def copy(self) -> Holds:
        """An independent copy (digests are changed in place by :func:`digest.fold`)."""
        return Holds(dict(self.requests), {k: d.copy() for k, d in self.digests.items()})

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "requests": {k: h.to_json() for k, h in self.requests.items()},
                "digests": {k: d.to_json() for k, d in self.digests.items()},
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Holds:
        if not raw:
            return cls()
        obj = json.loads(raw)
        return cls(
            requests={k: Hold.from_json(k, v) for k, v in obj.get("requests", {}).items()},
            digests={k: DigestBuffer.from_json(v) for k, v in obj.get("digests", {}).items()},
        )


# -- decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str | None = None
    channels: tuple[str, ...] = ()
    release_at: datetime | None = None


@dataclass
class Outcome:
    decisions: list[Decision]
    send: tuple[str, ...] = ()
    hold: tuple[str, ...] = ()  # channels held (empty with hold_all: the whole request)
    hold_all: bool = False
    release_at: datetime | None = None
    hold_reason: str | None = None
    digest: bool = False
    skipped: dict[str, str] = field(default_factory=dict)  # channel -> why it was left out

    @property
    def final(self) -> Action:
        return self.decisions[-1].action


def select_channels(
    request: Request, prefs: Preferences, policy: Policy
) -> tuple[tuple[str, ...], dict[str, str], str | None]:
    """(channels, skipped channel -> reason, reason the whole request is blocked)."""
    if prefs.global_opt_out:
        return (), {}, "user opted out of all notifications"
    category = policy.category(request.category)
    user_cat = prefs.categories.get(request.category)
    if user_cat is not None and not user_cat.enabled:
        return (), {}, f"user opted out of category {request.category}"
    if category.consent is not None and prefs.consent(category.consent) is not True:
        state = "withdrawn" if prefs.consent(category.consent) is False else "not given"
        return (), {}, f"consent for {category.consent} {state}"
    skipped: dict[str, str] = {}
    if request.contact_id is not None:
        # A request for one contact (a verification code) goes to its channel only.
        target = prefs.contact_channel(request.contact_id)
        if target is None:
            return (), {}, f"no contact {request.contact_id}"
        candidates = [target]
    elif request.channels:
        candidates = list(request.channels)
        if user_cat is not None and user_cat.channels is not None:
            for c in candidates:
                if c not in user_cat.channels:
                    skipped[c] = f"user does not want {request.category} on {c}"
            candidates = [c for c in candidates if c in user_cat.channels]
    elif user_cat is not None and user_cat.channels is not None:
        candidates = list(user_cat.channels)
    else:
        candidates = list(category.channels)
    chosen: list[str] = []
    for c in CHANNELS:
        if c not in candidates:
            continue
        if prefs.channels.get(c) is False:
            skipped[c] = f"user opted out of {c}"
            continue
        purpose = policy.channel_consent.get(c)
        if purpose is not None and prefs.consent(purpose) is not True:
            skipped[c] = f"no consent for {purpose}"
            continue
        contacts, why = prefs.contacts(c, only=request.contact_id)
        if not contacts:
            skipped[c] = why or f"no {c} contact"
            continue
        chosen.append(c)
    return tuple(chosen), skipped, None


def decide(
    request: Request,
    prefs: Preferences,
    state: UserState,
    now: datetime,
    policy: Policy,
    *,
    release: bool = False,
    bypass_caps: bool = False,
) -> Outcome:
    """What to do with one request now (no side effects; see :func:`apply`)."""
    now_s = now.timestamp()
    if not release:
        seen = state.seen.get(request.request_id)
        if seen is not None and (seen[0] == HELD or seen[1] > now_s):
            return Outcome([Decision(Action.DUPLICATE, f"request id already {seen[0]}")])
    if request.expires_at is not None and request.expires_at <= now:
        return Outcome([Decision(Action.EXPIRED, f"expired at {request.expires_at.isoformat()}")])
    if not release:
        key = request.collapse_key
        if key is not None and state.collapse.get(key, 0.0) > now_s:
            return Outcome(
                [Decision(Action.COLLAPSED, f"collapse key {key} already sent in its window")]
            )
        if request.deliver_at is not None and request.deliver_at > now:
            return Outcome(
                [
                    Decision(
                        Action.SCHEDULED,
                        "deliver_at",
                        request.channels,
                        request.deliver_at,
                    )
                ],
                hold_all=True,
                release_at=request.deliver_at,
                hold_reason="deliver_at",
            )
    channels, skipped, blocked = select_channels(request, prefs, policy)
    if blocked is not None:
        return Outcome([Decision(Action.SUPPRESSED, blocked)], skipped=skipped)
    if not channels:
        return Outcome(
            [Decision(Action.SUPPRESSED, "no channel left for this user")], skipped=skipped
        )
    user_cat = prefs.categories.get(request.category)
    digests = user_cat is not None and user_cat.digest
    if not request.critical and digests and request.priority == "LOW" and not bypass_caps:
        return Outcome(
            [Decision(Action.DIGESTED, "low priority in a digested category", channels)],
            digest=True,
            skipped=skipped,
        )
    if not request.critical and not bypass_caps and prefs.caps:
        over = caps_.exceeded(prefs.caps, state.sends, now_s, channels, request.category)
        if over:
            first = next(iter(over.values()))
            reason = f"frequency cap {first.limit} per {first.window_seconds}s"
            if digests:
                return Outcome(
                    [Decision(Action.DIGESTED, reason, channels)], digest=True, skipped=skipped
                )
            for c, cap in over.items():
                skipped[c] = f"frequency cap {cap.limit} per {cap.window_seconds}s"
            channels = tuple(c for c in channels if c not in over)
            if not channels:
                return Outcome([Decision(Action.SUPPRESSED, reason)], skipped=skipped)
    held: tuple[str, ...] = ()
    release_at = None
    if not request.critical and prefs.quiet_hours:
        quiet = tuple(c for c in channels if c in policy.quiet_channels)
        if quiet and is_quiet(prefs.quiet_hours, prefs.timezone, now):
            release_at = next_allowed(prefs.quiet_hours, prefs.timezone, now)
            if release_at is None:
                for c in quiet:
                    skipped[c] = "quiet hours cover the whole week"
            else:
                held = quiet
            channels = tuple(c for c in channels if c not in quiet)
    decisions: list[Decision] = []
    if channels:
        decisions.append(Decision(Action.ROUTED, "released" if release else None, channels))
    if held:
        decisions.append(Decision(Action.SCHEDULED, "quiet_hours", held, release_at))
    if not decisions:
        return Outcome(
            [Decision(Action.SUPPRESSED, "no channel left for this user")], skipped=skipped
        )
    return Outcome(
        decisions,
        send=channels,
        hold=held,
        release_at=release_at if held else None,
        hold_reason="quiet_hours" if held else None,
        skipped=skipped,
    )


def remember(
    outcome: Outcome,
    request: Request,
    state: UserState,
    now: datetime,
    policy: Policy,
    *,
    sent: Sequence[str],
) -> None:
    """Record in the user's state what was done: seen, collapse window, sends for caps.

    ``sent`` are the channels messages actually went out on.
    """
    now_s = now.timestamp()
    action = outcome.final
    if action in (Action.DUPLICATE, Action.EXPIRED, Action.COLLAPSED, Action.DROPPED):
        return
    held = outcome.hold_all or bool(outcome.hold)
    if held:
        assert outcome.release_at is not None
        until = max(outcome.release_at.timestamp(), now_s) + policy.dedupe_seconds
        state.seen[request.request_id] = (HELD, until)
    else:
        state.seen[request.request_id] = (DONE, now_s + policy.dedupe_seconds)
    if request.collapse_key and action is not Action.SUPPRESSED:
        state.collapse.setdefault(request.collapse_key, now_s + policy.collapse_seconds)
    if sent:
        state.sends.record(now_s, sent, request.category)


# -- composing the outbound messages ---------------------------------------------------------


def contact_hash(recipient: str) -> str:
    """A stable, non-reversible stand-in for a contact in logs and audit details."""
    return hashlib.sha256(recipient.encode()).hexdigest()[:16]


def contact_ref(contact: Contact) -> str:
    """How an audit event names a contact: its id, else the recipient masked. Never a
    hash of the address: audit rows outlive an erasure, and an unkeyed hash of an
    address can be matched by anyone who knows the address."""
    return contact.contact_id or mask_recipient(contact.recipient)


@dataclass(frozen=True)
class Composed:
    channel: str
    contact: Contact
    message: dict[str, Any]  # an OutboundMessage record


def compose(
    request: Request,
    prefs: Preferences,
    channels: Sequence[str],
    *,
    templates: Templates,
    policy: Policy,
    now: datetime,
    extra: Mapping[str, Any] | None = None,
) -> tuple[list[Composed], dict[str, str]]:
    """Render the request for each channel and address it to each contact.

    Returns the messages and the channels left out because the template has
    no version for them. Raises :class:`~finstream.domain.notify.templates.TemplateError`
    when the request cannot be rendered: nothing is sent half-rendered.
    """
    out: list[Composed] = []
    skipped: dict[str, str] = {}
    category = policy.category(request.category)
    for channel in channels:
        try:
            rendered = templates.render(
                request.template, channel, prefs.locale, request.data, extra
            )
        except ChannelNotAvailable as exc:
            skipped[channel] = str(exc)
            continue
        contacts, _ = prefs.contacts(channel, only=request.contact_id)
        for contact in contacts:
            out.append(
                Composed(
                    channel,
                    contact,
                    outbound_record(
                        request,
                        channel,
                        contact,
                        rendered=rendered,
                        category=category,
                        now=now,
                        templates=templates,
                    ),
                )
            )
    return out, skipped


def outbound_record(
    request: Request,
    channel: str,
    contact: Contact,
    *,
    rendered: Rendered,
    category: CategoryPolicy,
    now: datetime,
    templates: Templates,
) -> dict[str, Any]:
    subject, body, data = rendered.subject, rendered.text, dict(request.data)
    if channel == "push":
        subject, body, data = fit_push(subject, body, data, templates.limits)
    return {
        "message_id": outbound_message_id(request.request_id, channel, contact.recipient),
        "request_id": request.request_id,
        "user_id": request.user_id,
        "channel": channel.upper(),
        "category": request.category,
        "priority": request.priority,
        "recipient": contact.recipient,
        "platform": contact.platform,
        "locale": rendered.locale,
        "subject": subject,
        "body_text": body,
        "body_html": rendered.html,
        "data": data,
        "transactional": category.transactional,
        "created_at": now,
        "expires_at": request.expires_at,
        "attempt": 0,
        "correlation_id": request.correlation_id,
        "sealed": None,
        "template": request.template,
    }


# -- audit ---------------------------------------------------------------------------------


def audit_event(
    request: Request,
    decision: Decision,
    now: datetime,
    *,
    phase: str,
    actor: str = "router",
    messages: Sequence[Composed] = (),
    skipped: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one decision; contacts appear only as hashes.

    The event id is derived from the request, the decision and the phase, so
    a decision replayed after a crash carries the same id and the audit sink
    stores it once.
    """
    details: dict[str, str] = {
        "category": request.category,
        "priority": request.priority,
        "template": request.template,
        "phase": phase,
    }
    if decision.channels:
        details["channels"] = ",".join(decision.channels)
    if decision.release_at is not None:
        details["release_at"] = decision.release_at.isoformat()
    for channel, why in (skipped or {}).items():
        details[f"skipped.{channel}"] = why
    if messages:
        details["message_ids"] = ",".join(m.message["message_id"] for m in messages)
        details["contacts"] = ",".join(f"{m.channel}:{contact_ref(m.contact)}" for m in messages)
    if messages:
        # The rendered locale per channel (after fallback), for the notification's journey.
        details["locales"] = ",".join(
            dict.fromkeys(f"{m.channel}:{m.message['locale']}" for m in messages)
        )
    if request.collapse_key:
        details["collapse_key"] = request.collapse_key
    created = request.record.get("created_at")
    if isinstance(created, datetime):
        # When the request was made: the journey's first step (and its timings' origin).
        details["requested_at"] = created.isoformat()
    if request.record.get("source"):
        details["source"] = str(request.record["source"])[:200]
    details.update(extra or {})
    seed = f"{request.request_id}\x1f{decision.action}\x1f{phase}\x1f{','.join(decision.channels)}"
    if decision.release_at is not None:
        seed += f"\x1f{to_micros(decision.release_at)}"
    return {
        "event_id": "a-" + hashlib.sha256(seed.encode()).hexdigest()[:40],
        "at": now,
        "actor": actor,
        "action": str(decision.action),
        "subject_type": "request",
        "subject_id": request.request_id,
        "user_id": request.user_id,
        "reason": decision.reason,
        "details": details,
        "correlation_id": request.correlation_id,
    }
