"""What every request shares (connections, stores, verifier) and the auth dependency.

One :class:`Resources` per process, opened in the app's lifespan: a Redis
pool for reads and writes, a separate Redis client whose single pub/sub
connection feeds every WebSocket (``hub.py``), an asyncpg pool for bars, and
one Kafka producer. Writes to the compacted topics wait for the broker's
acknowledgement before the API answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
import redis.asyncio as aioredis
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from finstream.api.auth import AuthError, KeysUnavailable, Principal, TokenVerifier, bearer_token
from finstream.api.hub import PubSubHub
from finstream.api.idempotency import IdempotencyStore
from finstream.api.limits import RateLimiter
from finstream.api.metrics import AUTH_FAILURES, RATE_LIMITED
from finstream.api.problems import Problem
from finstream.codec import Codec, default_codec
from finstream.domain.notify.templates import Templates
from finstream.privacy.keys import KeyRing
from finstream.privacy.kms import token_secrets
from finstream.privacy.prefs import PreferencesWriter
from finstream.privacy.verify import Verifier
from finstream.runtime.deadletters import DeadLetters
from finstream.runtime.kafka import KafkaPublisher
from finstream.runtime.logging import get_logger
from finstream.settings import Settings
from finstream.stores.inbox import Inbox
from finstream.stores.locks import RedisLocks
from finstream.stores.postgres import create_pool
from finstream.stores.quotes import QuoteCache
from finstream.stores.read_models import PreferencesStore, RulesStore
from finstream.stores.templates import load_templates
from finstream.topics import Contract, contract

log = get_logger(__name__)

LOCK_WAIT_SECONDS = 3.0


class WriteLocks:
    """Serializes writes to one resource across API replicas (:mod:`finstream.stores.locks`);
    a lock that stays taken is answered 409 with Retry-After."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._locks = RedisLocks(redis, settings)

    def hold(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._locks.hold(name, LOCK_WAIT_SECONDS, busy=_resource_busy)


def _resource_busy() -> Problem:
    return Problem(
        409, "Another change to this resource is in progress; retry.", headers={"Retry-After": "1"}
    )


@dataclass
class Resources:
    settings: Settings
    codec: Codec
    redis: aioredis.Redis
    hub_redis: aioredis.Redis
    pg: asyncpg.Pool
    publisher: KafkaPublisher
    verifier: TokenVerifier
    limiter: RateLimiter
    idempotency: IdempotencyStore
    locks: WriteLocks
    quotes: QuoteCache
    inbox: Inbox
    rules: RulesStore
    prefs: PreferencesStore
    hub: PubSubHub
    dead_letters: DeadLetters
    templates: Templates
    # issue 14: users' data keys, the signing secrets, sealed and audited preference writes
    keys: KeyRing
    secrets: list[bytes]
    writer: PreferencesWriter
    contacts: Verifier
    _contracts: dict[str, Contract] = field(default_factory=dict)

    def topic(self, name: str) -> Contract:
        """The contract of catalogue topic ``name`` (un-namespaced) in this deployment."""
        found = self._contracts.get(name)
        if found is None:
            found = self._contracts[name] = contract(name, self.settings.namespace, self.codec)
        return found

    @classmethod
    async def open(cls, settings: Settings) -> Resources:
        secrets = token_secrets(settings)  # refuses to start without them in production
        verifier = TokenVerifier.from_settings(settings)
        await verifier.start()
        url = settings.redis_url.get_secret_value()
        redis = aioredis.from_url(
            url, decode_responses=False, health_check_interval=30, socket_keepalive=True
        )
        hub_redis = aioredis.from_url(
            url,
            decode_responses=False,
            health_check_interval=30,
            socket_keepalive=True,
            client_name=f"{settings.namespace}finstream-api-hub",
        )
        publisher = KafkaPublisher(settings, "api")
        pg: asyncpg.Pool | None = None
        try:
            pg = await create_pool(settings, max_size=settings.api_db_pool_max_size)
            await publisher.start()
            hub = PubSubHub.for_namespace(hub_redis, settings.namespace)
            await hub.start()
        except BaseException:
            await publisher.stop()
            if pg is not None:
                await pg.close()
            await redis.aclose()
            await hub_redis.aclose()
            raise
        codec = default_codec()
        keys = KeyRing.from_settings(settings, pg)
        writer = PreferencesWriter(
            settings=settings, codec=codec, redis=redis, publisher=publisher, keys=keys, actor="api"
        )
        return cls(
            settings=settings,
            codec=codec,
            redis=redis,
            hub_redis=hub_redis,
            pg=pg,
            publisher=publisher,
            verifier=verifier,
            limiter=RateLimiter(redis, settings),
            idempotency=IdempotencyStore(redis, settings),
            locks=WriteLocks(redis, settings),
            quotes=QuoteCache(redis, settings),
            inbox=Inbox(redis, settings),
            rules=RulesStore(redis, settings, codec),
            prefs=PreferencesStore(redis, settings, codec),
            hub=hub,
            dead_letters=DeadLetters(publisher, settings, "api"),
            templates=load_templates(settings),
            keys=keys,
            secrets=secrets,
            writer=writer,
            contacts=Verifier(
                settings=settings,
                codec=codec,
                pg=pg,
                redis=redis,
                publisher=publisher,
                keys=keys,
                secrets=secrets,
            ),
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.keys.close()
        await self.hub.stop()
        with contextlib.suppress(Exception):
            await self.publisher.stop()
        await self.pg.close()
        await self.redis.aclose()
        await self.hub_redis.aclose()

    async def readiness(self) -> dict[str, str]:
        """Each dependency: "ok" or why not."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
            checks["redis"] = "ok"
        except (RedisError, OSError, TimeoutError) as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        try:
            async with self.pg.acquire(timeout=2.0) as conn:
                await conn.fetchval("SELECT 1", timeout=2.0)
            checks["postgresql"] = "ok"
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            checks["postgresql"] = f"unreachable: {type(exc).__name__}"
        try:
            # Requests are accepted only once Kafka has them (notifications, rules, preferences).
            await asyncio.wait_for(self.publisher.probe(), 2.0)
            checks["kafka"] = "ok"
        except Exception as exc:
            checks["kafka"] = f"unreachable: {type(exc).__name__}"
        checks["pubsub"] = "ok" if self.hub.healthy else "reconnecting"
        keyset = self.verifier.keyset
        checks["keys"] = "ok" if self.verifier.ready else (keyset.error if keyset else None) or "?"
        return checks


def resources(request: Request) -> Resources:
    res: Resources = request.app.state.resources
    return res


Res = Annotated[Resources, Depends(resources)]


def _unauthorized(reason: str, description: str) -> Problem:
    AUTH_FAILURES.labels(reason).inc()
    error = "invalid_request" if reason == "missing" else "invalid_token"
    quoted = description.replace("\\", "").replace('"', "'")
    challenge = f'Bearer realm="finstream", error="{error}", error_description="{quoted}"'
    if reason == "missing":
        challenge = 'Bearer realm="finstream"'
    return Problem(401, description, headers={"WWW-Authenticate": challenge})


# Declares the scheme in the OpenAPI document; the header is read by authenticate().
_bearer = HTTPBearer(auto_error=False, bearerFormat="JWT", scheme_name="bearer")


async def authenticate(
    request: Request,
    res: Res,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise _unauthorized("missing", "A bearer token is required (Authorization: Bearer ...).")
    try:
        principal = await res.verifier.verify(token)
    except AuthError as exc:
        raise _unauthorized(exc.reason, exc.description) from None
    except KeysUnavailable:
        raise Problem(
            503, "Token verification keys are unavailable; retry.", headers={"Retry-After": "5"}
        ) from None
    decision = await res.limiter.hit(principal.token_hash)
    request.state.rate_headers = decision.headers()
    if not decision.allowed:
        RATE_LIMITED.inc()
        raise Problem(
            429,
            f"Rate limit of {decision.limit} requests per "
            f"{res.settings.api_rate_window_seconds:g}s for this token exceeded.",
            headers=decision.headers(),
        )
    request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(authenticate)]


def correlation_id(request: Request) -> str:
    cid: Any = getattr(request.state, "correlation_id", None)
    return str(cid) if cid else uuid.uuid4().hex
