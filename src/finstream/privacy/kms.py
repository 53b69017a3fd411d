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
  version by the encryption context. With ``FINSTREAM_PRIVACY_MASTER_KEYS``
  set as well, keys those wrapped still unwrap locally until ``finstream keys
  rewrap`` has moved them under KMS (:class:`MovingToKms`).

Workers unwrap a user's key once per ``privacy_key_cache_seconds``
(``finstream.privacy.keys``), so a KMS call is rare on the hot path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import random
from typing import Any, Protocol

import httpx
from prometheus_client import Counter

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
    # How many wraps or unwraps are worth running at once: 1 where they are CPU
    # work in this process, more where each is a round trip to a service.
    concurrency: int

    async def current(self) -> str:
        """The id that new wraps are stored under (``keys rewrap`` moves the others)."""
        ...

    async def wrap(self, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        """(id of the master key used, the wrapped key)."""
        ...

    async def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes: ...

    async def close(self) -> None: ...


class LocalMasterKeys:
    name = "local"
    concurrency = 1

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        if current not in keys:
            raise PrivacyConfigError(f"master key {current!r} is not among the keys")
        self.keys = keys
        self._current = current

    @property
    def current_id(self) -> str:
        return self._current

    async def current(self) -> str:
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
    """KMS refused a request, or did not answer within its attempts."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


KMS_REQUESTS = Counter(
    "finstream_privacy_kms_requests_total",
    "Requests to AWS KMS by action and outcome (ok, retried: throttled or failed and tried "
    "again, failed: given up or refused)",
    ["action", "outcome"],
)

# Answers that may succeed when asked again: KMS's throttling (HTTP 400) and its
# own failures (5xx: KMSInternalException, DependencyTimeoutException,
# KeyUnavailableException).
_RETRY_CODES = frozenset({"ThrottlingException", "KMSInternalException"})
# The blob does not open under that key and context: the same as a local master
# key failing to unwrap, not an outage.
_NOT_OPENING = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})


class AwsKms:
    """AWS KMS ``TrentService.Encrypt``/``Decrypt`` over HTTPS (JSON 1.1, SigV4).

    Throttling, KMS's 5xx answers and transport failures are tried again, up to
    ``attempts`` in all, after exponential backoff with full jitter (what the
    AWS SDKs do); at most ``concurrency`` requests are in flight, so a batch of
    cold keys unwraps in parallel without bursting past the account's quota.
    Wrapped keys are stored under the key's ARN as KMS answers it, so an alias
    re-pointed to a new key still decrypts old blobs with the key that made them.
    """

    name = "aws-kms"

    def __init__(
        self,
        *,
        key_id: str,
        region: str,
        access_key: str,
        secret_key: str,
        url: str | None = None,
        timeout: float = 5.0,
        attempts: int = 5,
        concurrency: int = 16,
        backoff: float = 0.05,
        backoff_cap: float = 2.0,
    ) -> None:
        from botocore.auth import SigV4Auth
        from botocore.credentials import Credentials

        self.key_id = key_id
        self.url = (url or f"https://kms.{region}.amazonaws.com").rstrip("/") + "/"
        self.attempts = max(1, attempts)
        self.concurrency = max(1, concurrency)
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self._signer = SigV4Auth(Credentials(access_key, secret_key), "kms", region)
        limits = httpx.Limits(max_connections=self.concurrency)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self._slots = asyncio.Semaphore(self.concurrency)
        self._arn: str | None = None

    async def current(self) -> str:
        """The ARN of the key the configured id (an alias, an id or an ARN) names now."""
        if self._arn is None:
            out = await self._call("DescribeKey", {"KeyId": self.key_id})
            self._arn = str(out["KeyMetadata"]["Arn"])
        return self._arn

    async def _call(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        for attempt in range(1, self.attempts + 1):
            async with self._slots:
                retry, result = await self._once(action, data)
            if not retry:
                KMS_REQUESTS.labels(action, "ok").inc()
                return result
            if attempt == self.attempts:
                KMS_REQUESTS.labels(action, "failed").inc()
                raise KmsError(f"{retry} (gave up after {attempt} attempts)", "retries")
            KMS_REQUESTS.labels(action, "retried").inc()
            ceiling = min(self.backoff_cap, self.backoff * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, ceiling))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _once(self, action: str, data: bytes) -> tuple[str, dict[str, Any]]:
        """One request: ("", the answer), or (why, {}) when it may be tried again."""
        from botocore.awsrequest import AWSRequest

        headers = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{action}",
        }
        request = AWSRequest(method="POST", url=self.url, data=data, headers=headers)
        self._signer.add_auth(request)  # per attempt: the signature carries the time
        try:
            response = await self._client.post(
                self.url, content=data, headers=dict(request.headers.items())
            )
        except httpx.TransportError as exc:
            return f"KMS {action}: {type(exc).__name__}: {exc}", {}
        if response.status_code == 200:
            try:
                result: dict[str, Any] = response.json()
            except ValueError:
                return f"KMS {action}: 200 with a body that is not JSON", {}
            return "", result
        try:
            err = response.json()
            code = str(err.get("__type", "")).rpartition("#")[2] or "error"
            text = str(err.get("message") or err.get("Message") or "")
        except (ValueError, AttributeError):
            code, text = "error", response.text[:200]
        message = f"KMS {action}: {response.status_code} {code}: {text}"
        if response.status_code >= 500 or code in _RETRY_CODES:
            return message, {}
        KMS_REQUESTS.labels(action, "failed").inc()
        if code in _NOT_OPENING:
            raise EnvelopeError(message)
        raise KmsError(message, code)

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
        return str(out.get("KeyId") or self.key_id), base64.b64decode(out["CiphertextBlob"])

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


class MovingToKms:
    """AWS KMS wraps; keys still wrapped by local master keys unwrap with those.

    Configured by setting both ``FINSTREAM_PRIVACY_KMS=aws-kms`` and
    ``FINSTREAM_PRIVACY_MASTER_KEYS``: ``finstream keys rewrap`` then moves
    every stored key under KMS, after which the local keys can go.
    """

    name = "aws-kms"

    def __init__(self, kms: AwsKms, local: LocalMasterKeys) -> None:
        self.kms = kms
        self.local = local
        self.concurrency = kms.concurrency

    async def current(self) -> str:
        return await self.kms.current()

    async def wrap(self, plaintext: bytes, context: bytes) -> tuple[str, bytes]:
        return await self.kms.wrap(plaintext, context)

    async def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        if key_id in self.local.keys:
            return await self.local.unwrap(key_id, wrapped, context)
        return await self.kms.unwrap(key_id, wrapped, context)

    async def close(self) -> None:
        await self.kms.close()


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
        kms = AwsKms(
            key_id=settings.privacy_aws_kms_key_id,
            region=settings.privacy_aws_kms_region,
            access_key=settings.privacy_aws_access_key_id,
            secret_key=secret.get_secret_value(),
            url=settings.privacy_aws_kms_url,
            timeout=settings.privacy_aws_kms_timeout_seconds,
            attempts=settings.privacy_aws_kms_attempts,
            concurrency=settings.privacy_aws_kms_concurrency,
        )
        local = settings.privacy_master_keys
        if local is not None and local.get_secret_value().strip():
            return MovingToKms(kms, LocalMasterKeys.parse(local.get_secret_value()))
        return kms
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
