"""OAuth2 bearer tokens: JWTs verified by signature, issuer, audience, expiry and not-before.

Keys come from a JWKS, a file or an http(s) URL. Only asymmetric keys (RSA,
EC, OKP) are taken from it: a symmetric ``oct`` key in a published key set
would let anyone who can read the set mint tokens. HS256 with a shared secret
is accepted only when ``FINSTREAM_API_JWT_HS256_SECRET`` is set, and a token's
``alg`` must match the key it names, so an RSA public key can never be used
as an HMAC secret (algorithm confusion).

The JWKS is fetched with httpx on the event loop, not with PyJWT's
``PyJWKClient``: that client fetches with blocking ``urllib`` inside
``get_signing_key``, which would stall every connection of the process while
the identity provider answers. Parsing and key construction still use PyJWT's
``PyJWK``. An unknown ``kid`` triggers one refresh (at most every
``_MIN_REFRESH`` seconds), which is how key rotation reaches us early.

Roles come from a claim (``roles`` by default; a list or a space-separated
string). A token without the claim is an ordinary ``user``.

The raw token never leaves this module: principals carry a hash of it (for
rate limits) and errors name only the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
from jwt import PyJWK

from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)

Role = Literal["user", "service", "operator"]
ROLES: frozenset[str] = frozenset({"user", "service", "operator"})
_ASYMMETRIC = {
    "RSA": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    "EC": {"ES256", "ES384", "ES512", "ES256K"},
    "OKP": {"EdDSA"},
}
_HMAC = {"HS256"}
_MIN_REFRESH = 30.0
_MAX_TOKEN_CHARS = 8192
_CACHE_SIZE = 10_000
_CACHE_SECONDS = 60.0
# User ids end up in Redis keys inside {hash tags} and in URLs: no braces, slashes or spaces.
USER_ID_PATTERN = r"^[A-Za-z0-9._:@|+=-]{1,128}$"
USER_ID_RE = re.compile(USER_ID_PATTERN)


class AuthError(Exception):
    """The token is missing or not acceptable; ``reason`` is a short machine code."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


class KeysUnavailable(Exception):
    """The key set cannot be loaded: the fault is ours, not the caller's (503)."""


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[str]
    token_hash: str = field(repr=False)
    expires_at: float
    claims: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def has(self, role: str) -> bool:
        return role in self.roles


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class _Key:
    jwk: PyJWK
    algorithms: frozenset[str]


