"""Contact verification: send a one-time code through the pipeline, check a guess.

The code goes out as a notification like any other (``notify.requests``,
category ``verification``, template ``contact_verification``, for one
contact only: ``contact_id``), critical so that quiet hours and caps do not
hold it, its data sealed under the user's key. What is kept is an HMAC of the
code (``contact_verifications``), the attempts, the expiry and how many codes
the contact got this hour. Limits (``FINSTREAM_PRIVACY_VERIFY_*``): a code
lives 15 minutes and takes 5 wrong guesses; a contact gets 5 codes an hour;
a user makes 20 guesses an hour (Redis counter).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain import verification as v
from finstream.domain.envelope import seal_data
from finstream.domain.time import utcnow
from finstream.privacy.keys import KeyRing
from finstream.runtime.kafka import KafkaPublisher, correlation_header
from finstream.settings import Settings


class RateLimited(RuntimeError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Sent:
    contact_id: str
    channel: str
    expires_at: datetime
    request_id: str


def _pending(row: Any) -> v.Pending | None:
    if row is None:
        return None
    return v.Pending(
        code_digest=row["code_digest"],
        expires_at=row["expires_at"],
        attempts=row["attempts"],
        sends=row["sends"],
        window_start=row["window_start"],
        sent_at=row["sent_at"],
        verified_at=row["verified_at"],
    )


class Verifier:
    def __init__(
        self,
        *,
        settings: Settings,
        codec: Codec,
        pg: asyncpg.Pool,
        redis: aioredis.Redis,
        publisher: KafkaPublisher,
        keys: KeyRing,
        secrets: list[bytes],
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.pg = pg
        self.redis = redis
        self.publisher = publisher
        self.keys = keys
        self.secrets = secrets

    async def state(self, user: str, contact_id: str) -> v.Pending | None:
        row = await self.pg.fetchrow(
            "SELECT * FROM contact_verifications WHERE user_id = $1 AND contact_id = $2",
            user,
            contact_id,
        )
        return _pending(row)

    async def send(
        self,
        user: str,
        contact_id: str,
        channel: str,
        *,
        correlation_id: str | None = None,
        now: datetime | None = None,
    ) -> Sent:
        """A new code to the contact (the previous one stops working); RateLimited."""
        now = now or utcnow()
        s = self.settings
        decision = v.may_send(
            await self.state(user, contact_id), now, s.privacy_verify_sends_per_hour
        )
        if not decision.allowed:
            raise RateLimited(
                f"at most {s.privacy_verify_sends_per_hour} codes an hour to one contact",
                decision.retry_after,
            )
        code = v.new_code()
        expires = now + timedelta(seconds=s.privacy_verify_code_ttl_seconds)
        await self.pg.execute(
            """INSERT INTO contact_verifications (user_id, contact_id, channel, code_digest,
                   expires_at, attempts, sends, window_start, sent_at, verified_at)
               VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, NULL)
               ON CONFLICT (user_id, contact_id) DO UPDATE SET channel = $3, code_digest = $4,
                   expires_at = $5, attempts = 0, sends = $6, window_start = $7, sent_at = $8,
                   verified_at = NULL""",
            user,
            contact_id,
            channel,
            v.code_digest(self.secrets[0], user, contact_id, code),
            expires,
            decision.sends,
            decision.window_start,
            now,
        )
        keys = await self.keys.seal_keys(user)
        request_id = f"verify-{uuid.uuid4().hex}"
        minutes = max(int(s.privacy_verify_code_ttl_seconds // 60), 1)
        record: dict[str, Any] = {
            "request_id": request_id,
            "user_id": user,
            "category": v.VERIFICATION_CATEGORY,
            "priority": "CRITICAL",
            "template": v.VERIFICATION_TEMPLATE,
            "data": seal_data({"code": code, "minutes": str(minutes)}, keys),
            "channels": [],
            "deliver_at": None,
            "expires_at": expires,
            "collapse_key": None,
            "created_at": now,
            "source": "api:verification",
            "correlation_id": correlation_id,
            "contact_id": contact_id,
        }
        await self.publisher.send_and_wait(
            s.topic("notify.requests"),
            user.encode(),
            self.codec.encode("NotificationRequest", record),
            correlation_header(correlation_id),
        )
        return Sent(contact_id, channel, expires, request_id)

    async def guess(
        self, user: str, contact_id: str, code: str, now: datetime | None = None
    ) -> v.Outcome:
        """Check a guess; a wrong one counts. RateLimited past the user's hourly guesses."""
        now = now or utcnow()
        key = self.settings.redis_key(f"verify:attempts:{{{user}}}")
        count = await self.redis.incr(key)
        if count == 1:
            await self.redis.expire(key, 3600)
        if count > self.settings.privacy_verify_attempts_per_hour:
            ttl = await self.redis.ttl(key)
            raise RateLimited(
                f"at most {self.settings.privacy_verify_attempts_per_hour} verification "
                "attempts an hour",
                float(max(ttl, 1)),
            )
        async with self.pg.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """SELECT * FROM contact_verifications WHERE user_id = $1 AND contact_id = $2
                   FOR UPDATE""",
                user,
                contact_id,
            )
            pending = _pending(row)
            matches = pending is not None and v.code_matches(
                self.secrets, pending.code_digest, user, contact_id, code
            )
            outcome = v.check(pending, matches, now, self.settings.privacy_verify_max_attempts)
            if outcome is v.Outcome.WRONG:
                await conn.execute(
                    """UPDATE contact_verifications SET attempts = attempts + 1
                       WHERE user_id = $1 AND contact_id = $2""",
                    user,
                    contact_id,
                )
            elif outcome is v.Outcome.VERIFIED:
                await conn.execute(
                    """UPDATE contact_verifications SET verified_at = $3
                       WHERE user_id = $1 AND contact_id = $2""",
                    user,
                    contact_id,
                    now,
                )
        return outcome

    def attempts_left(self, pending: v.Pending | None) -> int:
        used = pending.attempts if pending else 0
        return max(self.settings.privacy_verify_max_attempts - used, 0)
