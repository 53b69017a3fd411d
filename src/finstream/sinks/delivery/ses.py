"""AWS SES v2 SendEmail (``POST /v2/email/outbound-emails``), signed with SigV4.

Signing is botocore's (``botocore.auth.SigV4Auth``, service ``ses``); the
request goes out through httpx like every other provider, so timeouts,
transport errors and the fakes work the same way. The message id travels as
an SES message tag (``EmailTags``), visible in SES event publishing.

SES has no API to ask whether it took a message, and a resend is a second
email: an ambiguous send is settled by ``delivery_unknown_outcome``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

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

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _tag(value: str) -> str:
    # SES tag values: ASCII letters, digits, underscores and dashes, at most 256.
    return _TAG_UNSAFE.sub("_", value)[:256] or "_"


# -- classification of the answers --------------------------------------------------

_SES_CLASSES = {
    "TooManyRequestsException": ErrorClass.THROTTLED,
    "LimitExceededException": ErrorClass.THROTTLED,  # sending quota for the period
    "MessageRejected": ErrorClass.PERMANENT,
    "BadRequestException": ErrorClass.PERMANENT,
    # The account or its set-up cannot send at all: provider-level, fail over.
    "AccountSuspendedException": ErrorClass.AUTH,
    "SendingPausedException": ErrorClass.AUTH,
    "MailFromDomainNotVerifiedException": ErrorClass.AUTH,
    "NotFoundException": ErrorClass.AUTH,
    "AccessDeniedException": ErrorClass.AUTH,
    "UnrecognizedClientException": ErrorClass.AUTH,
    "InvalidSignatureException": ErrorClass.AUTH,
    "SignatureDoesNotMatch": ErrorClass.AUTH,
    "ExpiredTokenException": ErrorClass.AUTH,
    "ThrottlingException": ErrorClass.THROTTLED,
    "ServiceUnavailable": ErrorClass.TRANSIENT,
    "InternalFailure": ErrorClass.TRANSIENT,
}


def _ses_code(headers: Mapping[str, str], data: Any) -> str | None:
    # restJson: the type is in x-amzn-ErrorType ("Code:http://..."), or in the
    # body's __type ("namespace#Code") or code.
    raw = headers.get("x-amzn-errortype")
    if not raw and isinstance(data, dict):
        raw = data.get("__type") or data.get("code") or data.get("Code")
    if not raw or not isinstance(raw, str):
        return None
    return raw.split(":", 1)[0].rsplit("#", 1)[-1].strip() or None


def classify(
    status: int, headers: Mapping[str, str], body: bytes, now: datetime
) -> DeliveryError | None:
    data = json_body(body)
    if 200 <= status < 300:
        if isinstance(data, dict) and isinstance(data.get("MessageId"), str) and data["MessageId"]:
            return None
        return DeliveryError(
            ErrorClass.MALFORMED,
            f"HTTP {status} without MessageId: {snippet(body)}",
            provider="ses",
            status=status,
            ambiguous=True,
        )
    code = _ses_code(headers, data)
    message = ""
    if isinstance(data, dict):
        message = str(data.get("message") or data.get("Message") or "")
    message = message or snippet(body) or f"HTTP {status}"
    cls = _SES_CLASSES.get(code or "")
    if cls is None:
        return by_status(
            "ses", status, message, code=code, retry_after=throttle_delay(headers, now)
        )
    return DeliveryError(
        cls,
        message,
        provider="ses",
        status=status,
        code=code,
        retry_after=throttle_delay(headers, now) if cls.retryable else None,
    )


class Ses(HttpProvider):
    name = "ses"
    channel = "EMAIL"
    reconcile = Reconcile.NONE

    def __init__(self, settings: Settings, access_key: str, secret_key: str) -> None:
        super().__init__(settings)
        region = settings.delivery_ses_region
        base = settings.delivery_ses_url or f"https://email.{region}.amazonaws.com"
        self._url = f"{base.rstrip('/')}/v2/email/outbound-emails"
        self._signer = SigV4Auth(Credentials(access_key, secret_key), "ses", region)
        self.rate = settings.delivery_ses_rate

    def payload(self, message: Message) -> dict[str, Any]:
        s = self.settings
        parts = email_parts(
            message,
            s.delivery_email_from,
            s.delivery_email_unsubscribe_url,
            s.delivery_email_unsubscribe_mailto,
        )
        body: dict[str, Any] = {"Text": {"Data": parts.text, "Charset": "UTF-8"}}
        if parts.html:
            body["Html"] = {"Data": parts.html, "Charset": "UTF-8"}
        sender = (
            f'"{parts.from_name}" <{parts.from_address}>' if parts.from_name else parts.from_address
        )
        request: dict[str, Any] = {
            "FromEmailAddress": sender,
            "Destination": {"ToAddresses": [parts.to]},
            "Content": {
                "Simple": {
                    "Subject": {"Data": parts.subject, "Charset": "UTF-8"},
                    "Body": body,
                    "Headers": [{"Name": k, "Value": v} for k, v in parts.headers.items()],
                }
            },
            "EmailTags": [
                {"Name": "message_id", "Value": _tag(str(message["message_id"]))},
                {"Name": "category", "Value": _tag(str(message.get("category") or "none"))},
            ],
        }
        if s.delivery_ses_configuration_set:
            request["ConfigurationSetName"] = s.delivery_ses_configuration_set
        return request

    def signed_headers(self, body: bytes) -> dict[str, str]:
        aws = AWSRequest(
            method="POST",
            url=self._url,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        self._signer.add_auth(aws)
        return {k: v for k, v in aws.headers.items()}

    async def send(self, message: Message) -> Sent:
        body = json.dumps(self.payload(message)).encode()
        response = await self.request(
            "POST", self._url, content=body, headers=self.signed_headers(body)
        )
        error = classify(
            response.status_code, self.lower_headers(response), response.content, self.now()
        )
        if error is not None:
            raise error
        return Sent(str(response.json()["MessageId"]))


def create(settings: Settings) -> Ses | None:
    key = settings.delivery_ses_access_key_id
    secret = settings.delivery_ses_secret_access_key
    if not key or secret is None or not secret.get_secret_value():
        return None
    return Ses(settings, key, secret.get_secret_value())
