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

:func:`remember` records an outcome in the user's state once its messages are
composed (a request that fails to render is not marked seen, so that a
redriven copy after a template fix is not taken for a duplicate). Both run
inside :func:`finstream.domain.notify.plan.plan`, which the router calls.

The request type is in :mod:`~finstream.domain.notify.request`, the per-user
state in :mod:`~finstream.domain.notify.routing_state`, composing the outbound
messages in :mod:`~finstream.domain.notify.outbound` and the audit event of a
decision in :mod:`~finstream.domain.notify.audit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from finstream.domain.notify import caps as caps_
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.quiet_hours import is_quiet, next_allowed
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing_state import DONE, HELD, UserState


class Action(StrEnum):
    ROUTED = "routed"
    SCHEDULED = "scheduled"
    SUPPRESSED = "suppressed"
    DIGESTED = "digested"
    DROPPED = "dropped"
    DUPLICATE = "duplicate"
    COLLAPSED = "collapsed"
    EXPIRED = "expired"


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


def contact_channels(request: Request, prefs: Preferences, policy: Policy) -> tuple[str, ...]:
    """Every channel whose contacts deciding and composing ``request`` may read.

    A superset of what :func:`select_channels` looks up (it narrows these), read
    without the contact values: the router opens only these channels' sealed
    contacts (a price alert for push and in-app opens no email address).
    """
    if request.contact_id is not None:
        target = prefs.contact_channel(request.contact_id)
        return () if target is None else (target,)
    if request.channels:
        return request.channels
    user_cat = prefs.categories.get(request.category)
    if user_cat is not None and user_cat.channels is not None:
        return user_cat.channels
    return policy.category(request.category).channels


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
    """What to do with one request now (no side effects; see :func:`remember`)."""
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
