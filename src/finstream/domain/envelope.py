"""Crypto-shredding: personal data sealed under a per-user data key.

Every user has data keys (versions 1, 2, ...; the newest seals, every one
still held opens), each 32 random bytes wrapped by a master key and stored
wrapped (``finstream.privacy.keys``). Personal data is sealed with AES-256-GCM
under the user's newest key into a **token**, a plain string that fits any
Avro string field, JSON document or Redis value::

    fse1:<key version>:<base64url(nonce 12 bytes || ciphertext || tag 16 bytes)>

The associated data binds a token to its user (``fse1|<user id>``): a token
moved into another user's record does not open. Erasing a user destroys their
keys, so every token sealed for them, wherever it was copied (compacted
topics, changelogs, retention, backups, dead letters), no longer opens.

What is sealed, by record:

* UserPreferences: each ``emails[].address``, ``phones[].number`` and
  ``push_tokens[].token`` on its own (flags stay readable for routing);
* NotificationRequest: each value of ``data`` on its own;
* OutboundMessage: ``recipient``, ``subject``, ``body_text``, ``body_html``
  and ``data`` together, as JSON, in ``sealed``; the fields themselves then
  hold nothing but the recipient masked (one seal per message keeps the
  router's cost down);
* inbox entries, digest items, deliveries' content: a sealed JSON document.

Pure: no I/O (``os.urandom`` for nonces and keys aside). Values that are not
tokens pass through the ``open_*`` helpers unchanged, so records written
before sealing existed (or by an upstream producer that does not seal) are
still read.
"""

from __future__ import annotations

import binascii
import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "fse1:"
_PREFIX_LEN = len(PREFIX)
NONCE_BYTES = 12
KEY_BYTES = 32
_AAD = b"fse1|"
# Where a preferences record keeps contact points: (list field, value field).
CONTACT_FIELDS: tuple[tuple[str, str], ...] = (
    ("emails", "address"),
    ("phones", "number"),
    ("push_tokens", "token"),
)
# The parts of an OutboundMessage sealed together into its ``sealed`` field.
OUTBOUND_SEALED: tuple[str, ...] = ("recipient", "subject", "body_text", "body_html", "data")


class EnvelopeError(ValueError):
    """A token that is malformed or was tampered with (or belongs to another user)."""


class KeyUnavailable(EnvelopeError):
    """The key version that sealed a token is gone: the user was erased (or never had it)."""


class UserErased(RuntimeError):
    """Nothing may be sealed for a user whose keys were destroyed."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id!r} was erased: their data keys are destroyed")
        self.user_id = user_id


def is_sealed(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(PREFIX)


def token_version(token: str) -> int:
    """The key version a token was sealed with."""
    return _split_token(token)[0]


def _split_token(token: str) -> tuple[int, str]:
    """A token's key version and its base64 body."""
    if not is_sealed(token):
        raise EnvelopeError("not a sealed token")
    head, sep, body = token[_PREFIX_LEN:].partition(":")
    if not sep or not head.isdigit():
        raise EnvelopeError("malformed token (key version)")
    return int(head), body


def _aad(user_id: str) -> bytes:
    return _AAD + user_id.encode()


# base64url by binascii and a translation table: ``base64.urlsafe_b64encode`` and
# its decoder go through two more Python calls each, and the router seals two
# messages and opens a contact per request.
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        raw = text.encode("ascii").translate(_FROM_URLSAFE)
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise EnvelopeError("malformed token (base64)") from None


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


# -- wrapping data keys under a master key ------------------------------------------------


def wrap_context(user_id: str, version: int) -> bytes:
    """What a wrapped data key is bound to: its user and version."""
    return f"finstream-dek|{user_id}|{version}".encode()


@functools.lru_cache(maxsize=8)
def _master_cipher(master: bytes) -> AESGCM:
    # One cipher per master key: a router unwraps the key of every user it has
    # not seen lately, and building the cipher cost as much as the decryption.
    return AESGCM(master)


