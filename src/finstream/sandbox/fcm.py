"""Fake Firebase Cloud Messaging HTTP v1 and Google's OAuth2 token endpoint.

POST /token takes the service-account JWT (grant_type jwt-bearer), checks its
RS256 signature with the account's public key, its audience and scope, and
answers ``{"access_token", "expires_in", "token_type"}``.

POST /v1/projects/{project}/messages:send checks the bearer token, the body
shape, and answers ``{"name": "projects/<p>/messages/<n>"}`` or the
documented error body with an FcmError detail: UNREGISTERED (404) for tokens
in ``unregistered``, INVALID_ARGUMENT (400), QUOTA_EXCEEDED (429),
UNAVAILABLE (503), UNAUTHENTICATED (401) for unknown or revoked tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from finstream.sandbox.base import HttpFake

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def _error(
    status: int, message: str, fcm_code: str | None, headers: dict[str, str] | None = None
) -> web.Response:
    err: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUS.get(status, "UNKNOWN"),
    }
    if fcm_code:
        err["details"] = [{"@type": FCM_ERROR, "errorCode": fcm_code}]
    return web.json_response({"error": err}, status=status, headers=headers)


def write_service_account(
    folder: Path, token_uri: str, project_id: str = "finstream-test"
) -> tuple[Path, Any]:
    """A service-account key file (as Google issues them) and the account's public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "fake-key-1",
        "private_key": pem,
        "client_email": f"delivery@{project_id}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "service-account.json"
    path.write_text(json.dumps(info))
    return path, key.public_key()


class FakeFcm(HttpFake):
    def __init__(self, project_id: str = "finstream-test", token_lifetime: int = 3600) -> None:
        super().__init__()
        self.project_id = project_id
        self.public_key: Any = None  # set once the account file is written
        self.client_email = f"delivery@{project_id}.iam.gserviceaccount.com"
        self.token_lifetime = token_lifetime
        self.tokens: dict[str, float] = {}  # access token -> expiry (epoch)
        self.token_requests = 0
        self.unregistered: set[str] = set()
        self._serial = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        self.add_routes(app.router)
        return app

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/token", self.token)
        router.add_post("/v1/projects/{project}/messages:send", self.send)

    def revoke_all(self) -> None:
        self.tokens.clear()

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")),
                self.public_key,
                algorithms=["RS256"],
                audience=f"{self.url}/token",
                issuer=self.client_email,
            )
        except jwt.PyJWTError as exc:
            return web.json_response(
                {"error": "invalid_grant", "error_description": str(exc)}, status=400
            )
        if claims.get("scope") != SCOPE:
            return web.json_response({"error": "invalid_scope"}, status=400)
        token = f"ya29.fake-{next(self._serial)}"
        self.tokens[token] = time.time() + self.token_lifetime
        return web.json_response(
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    async def send(self, request: web.Request) -> web.Response:
        kind = await self.fault(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if kind == "auth" or self.tokens.get(token, 0) < time.time():
            return _error(401, "Request had invalid authentication credentials.", None)
        if request.match_info["project"] != self.project_id:
            return _error(404, "Requested entity was not found.", None)
        if kind == "throttle":
            return _error(
                429,
                "Quota exceeded",
                "QUOTA_EXCEEDED",
                {"Retry-After": str(int(self.faults.retry_after))},
            )
        if kind in ("error", "timeout"):
            # FCM asks clients to honour Retry-After on UNAVAILABLE too.
            return _error(
                503,
                "The service is currently unavailable.",
                "UNAVAILABLE",
                {"Retry-After": str(int(self.faults.retry_after))},
            )
        try:
            message = (await request.json())["message"]
            device = message["token"]
            data = message.get("data") or {}
            assert all(isinstance(v, str) for v in data.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            return _error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
        if device in self.unregistered:
            return _error(404, "Requested entity was not found.", "UNREGISTERED")
        name = f"projects/{self.project_id}/messages/{next(self._serial)}"
        android = message.get("android") or {}
        self.recorder.take(
            data.get("finstream_message_id"),
            token=device,
            collapse=(android.get("notification") or {}).get("tag"),
            notification=message.get("notification"),
            name=name,
        )
        if kind == "accept_hang":
            await asyncio.sleep(self.faults.hang)
        return web.json_response({"name": name})
