"""Helpers for the API's tests: signing keys and tokens, settings, an in-process app and server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from finstream.api.app import create_app
from finstream.api.deps import Resources
from finstream.api.service import EmbeddedServer, uvicorn_config
from finstream.settings import Settings
from finstream.testing.services import free_port

ISSUER = "https://idp.test.finstream"
AUDIENCE = "finstream-api-test"
HS_SECRET = "an-hs256-secret-that-is-long-enough-0123456789"  # noqa: S105 (tests only)


@dataclass
class Keys:
    """A JWKS with one EC and one RSA key, plus an unpublished key for forged tokens."""

    ec_key: ec.EllipticCurvePrivateKey
    rsa_key: rsa.RSAPrivateKey
    rogue_key: ec.EllipticCurvePrivateKey
    jwks_path: Path

    @classmethod
    def create(cls, folder: Path) -> Keys:
        ec_key = ec.generate_private_key(ec.SECP256R1())
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rogue = ec.generate_private_key(ec.SECP256R1())
        ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
        ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
        rsa_jwk.update(kid="rsa-1", use="sig")  # no alg: any RSA algorithm
        # A symmetric key in the set must never be used to verify anything.
        oct_jwk = {"kty": "oct", "kid": "oct-1", "k": "c2VjcmV0", "alg": "HS256"}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"jwks-{uuid.uuid4().hex[:6]}.json"
        path.write_text(json.dumps({"keys": [ec_jwk, rsa_jwk, oct_jwk]}))
        return cls(ec_key, rsa_key, rogue, path)

    def token(
        self,
        sub: str = "alice",
        roles: Iterable[str] | None = ("user",),
        *,
        ttl: float = 600,
        aud: str = AUDIENCE,
        iss: str = ISSUER,
        nbf: float | None = None,
        alg: str = "ES256",
        kid: str | None = None,
        key: Any = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        now = time.time()
        payload: dict[str, Any] = {
            "iss": iss,
            "aud": aud,
            "sub": sub,
            "iat": int(now),
            "exp": int(now + ttl),
            "jti": uuid.uuid4().hex,
        }
        if nbf is not None:
            payload["nbf"] = int(nbf)
        if roles is not None:
            payload["roles"] = list(roles)
        payload.update(claims or {})
        if key is None:
            key = {"ES256": self.ec_key, "RS256": self.rsa_key, "PS256": self.rsa_key}.get(alg)
        if kid is None:
            kid = {"ES256": "ec-1", "RS256": "rsa-1", "PS256": "rsa-1"}.get(alg)
        headers = {"kid": kid} if kid else {}
        return jwt.encode(payload, key, algorithm=alg, headers=headers)

    def forged(self, sub: str = "alice") -> str:
        """Claims that would pass, signed by a key the API does not know, under a known kid."""
        return self.token(sub, key=self.rogue_key, kid="ec-1")


def api_settings(base: Settings, keys: Keys, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_jwks": str(keys.jwks_path),
        "api_jwt_issuer": ISSUER,
        "api_jwt_audience": AUDIENCE,
        "api_jwt_leeway_seconds": 5.0,
        "api_rate_limit": 10_000,
        "env": "test",
    }
    values.update(overrides)
    return base.model_copy(update=values)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Resources]]:
    """The app in-process over httpx's ASGI transport, with real resources behind it."""
    res = await Resources.open(settings)
    try:
        app = create_app(settings, res)
        app.state.resources = res
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            yield client, res
    finally:
        await res.close()


@contextlib.asynccontextmanager
async def api_server(settings: Settings) -> AsyncIterator[tuple[str, Resources]]:
    """A real uvicorn server on a free port in this event loop; yields its ws:// base URL."""
    port = free_port()
    res = await Resources.open(settings)
    app = create_app(settings, res)
    server = EmbeddedServer(uvicorn_config(settings, app, "127.0.0.1", port))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield f"ws://127.0.0.1:{port}", res
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        await res.close()
