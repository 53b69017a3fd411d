"""Router agent: notify.requests -> notify.outbound.<channel>.

Foundation version: every request becomes one in-app message for its user,
with the request's ``title`` and ``body`` data as subject and text. The
routing issue replaces this with preferences, consent, quiet hours, caps,
templates and schedules.
"""

from __future__ import annotations

from typing import Any

import faust

from finstream.app import RAW, AgentContext
from finstream.codec import DecodeError, EncodeError
from finstream.domain.notifications import outbound_message_id
from finstream.domain.time import utcnow
from finstream.runtime.faust_support import message_headers
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import correlation, correlation_from_headers, get_logger
from finstream.runtime.metrics import EVENTS_IN
from finstream.topics import load_catalogue

log = get_logger(__name__)


def inapp_message(request: dict[str, Any]) -> dict[str, Any]:
    data = request.get("data") or {}
    return {
        "message_id": outbound_message_id(request["request_id"], "INAPP", request["user_id"]),
        "request_id": request["request_id"],
        "user_id": request["user_id"],
        "channel": "INAPP",
        "category": request["category"],
        "priority": request.get("priority") or "NORMAL",
        "recipient": request["user_id"],
        "platform": None,
        "locale": "en",
        "subject": data.get("title"),
        "body_text": data.get("body") or request["template"],
        "body_html": None,
        "data": dict(data),
        "transactional": True,
        "created_at": utcnow(),
        "expires_at": request.get("expires_at"),
        "attempt": 0,
        "correlation_id": request.get("correlation_id"),
    }


def register(app: faust.App, ctx: AgentContext) -> None:
    settings = ctx.settings
    source = settings.topic("notify.requests")
    target = settings.topic("notify.outbound.inapp")
    requests = app.topic(
        source, partitions=load_catalogue().get("notify.requests").partitions, **RAW
    )

    @app.agent(requests, name="router")
    async def route(stream: faust.StreamT[Any]) -> None:
        async for event in stream.events():
            msg = event.message
            EVENTS_IN.labels(ctx.role, msg.topic).inc()
            headers = message_headers(msg)
            try:
                request = ctx.codec.decode(msg.value, "NotificationRequest")
                with correlation(
                    request.get("correlation_id") or correlation_from_headers(headers)
                ) as cid:
                    request["correlation_id"] = cid
                    out = inapp_message(request)
                    await ctx.publisher.send(
                        target,
                        request["user_id"].encode(),
                        ctx.codec.encode("OutboundMessage", out),
                        correlation_header(cid),
                    )
                    log.info("routed", request_id=request["request_id"], channel="INAPP")
            except (DecodeError, EncodeError, KeyError) as exc:
                await ctx.dead_letters.send(
                    source_topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    key=msg.key,
                    value=msg.value,
                    error=exc,
                    headers=headers,
                )
