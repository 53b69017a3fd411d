"""Fake Amazon SNS, the side an HTTP(S) subscriber sees: signed messages and their certificate.

SNS signs each message it posts (``Signature``: base64 RSA PKCS#1 v1.5 over
the canonical string of its fields, SHA1 for SignatureVersion 1, SHA256 for
2) with the key of the X.509 certificate it serves at ``SigningCertURL``;
a SubscriptionConfirmation carries a ``SubscribeURL`` to GET. This fake
serves the certificate (``/SimpleNotificationService-<id>.pem``) and the
confirmation endpoint (``/confirm``, recording tokens), and builds signed
Notification and SubscriptionConfirmation documents the way SNS does.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from finstream.api.ses_sns import string_to_sign
from finstream.sandbox.base import HttpFake


def _certificate(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.us-east-1.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class FakeSns(HttpFake):
    def __init__(self, topic: str = "arn:aws:sns:us-east-1:123456789012:finstream-ses") -> None:
        super().__init__()
        self.topic = topic
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = _certificate(self.key)
        self.cert_name = f"SimpleNotificationService-{secrets.token_hex(8)}.pem"
        self.confirmed: list[str] = []
        self.certificate_fetches = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"/{self.cert_name}", self.certificate)
        app.router.add_get("/confirm", self.confirm)
        return app

    async def certificate(self, request: web.Request) -> web.Response:
        self.certificate_fetches += 1
        return web.Response(body=self.pem, content_type="application/x-pem-file")

    async def confirm(self, request: web.Request) -> web.Response:
        self.confirmed.append(request.query.get("Token", ""))
        return web.Response(text="<ConfirmSubscriptionResponse/>", content_type="text/xml")

    @property
    def cert_url(self) -> str:
        return f"{self.url}/{self.cert_name}"

    def _sign(self, doc: dict[str, Any], version: str) -> dict[str, Any]:
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(string_to_sign(doc), padding.PKCS1v15(), algorithm)
        return {
            **doc,
            "SignatureVersion": version,
            "Signature": base64.b64encode(signature).decode(),
            "SigningCertURL": self.cert_url,
        }

    def _now(self) -> str:
        return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def notification(
        self, message: dict[str, Any], *, version: str = "2", topic: str | None = None
    ) -> dict[str, Any]:
        doc = {
            "Type": "Notification",
            "MessageId": secrets.token_hex(16),
            "TopicArn": topic or self.topic,
            "Message": json.dumps(message),
            "Timestamp": self._now(),
            "UnsubscribeURL": f"{self.url}/unsubscribe",
        }
        return self._sign(doc, version)

    def subscription(self, *, version: str = "1") -> dict[str, Any]:
        token = secrets.token_hex(16)
        doc = {
            "Type": "SubscriptionConfirmation",
            "MessageId": secrets.token_hex(16),
            "Token": token,
            "TopicArn": self.topic,
            "Message": f"You have chosen to subscribe to the topic {self.topic}.",
            "SubscribeURL": f"{self.url}/confirm?Action=ConfirmSubscription&Token={token}",
            "Timestamp": self._now(),
        }
        return self._sign(doc, version)


def ses_event(kind: str, message_id: str, recipient: str, **extra: Any) -> dict[str, Any]:
    """An SES event-publishing record about one of our messages (tagged with its id)."""
    event: dict[str, Any] = {
        "eventType": kind,
        "mail": {
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
            "messageId": f"ses-{secrets.token_hex(8)}",
            "source": "alerts@finstream.local",
            "destination": [recipient],
            "tags": {"message_id": [message_id]},
        },
    }
    if kind == "Bounce":
        event["bounce"] = {
            "bounceType": extra.get("bounce_type", "Permanent"),
            "bounceSubType": "General",
            "bouncedRecipients": [
                {
                    "emailAddress": recipient,
                    "diagnosticCode": f"smtp; 550 5.1.1 {recipient} unknown",
                }
            ],
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
        }
    elif kind == "Complaint":
        event["complaint"] = {
            "complainedRecipients": [{"emailAddress": recipient}],
            "complaintFeedbackType": "abuse",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(),
        }
    elif kind == "Delivery":
        event["delivery"] = {"timestamp": dt.datetime.now(dt.UTC).isoformat()}
    return event