class KeySet:
    """Asymmetric verification keys by ``kid``, from a JWKS file or URL."""

    def __init__(self, source: str, refresh_seconds: float = 300.0) -> None:
        self.source = source
        self.refresh_seconds = refresh_seconds
        self._keys: dict[str | None, _Key] = {}
        self._loaded_at = -1e18
        self._attempted_at = -1e18
        self._lock = asyncio.Lock()
        self._file_mtime: float | None = None
        self.error: str | None = None

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    async def _fetch(self) -> dict[str, Any]:
        if self.is_url:
            async with httpx.AsyncClient(timeout=5.0, follow_redirects=False) as client:
                resp = await client.get(self.source, headers={"Accept": "application/json"})
                resp.raise_for_status()
                data = resp.json()
        else:
            data = await asyncio.to_thread(self._read_file)
        if not isinstance(data, dict):
            raise ValueError("a JWKS is a JSON object with a 'keys' array")
        return data

    def _read_file(self) -> Any:
        path = Path(self.source.removeprefix("file://"))
        self._file_mtime = path.stat().st_mtime
        return json.loads(path.read_text())

    @staticmethod
    def parse(data: dict[str, Any]) -> dict[str | None, _Key]:
        keys: dict[str | None, _Key] = {}
        for raw in data.get("keys") or []:
            if not isinstance(raw, dict):
                continue
            kty = raw.get("kty")
            if kty not in _ASYMMETRIC or raw.get("use", "sig") != "sig":
                continue
            try:
                jwk = PyJWK.from_dict(raw)
            except jwt.PyJWTError as exc:
                log.warning("unusable key in JWKS skipped", kid=raw.get("kid"), error=str(exc))
                continue
            algorithms = frozenset({raw["alg"]}) if raw.get("alg") else frozenset(_ASYMMETRIC[kty])
            keys[raw.get("kid")] = _Key(jwk, algorithms & _ASYMMETRIC[kty])
        return keys

    async def load(self, force: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            fresh = now - self._loaded_at < self.refresh_seconds
            if not force and fresh and (self.is_url or not self._file_changed()):
                return
            if force and now - self._attempted_at < _MIN_REFRESH:
                return
            self._attempted_at = now
            try:
                keys = self.parse(await self._fetch())
            except (OSError, ValueError, httpx.HTTPError) as exc:
                self.error = f"cannot load JWKS from {self.source}: {exc}"
                log.warning("JWKS load failed", source=self.source, error=str(exc))
                return
            if not keys:
                self.error = f"JWKS at {self.source} holds no usable asymmetric signing key"
                return
            self._keys = keys
            self._loaded_at = now
            self.error = None

    def _file_changed(self) -> bool:
        try:
            return Path(self.source.removeprefix("file://")).stat().st_mtime != self._file_mtime
        except OSError:
            return False

    async def key_for(self, kid: str | None) -> _Key:
        await self.load()
        key = self._lookup(kid)
        if key is None:
            await self.load(force=True)
            key = self._lookup(kid)
        if key is None:
            if not self._keys:
                raise KeysUnavailable(self.error or "no verification keys loaded")
            raise AuthError("unknown_key", "the token's signing key is not known")
        return key

    def _lookup(self, kid: str | None) -> _Key | None:
        if kid is not None:
            return self._keys.get(kid)
        # No kid: acceptable only when the set has exactly one key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    @property
    def ready(self) -> bool:
        return bool(self._keys)


def _roles(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset({"user"})
    if isinstance(value, str):
        items: list[Any] = value.split()
    elif isinstance(value, list):
        items = value
    else:
        raise AuthError("bad_claims", "the roles claim must be a list or a string")
    return frozenset(str(r) for r in items) & ROLES


class TokenVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        leeway: float,
        roles_claim: str = "roles",
        keyset: KeySet | None = None,
        hs256_secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keyset is None and hs256_secret is None:
            raise ValueError("a token verifier needs a JWKS or an HS256 secret")
        if hs256_secret is not None and len(hs256_secret) < 32:
            raise ValueError("the HS256 secret must be at least 32 bytes (RFC 7518 section 3.2)")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.roles_claim = roles_claim
        self.keyset = keyset
        self._secret = hs256_secret
        # The cache's clock (wall time, as a token's exp is); PyJWT reads its own.
        self._clock = clock
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        from finstream.api.devkeys import dev_jwks_path, ensure_dev_keys

        source = settings.api_jwks
        if source is None and settings.env == "dev":
            ensure_dev_keys(settings)
            source = str(dev_jwks_path(settings))
        secret = settings.api_jwt_hs256_secret
        if source is None and secret is None:
            raise ValueError(
                "no token verification configured: set FINSTREAM_API_JWKS (file or URL), "
                "or FINSTREAM_API_JWT_HS256_SECRET to accept HS256 tokens"
            )
        return cls(
            issuer=settings.api_jwt_issuer,
            audience=settings.api_jwt_audience,
            leeway=settings.api_jwt_leeway_seconds,
            roles_claim=settings.api_jwt_roles_claim,
            keyset=KeySet(source, settings.api_jwks_refresh_seconds) if source else None,
            hs256_secret=secret.get_secret_value().encode() if secret else None,
        )

    async def start(self) -> None:
        if self.keyset is not None:
            await self.keyset.load(force=True)

    @property
    def ready(self) -> bool:
        return self.keyset is None or self.keyset.ready

    async def verify(self, token: str) -> Principal:
        if not token or len(token) > _MAX_TOKEN_CHARS or token.count(".") != 2:
            raise AuthError("malformed", "the bearer token is not a JWT")
        # A token verified before is not verified again (an ECDSA or RSA check costs
        # more than the rest of a quote request); expiry is still checked every time.
        # Entries live at most _CACHE_SECONDS, so a key withdrawn from the JWKS
        # stops working within that time even for tokens seen before.
        digest = token_hash(token)
        now = self._clock()
        cached = self._verified.get(digest)
        if cached is not None:
            principal, checked_at = cached
            if now >= principal.expires_at + self.leeway:
                del self._verified[digest]
                raise AuthError("expired", "the token has expired")
            if now - checked_at < _CACHE_SECONDS:
                return principal
            del self._verified[digest]
        principal = await self._verify(token, digest)
        if len(self._verified) >= _CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[digest] = (principal, now)
        return principal

    async def _verify(self, token: str, digest: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "the bearer token is not a JWT") from None
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise AuthError("malformed", "the token header is invalid")
        key: Any
        if alg in _HMAC:
            if self._secret is None:
                raise AuthError("alg_not_allowed", f"tokens signed with {alg} are not accepted")
            key = self._secret
        elif any(alg in algs for algs in _ASYMMETRIC.values()):
            if self.keyset is None:
                raise AuthError("alg_not_allowed", f"tokens signed with {alg} are not accepted")
            found = await self.keyset.key_for(kid)
            if alg not in found.algorithms:
                raise AuthError("alg_not_allowed", f"the signing key does not sign with {alg}")
            key = found.jwk.key
        else:
            raise AuthError("alg_not_allowed", f"tokens signed with {alg!r} are not accepted")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("bad_audience", "the token is not meant for this API (aud)") from None
        except jwt.InvalidIssuerError:
            raise AuthError("bad_issuer", "the token's issuer is not trusted (iss)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("bad_claims", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature is invalid") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid", f"the token is invalid ({type(exc).__name__})") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not USER_ID_RE.match(sub) or sub == "me":
            raise AuthError("bad_claims", "the token's subject (sub) is not a usable id")
        roles = _roles(claims.get(self.roles_claim))
        if not roles:
            raise AuthError("bad_claims", "the token grants no role this API knows")
        return Principal(
            subject=sub,
            roles=roles,
            token_hash=digest,
            expires_at=float(claims["exp"]),
            claims=claims,
        )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
