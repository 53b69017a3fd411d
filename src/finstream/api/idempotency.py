"""``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header) backed by Redis.

Per caller and key, Redis holds either a claim (a request is in flight) or
the finished answer, with the fingerprint of the request that produced it:

* same key, same request (method, path and canonical JSON body): the stored
  answer again, marked ``Idempotent-Replayed: true``;
* same key, different request: 422, the key was reused for something else;
* same key while the first is still in flight: 409, retry shortly.

Why Redis with a TTL and not PostgreSQL: this record is a cache of answers,
not the guarantee. The guarantee is downstream: the request id published to
``notify.requests`` is derived from (caller, key), and the router delivers a
request id at most once. If Redis lost every record, a retried request would
publish the same request id again and the router would drop the duplicate;
the client would merely get a fresh 202 instead of a replay. So the store
only needs to be fast, shared by replicas and self-expiring, which is Redis
with ``SET NX PX``. A claim has a short TTL so that a replica that dies
mid-request does not block the key for a day.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from finstream.api.problems import Problem
from finstream.settings import Settings

CLAIM_TTL_MS = 30_000
MAX_KEY_CHARS = 255

# KEYS[1] record; ARGV[1] claim token. Deletes the claim only if it is still ours.
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['claim'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] record; ARGV[1] claim token, ARGV[2] answer, ARGV[3] ttl ms. Only over our own claim.
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)['claim'] == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


def parse_key(raw: str | None) -> str:
    """The key of an ``Idempotency-Key`` header; the draft makes it a quoted sf-string."""
    if raw is None:
        raise Problem(400, "The Idempotency-Key header is required for this request.")
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > MAX_KEY_CHARS or not value.isascii() or not value.isprintable():
        raise Problem(
            400, f"The Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable ASCII characters."
        )
    return value


def fingerprint(method: str, path: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


@dataclass
class Claim:
    key: str
    token: str
    fingerprint: str


class IdempotencyStore:
    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._ttl_ms = settings.api_idempotency_ttl_seconds * 1000
        self._release = redis.register_script(_RELEASE)
        self._complete = redis.register_script(_COMPLETE)

    def _key(self, caller: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._settings.redis_key(f"api:idem:{{{caller}}}:{digest}")

    async def begin(self, caller: str, key: str, fp: str) -> Claim | StoredResponse:
        """Claim the key for this request, or return the answer already stored for it."""
        record_key = self._key(caller, key)
        token = uuid.uuid4().hex
        claim = json.dumps({"claim": token, "fp": fp})
        if await self._redis.set(record_key, claim, nx=True, px=CLAIM_TTL_MS):
            return Claim(record_key, token, fp)
        raw = await self._redis.get(record_key)
        if raw is None:
            # Expired between SET and GET: the key is free again; try once more.
            if await self._redis.set(record_key, claim, nx=True, px=CLAIM_TTL_MS):
                return Claim(record_key, token, fp)
            raise Problem(409, "A request with this Idempotency-Key is being processed.")
        stored = json.loads(raw)
        if stored.get("fp") != fp:
            raise Problem(
                422,
                "This Idempotency-Key was already used with a different request; "
                "use a new key for a new request.",
                slug="idempotency-key-reused",
            )
        if "claim" in stored:
            raise Problem(
                409,
                "A request with this Idempotency-Key is still being processed; retry shortly.",
                slug="idempotency-key-in-flight",
                headers={"Retry-After": "1"},
            )
        return StoredResponse(int(stored["status"]), dict(stored["body"]))

    async def complete(self, claim: Claim, status: int, body: dict[str, Any]) -> None:
        record = json.dumps({"fp": claim.fingerprint, "status": status, "body": body})
        # If our claim expired (a very slow request), the answer is not stored; the
        # deterministic request id still keeps a retry from notifying twice.
        await self._complete(keys=[claim.key], args=[claim.token, record, self._ttl_ms])

    async def abandon(self, claim: Claim) -> None:
        """The request failed before it took effect: free the key for a retry."""
        await self._release(keys=[claim.key], args=[claim.token])
