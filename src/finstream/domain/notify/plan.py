"""The router's decisions, finished: one request in, every consequence out, as data.

:func:`plan` takes a decoded request, the user's preferences (contacts
opened), the user's routing state and holds, the policy, the templates and
``now``, and returns :class:`Effects`: the outbound messages, the request to
hold (and when), the digest it folds into, the audit events, the user's state
afterwards and, for a request that cannot be rendered, the dead letter's
error. It decides (:func:`~finstream.domain.notify.routing.decide`), composes
(:func:`~finstream.domain.notify.outbound.compose`) and remembers
(:func:`~finstream.domain.notify.routing.remember`); it changes none of its
inputs and does no I/O. The router role applies the effects: it seals what
it keeps or publishes, encodes it and produces it into its transaction.

The release path: :func:`due_requests` and :func:`due_digests` take what
time releases out of a user's holds; each released request (and each digest,
turned into a request by :func:`~finstream.domain.notify.digest.digest_request`)
is planned again with ``release=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finstream.domain.notify import digest as digest_
from finstream.domain.notify.audit import audit_event
from finstream.domain.notify.outbound import Composed, compose
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing import (
    Action,
    Decision,
    Outcome,
    Policy,
    decide,
    remember,
    select_channels,
)
from finstream.domain.notify.routing_state import Hold, Holds, UserState
from finstream.domain.notify.templates import ChannelNotAvailable, TemplateError, Templates
from finstream.domain.time import from_micros, to_micros

ERASED_REASON = "user erased: their data keys are destroyed"
NO_TEMPLATE_VERSION = "template has no version for the chosen channels"
# The channels a digest item's text is taken from, first that the template offers.
DIGEST_ITEM_CHANNELS = ("inapp", "push", "email", "sms")


@dataclass(frozen=True)
class HoldRequest:
    """A request (or the part of it for some channels) to keep until ``due``."""

    request_id: str
    due: int  # epoch micros
    reason: str  # "deliver_at" or "quiet_hours"
    record: dict[str, Any]  # the NotificationRequest record, narrowed to the held channels
    bypass_caps: bool = False


@dataclass(frozen=True)
class Audit:
    decision: Decision
    event: dict[str, Any]  # the AuditEvent record


@dataclass
class Effects:
    """Every consequence of planning one request."""

    request: Request
    state: UserState  # the user's state afterwards (the input itself when unchanged)
    phase: str
    messages: list[Composed] = field(default_factory=list)
    holds: list[HoldRequest] = field(default_factory=list)
    # category -> the user's digest after the fold (a new buffer; its new item is the last)
    folds: dict[str, digest_.DigestBuffer] = field(default_factory=dict)
    audits: list[Audit] = field(default_factory=list)
    dead_letter: TemplateError | None = None  # the request goes to the dlq with this error

    @property
    def decisions(self) -> list[Action]:
        """One per audit event: what the decision counters count."""
        return [a.decision.action for a in self.audits]

    @property
    def sent(self) -> list[str]:
        return [c for c in CHANNELS if any(m.channel == c for m in self.messages)]


def plan(
    request: Request,
    prefs: Preferences,
    state: UserState,
    holds: Holds,
    *,
    now: datetime,
    policy: Policy,
    templates: Templates,
    phase: str = "intake",
    release: bool = False,
    bypass_caps: bool = False,
    erased: bool = False,
    extra: Mapping[str, str] | None = None,
) -> Effects:
    """What routing ``request`` now does, as data (see the module docstring).

    ``release`` plans a request that was held (``bypass_caps``: held past the
    caps already, e.g. a digest); ``extra`` adds details to its audit events.
    An erased user's request is dropped, audited, and nothing else happens.
    """
    if erased:
        fx = Effects(request, state, phase)
        _audit(fx, Decision(Action.DROPPED, ERASED_REASON), now)
        return fx
    state = state.copy()
    state.prune(now.timestamp(), prefs, policy.max_seen)
    fx = Effects(request, state, phase)
    outcome = decide(request, prefs, state, now, policy, release=release, bypass_caps=bypass_caps)
    skipped = dict(outcome.skipped)
    messages: list[Composed] = []
    try:
        if outcome.digest:
            _fold(fx, outcome, skipped, prefs, holds, now=now, policy=policy, templates=templates)
            return fx
        if outcome.send:
            messages, missing = compose(
                request, prefs, outcome.send, templates=templates, policy=policy, now=now
            )
            skipped.update(missing)
        _preflight(request, prefs, outcome, policy, templates)
    except TemplateError as exc:
        return _dropped(fx, exc, now)
    decisions = list(outcome.decisions)
    if outcome.send and not messages:
        decisions = [
            Decision(Action.SUPPRESSED, NO_TEMPLATE_VERSION) if d.action is Action.ROUTED else d
            for d in decisions
        ]
    if outcome.hold_all or outcome.hold:
        assert outcome.release_at is not None
        fx.holds.append(
            HoldRequest(
                request.request_id,
                to_micros(outcome.release_at),
                outcome.hold_reason or "scheduled",
                request.record if outcome.hold_all else request.with_channels(outcome.hold),
                bypass_caps,
            )
        )
    fx.messages = messages
    remember(outcome, request, state, now, policy, sent=fx.sent)
    for d in decisions:
        routed = messages if d.action is Action.ROUTED else ()
        _audit(fx, d, now, messages=routed, skipped=skipped, extra=extra)
    return fx


def _preflight(
    request: Request, prefs: Preferences, outcome: Outcome, policy: Policy, templates: Templates
) -> None:
    """Render what is held now, so a missing variable fails at once, not at release."""
    if outcome.hold:
        channels: Sequence[str] = outcome.hold
    elif outcome.hold_all:
        channels = select_channels(request, prefs, policy)[0]
    else:
        return
    for channel in channels:
        try:
            templates.render(request.template, channel, prefs.locale, request.data)
        except ChannelNotAvailable:
            continue


def _fold(
    fx: Effects,
    outcome: Outcome,
    skipped: dict[str, str],
    prefs: Preferences,
    holds: Holds,
    *,
    now: datetime,
    policy: Policy,
    templates: Templates,
) -> None:
    request = fx.request
    subject, text = digest_item(request, prefs, templates)
    buffer = holds.digests.get(request.category)
    if buffer is not None and request.request_id in buffer.request_ids:
        return  # folded already (a redelivered release)
    folded = digest_.fold(
        buffer.copy() if buffer is not None else None,
        category=request.category,
        request_id=request.request_id,
        subject=subject,
        text=text,
        at=request.record.get("created_at") or now,
        now=now,
        window_seconds=policy.digest_seconds,
        max_items=policy.digest_max_items,
    )
    fx.folds[request.category] = folded
    remember(outcome, request, fx.state, now, policy, sent=())
    extra = {"digest_due": from_micros(folded.due).isoformat()}
    _audit(fx, outcome.decisions[-1], now, skipped=skipped, extra=extra)


def digest_item(
    request: Request, prefs: Preferences, templates: Templates
) -> tuple[str | None, str]:
    """The subject and text a request contributes to a digest."""
    for channel in DIGEST_ITEM_CHANNELS:
        try:
            r = templates.render(request.template, channel, prefs.locale, request.data)
        except ChannelNotAvailable:
            continue
        return r.subject, r.text
    raise TemplateError(f"template {request.template!r} has no version for any channel")


def _dropped(fx: Effects, exc: TemplateError, now: datetime) -> Effects:
    # Not remembered as seen: a copy redriven from the dlq (after the template
    # or the data is fixed) is routed, not taken for a duplicate.
    fx.state.seen.pop(fx.request.request_id, None)
    fx.dead_letter = exc
    _audit(fx, Decision(Action.DROPPED, str(exc)[:500]), now)
    return fx


def _audit(
    fx: Effects,
    decision: Decision,
    now: datetime,
    *,
    messages: Sequence[Composed] = (),
    skipped: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> None:
    event = audit_event(
        fx.request,
        decision,
        now,
        phase=fx.phase,
        messages=messages,
        skipped=skipped,
        extra=extra,
    )
    fx.audits.append(Audit(decision, event))


# -- the release path ----------------------------------------------------------------------


def due_requests(holds: Holds, now_us: int) -> tuple[list[Hold], Holds]:
    """The held requests due at ``now_us`` (earliest first) and the holds without them."""
    due = sorted((h for h in holds.requests.values() if h.due <= now_us), key=lambda h: h.due)
    ids = {h.request_id for h in due}
    rest = {k: h for k, h in holds.requests.items() if k not in ids}
    return due, Holds(rest, dict(holds.digests))


def due_digests(holds: Holds, now_us: int) -> tuple[list[digest_.DigestBuffer], Holds]:
    """The digests due at ``now_us`` (by category) and the holds without them."""
    due = [d for _, d in sorted(holds.digests.items()) if d.due <= now_us]
    rest = {k: d for k, d in holds.digests.items() if d.due > now_us}
    return due, Holds(dict(holds.requests), rest)
