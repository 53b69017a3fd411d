"""The journey of one notification: every step from request to final state, with timings.

Built from what the pipeline already records, without I/O here:

* the audit trail (``audit_events``): the router's decisions on the request
  (``subject_type = 'request'``: routed, scheduled, suppressed, digested,
  duplicate, collapsed, expired, dropped; and the outcomes of commands on a
  held request: cancelled, rescheduled, command_refused), with the phase
  (``intake``, ``release.<reason>``, ``digest``, ``command``), the channels, why a channel was left out
  (``skipped.<channel>``), the hold's release time, the messages composed and
  their locales; and the delivery workers' events on those messages
  (``subject_type = 'message'``: rejections, final failures, feedback);
* the delivery records: one ``deliveries`` row per outbound message (its
  state and the rendered message) and one ``delivery_results`` row per
  provider attempt (provider, outcome, latency).

:func:`build` orders all of it into ``steps`` (each with ``at`` and
``elapsed_ms`` since the request was made), summarizes each channel
(decision, reason, hold, messages with their attempts) and names the final
state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finstream.domain.delivery.lifecycle import REOPENABLE_STATES, SUCCESS_STATES

CHANNELS = ("email", "push", "sms", "inapp")
# The deliveries life cycle's own sets (its states are str enums: "sent" in DONE holds).
DONE = SUCCESS_STATES
FAILED = REOPENABLE_STATES


@dataclass(frozen=True)
class AuditRow:
    at: datetime
    actor: str
    action: str
    subject_type: str
    subject_id: str
    user_id: str | None
    reason: str | None
    details: Mapping[str, str]


@dataclass(frozen=True)
class MessageRow:
    message_id: str
    channel: str  # lower case
    state: str
    attempts: int
    provider: str | None
    created_at: datetime
    finished_at: datetime | None
    last_error: str | None = None
    locale: str | None = None
    subject: str | None = None
    recipient: str | None = None  # masked by the caller


@dataclass(frozen=True)
class AttemptRow:
    message_id: str
    channel: str  # lower case
    provider: str
    status: str
    attempt: int
    latency_ms: float | None
    error_class: str | None
    error: str | None
    at: datetime


@dataclass
class _Channel:
    decision: str = "not chosen"
    reason: str | None = None
    held_until: str | None = None
    released_at: datetime | None = None
    locale: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def build(
    request_id: str,
    events: Sequence[AuditRow],
    messages: Sequence[MessageRow],
    attempts: Sequence[AttemptRow],
) -> dict[str, Any] | None:
    """The journey, or None when nothing at all is known about the request."""
    routing = sorted(
        (e for e in events if e.subject_type == "request" and e.subject_id == request_id),
        key=lambda e: e.at,
    )
    if not routing and not messages:
        return None
    first = routing[0] if routing else None
    details = first.details if first else {}
    received: datetime | None = None
    if details.get("requested_at"):
        try:
            received = datetime.fromisoformat(details["requested_at"])
        except ValueError:
            received = None
    starts = [e.at for e in routing] + [m.created_at for m in messages]
    origin = received or min(starts)

    steps: list[dict[str, Any]] = []

    def step(at: datetime, kind: str, summary: str, **extra: Any) -> None:
        steps.append(
            {
                "at": at.isoformat(),
                "elapsed_ms": round((at - origin).total_seconds() * 1000, 1),
                "kind": kind,
                "summary": summary,
                **{k: v for k, v in extra.items() if v is not None},
            }
        )

    source = details.get("source")
    step(origin, "received", f"request received{f' from {source}' if source else ''}")

    channels = {c: _Channel() for c in CHANNELS}
    final_action: str | None = None
    held_pending = False
    for e in routing:
        d = e.details
        phase = d.get("phase", "intake")
        chosen = [c for c in d.get("channels", "").split(",") if c]
        locales = dict(
            pair.split(":", 1) for pair in d.get("locales", "").split(",") if ":" in pair
        )
        if phase == "command":
            # A cancel or reschedule of the held request (finstream.domain.notify.scheduled).
            who = d.get("requested_by")
            if e.action == "cancelled":
                for ch in channels.values():
                    if ch.decision == "held":
                        ch.decision, ch.reason = "cancelled", e.reason
                held_pending = False
                final_action = "cancelled"
                step(e.at, "decision", f"cancelled by {who}", action=e.action, reason=e.reason)
            elif e.action == "rescheduled":
                until = d.get("new_release_at")
                for ch in channels.values():
                    if ch.decision == "held":
                        ch.held_until = until
                step(
                    e.at,
                    "hold",
                    f"rescheduled to {until} by {who}",
                    action=e.action,
                    release_at=until,
                )
            else:  # refused: the release (or another cancel) came first
                step(e.at, "decision", f"{d.get('command')} by {who}: {e.reason}", action=e.action)
            continue
        for key, why in d.items():
            if key.startswith("skipped."):
                c = key.removeprefix("skipped.")
                if c in channels and channels[c].decision == "not chosen":
                    channels[c].decision = "skipped"
                    channels[c].reason = why
        if phase.startswith("release.") or phase == "digest":
            step(e.at, "release", f"released ({phase.removeprefix('release.')})", phase=phase)
            held_pending = False
            for c in chosen:
                channels[c].released_at = e.at
        if e.action == "routed":
            for c in chosen:
                ch = channels[c]
                ch.decision = "released" if ch.held_until else "sent"
                ch.reason = None
                ch.locale = locales.get(c, ch.locale)
            step(
                e.at,
                "decision",
                f"routed to {', '.join(chosen)}",
                action=e.action,
                phase=phase,
                channels=chosen,
                template=d.get("template"),
                locales=locales or None,
            )
        elif e.action == "scheduled":
            why = e.reason or "scheduled"
            until = d.get("release_at")
            for c in chosen:
                channels[c].decision = "held"
                channels[c].reason = why
                channels[c].held_until = until
            held_pending = True
            what = ", ".join(chosen) if chosen else "the whole request"
            step(
                e.at,
                "hold",
                f"held {what} until {until} ({why})",
                action=e.action,
                reason=why,
                release_at=until,
                channels=chosen or None,
            )
        else:
            step(
                e.at,
                "decision",
                f"{e.action}: {e.reason}" if e.reason else e.action,
                action=e.action,
                reason=e.reason,
                phase=phase,
            )
            if e.action in ("suppressed", "dropped", "expired", "duplicate", "collapsed"):
                for ch in channels.values():
                    if ch.decision in ("not chosen", "held"):
                        ch.decision = e.action
                        ch.reason = e.reason
            if e.action == "digested":
                held_pending = True
        final_action = e.action

    for c, ch in channels.items():
        if ch.decision == "skipped":
            step_at = routing[0].at if routing else origin
            steps.append(
                {
                    "at": step_at.isoformat(),
                    "elapsed_ms": round((step_at - origin).total_seconds() * 1000, 1),
                    "kind": "decision",
                    "summary": f"{c}: skipped ({ch.reason})",
                    "channel": c,
                    "reason": ch.reason,
                }
            )

    by_message: dict[str, list[AttemptRow]] = {}
    for a in sorted(attempts, key=lambda a: (a.at, a.attempt)):
        by_message.setdefault(a.message_id, []).append(a)
    for m in sorted(messages, key=lambda m: m.created_at):
        ch = channels.setdefault(m.channel, _Channel(decision="sent"))
        if ch.decision in ("not chosen", "held"):
            ch.decision = "sent"
        step(
            m.created_at,
            "rendered",
            f"{m.channel}: rendered in {m.locale or '?'}"
            + (f': "{m.subject}"' if m.subject else ""),
            channel=m.channel,
            message_id=m.message_id,
            locale=m.locale,
            subject=m.subject,
        )
        tries = []
        for a in by_message.get(m.message_id, []):
            latency = f" in {a.latency_ms:.0f} ms" if a.latency_ms is not None else ""
            error = f" ({a.error})" if a.error else ""
            step(
                a.at,
                "attempt",
                f"{m.channel} via {a.provider}: {a.status.lower()}{latency}{error}",
                channel=m.channel,
                message_id=m.message_id,
                provider=a.provider,
                status=a.status,
                attempt=a.attempt,
                latency_ms=a.latency_ms,
                error_class=a.error_class,
                error=a.error,
            )
            tries.append(
                {
                    "provider": a.provider,
                    "status": a.status,
                    "attempt": a.attempt,
                    "latency_ms": a.latency_ms,
                    "error_class": a.error_class,
                    "error": a.error,
                    "at": a.at.isoformat(),
                }
            )
        ch.messages.append(
            {
                "message_id": m.message_id,
                "recipient": m.recipient,
                "locale": m.locale,
                "subject": m.subject,
                "state": m.state,
                "provider": m.provider,
                "attempts": tries,
                "finished_at": _iso(m.finished_at),
                "last_error": m.last_error,
            }
        )
        if m.finished_at is not None:
            step(
                m.finished_at,
                "delivered" if m.state in DONE else "final",
                f"{m.channel}: {m.state}" + (f" by {m.provider}" if m.provider else ""),
                channel=m.channel,
                message_id=m.message_id,
                state=m.state,
            )
    for e in sorted((e for e in events if e.subject_type == "message"), key=lambda e: e.at):
        step(
            e.at,
            "delivery",
            f"{e.action}: {e.reason}" if e.reason else e.action,
            action=e.action,
            message_id=e.subject_id,
            channel=e.details.get("channel", "").lower() or None,
        )

    states = [m.state for m in messages]
    if held_pending:
        state = "held"
    elif states and all(s in DONE for s in states):
        state = "delivered"
    elif states and all(s in DONE | FAILED for s in states):
        state = "failed" if not any(s in DONE for s in states) else "partly delivered"
    elif states:
        state = "delivering"
    elif final_action in (
        "suppressed",
        "dropped",
        "expired",
        "duplicate",
        "collapsed",
        "digested",
        "cancelled",
    ):
        state = final_action
    else:
        state = "routing"
    steps.sort(key=lambda s: (s["at"], _ORDER.get(s["kind"], 9)))
    last = max((datetime.fromisoformat(s["at"]) for s in steps), default=origin)
    return {
        "request_id": request_id,
        "user_id": first.user_id if first else None,
        "category": details.get("category"),
        "priority": details.get("priority"),
        "template": details.get("template"),
        "source": source,
        "received_at": origin.isoformat(),
        "state": state,
        "took_ms": round((last - origin).total_seconds() * 1000, 1),
        "channels": {
            c: {
                "decision": ch.decision,
                "reason": ch.reason,
                "held_until": ch.held_until,
                "released_at": _iso(ch.released_at),
                "locale": ch.locale,
                "messages": ch.messages,
            }
            for c, ch in channels.items()
            if ch.decision != "not chosen" or ch.messages
        },
        "steps": steps,
    }


_ORDER = {
    "received": 0,
    "release": 1,
    "decision": 2,
    "hold": 3,
    "rendered": 4,
    "attempt": 5,
    "delivery": 6,
    "delivered": 7,
    "final": 7,
}
