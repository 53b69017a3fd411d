"""Firebase Cloud Messaging HTTP v1 (``POST /v1/projects/{id}/messages:send``).

Authentication is OAuth2 with a service account: a JWT signed with the
account's RSA key (RS256, pyjwt) is exchanged at the token endpoint (the
account file's ``token_uri``, or ``delivery_fcm_token_url``) for an access
token, cached until five minutes before it expires and fetched again when
FCM says it is no longer valid.

A resend cannot show the user a second notification: every try carries the
same collapse identity (Android ``notification.tag`` replaces a shown
notification with the same tag; ``apns-collapse-id`` does the same on iOS),
so an ambiguous send is simply sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt

from finstream.domain.delivery.channels import PUSH_MAX_PAYLOAD_BYTES
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

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
REFRESH_MARGIN = 300.0  # seconds before expiry when a token is renewed
_RESERVED_DATA = ("from", "message_type", "notification")


def collapse_id(message_id: str) -> str:
    # apns-collapse-id is at most 64 bytes.
    return message_id if len(message_id) <= 64 else hashlib.sha256(message_id.encode()).hexdigest()


class ServiceAccount:
    """The fields of a Google service-account key file that the token exchange needs."""

    def __init__(self, info: dict[str, Any]) -> None:
        missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
        if missing:
            raise ValueError(f"service account file lacks {missing}")
        self.client_email = str(info["client_email"])
        self.private_key = str(info["private_key"])
        self.private_key_id = info.get("private_key_id")
        self.token_uri = str(info["token_uri"])
        self.project_id = info.get("project_id")

    @classmethod
    def from_file(cls, path: Path) -> ServiceAccount:
        return cls(json.loads(path.read_text()))


# -- classification of the answers --------------------------------------------------

_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def fcm_error_code(data: Any) -> tuple[str | None, str | None, str]:
    """(FcmError errorCode, canonical status, message) of an FCM error body."""
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return None, None, ""
    fcm_code = None
    for detail in err.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == _FCM_ERROR_TYPE:
            fcm_code = detail.get("errorCode")
    status = err.get("status")
    return (
        fcm_code if isinstance(fcm_code, str) else None,
        status if isinstance(status, str) else None,
        str(err.get("message") or ""),
    )


def classify(
    status: int, headers: Mapping[str, str], body: bytes, now: datetime
) -> DeliveryError | None:
    data = json_body(body)
    if status == 200:
        if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
            return None
        return DeliveryError(
            ErrorClass.MALFORMED,
            f"HTTP 200 without a message name: {snippet(body)}",
            provider="fcm",
            status=status,
            ambiguous=True,
        )
    fcm_code, canonical, message = fcm_error_code(data)
    code = fcm_code or canonical
    message = message or snippet(body) or f"HTTP {status}"
    wait = throttle_delay(headers, now)
    if code == "UNREGISTERED":
        return DeliveryError(
            ErrorClass.INVALID_RECIPIENT,
            message,
            provider="fcm",
            status=status,
            code=code,
            feedback=Feedback.TOKEN_INVALID,
        )
    if code == "SENDER_ID_MISMATCH":
        return DeliveryError(
            ErrorClass.INVALID_RECIPIENT, message, provider="fcm", status=status, code=code
        )
    if code in ("QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"):
        return DeliveryError(
            ErrorClass.THROTTLED,
            message,
            provider="fcm",
            status=status,
            code=code,
            retry_after=wait,
        )
    if code in ("UNAVAILABLE", "INTERNAL"):
        return DeliveryError(
            ErrorClass.TRANSIENT,
            message,
            provider="fcm",
            status=status,
            code=code,
            retry_after=wait,
        )
    if code in ("THIRD_PARTY_AUTH_ERROR", "UNAUTHENTICATED", "PERMISSION_DENIED"):
        return DeliveryError(ErrorClass.AUTH, message, provider="fcm", status=status, code=code)
    if code == "INVALID_ARGUMENT":
        return DeliveryError(
            ErrorClass.PERMANENT, message, provider="fcm", status=status, code=code
        )
    return by_status("fcm", status, message, code=code, retry_after=wait)


class Fcm(HttpProvider):
    name = "fcm"
    channel = "PUSH"
    reconcile = Reconcile.IDEMPOTENT

    def __init__(self, settings: Settings, account: ServiceAccount, project_id: str) -> None:
        super().__init__(settings)
        self.rate = settings.delivery_fcm_rate
        self._account = account
        self._token_url = settings.delivery_fcm_token_url or account.token_uri
        self._url = (
            f"{settings.delivery_fcm_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        )
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        self.token_fetches = 0

    def supports(self, message: Message) -> bool:
        return message.get("platform") == "FCM"

    # -- OAuth2 ------------------------------------------------------------------
    def assertion(self, now: float) -> str:
        headers = {"kid": self._account.private_key_id} if self._account.private_key_id else None
        claims = {
            "iss": self._account.client_email,
            "sub": self._account.client_email,
            "scope": SCOPE,
            "aud": self._token_url,
            "iat": int(now),
            "exp": int(now) + 3600,
        }
        return jwt.encode(claims, self._account.private_key, algorithm="RS256", headers=headers)

    async def access_token(self, *, refresh: bool = False) -> str:
        async with self._token_lock:
            now = time.time()
            if not refresh and self._token and now < self._token_expires - REFRESH_MARGIN:
                return self._token
            try:
                response = await self.request(
                    "POST",
                    self._token_url,
                    data={"grant_type": GRANT_TYPE, "assertion": self.assertion(now)},
                )
            except DeliveryError as exc:
                # Nothing was sent to FCM yet: a token failure is never ambiguous.
                raise DeliveryError(
                    exc.error_class, f"token endpoint: {exc.args[0]}", provider=self.name
                ) from None
            try:
                data = response.json()
            except ValueError:
                data = None
            if response.status_code != 200 or not isinstance(data, dict):
                cls = (
                    ErrorClass.TRANSIENT
                    if response.status_code >= 500 or response.status_code == 429
                    else ErrorClass.AUTH
                )
                detail = data.get("error_description") or data.get("error") if data else None
                raise DeliveryError(
                    cls,
                    f"token endpoint answered {response.status_code}: {detail or response.text[:200]}",
                    provider=self.name,
                    status=response.status_code,
                )
            token = data.get("access_token")
            if not isinstance(token, str) or not token:
                raise DeliveryError(
                    ErrorClass.MALFORMED,
                    "token endpoint answered without access_token",
                    provider=self.name,
                )
            expires_in = data.get("expires_in")
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else 3600.0
            self._token, self._token_expires = token, now + lifetime
            self.token_fetches += 1
            return token

    # -- sending -------------------------------------------------------------------
    def payload(self, message: Message) -> dict[str, Any]:
        mid = str(message["message_id"])
        collapse = collapse_id(mid)
        high = message.get("priority") in ("HIGH", "URGENT", "CRITICAL")
        data = {
            k: str(v)
            for k, v in (message.get("data") or {}).items()
            if k not in _RESERVED_DATA and not k.startswith(("google", "gcm"))
        }
        data["finstream_message_id"] = mid
        android: dict[str, Any] = {
            "priority": "HIGH" if high else "NORMAL",
            "notification": {"tag": collapse},
        }
        apns_headers = {"apns-collapse-id": collapse, "apns-priority": "10" if high else "5"}
        expires = message.get("expires_at")
        if expires is not None:
            ttl = max(int(to_micros(expires) / 1_000_000 - time.time()), 0)
            android["ttl"] = f"{ttl}s"
            apns_headers["apns-expiration"] = str(int(to_micros(expires) / 1_000_000))
        notification = {"body": str(message.get("body_text") or "")}
        if message.get("subject"):
            notification["title"] = str(message["subject"])
        return {
            "message": {
                "token": str(message["recipient"]),
                "notification": notification,
                "data": data,
                "android": android,
                "apns": {"headers": apns_headers},
            }
        }

    async def send(self, message: Message) -> Sent:
        body = self.payload(message)
        size = len(json.dumps(body["message"]).encode()) - len(str(message["recipient"]))
        if size > PUSH_MAX_PAYLOAD_BYTES:
            raise DeliveryError(
                ErrorClass.PERMANENT,
                f"payload of {size} bytes (FCM takes at most {PUSH_MAX_PAYLOAD_BYTES})",
                provider=self.name,
            )
        for refreshed in (False, True):
            token = await self.access_token(refresh=refreshed)
            response = await self.request(
                "POST", self._url, json=body, headers={"authorization": f"Bearer {token}"}
            )
            error = classify(
                response.status_code, self.lower_headers(response), response.content, self.now()
            )
            if error is None:
                return Sent(str(response.json()["name"]))
            if response.status_code == 401 and error.code == "UNAUTHENTICATED" and not refreshed:
                continue  # the access token was revoked or expired early: fetch a new one once
            raise error
        raise AssertionError("unreachable")  # pragma: no cover


def create(settings: Settings) -> Fcm | None:
    path = settings.delivery_fcm_service_account_file
    if path is None:
        return None
    account = ServiceAccount.from_file(path)
    project = settings.delivery_fcm_project_id or account.project_id
    if not project:
        raise ValueError("FCM needs delivery_fcm_project_id (or project_id in the account file)")
    return Fcm(settings, account, str(project))
