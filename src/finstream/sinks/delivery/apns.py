"""Apple Push Notification service, token-based (``POST /3/device/<token>`` over HTTP/2).

The client is httpx with ``http2=True``: APNs only speaks HTTP/2, and httpx
(with the h2 package) negotiates it by ALPN and takes any base URL and CA
file, so the tests run it against a local HTTP/2 fake. aioapns was the other
maintained option; it was not chosen because its host is a class constant
(``APNsProductionClientProtocol.APNS_SERVER`` / ``APNS_PORT = 443`` in
aioapns/connection.py, ``loop.create_connection(host=self.protocol_class.APNS_SERVER,
port=self.protocol_class.APNS_PORT, ...)``): the only way to point it
elsewhere is an HTTP CONNECT proxy in front of a fake presenting a
certificate for api.push.apple.com.

The provider token is an ES256 JWT (``kid`` = key id, ``iss`` = team id,
``iat``), reused for 50 minutes (Apple refuses tokens older than an hour and
throttles tokens renewed more than every 20 minutes) and renewed at once on
``ExpiredProviderToken``.

Every try of a message carries the same ``apns-id`` and ``apns-collapse-id``,
so a resend replaces the notification on the device instead of adding one.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

import jwt

from finstream.domain.delivery.channels import PUSH_MAX_PAYLOAD_BYTES, apns_id
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
from finstream.domain.time import to_micros
from finstream.settings import Settings
from finstream.sinks.delivery.base import HttpProvider, Message, Sent
from finstream.sinks.delivery.fcm import collapse_id

TOKEN_LIFETIME = 50 * 60.0


# -- classification of the answers --------------------------------------------------

_APNS_REASONS = {
    "Unregistered": ErrorClass.INVALID_RECIPIENT,
    "ExpiredToken": ErrorClass.INVALID_RECIPIENT,
    # BadDeviceToken also means "token of the other environment" (sandbox vs
    # production): a set-up mistake must not mark every user's token invalid,
    # so it is rejected without feedback.
    "BadDeviceToken": ErrorClass.INVALID_RECIPIENT,
    "DeviceTokenNotForTopic": ErrorClass.INVALID_RECIPIENT,
    "ExpiredProviderToken": ErrorClass.AUTH,
    "InvalidProviderToken": ErrorClass.AUTH,
    "MissingProviderToken": ErrorClass.AUTH,
    "BadCertificate": ErrorClass.AUTH,
    "BadCertificateEnvironment": ErrorClass.AUTH,
    "Forbidden": ErrorClass.AUTH,
    "TopicDisallowed": ErrorClass.AUTH,
    "TooManyRequests": ErrorClass.THROTTLED,
    "TooManyProviderTokenUpdates": ErrorClass.THROTTLED,
    "InternalServerError": ErrorClass.TRANSIENT,
    "ServiceUnavailable": ErrorClass.TRANSIENT,
    "Shutdown": ErrorClass.TRANSIENT,
}


def classify(
    status: int, headers: Mapping[str, str], body: bytes, now: datetime
) -> DeliveryError | None:
    if status == 200:
        return None
    data = json_body(body)
    reason = data.get("reason") if isinstance(data, dict) else None
    reason = reason if isinstance(reason, str) else None
    message = reason or snippet(body) or f"HTTP {status}"
    cls = _APNS_REASONS.get(reason or "")
    wait = throttle_delay(headers, now)
    if cls is None:
        return by_status("apns", status, message, code=reason, retry_after=wait)
    return DeliveryError(
        cls,
        message,
        provider="apns",
        status=status,
        code=reason,
        retry_after=wait if cls.retryable else None,
        feedback=Feedback.TOKEN_INVALID if status == 410 else None,
    )


class Apns(HttpProvider):
    name = "apns"
    channel = "PUSH"
    reconcile = Reconcile.IDEMPOTENT

    def __init__(self, settings: Settings, key: str, key_id: str, team_id: str, topic: str) -> None:
        verify: Any = True
        if settings.delivery_apns_ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.delivery_apns_ca_file))
        super().__init__(settings, http2=True, verify=verify)
        self.rate = settings.delivery_apns_rate
        self._base = settings.delivery_apns_url.rstrip("/")
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._topic = topic
        self._token: str | None = None
        self._token_at = 0.0
        self._lock = asyncio.Lock()
        self.token_renewals = 0

    def supports(self, message: Message) -> bool:
        return message.get("platform") == "APNS"

    async def provider_token(self, *, renew: bool = False) -> str:
        async with self._lock:
            now = time.time()
            if renew or self._token is None or now - self._token_at >= TOKEN_LIFETIME:
                self._token = jwt.encode(
                    {"iss": self._team_id, "iat": int(now)},
                    self._key,
                    algorithm="ES256",
                    headers={"kid": self._key_id},
                )
                self._token_at = now
                self.token_renewals += 1
            return self._token

    def payload(self, message: Message) -> dict[str, Any]:
        alert: dict[str, str] = {"body": str(message.get("body_text") or "")}
        if message.get("subject"):
            alert["title"] = str(message["subject"])
        payload: dict[str, Any] = {
            k: str(v) for k, v in (message.get("data") or {}).items() if k != "aps"
        }
        payload["aps"] = {"alert": alert, "sound": "default"}
        payload["finstream_message_id"] = str(message["message_id"])
        return payload

    def headers(self, message: Message, token: str) -> dict[str, str]:
        high = message.get("priority") in ("HIGH", "URGENT", "CRITICAL")
        expires = message.get("expires_at")
        return {
            "authorization": f"bearer {token}",
            "apns-topic": self._topic,
            "apns-push-type": "alert",
            "apns-priority": "10" if high else "5",
            "apns-expiration": str(int(to_micros(expires) / 1_000_000)) if expires else "0",
            "apns-collapse-id": collapse_id(str(message["message_id"])),
            "apns-id": apns_id(str(message["message_id"])),
        }

    async def send(self, message: Message) -> Sent:
        body = json.dumps(self.payload(message), separators=(",", ":")).encode()
        if len(body) > PUSH_MAX_PAYLOAD_BYTES:
            raise DeliveryError(
                ErrorClass.PERMANENT,
                f"payload of {len(body)} bytes (APNs takes at most {PUSH_MAX_PAYLOAD_BYTES})",
                provider=self.name,
            )
        url = f"{self._base}/3/device/{quote(str(message['recipient']), safe='')}"
        for renewed in (False, True):
            token = await self.provider_token(renew=renewed)
            response = await self.request(
                "POST", url, content=body, headers=self.headers(message, token)
            )
            error = classify(
                response.status_code, self.lower_headers(response), response.content, self.now()
            )
            if error is None:
                sent_id = response.headers.get("apns-id") or apns_id(str(message["message_id"]))
                return Sent(sent_id, detail=response.http_version)
            if error.code == "ExpiredProviderToken" and not renewed:
                continue
            raise error
        raise AssertionError("unreachable")  # pragma: no cover


def create(settings: Settings) -> Apns | None:
    s = settings
    if s.delivery_apns_key_file is None:
        return None
    missing = [
        name
        for name, value in (
            ("delivery_apns_key_id", s.delivery_apns_key_id),
            ("delivery_apns_team_id", s.delivery_apns_team_id),
            ("delivery_apns_topic", s.delivery_apns_topic),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"APNs needs {', '.join(missing)} with delivery_apns_key_file")
    assert s.delivery_apns_key_id
    assert s.delivery_apns_team_id
    assert s.delivery_apns_topic
    return Apns(
        s,
        s.delivery_apns_key_file.read_text(),
        s.delivery_apns_key_id,
        s.delivery_apns_team_id,
        s.delivery_apns_topic,
    )
