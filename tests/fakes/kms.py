"""Fake AWS KMS: ``TrentService.Encrypt``, ``Decrypt`` and ``DescribeKey``, JSON 1.1, SigV4.

What finstream's :class:`~finstream.privacy.kms.AwsKms` relies on, as KMS
documents it:

* ``POST /`` with ``X-Amz-Target: TrentService.<Action>`` and
  ``Content-Type: application/x-amz-json-1.1``, signed with SigV4 for the
  ``kms`` service (checked, :func:`tests.fakes.aws.sigv4_problem`);
* keys named by id, ARN, alias name (``alias/...``) or alias ARN; Encrypt and
  Decrypt answer with the key's ARN in ``KeyId``; an alias can be re-pointed
  (:meth:`FakeKms.point`), and a ciphertext keeps naming the key that made it;
* the encryption context is authenticated with the ciphertext: Decrypt with
  another context, or a blob that was altered, is ``InvalidCiphertextException``;
  Decrypt naming a key other than the blob's is ``IncorrectKeyException``;
* errors are ``{"__type": ..., "message": ...}``: ``ThrottlingException``
  (HTTP 400) beyond ``rate`` requests a second or when the fault script says
  ``throttle``, ``KMSInternalException`` (500) for ``error``,
  ``DependencyTimeoutException`` (503) after ``timeout``'s hang,
  ``UnrecognizedClientException``/``IncorrectSignatureException`` (400) for
  signatures, ``DisabledException``, ``NotFoundException``,
  ``ValidationException`` and ``SerializationException`` (400);
* a delay per request (``latency``: a few milliseconds, as KMS in the same region).

The ciphertext blob is this fake's own format (KMS's is opaque to clients too).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tests.fakes.aws import sigv4_problem

from finstream.sandbox.base import HttpFake

ACCOUNT = "111122223333"
_MAGIC = b"FKMS1"
_ID_BYTES = 36  # a key id is a UUID in its text form


@dataclass
class Key:
    key_id: str
    arn: str
    material: bytes
    enabled: bool = True


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"__type": code, "message": message},
        status=status,
        headers={"x-amzn-RequestId": str(uuid.uuid4())},
        content_type="application/x-amz-json-1.1",
    )


def _ok(key: Key, **fields: str) -> web.Response:
    """Encrypt's and Decrypt's answer: the key's ARN, the algorithm, the result."""
    return web.json_response(
        {**fields, "KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
        content_type="application/x-amz-json-1.1",
    )


def _context_aad(context: Any) -> bytes:
    if context is None:
        return b"{}"
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise ValueError("EncryptionContext must map strings to strings")
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


class FakeKms(HttpFake):
    def __init__(
        self,
        access_key: str = "AKIDFAKEKMS",
        secret_key: str = "fake-kms-secret",
        region: str = "eu-west-1",
        *,
        latency: float = 0.004,
        rate: float | None = None,
    ) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.faults.latency = latency
        self.rate = rate  # requests a second before ThrottlingException (None: no quota)
        self.keys: dict[str, Key] = {}
        self.aliases: dict[str, str] = {}
        self.calls: Counter[str] = Counter()  # answered with 200, by action
        self.errors: Counter[str] = Counter()  # answered with an error, by its code
        self.in_flight = 0
        self.max_in_flight = 0
        self._bucket: float | None = None  # full at the first request
        self._refilled = time.monotonic()

    # -- set-up --------------------------------------------------------------------------

    def create_key(self, alias: str | None = None) -> str:
        """A new symmetric key (its ARN); ``alias``: ``alias/<name>`` pointed at it."""
        key_id = str(uuid.uuid4())
        arn = f"arn:aws:kms:{self.region}:{ACCOUNT}:key/{key_id}"
        self.keys[key_id] = Key(key_id, arn, os.urandom(32))
        if alias is not None:
            self.point(alias, arn)
        return arn

    def point(self, alias: str, arn: str) -> None:
        if not alias.startswith("alias/"):
            raise ValueError("alias names start with alias/")
        self.aliases[alias] = arn.rsplit("/", 1)[1]

    def disable(self, arn: str) -> None:
        self.keys[arn.rsplit("/", 1)[1]].enabled = False

    def _resolve(self, name: Any) -> Key | None:
        if not isinstance(name, str):
            return None
        prefix = f"arn:aws:kms:{self.region}:{ACCOUNT}:"
        if name.startswith(prefix):
            name = name[len(prefix) :]
        if name.startswith("key/"):
            name = name[4:]
        if name.startswith("alias/"):
            target = self.aliases.get(name)
            return self.keys.get(target) if target is not None else None
        return self.keys.get(name)

    # -- serving ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self.serve)
        return app

    def _over_rate(self) -> bool:
        if self.rate is None:
            return False
        now = time.monotonic()
        # A bucket of one second's requests, refilled continuously (KMS's quota is per second).
        bucket = self.rate if self._bucket is None else self._bucket
        self._bucket = min(self.rate, bucket + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._bucket < 1:
            return True
        self._bucket -= 1
        return False

    async def serve(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._answer(request)
        finally:
            self.in_flight -= 1
        if response.status == 200:
            self.calls[request.headers.get("X-Amz-Target", "").rpartition(".")[2]] += 1
        else:
            self.errors[json.loads(response.text or "{}").get("__type", "?")] += 1
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        kind = await self.fault(request)
        body = await request.read()
        problem = sigv4_problem(
            request,
            body,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            service="kms",
        )
        if problem == "UnrecognizedClientException" or kind == "auth":
            return _error(400, "UnrecognizedClientException", "The security token is invalid.")
        if problem:
            return _error(
                400,
                "IncorrectSignatureException",
                f"The request signature we calculated does not match ({problem})",
            )
        if kind == "throttle" or self._over_rate():
            return _error(400, "ThrottlingException", "Rate exceeded")
        if kind == "error":
            return _error(500, "KMSInternalException", "An internal error occurred.")
        if kind == "timeout":
            return _error(503, "DependencyTimeoutException", "The service timed out.")
        if request.headers.get("Content-Type", "").split(";")[0] != "application/x-amz-json-1.1":
            return _error(400, "SerializationException", "Content-Type is not JSON 1.1")
        target = request.headers.get("X-Amz-Target", "")
        action = target.removeprefix("TrentService.")
        handler = {
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "DescribeKey": self._describe,
        }.get(action)
        if not target.startswith("TrentService.") or handler is None:
            return _error(400, "UnknownOperationException", f"unknown operation {target!r}")
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            return _error(400, "SerializationException", "the body is not a JSON object")
        return handler(data)

    def _key(self, data: dict[str, Any]) -> Key | web.Response:
        if "KeyId" not in data:
            return _error(400, "ValidationException", "KeyId is required")
        key = self._resolve(data["KeyId"])
        if key is None:
            return _error(400, "NotFoundException", f"Key '{data['KeyId']}' does not exist")
        if not key.enabled:
            return _error(400, "DisabledException", f"{key.arn} is disabled.")
        return key

    def _encrypt(self, data: dict[str, Any]) -> web.Response:
        key = self._key(data)
        if isinstance(key, web.Response):
            return key
        try:
            plaintext = base64.b64decode(data["Plaintext"], validate=True)
            aad = _context_aad(data.get("EncryptionContext"))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            return _error(400, "ValidationException", f"Plaintext or EncryptionContext: {exc}")
        if not 1 <= len(plaintext) <= 4096:
            return _error(400, "ValidationException", "Plaintext must be 1 to 4096 bytes")
        nonce = os.urandom(12)
        sealed = AESGCM(key.material).encrypt(nonce, plaintext, aad)
        blob = _MAGIC + key.key_id.encode() + nonce + sealed
        return _ok(key, CiphertextBlob=base64.b64encode(blob).decode())

    def _decrypt(self, data: dict[str, Any]) -> web.Response:
        try:
            blob = base64.b64decode(data["CiphertextBlob"], validate=True)
            aad = _context_aad(data.get("EncryptionContext"))
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            return _error(400, "ValidationException", f"CiphertextBlob or EncryptionContext: {exc}")
        head = len(_MAGIC) + _ID_BYTES
        if not blob.startswith(_MAGIC) or len(blob) < head + 12 + 16:
            return _error(400, "InvalidCiphertextException", "")
        owner = self.keys.get(blob[len(_MAGIC) : head].decode(errors="replace"))
        if owner is None:
            return _error(400, "InvalidCiphertextException", "")
        if "KeyId" in data:
            named = self._key(data)
            if isinstance(named, web.Response):
                return named
            if named is not owner:
                return _error(
                    400,
                    "IncorrectKeyException",
                    "The key ID in the request does not identify a key that can decrypt "
                    "the ciphertext.",
                )
        if not owner.enabled:
            return _error(400, "DisabledException", f"{owner.arn} is disabled.")
        try:
            plaintext = AESGCM(owner.material).decrypt(
                blob[head : head + 12], blob[head + 12 :], aad
            )
        except InvalidTag:
            return _error(400, "InvalidCiphertextException", "")
        return _ok(owner, Plaintext=base64.b64encode(plaintext).decode())

    def _describe(self, data: dict[str, Any]) -> web.Response:
        key = self._resolve(data.get("KeyId"))
        if key is None:
            return _error(400, "NotFoundException", f"Key '{data.get('KeyId')}' does not exist")
        return web.json_response(
            {
                "KeyMetadata": {
                    "AWSAccountId": ACCOUNT,
                    "KeyId": key.key_id,
                    "Arn": key.arn,
                    "Enabled": key.enabled,
                    "KeyState": "Enabled" if key.enabled else "Disabled",
                    "KeyUsage": "ENCRYPT_DECRYPT",
                    "KeySpec": "SYMMETRIC_DEFAULT",
                }
            },
            content_type="application/x-amz-json-1.1",
        )
