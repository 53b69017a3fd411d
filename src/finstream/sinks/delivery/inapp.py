"""In-app delivery: notify.outbound.inapp -> the user's Redis inbox.

The inbox (:mod:`finstream.stores.inbox`) keeps read/unread state and the
per-user cap, and publishes each new message on the user's pub/sub channel
for live delivery. As a provider it is the one that can never show a message
twice: storing is idempotent on message_id (its Lua script remembers the ids
it has seen), so an uncertain store is simply repeated.

The role runs the same delivery engine as email, push and SMS: the message
is claimed in PostgreSQL before it is stored, every outcome is a
DeliveryResult on notify.delivery and in ``delivery_results``, and a Redis
outage is retried with backoff instead of stalling the partition.

The delivery records are the inboxes' source of truth: when Redis turns out
to have lost them (the role's repair mark is gone,
:class:`finstream.stores.redis.RepairMarks`), :class:`InboxRepair` puts
every delivered in-app message that PostgreSQL still holds back into its
user's inbox (idempotent on message_id, not published to live clients again,
the per-user cap applied). Read and archived marks lived only in Redis: the
repaired messages are unread.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from finstream.codec import Codec, DecodeError
from finstream.domain import strict_json
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import to_micros
from finstream.runtime.logging import get_logger
from finstream.settings import Settings
from finstream.sinks.delivery.base import Message, Sent
from finstream.stores.inbox import Inbox
from finstream.stores.redis import RepairMarks, connect

log = get_logger(__name__)

PROVIDER = "redis-inbox"
REPAIR_PAGE = 500

_DELIVERED = """
SELECT message_id, user_id, message FROM deliveries
WHERE channel = 'INAPP' AND state = 'delivered' AND message_id > $1
ORDER BY message_id LIMIT $2
"""


def inbox_entry(message: Message) -> dict[str, Any]:
    """What the inbox keeps of a message: its subject, body and data only sealed (the
    message's ``sealed`` token, opened by the API for its user), when it has one."""
    if message.get("sealed"):
        return {
            "request_id": message["request_id"],
            "category": message["category"],
            "priority": message["priority"],
            "sealed": message["sealed"],
            "created_at": message["created_at"].isoformat(),
        }
    return {
        "request_id": message["request_id"],
        "category": message["category"],
        "priority": message["priority"],
        "subject": message.get("subject"),
        "body": message["body_text"],
        "data": message.get("data") or {},
        "created_at": message["created_at"].isoformat(),
    }


class InboxProvider:
    name = PROVIDER
    channel = "INAPP"
    reconcile = Reconcile.IDEMPOTENT
    rate = 10_000.0

    def __init__(self, settings: Settings) -> None:
        self._redis = connect(settings)
        self.inbox = Inbox(self._redis, settings)

    def supports(self, message: Message) -> bool:
        return True

    async def send(self, message: Message) -> Sent:
        try:
            stored = await self.inbox.add(
                str(message["user_id"]),
                str(message["message_id"]),
                inbox_entry(message),
                score=to_micros(message["created_at"]) / 1_000_000,
            )
        except strict_json.NonFiniteNumber as exc:
            raise DeliveryError(
                ErrorClass.PERMANENT, f"inbox entry is not JSON: {exc}", provider=self.name
            ) from None
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise DeliveryError(
                ErrorClass.TRANSIENT, f"redis: {exc}", provider=self.name, ambiguous=True
            ) from None
        except RedisError as exc:
            raise DeliveryError(ErrorClass.TRANSIENT, f"redis: {exc}", provider=self.name) from None
        return Sent(
            str(message["message_id"]),
            status="DELIVERED",
            detail=None if stored else "already in the inbox",
        )

    async def lookup(self, message: Message, since: Any) -> Sent | None:
        raise DeliveryError(ErrorClass.PERMANENT, "not needed: storing is idempotent")

    async def close(self) -> None:
        await self._redis.aclose()


class InboxRepair:
    """Puts delivered in-app messages back into inboxes that Redis lost."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        inbox: Inbox,
        redis: aioredis.Redis,
        settings: Settings,
        codec: Codec,
    ) -> None:
        self.pool = pool
        self.inbox = inbox
        self.codec = codec
        self.every = settings.redis_repair_check_seconds
        self.marks = RepairMarks(redis, settings, "inapp")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.marks.missing(["inboxes"]):
                    restored = await self.repair()
                    await self.marks.mark(["inboxes"])
                    log.warning(
                        "Redis had lost the in-app inboxes; rebuilt them from the delivery records",
                        messages=restored,
                    )
            except Exception as exc:
                log.warning("inboxes not repaired yet", error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)

    async def repair(self) -> int:
        """Every delivered in-app message back into its inbox; how many were missing."""
        restored = 0
        after = ""
        while True:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(_DELIVERED, after, REPAIR_PAGE)
            for row in rows:
                try:
                    message = self.codec.decode(bytes(row["message"]), "OutboundMessage")
                except DecodeError:
                    continue
                stored = await self.inbox.add(
                    row["user_id"],
                    row["message_id"],
                    inbox_entry(message),
                    score=to_micros(message["created_at"]) / 1_000_000,
                    publish=False,
                )
                restored += int(stored)
            if len(rows) < REPAIR_PAGE:
                return restored
            after = rows[-1]["message_id"]


def create(settings: Settings) -> InboxProvider:
    return InboxProvider(settings)
