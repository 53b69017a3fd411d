"""In-app delivery: notify.outbound.inapp -> the user's Redis inbox.

Storing is idempotent on message_id (see :mod:`finstream.sinks.inbox`), so a
redelivered batch neither duplicates a message nor publishes it twice. Every
stored message yields a DeliveryResult on notify.delivery.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from finstream.codec import DecodeError
from finstream.domain.time import to_micros, utcnow
from finstream.runtime.consumer import BatchConsumer
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import correlation, correlation_from_headers, get_logger
from finstream.runtime.worker import ServiceContext
from finstream.sinks.inbox import Inbox
from finstream.sinks.redis_client import connect

log = get_logger(__name__)
PROVIDER = "redis-inbox"


def inbox_entry(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": message["request_id"],
        "category": message["category"],
        "priority": message["priority"],
        "subject": message.get("subject"),
        "body": message["body_text"],
        "data": message.get("data") or {},
        "created_at": message["created_at"].isoformat(),
    }


def delivery_result(message: dict[str, Any], status: str, started: float) -> dict[str, Any]:
    return {
        "result_id": uuid.uuid4().hex,
        "message_id": message["message_id"],
        "request_id": message["request_id"],
        "user_id": message["user_id"],
        "channel": "INAPP",
        "provider": PROVIDER,
        "status": status,
        "attempt": 1,
        "provider_message_id": message["message_id"],
        "error_class": None,
        "error": None,
        "latency_ms": (time.perf_counter() - started) * 1000,
        "at": utcnow(),
    }


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    redis = connect(settings)
    inbox = Inbox(redis, settings)
    publisher = await ctx.publisher()
    dead_letters = await ctx.dead_letters()
    results_topic = settings.topic("notify.delivery")

    async def handle(records: Sequence[Any]) -> None:
        for r in records:
            headers = r.headers or ()
            try:
                message = ctx.codec.decode(r.value, "OutboundMessage")
            except DecodeError as exc:
                await dead_letters.send(
                    source_topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    key=r.key,
                    value=r.value,
                    error=exc,
                    headers=headers,
                )
                continue
            cid = message.get("correlation_id") or correlation_from_headers(headers)
            with correlation(cid):
                started = time.perf_counter()
                stored = await inbox.add(
                    message["user_id"],
                    message["message_id"],
                    inbox_entry(message),
                    score=to_micros(message["created_at"]) / 1_000_000,
                )
                status = "DELIVERED" if stored else "DUPLICATE"
                await publisher.send(
                    results_topic,
                    message["user_id"].encode(),
                    ctx.codec.encode("DeliveryResult", delivery_result(message, status, started)),
                    correlation_header(cid),
                )
                log.info(
                    "in-app message stored" if stored else "in-app duplicate ignored",
                    message_id=message["message_id"],
                )

    consumer = BatchConsumer(
        settings,
        ctx.role,
        [settings.topic("notify.outbound.inapp")],
        handle,
        publisher=publisher,
        batch_size=200,
        batch_ms=100,
        on_ready=lambda ready: ctx.health.set_ready(ready, "" if ready else "rebalancing"),
    )
    try:
        await consumer.run(ctx.stop)
    finally:
        await redis.aclose()
