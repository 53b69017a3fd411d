"""Master keys: who wraps and unwraps users' data keys.

A small provider interface, so that production can keep the master key in a
key management service and never in the process:

* ``local``: master keys from ``FINSTREAM_PRIVACY_MASTER_KEYS``
  (``ID:BASE64,...``; the first wraps, every one unwraps). In
  ``FINSTREAM_ENV`` dev and test, without the setting, a built-in development
  key (id ``dev``) is used; any other environment refuses to start.
* ``aws-kms``: AWS KMS ``Encrypt``/``Decrypt`` (JSON 1.1 protocol, SigV4
  signed by botocore, sent with httpx) under ``FINSTREAM_PRIVACY_AWS_KMS_KEY_ID``;
  the wrapped key is KMS's ciphertext blob, bound to the data key's user and
  version by the encryption context.

Workers unwrap a user's key once per ``privacy_key_cache_seconds``
(``finstream.privacy.keys``), so a KMS call is rare on the hot path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Protocol

import httpx

from finstream.domain.envelope import KEY_BYTES, EnvelopeError, unwrap_key, wrap_key
from finstream.settings import Settings

DEV_KEY_ID = "dev"
# Development only (FINSTREAM_ENV dev/test): anyone can read it here.
DEV_MASTER_KEY = hashlib.sha256(b"finstream development master key; never in production").digest()
DEV_TOKEN_SECRET = b"finstream development token secret; never in production"
DEV_ENVS = ("dev", "test")


class PrivacyConfigError(ValueError):
    """The privacy settings are missing or malformed (one line, for the operator)."""


class MasterKeys(Protocol):
    name: str

    @property
    def current_id(self) -> str: ...

    async def wrap(self, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        """(id of the master key used, the wrapped key)."""
        ...

    async def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes: ...

    async def close(self) -> None: ...


class LocalMasterKeys:
    name = "local"

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        if current not in keys:
            raise PrivacyConfigError(f"master key {current!r} is not among the keys")
        self.keys = keys
        self._current = current

    @property
    def current_id(self) -> str:
        return self._current

    @classmethod
    def parse(cls, text: str) -> LocalMasterKeys:
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for item in (p.strip() for p in text.split(",")):
            if not item:
                continue
            key_id, sep, b64 = item.partition(":")
            if not sep or not key_id or not key_id.replace("-", "").replace("_", "").isalnum():
                raise PrivacyConfigError(
                    "FINSTREAM_PRIVACY_MASTER_KEYS: each key is ID:BASE64 (ID letters, digits, - or _)"
                )
            try:
                raw = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise PrivacyConfigError(
                    f"FINSTREAM_PRIVACY_MASTER_KEYS: key {key_id!r} is not base64"
                ) from None
            if len(raw) != KEY_BYTES:
                raise PrivacyConfigError(
                    f"FINSTREAM_PRIVACY_MASTER_KEYS: key {key_id!r} has {len(raw)} bytes, "
                    f"expected {KEY_BYTES} (openssl rand -base64 32)"
                )
            if key_id in keys:
                raise PrivacyConfigError(f"FINSTREAM_PRIVACY_MASTER_KEYS: {key_id!r} twice")
            keys[key_id] = raw
            order.append(key_id)
        if not order:
            raise PrivacyConfigError("FINSTREAM_PRIVACY_MASTER_KEYS holds no key")
        return cls(keys, order[0])

    async def wrap(self, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        return self._current, wrap_key(self.keys[self._current], plaintext, context)

    async def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        master = self.keys.get(key_id)
        if master is None:
            raise EnvelopeError(
                f"master key {key_id!r} is not configured (FINSTREAM_PRIVACY_MASTER_KEYS)"
            )
        return unwrap_key(master, wrapped, context)

    async def close(self) -> None:
        return None


class KmsError(RuntimeError):
    pass


class AwsKms:
    """AWS KMS ``TrentService.Encrypt``/``Decrypt`` over HTTPS (JSON 1.1, SigV4)."""

    name = "aws-kms"

    def __init__(
        self,
        *,
        key_id: str,
        region: str,
        access_key: str,
        secret_key: str,
        url: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        from botocore.auth import SigV4Auth
        from botocore.credentials import Credentials

        self.key_id = key_id
        self.url = (url or f"https://kms.{region}.amazonaws.com").rstrip("/") + "/"
        self._signer = SigV4Auth(Credentials(access_key, secret_key), "kms", region)
        self._client = httpx.AsyncClient(timeout=timeout)

    @property
    def current_id(self) -> str:
        return self.key_id

    async def _call(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        from botocore.awsrequest import AWSRequest

        data = json.dumps(body).encode()
        headers = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{action}",
        }
        request = AWSRequest(method="POST", url=self.url, data=data, headers=headers)
        self._signer.add_auth(request)
        try:
            response = await self._client.post(
                self.url, content=data, headers=dict(request.headers.items())
            )
        except httpx.HTTPError as exc:
            raise KmsError(f"KMS {action}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                err = response.json()
                kind = str(err.get("__type", "")).rpartition("#")[2] or "error"
                text = err.get("message") or err.get("Message") or ""
            except ValueError:
                kind, text = "error", response.text[:200]
            raise KmsError(f"KMS {action}: {response.status_code} {kind}: {text}")
        result: dict[str, Any] = response.json()
        return result

    @staticmethod
    def _context(context: bytes) -> dict[str, str]:
        return {"finstream": context.decode()}

    async def wrap(self, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        out = await self._call(
            "Encrypt",
            {
                "KeyId": self.key_id,
                "Plaintext": base64.b64encode(plaintext).decode(),
                "EncryptionContext": self._context(context),
            },
        )
        return self.key_id, base64.b64decode(out["CiphertextBlob"])

    async def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        out = await self._call(
            "Decrypt",
            {
                "KeyId": key_id,
                "CiphertextBlob": base64.b64encode(wrapped).decode(),
                "EncryptionContext": self._context(context),
            },
        )
        return base64.b64decode(out["Plaintext"])

    async def close(self) -> None:
        await self._client.aclose()


def master_keys(settings: Settings) -> MasterKeys:
    """The configured master key provider, or one clear line saying what is missing."""
    if settings.privacy_kms == "aws-kms":
        secret = settings.privacy_aws_secret_access_key
        if not settings.privacy_aws_kms_key_id:
            raise PrivacyConfigError("FINSTREAM_PRIVACY_KMS=aws-kms needs PRIVACY_AWS_KMS_KEY_ID")
        if not settings.privacy_aws_access_key_id or secret is None:
            raise PrivacyConfigError(
                "FINSTREAM_PRIVACY_KMS=aws-kms needs FINSTREAM_PRIVACY_AWS_ACCESS_KEY_ID and "
                "FINSTREAM_PRIVACY_AWS_SECRET_ACCESS_KEY"
            )
        return AwsKms(
            key_id=settings.privacy_aws_kms_key_id,
            region=settings.privacy_aws_kms_region,
            access_key=settings.privacy_aws_access_key_id,
            secret_key=secret.get_secret_value(),
            url=settings.privacy_aws_kms_url,
        )
    configured = settings.privacy_master_keys
    if configured is not None and configured.get_secret_value().strip():
        return LocalMasterKeys.parse(configured.get_secret_value())
    if settings.env in DEV_ENVS:
        return LocalMasterKeys({DEV_KEY_ID: DEV_MASTER_KEY}, DEV_KEY_ID)
    raise PrivacyConfigError(
        f"FINSTREAM_PRIVACY_MASTER_KEYS is required with FINSTREAM_ENV={settings.env} "
        "(or FINSTREAM_PRIVACY_KMS=aws-kms); only dev and test use the built-in development key"
    )


def token_secrets(settings: Settings) -> list[bytes]:
    """Secrets for unsubscribe links and code digests: the first signs, all verify."""
    configured = settings.privacy_token_secrets
    if configured is not None and configured.get_secret_value().strip():
        secrets = [s.strip().encode() for s in configured.get_secret_value().split(",")]
        secrets = [s for s in secrets if s]
        short = [i for i, s in enumerate(secrets) if len(s) < 32]
        if short:
            raise PrivacyConfigError(
                "FINSTREAM_PRIVACY_TOKEN_SECRETS: every secret needs at least 32 characters"
            )
        return secrets
    if settings.env in DEV_ENVS:
        return [DEV_TOKEN_SECRET]
    raise PrivacyConfigError(
        f"FINSTREAM_PRIVACY_TOKEN_SECRETS is required with FINSTREAM_ENV={settings.env} "
        "(unsubscribe links and verification codes); only dev and test use a built-in one"
    )


def check_unsubscribe_url(settings: Settings) -> None:
    """Refuse the placeholder List-Unsubscribe target outside dev and test."""
    url = settings.delivery_email_unsubscribe_url or ""
    if settings.env not in DEV_ENVS and "finstream.local" in url:
        raise PrivacyConfigError(
            "FINSTREAM_DELIVERY_EMAIL_UNSUBSCRIBE_URL still points at the placeholder "
            f"finstream.local with FINSTREAM_ENV={settings.env}: set it to the API's public "
            "https://.../v1/unsubscribe/{token}"
        )
