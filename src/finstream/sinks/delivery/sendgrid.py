"""SendGrid v3 Mail Send (``POST /v3/mail/send``).

The message id travels as ``custom_args.message_id`` (SendGrid's unique
args), which is what makes an ambiguous send reconcilable: the Email
Activity API (``GET /v3/messages?query=unique_args['message_id']="..."``)
says whether SendGrid took it. That API is a paid add-on; without it
(``delivery_sendgrid_activity_lookup=false``, or a 403 from it) SendGrid is
treated like a provider that cannot be asked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from finstream.domain.delivery.channels import email_parts
from finstream.domain.delivery.errors import (
    DeliveryError,
    by_status,
    json_body,
    snippet,
    throttle_delay,
)
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.settings import Settings
from finstream.sinks.delivery.base import HttpProvider, Message, Sent

# -- classification of the answers --------------------------------------------------

_SENDGRID_RECIPIENT_FIELDS = re.compile(r"^personalizations(\.\d+)?\.(to|cc|bcc)")


def classify(
    status: int, headers: Mapping[str, str], body: bytes, now: datetime
) -> DeliveryError | None:
    """None when SendGrid accepted the message (202 with ``X-Message-Id``)."""
    if 200 <= status < 300:
        if headers.get("x-message-id"):
            return None
        return DeliveryError(
            ErrorClass.MALFORMED,
            f"HTTP {status} without X-Message-Id",
            provider="sendgrid",
            status=status,
            ambiguous=True,
        )
    data = json_body(body)
    errors = data.get("errors") if isinstance(data, dict) else None
    messages: list[str] = []
    recipient_problem = False
    if isinstance(errors, list):
        for e in errors:
            if not isinstance(e, dict):
                continue
            field = str(e.get("field") or "")
            messages.append(f"{field}: {e.get('message')}" if field else str(e.get("message")))
            recipient_problem |= bool(_SENDGRID_RECIPIENT_FIELDS.match(field))
    message = "; ".join(messages) or snippet(body) or f"HTTP {status}"
    if status == 400 and recipient_problem:
        return DeliveryError(
            ErrorClass.INVALID_RECIPIENT, message, provider="sendgrid", status=status
        )
    return by_status("sendgrid", status, message, retry_after=throttle_delay(headers, now))


class SendGrid(HttpProvider):
    name = "sendgrid"
    channel = "EMAIL"

    def __init__(self, settings: Settings, api_key: str) -> None:
        super().__init__(settings)
        self._auth = {"authorization": f"Bearer {api_key}"}
        self._base = settings.delivery_sendgrid_url.rstrip("/")
        self.rate = settings.delivery_sendgrid_rate
        self.reconcile = (
            Reconcile.LOOKUP if settings.delivery_sendgrid_activity_lookup else Reconcile.NONE
        )

    def payload(self, message: Message) -> dict[str, Any]:
        s = self.settings
        parts = email_parts(
            message,
            s.delivery_email_from,
            s.delivery_email_unsubscribe_url,
            s.delivery_email_unsubscribe_mailto,
        )
        content = [{"type": "text/plain", "value": parts.text}]
        if parts.html:
            content.append({"type": "text/html", "value": parts.html})
        sender: dict[str, str] = {"email": parts.from_address}
        if parts.from_name:
            sender["name"] = parts.from_name
        return {
            "personalizations": [
                {
                    "to": [{"email": parts.to}],
                    "custom_args": {"message_id": str(message["message_id"])},
                }
            ],
            "from": sender,
            "subject": parts.subject,
            "content": content,
            "headers": parts.headers,
            "categories": [str(message.get("category") or "notification")[:255]],
        }

    async def send(self, message: Message) -> Sent:
        response = await self.request(
            "POST", f"{self._base}/v3/mail/send", json=self.payload(message), headers=self._auth
        )
        error = classify(
            response.status_code, self.lower_headers(response), response.content, self.now()
        )
        if error is not None:
            raise error
        return Sent(response.headers.get("x-message-id"))

    async def lookup(self, message: Message, since: datetime) -> Sent | None:
        query = f"unique_args['message_id']=\"{message['message_id']}\""
        response = await self.request(
            "GET",
            f"{self._base}/v3/messages",
            params={"query": query, "limit": "10"},
            headers=self._auth,
        )
        if response.status_code != 200:
            error = classify(
                response.status_code, self.lower_headers(response), response.content, self.now()
            )
            raise error or DeliveryError(
                ErrorClass.MALFORMED, "activity lookup failed", provider=self.name
            )
        try:
            found = response.json().get("messages")
        except (ValueError, AttributeError):
            found = None
        if not isinstance(found, list):
            raise DeliveryError(
                ErrorClass.MALFORMED,
                "activity lookup answered without a messages list",
                provider=self.name,
            )
        for item in found:
            if isinstance(item, dict) and item.get("msg_id"):
                # msg_id is X-Message-Id plus a per-recipient suffix.
                return Sent(str(item["msg_id"]).split(".", 1)[0], detail="found by activity lookup")
        return None


def create(settings: Settings) -> SendGrid | None:
    key = settings.delivery_sendgrid_api_key
    if key is None or not key.get_secret_value():
        return None
    return SendGrid(settings, key.get_secret_value())
