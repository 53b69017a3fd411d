"""Composing the outbound messages of a routed request: one per channel and contact."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finstream.domain.envelope import mask_recipient
from finstream.domain.notify.fitting import fit_push
from finstream.domain.notify.ids import outbound_message_id
from finstream.domain.notify.preferences_view import Contact, Preferences
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing import CategoryPolicy, Policy
from finstream.domain.notify.templates import ChannelNotAvailable, Rendered, Templates


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
