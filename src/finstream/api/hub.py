"""Fan-out of Redis pub/sub to WebSocket clients over ONE shared connection per process.

Every API process holds a single Redis pub/sub connection. A channel is
subscribed there when its first client asks for it and unsubscribed when its
last client leaves (reference counting), so Redis sees one subscriber per
process whatever the number of WebSocket clients, and a message is read and
framed once, then handed to each client.

Handing over never waits: each client has a bounded queue and
:meth:`Subscriber.offer` must return at once. A client that cannot keep up is
the client's problem (it is told and dropped, see ``stream.py``), never the
other clients'.

Redis pub/sub is at-most-once: what is published while the connection is
down is lost. redis-py re-subscribes every channel when it reconnects, and
the hub then tells every client that its streams had a gap, so an app can
refetch the state (latest quote, inbox page) over REST.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from finstream.api.metrics import WS_NONFINITE, WS_SUBSCRIPTIONS
from finstream.domain import strict_json
from finstream.runtime.logging import get_logger

log = get_logger(__name__)

Render = Callable[[str], str]


class Subscriber(Protocol):
    def offer(self, frame: str) -> None:
        """Take a frame without waiting (queue it, or mark the client too slow)."""


def frame_text(obj: dict[str, Any]) -> str:
    """A frame the server builds itself, as strict JSON.

    A non-finite number in it is a bug of ours: it goes out as null, the frame
    names it in ``nonfinite``, and the error is logged and counted, rather than
    a frame that the client's JSON.parse would reject whole.
    """
    try:
        return strict_json.dumps(obj)
    except strict_json.NonFiniteNumber as exc:
        repaired, pointers = strict_json.replace_non_finite(obj)
        _report_non_finite(str(obj.get("type")), exc.pointers, "built by the API")
        return strict_json.dumps({**repaired, "nonfinite": pointers})


def frame_for(kind: str, fields: dict[str, str]) -> Render:
    """A renderer that wraps a channel's payload in a typed frame, always strict JSON.

    A JSON payload is passed through as it is; text that is not JSON becomes a
    JSON string; a payload with NaN or Infinity (not JSON, though Python writes
    it) carries null in their place and ``"nonfinite": [JSON pointers]``.
    """
    prefix = strict_json.dumps({"type": kind, **fields})[:-1] + ',"data":'

    def render(payload: str) -> str:
        try:
            value, pointers = strict_json.parse(payload)
        except (ValueError, RecursionError):
            return prefix + strict_json.dumps(payload) + "}"
        if not pointers:
            return prefix + payload + "}"
        _report_non_finite(kind, pointers, "published on Redis")
        return (
            prefix + strict_json.dumps(value) + ',"nonfinite":' + strict_json.dumps(pointers) + "}"
        )

    return render


def _report_non_finite(kind: str, pointers: list[str], where: str) -> None:
    WS_NONFINITE.labels(kind).inc()
    log.error(
        "a frame held non-finite numbers (not JSON); sent as null",
        kind=kind,
        where=where,
        pointers=pointers[:10],
    )


GAP_FRAME = strict_json.dumps(
    {"type": "gap", "message": "the live stream was interrupted; refetch current state"}
)


class PubSubHub:
    def __init__(self, redis: aioredis.Redis, control_channel: str) -> None:
        self._redis = redis
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self._control = control_channel
        self._subscribers: dict[str, dict[Subscriber, None]] = {}
        self._renderers: dict[str, Render] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.healthy = False
        self.delivered = 0

    @classmethod
    def for_namespace(cls, redis: aioredis.Redis, namespace: str) -> PubSubHub:
        return cls(redis, f"{namespace}api:hub:{uuid.uuid4().hex}")

    async def start(self) -> None:
        # A private channel keeps the connection open (and readable) before any client arrives.
        await self._pubsub.subscribe(self._control)
        self.healthy = True
        self._task = asyncio.create_task(self._run(), name="pubsub-hub")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @property
    def channels(self) -> int:
        return len(self._subscribers)

    def subscribers(self, channel: str) -> int:
        return len(self._subscribers.get(channel, ()))

    async def subscribe(self, channel: str, subscriber: Subscriber, render: Render) -> None:
        async with self._lock:
            subs = self._subscribers.get(channel)
            if subs is None:
                self._subscribers[channel] = {subscriber: None}
                self._renderers[channel] = render
                try:
                    await self._pubsub.subscribe(channel)
                except BaseException:
                    del self._subscribers[channel]
                    del self._renderers[channel]
                    raise
                WS_SUBSCRIPTIONS.set(len(self._subscribers))
            else:
                subs[subscriber] = None

    async def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        async with self._lock:
            subs = self._subscribers.get(channel)
            if subs is None or subscriber not in subs:
                return
            del subs[subscriber]
            if not subs:
                del self._subscribers[channel]
                del self._renderers[channel]
                WS_SUBSCRIPTIONS.set(len(self._subscribers))
                try:
                    await self._pubsub.unsubscribe(channel)
                except (RedisError, OSError) as exc:
                    # The reconnect re-subscribes only what redis-py still tracks; a
                    # stray subscription costs a few ignored messages, nothing more.
                    log.warning("unsubscribe failed", channel=channel, error=str(exc))

    def dispatch(self, channel: str, payload: str) -> None:
        subs = self._subscribers.get(channel)
        if not subs:
            return
        frame = self._renderers[channel](payload)
        for subscriber in list(subs):
            subscriber.offer(frame)
        self.delivered += len(subs)

    def _broadcast(self, frame: str) -> None:
        clients: dict[Subscriber, None] = {}
        for subs in self._subscribers.values():
            clients.update(subs)
        for client in clients:
            client.offer(frame)

    async def _run(self) -> None:
        delay = 0.1
        while not self._stopping:
            try:
                message: Any = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.healthy:
                    log.warning("pub/sub connection lost; reconnecting", error=str(exc))
                self.healthy = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not self.healthy:
                log.info("pub/sub connection restored; clients told about the gap")
                self.healthy = True
                self._broadcast(GAP_FRAME)
            delay = 0.1
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"]
            data = message["data"]
            self.dispatch(
                channel.decode() if isinstance(channel, bytes) else channel,
                data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data),
            )
