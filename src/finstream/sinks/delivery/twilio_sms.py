"""Twilio Programmable Messaging (``POST /2010-04-01/Accounts/{sid}/Messages.json``).

Plain httpx with HTTP Basic auth and a form body, like the other HTTP
providers. The official ``twilio`` package was not used: its API host is
fixed (``twilio/rest/api/ApiBase.py`` passes "https://api.twilio.com" to its
Domain), so it cannot be pointed at the local fake.

``To`` is validated and normalized to E.164 (phonenumbers) and the segment
count (GSM-7 / UCS-2) is known before sending. Twilio takes no idempotency
key, so a resend is a second SMS; an ambiguous send is reconciled by listing
the recipient's messages (``GET Messages.json?To=...``) and matching one
created since the send started with the same body.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

from finstream.domain.delivery.channels import RecipientError, normalize_e164, sms_segments
from finstream.domain.delivery.errors import (
    DeliveryError,
    Feedback,
    by_status,
    json_body,
    snippet,
    throttle_delay,
)
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.settings import Settings
from finstream.sinks.delivery.base import HttpProvider, Message, Sent

CLOCK_SKEW = timedelta(seconds=60)


# -- classification of the answers --------------------------------------------------

_TWILIO_CODES = {
    21610: (ErrorClass.INVALID_RECIPIENT, Feedback.PHONE_OPTED_OUT),  # replied STOP
    21211: (ErrorClass.INVALID_RECIPIENT, None),  # invalid To
    21612: (ErrorClass.INVALID_RECIPIENT, None),  # cannot route to this number
    21614: (ErrorClass.INVALID_RECIPIENT, None),  # not a mobile number
    21408: (ErrorClass.INVALID_RECIPIENT, None),  # region not enabled
    21617: (ErrorClass.PERMANENT, None),  # body too long
    21602: (ErrorClass.PERMANENT, None),  # body required
    20429: (ErrorClass.THROTTLED, None),
    20003: (ErrorClass.AUTH, None),
    20404: (ErrorClass.AUTH, None),  # account / service not found: set-up
    21606: (ErrorClass.AUTH, None),  # From is not ours
    21659: (ErrorClass.AUTH, None),
}


def classify(
    status: int, headers: Mapping[str, str], body: bytes, now: datetime
) -> DeliveryError | None:
    data = json_body(body)
    if 200 <= status < 300:
        if isinstance(data, dict) and isinstance(data.get("sid"), str) and data["sid"]:
            return None
        return DeliveryError(
            ErrorClass.MALFORMED,
            f"HTTP {status} without a message sid: {snippet(body)}",
            provider="twilio",
            status=status,
            ambiguous=True,
        )
    code: int | None = None
    message = ""
    if isinstance(data, dict):
        raw = data.get("code")
        code = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        message = str(data.get("message") or "")
    message = message or snippet(body) or f"HTTP {status}"
    wait = throttle_delay(headers, now)
    known = _TWILIO_CODES.get(code) if code is not None else None
    if known is None:
        return by_status(
            "twilio",
            status,
            message,
            code=str(code) if code is not None else None,
            retry_after=wait,
        )
    cls, feedback = known
    return DeliveryError(
        cls,
        message,
        provider="twilio",
        status=status,
        code=str(code),
        retry_after=wait if cls.retryable else None,
        feedback=feedback,
    )


class TwilioSms(HttpProvider):
    name = "twilio"
    channel = "SMS"
    reconcile = Reconcile.LOOKUP

    def __init__(self, settings: Settings, account_sid: str, auth_token: str) -> None:
        super().__init__(settings)
        self.rate = settings.delivery_twilio_rate
        self._auth = (account_sid, auth_token)
        self._url = (
            f"{settings.delivery_twilio_url.rstrip('/')}/2010-04-01/Accounts/"
            f"{account_sid}/Messages.json"
        )

    def form(self, message: Message) -> dict[str, str]:
        s = self.settings
        try:
            to = normalize_e164(str(message["recipient"]))
        except RecipientError as exc:
            raise DeliveryError(
                ErrorClass.INVALID_RECIPIENT, str(exc), provider=self.name
            ) from None
        form = {"To": to, "Body": str(message["body_text"])}
        if s.delivery_twilio_messaging_service_sid:
            form["MessagingServiceSid"] = s.delivery_twilio_messaging_service_sid
        else:
            form["From"] = str(s.delivery_twilio_from)
        if s.delivery_twilio_status_callback:
            sep = "&" if "?" in s.delivery_twilio_status_callback else "?"
            form["StatusCallback"] = (
                s.delivery_twilio_status_callback
                + sep
                + urlencode({"message_id": str(message["message_id"])})
            )
        return form

    async def send(self, message: Message) -> Sent:
        form = self.form(message)
        segments = sms_segments(form["Body"])
        response = await self.request("POST", self._url, data=form, auth=self._auth)
        error = classify(
            response.status_code, self.lower_headers(response), response.content, self.now()
        )
        if error is not None:
            raise error
        data = response.json()
        counted = data.get("num_segments") or segments.segments
        return Sent(str(data["sid"]), detail=f"{counted} segment(s), {segments.encoding}")

    async def lookup(self, message: Message, since: datetime) -> Sent | None:
        to = self.form(message)["To"]
        response = await self.request(
            "GET", self._url, params={"To": to, "PageSize": "50"}, auth=self._auth
        )
        if response.status_code != 200:
            error = classify(
                response.status_code, self.lower_headers(response), response.content, self.now()
            )
            raise error or DeliveryError(
                ErrorClass.MALFORMED, "message list failed", provider=self.name
            )
        try:
            items = response.json().get("messages")
        except (ValueError, AttributeError):
            items = None
        if not isinstance(items, list):
            raise DeliveryError(
                ErrorClass.MALFORMED, "message list without messages", provider=self.name
            )
        body = str(message["body_text"])
        for item in items:
            if _matches(item, body, since - CLOCK_SKEW):
                return Sent(str(item["sid"]), detail="found in the message list")
        return None


def _matches(item: Any, body: str, not_before: datetime) -> bool:
    if not isinstance(item, dict) or not item.get("sid") or item.get("body") != body:
        return False
    if item.get("direction", "outbound-api") not in (
        "outbound-api",
        "outbound-call",
        "outbound-reply",
    ):
        return False
    try:
        created = parsedate_to_datetime(str(item.get("date_created")))
    except (TypeError, ValueError):
        return False
    return created >= not_before


def create(settings: Settings) -> TwilioSms | None:
    s = settings
    token = s.delivery_twilio_auth_token
    if not s.delivery_twilio_account_sid or token is None or not token.get_secret_value():
        return None
    if not (s.delivery_twilio_from or s.delivery_twilio_messaging_service_sid):
        raise ValueError(
            "Twilio needs delivery_twilio_from or delivery_twilio_messaging_service_sid"
        )
    return TwilioSms(s, s.delivery_twilio_account_sid, token.get_secret_value())
