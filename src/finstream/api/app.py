"""The finstream API: an ASGI app (FastAPI) served by uvicorn.

:func:`create_app` builds the app; its lifespan opens the shared
:class:`~finstream.api.deps.Resources` (or uses ones given, for tests).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from confluent_kafka import KafkaException
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import finstream
from finstream.api import problems
from finstream.api.deps import Resources
from finstream.api.limits import BodyLimitMiddleware
from finstream.api.metrics import REQUEST_SECONDS, REQUESTS
from finstream.api.routes import (
    analytics,
    console,
    contacts,
    inbox,
    market,
    notifications,
    ops,
    preferences,
    privacy,
    rules,
    scheduled,
    templates,
    unsubscribe,
    webhooks,
)
from finstream.api.stream import stream_endpoint
from finstream.api.webhooks import load_sendgrid_key
from finstream.privacy import erasure
from finstream.privacy.prefs import Busy
from finstream.runtime.kafka import DeliveryError
from finstream.runtime.logging import correlation, get_logger
from finstream.settings import Settings, get_settings

log = get_logger(__name__)

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

DESCRIPTION = """
Market data, alert rules, notification preferences, the in-app inbox and
notification requests of finstream.

**Authentication.** Every `/v1` endpoint except the provider webhooks takes an
OAuth2 bearer JWT (`Authorization: Bearer ...`), verified by signature against
the configured JWKS, issuer, audience, expiry and not-before. Roles come from
the `roles` claim: `user` (own resources only), `service` (may post
notification requests for any user), `operator` (read-only views across
users). Someone else's resource answers exactly like a missing one (404).
Each token is rate limited; answers carry `RateLimit-*` headers and 429 a
`Retry-After`.

**Errors** are `application/problem+json` (RFC 9457); validation errors list
each offending field as a JSON pointer in `errors`.

**Read-after-write.** Rules and preferences are published to compacted Kafka
topics (the source of truth for the pipeline); every write waits for Kafka's
acknowledgement, so a client sees its own change at once. Rules are written
through to the Redis read model the API reads, with the same version
(`updated_at`). Preferences are answered once the statestore role has applied
them to theirs: `202` when that takes longer than a few seconds, and a change
of the same user's preferences meanwhile is refused with `409` (retry).
`ETag`/`If-Match` give optimistic concurrency.

**Privacy.** Personal data (contact points, message content, the data of
notification requests) is sealed under a key per user; `DELETE
/v1/users/me` erases the user (keys destroyed, records deleted),
`GET /v1/users/me/export` returns everything held about them. New email
addresses and phone numbers are confirmed with a code
(`POST /v1/users/me/contacts/{id}/verify`). Marketing email links to
`/v1/unsubscribe/{token}` (RFC 8058 one-click, no login). Operators read the
delivery funnel at `/v1/analytics/deliveries`.

**Live streams** are on the WebSocket `/v1/stream` (not describable in
OpenAPI): authenticate with an `Authorization` header, the subprotocols
`["finstream.v1", "bearer.<token>"]` or a first message
`{"type": "auth", "token": "..."}`; then `{"type": "subscribe", "stream":
"quotes" | "bars" | "inbox", "symbol": "AAPL", "interval": "1m"}`.
"""


class RequestContext:
    """Correlation id, metrics and common headers for every HTTP request (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        cid = None
        for name, value in scope.get("headers", ()):
            if name in (b"x-request-id", b"x-correlation-id"):
                text = value.decode("latin-1")
                if _REQUEST_ID.match(text):
                    cid = text
                    break
        cid = cid or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["correlation_id"] = cid
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = cid
                for key, value in (state.get("rate_headers") or {}).items():
                    if key not in headers:
                        headers[key] = value
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        try:
            with correlation(cid):
                await self.app(scope, receive, send_with_headers)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "?")
            REQUESTS.labels(method, template, str(status)).inc()
            REQUEST_SECONDS.labels(method, template).observe(time.perf_counter() - started)


async def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("dependency unavailable", error_class=type(exc).__name__, error=str(exc)[:200])
    return problems.Problem(
        503, "A backing service is unavailable; retry shortly.", headers={"Retry-After": "2"}
    ).response()


async def _busy(request: Request, exc: Exception) -> Response:
    # A change of the user's preferences in progress, or published and not yet
    # applied by the statestore role (PreferencesWriter.settled).
    return problems.Problem(409, f"{exc}", headers={"Retry-After": "1"}).response()


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    doc.setdefault("components", {}).setdefault("schemas", {})["Problem"] = problems.PROBLEM_SCHEMA
    # FastAPI's default 422 schema is never what we send: drop it (ours is a Problem).
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)
    app.openapi_schema = doc
    return doc


def create_app(settings: Settings | None = None, resources: Resources | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.api_sendgrid_webhook_public_key:
        load_sendgrid_key(settings.api_sendgrid_webhook_public_key)  # fail at start, not per call

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if resources is not None:
            app.state.resources = resources
            yield
            return
        res = await Resources.open(settings)
        app.state.resources = res
        # issue 14: each erasure is swept again once every worker's key cache has lapsed.
        stop = asyncio.Event()
        sweeper = asyncio.create_task(erasure.sweep_loop(privacy.services(res), stop))
        log.info("api ready", namespace=settings.namespace)
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(sweeper, return_exceptions=True)
            await res.close()

    app = FastAPI(
        title="finstream API",
        version=finstream.__version__,
        description=DESCRIPTION.strip(),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    problems.install(app)
    for exc_class in (
        RedisError,
        KafkaException,
        DeliveryError,
        asyncpg.PostgresConnectionError,
        OSError,
    ):
        app.add_exception_handler(exc_class, _unavailable)
    app.add_exception_handler(Busy, _busy)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.api_max_body_bytes,
        webhook_max_bytes=settings.api_webhook_max_body_bytes,
    )
    app.add_middleware(RequestContext)
    for module in (
        ops,
        market,
        rules,
        preferences,
        contacts,
        inbox,
        notifications,
        templates,
        scheduled,
        webhooks,
        privacy,
        unsubscribe,
        analytics,
        console,
    ):
        app.include_router(module.router)
    # The console's static files (issue 16); config.json above is the one dynamic part.
    app.mount("/console", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")
    app.add_api_websocket_route("/v1/stream", stream_endpoint)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