def wrap_key(master: bytes, plaintext: bytes, context: bytes) -> bytes:
    """A data key sealed under a local master key: nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _master_cipher(master).encrypt(nonce, plaintext, context)


def unwrap_key(master: bytes, wrapped: bytes, context: bytes) -> bytes:
    if len(wrapped) < NONCE_BYTES + 16:
        raise EnvelopeError("wrapped key too short")
    try:
        return _master_cipher(master).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
    except InvalidTag:
        raise EnvelopeError("wrapped key does not open under this master key") from None


# -- a user's keys -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The data keys of one user that are still held: seal with the newest, open with any.

    ``erased``: the user's keys were destroyed; sealing raises
    :class:`UserErased` and opening :class:`KeyUnavailable`.
    """

    user_id: str
    keys: Mapping[int, AESGCM] = field(default_factory=dict)
    erased: bool = False
    # Derived once: a router seals several times per message with the same keys.
    # Slots, not cached properties: a worker caches the keys of every user it
    # routes for, and an instance dict per user was one more long-lived object
    # for the collector to walk (bench/RESULTS.md, the router's heap).
    current: int | None = field(init=False, repr=False, compare=False)
    _aad_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        current = max(self.keys) if self.keys and not self.erased else None
        object.__setattr__(self, "current", current)
        object.__setattr__(self, "_aad_bytes", _aad(self.user_id))

    @classmethod
    def from_raw(cls, user_id: str, raw: Mapping[int, bytes]) -> UserKeys:
        return cls(user_id, {v: AESGCM(k) for v, k in raw.items()})

    def seal(self, plaintext: bytes) -> str:
        version = self.current
        if version is None:
            raise UserErased(self.user_id)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self.keys[version].encrypt(nonce, plaintext, self._aad_bytes)
        return f"{PREFIX}{version}:{_b64(nonce + sealed)}"

    def open(self, token: str) -> bytes:
        version, body = _split_token(token)
        aead = None if self.erased else self.keys.get(version)
        if aead is None:
            raise KeyUnavailable(f"key version {version} of this user is not available")
        blob = _unb64(body)
        if len(blob) < NONCE_BYTES + 16:
            raise EnvelopeError("malformed token (too short)")
        try:
            return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], self._aad_bytes)
        except InvalidTag:
            raise EnvelopeError("token does not open (tampered, or another user's)") from None

    def seal_text(self, text: str) -> str:
        return self.seal(text.encode())

    def open_text(self, token: str) -> str:
        return self.open(token).decode()

    def reveal(self, value: str) -> str:
        """A token opened; anything else (plaintext) as it is."""
        return self.open_text(value) if is_sealed(value) else value

    def conceal(self, value: str) -> str:
        """Plaintext sealed; a token (already sealed) as it is."""
        return value if is_sealed(value) else self.seal_text(value)

    def seal_json(self, value: Any) -> str:
        # Compact UTF-8 JSON by orjson: the router seals two messages a request, and
        # the standard library's encoder took 3.5 us a message where orjson takes 0.2
        # (the same bytes; bench/RESULTS.md).
        return self.seal(orjson.dumps(value))

    def open_json(self, token: str) -> Any:
        try:
            return orjson.loads(self.open(token))
        except ValueError as exc:
            if isinstance(exc, EnvelopeError):
                raise
            raise EnvelopeError(f"sealed document is not JSON: {exc}") from None


# -- records -------------------------------------------------------------------------------


def map_contacts(record: Mapping[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a preferences record with ``fn`` applied to every contact value."""
    out = dict(record)
    for field_name, name in CONTACT_FIELDS:
        items = record.get(field_name)
        if items:
            out[field_name] = [{**item, name: fn(str(item[name]))} for item in items]
    return out


def seal_contacts(
    record: Mapping[str, Any],
    keys: UserKeys,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every contact value sealed; one the ``previous`` (sealed) record already held
    keeps its token, so an unchanged address keeps the same ciphertext."""
    known: dict[tuple[str, str], str] = {}
    for field_name, name in CONTACT_FIELDS:
        for item in (previous or {}).get(field_name) or ():
            value = str(item.get(name) or "")
            if is_sealed(value):
                try:
                    known.setdefault((field_name, keys.open_text(value)), value)
                except EnvelopeError:
                    continue
    out = dict(record)
    for field_name, name in CONTACT_FIELDS:
        items = record.get(field_name)
        if items:
            sealed = []
            for item in items:
                value = str(item[name])
                if not is_sealed(value):
                    value = known.get((field_name, value)) or keys.seal_text(value)
                sealed.append({**item, name: value})
            out[field_name] = sealed
    return out


def open_contacts(record: Mapping[str, Any], keys: UserKeys) -> dict[str, Any]:
    return map_contacts(record, keys.reveal)


def seal_data(data: Mapping[str, str], keys: UserKeys) -> dict[str, str]:
    """A request's ``data``, each value sealed on its own (names stay readable)."""
    return {k: keys.conceal(v) for k, v in data.items()}


def open_data(data: Mapping[str, str], keys: UserKeys) -> dict[str, str]:
    return {k: keys.reveal(v) for k, v in data.items()}


def data_is_sealed(data: Mapping[str, str]) -> bool:
    # A loop, not any() over a generator: every request the router takes asks.
    for value in data.values():  # noqa: SIM110
        if isinstance(value, str) and value.startswith(PREFIX):
            return True
    return False


def mask_recipient(value: str) -> str:
    """What stays readable of a recipient beside a sealed message: almost nothing."""
    if not value:
        return value
    if "@" in value:
        local, _, domain = value.rpartition("@")
        tld = domain.rpartition(".")[2]
        return f"{local[:1]}***@***.{tld}" if tld != domain else f"{local[:1]}***@***"
    return ("*" * max(len(value) - 2, 1)) + value[-2:] if len(value) > 4 else "****"


def seal_outbound(record: Mapping[str, Any], keys: UserKeys) -> dict[str, Any]:
    """An OutboundMessage with its personal parts sealed into ``sealed``.

    Already sealed: returned as it is (a redelivered or redriven message).
    """
    if record.get("sealed"):
        return dict(record)
    get = record.get
    # OUTBOUND_SEALED, spelled out: a comprehension over it cost more than the encryption.
    secret = {
        "recipient": get("recipient"),
        "subject": get("subject"),
        "body_text": get("body_text"),
        "body_html": get("body_html"),
        "data": get("data"),
    }
    out = dict(record)
    out["sealed"] = keys.seal_json(secret)
    out["recipient"] = mask_recipient(str(record.get("recipient") or ""))
    out["subject"] = None
    out["body_text"] = ""
    out["body_html"] = None
    out["data"] = {}
    return out


def open_outbound(record: Mapping[str, Any], keys: UserKeys) -> dict[str, Any]:
    """The message as the router composed it (``sealed`` kept); plaintext ones as they are."""
    token = record.get("sealed")
    if not token:
        return dict(record)
    secret = keys.open_json(str(token))
    if not isinstance(secret, dict):
        raise EnvelopeError("sealed message is not a JSON object")
    out = dict(record)
    for name in OUTBOUND_SEALED:
        if name in secret:
            out[name] = secret[name]
    if not isinstance(out.get("data"), dict):
        out["data"] = {}
    return out
