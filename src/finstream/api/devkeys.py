"""A development signing key, so a fresh checkout can authenticate without an identity provider.

Only used when ``env`` is ``dev`` and no JWKS is configured: an ES256 key pair
under ``<stack_dir>/api/`` (git-ignored with the rest of the stack data), its
public half published as a JWKS file the API verifies against, and
:func:`mint_token` for ``finstream api token``, ``finstream api stream`` and
tests. Production configures ``FINSTREAM_API_JWKS`` and never reads these files.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from finstream.settings import Settings


def _dir(settings: Settings) -> Path:
    return settings.stack_dir / "api"


def dev_key_path(settings: Settings) -> Path:
    return _dir(settings) / "dev-signing-key.pem"


def dev_jwks_path(settings: Settings) -> Path:
    return _dir(settings) / "dev-jwks.json"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    # RFC 7638 thumbprint: the required members in lexicographic order, no spaces.
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    jwk.update(kid=_b64(hashlib.sha256(canonical.encode()).digest()), alg="ES256", use="sig")
    return jwk


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_dev_keys(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """Load the development key, creating it (and its JWKS) on first use."""
    key_path, jwks_path = dev_key_path(settings), dev_jwks_path(settings)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Two processes racing here: the first link wins, the other reads its key.
        tmp = key_path.with_name(f".{key_path.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, key_path)
        tmp.unlink()
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} does not hold an EC private key")
    jwks = json.dumps({"keys": [public_jwk(loaded)]}, indent=2).encode()
    if not jwks_path.exists() or jwks_path.read_bytes() != jwks:
        _write_atomic(jwks_path, jwks, 0o644)
    return loaded


def mint_token(
    settings: Settings,
    subject: str,
    roles: Iterable[str] = ("user",),
    ttl_seconds: float = 3600.0,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    now: float | None = None,
    **claims: Any,
) -> str:
    """A token the API configured with the development JWKS accepts."""
    key = key or ensure_dev_keys(settings)
    issued = time.time() if now is None else now
    payload: dict[str, Any] = {
        "iss": settings.api_jwt_issuer,
        "aud": settings.api_jwt_audience,
        "sub": subject,
        "iat": int(issued),
        "nbf": int(issued),
        "exp": int(issued + ttl_seconds),
        "jti": uuid.uuid4().hex,
        settings.api_jwt_roles_claim: list(roles),
    }
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": public_jwk(key)["kid"]})
