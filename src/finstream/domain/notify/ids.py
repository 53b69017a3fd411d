"""Notification identities shared by the router and the delivery workers."""

from __future__ import annotations

import hashlib


def outbound_message_id(request_id: str, channel: str, recipient: str) -> str:
    """The idempotency key of one outbound message.

    Derived, never random: the same request routed again (a redelivery, a
    restarted router) yields the same key for the same channel and contact,
    so the delivery side can refuse to send it twice.
    """
    digest = hashlib.sha256(
        f"{request_id}\x1f{channel.upper()}\x1f{recipient}".encode()
    ).hexdigest()
    return f"m-{digest[:40]}"
