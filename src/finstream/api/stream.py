"""``/v1/stream``: live quotes, bars and the caller's inbox over one WebSocket.

Authentication happens on connect and never through the URL (URLs end up in
proxy and access logs): either an ``Authorization: Bearer`` header (servers,
native apps), or the subprotocol list ``["finstream.v1", "bearer.<token>"]``
(browsers cannot set headers; the server answers with ``finstream.v1`` only,
so the token is not echoed), or a first message ``{"type": "auth", "token":
...}`` within ``api_ws_auth_timeout_seconds``. A later ``auth`` message with
a fresh token of the same subject extends the session; when the token
expires without one the server closes with 4001.

Client messages (JSON text frames; ``id`` is echoed back when given)::

    {"type": "subscribe",   "stream": "quotes", "symbol": "AAPL"}
    {"type": "subscribe",   "stream": "bars",   "symbol": "AAPL", "interval": "1m"}
    {"type": "subscribe",   "stream": "inbox"}
    {"type": "unsubscribe", ...same fields...}
    {"type": "ping"}

Server frames: ``welcome``, ``subscribed``, ``unsubscribed``, ``quote``
(the first after subscribing carries ``"snapshot": true``: the cached latest
quote; compare ``ts`` since a live update may overtake it), ``bar``,
``inbox``, ``heartbeat`` (every ``api_ws_heartbeat_seconds``), ``pong``,
``gap`` (the server's Redis link dropped; refetch state) and ``error``.
Every frame is strict JSON (RFC 8259): a NaN or Infinity in a payload (which
is not JSON) arrives as null, and the frame lists where in ``nonfinite`` (JSON
pointers into ``data``, e.g. ``["/price"]``).

Each client has a bounded send queue. When it is full the client is too slow
for the stream: it gets an ``error`` frame with code ``slow_consumer`` and is
closed with 4008, and nobody else waits for it. Close codes: 4001 not
authenticated or token expired, 4008 too slow, 4029 rate limited, 1003
binary frame, 1008 protocol abuse, 1009 message too big.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from typing import Any

from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from finstream.api.auth import AuthError, KeysUnavailable, Principal, bearer_token
from finstream.api.hub import frame_for, frame_text
from finstream.api.metrics import AUTH_FAILURES, WS_CONNECTIONS, WS_DROPPED, WS_MESSAGES
from finstream.domain import strict_json
from finstream.domain.envelope import UserKeys
from finstream.domain.marketdata.ticks import SYMBOL_RE
from finstream.domain.resilience import RateLimiter as TokenBucket
from finstream.runtime.logging import get_logger
from finstream.stores.inbox import open_entry

log = get_logger(__name__)
_SENT = WS_MESSAGES.labels("out")

SUBPROTOCOL = "finstream.v1"
_BEARER_PROTOCOL = "bearer."
_INTERVAL_RE = re.compile(r"^[1-9][0-9]{0,2}[smhd]$")
SEND_TIMEOUT = 10.0
CLOSE_UNAUTHORIZED = 4001
CLOSE_SLOW = 4008
CLOSE_RATE_LIMITED = 4029


def _dumps(obj: dict[str, Any]) -> str:
    return frame_text(obj)


def handshake_credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """(token, subprotocol to answer with) from the upgrade request."""
    offered: list[str] = list(ws.scope.get("subprotocols") or [])
    chosen = SUBPROTOCOL if SUBPROTOCOL in offered else None
    token = bearer_token(ws.headers.get("authorization"))
    if token is None:
        for proto in offered:
            if proto.startswith(_BEARER_PROTOCOL):
                token = proto[len(_BEARER_PROTOCOL) :]
                break
    return token, chosen


def opening(render: Any, keys: UserKeys) -> Any:
    """A renderer of inbox payloads that opens their sealed part first."""

    def open_then_render(payload: str) -> str:
        try:
            entry = json.loads(payload)
        except ValueError:
            return str(render(payload))
        if isinstance(entry, dict) and entry.get("sealed"):
            payload = strict_json.dumps(open_entry(entry, keys))
        return str(render(payload))

    return open_then_render


class StreamClient:
    def __init__(self, ws: WebSocket, principal: Principal, resources: Any) -> None:
        self.ws = ws
        self.principal = principal
        self.res = resources
        settings = resources.settings
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(settings.api_ws_queue_size)
        self.max_subscriptions: int = settings.api_ws_max_subscriptions
        self.max_message: int = settings.api_ws_max_message_bytes
        self.heartbeat: float = settings.api_ws_heartbeat_seconds
        self.subscriptions: dict[str, dict[str, str]] = {}
        self.closing: tuple[int, str] | None = None
        self.sending_since: float | None = None
        self._bucket = TokenBucket(rate=20.0, burst=40.0)

    # -- outbound ------------------------------------------------------------------
    def offer(self, frame: str) -> None:
        if self.closing is not None:
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            WS_DROPPED.labels("slow_consumer").inc()
            self.drop(
                CLOSE_SLOW,
                "slow consumer",
                code="slow_consumer",
                message=f"more than {self.queue.maxsize} messages waited for this client; "
                "closing so others are not held up",
            )

    def drop(self, close_code: int, reason: str, *, code: str, message: str) -> None:
        """Close soon: discard what is queued, then send the error and the close."""
        if self.closing is not None:
            return
        self.closing = (close_code, reason)
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_dumps({"type": "error", "code": code, "message": message}))
        self.queue.put_nowait(None)

    def send(self, obj: dict[str, Any]) -> None:
        self.offer(_dumps(obj))

    async def writer(self) -> None:
        get, send = self.queue.get, self.ws.send_text
        while True:
            frame = await get()
            if frame is None:
                break
            # No asyncio.wait_for per frame (in 3.11 it makes a task per call, which
            # dominated fan-out CPU); the watchdog times out a stuck send instead.
            self.sending_since = time.monotonic()
            await send(frame)
            self.sending_since = None
            _SENT.inc()
        code, reason = self.closing or (1000, "")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code, reason), SEND_TIMEOUT)

    async def watchdog(self, writer: asyncio.Task[None]) -> None:
        """Give up on a client whose socket has not taken a frame for SEND_TIMEOUT."""
        while not writer.done():
            await asyncio.sleep(1.0)
            since = self.sending_since
            if since is not None and time.monotonic() - since > SEND_TIMEOUT:
                WS_DROPPED.labels("send_timeout").inc()
                writer.cancel()
                return

    async def heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.send({"type": "heartbeat", "ts": time.time()})

    async def expiry(self) -> None:
        leeway = self.res.verifier.leeway
        while True:
            left = self.principal.expires_at + leeway - time.time()
            if left <= 0:
                WS_DROPPED.labels("token_expired").inc()
                self.drop(
                    CLOSE_UNAUTHORIZED,
                    "token expired",
                    code="token_expired",
                    message="the token expired; reconnect (or send an auth message before expiry)",
                )
                return
            await asyncio.sleep(min(left, 60.0))

    # -- inbound -------------------------------------------------------------------
    async def reader(self) -> None:
        while self.closing is None:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.drop(1003, "text frames only", code="bad_frame", message="send JSON text")
                return
            if len(text) > self.max_message:
                self.drop(
                    1009,
                    "message too big",
                    code="too_big",
                    message=f"messages are at most {self.max_message} bytes",
                )
                return
            if not self._bucket.try_acquire(time.monotonic()):
                WS_DROPPED.labels("flooding").inc()
                self.drop(1008, "too many messages", code="flooding", message="slow down")
                return
            WS_MESSAGES.labels("in").inc()
            await self.handle(text)

    async def handle(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.send({"type": "error", "code": "bad_request", "message": "not JSON"})
            return
        if not isinstance(msg, dict):
            self.send({"type": "error", "code": "bad_request", "message": "send a JSON object"})
            return
        kind = msg.get("type")
        ref = {"id": msg["id"]} if isinstance(msg.get("id"), str | int) else {}
        if kind == "ping":
            self.send({"type": "pong", **ref})
        elif kind in ("subscribe", "unsubscribe"):
            try:
                channel, desc, render = self.target(msg)
            except ValueError as exc:
                self.send({"type": "error", "code": "bad_request", "message": str(exc), **ref})
                return
            except PermissionError as exc:
                self.send({"type": "error", "code": "forbidden", "message": str(exc), **ref})
                return
            if kind == "subscribe":
                await self.subscribe(channel, desc, render, ref)
            else:
                await self.unsubscribe(channel, desc, ref)
        elif kind == "auth":
            await self.reauthenticate(msg.get("token"), ref)
        else:
            self.send(
                {"type": "error", "code": "bad_request", "message": f"unknown type {kind!r}", **ref}
            )

    def target(self, msg: dict[str, Any]) -> tuple[str, dict[str, str], Any]:
        stream = msg.get("stream")
        settings = self.res.settings
        if stream in ("quotes", "bars"):
            raw = msg.get("symbol")
            symbol = raw.strip().upper() if isinstance(raw, str) else ""
            if not SYMBOL_RE.match(symbol):
                raise ValueError(f"symbol {raw!r} is not a valid symbol")
            if stream == "quotes":
                desc = {"stream": "quotes", "symbol": symbol}
                return (
                    self.res.quotes.channel(symbol),
                    desc,
                    frame_for("quote", {"symbol": symbol}),
                )
            interval = msg.get("interval", "1m")
            if not isinstance(interval, str) or not _INTERVAL_RE.match(interval):
                raise ValueError(f"interval {interval!r} is not like 1m, 5m or 1h")
            desc = {"stream": "bars", "symbol": symbol, "interval": interval}
            return (
                settings.redis_key(f"bars:{interval}:{symbol}"),
                desc,
                frame_for("bar", {"symbol": symbol, "interval": interval}),
            )
        if stream == "inbox":
            if not self.principal.has("user"):
                raise PermissionError("only a user has an inbox")
            return (
                self.res.inbox.channel(self.principal.subject),
                {"stream": "inbox"},
                frame_for("inbox", {}),
            )
        raise ValueError("stream must be quotes, bars or inbox")

    async def subscribe(
        self, channel: str, desc: dict[str, str], render: Any, ref: dict[str, Any]
    ) -> None:
        if channel in self.subscriptions:
            self.send({"type": "subscribed", **desc, **ref})
            return
        if len(self.subscriptions) >= self.max_subscriptions:
            self.send(
                {
                    "type": "error",
                    "code": "too_many_subscriptions",
                    "message": f"at most {self.max_subscriptions} subscriptions per connection",
                    **ref,
                }
            )
            return
        if desc["stream"] == "inbox":
            # issue 14: inbox entries are sealed; opened here for their own user only.
            render = opening(render, await self.res.keys.get(self.principal.subject))
        try:
            await self.res.hub.subscribe(channel, self, render)
        except (RedisError, OSError):
            self.send({"type": "error", "code": "unavailable", "message": "retry shortly", **ref})
            return
        self.subscriptions[channel] = desc
        self.send({"type": "subscribed", **desc, **ref})
        if desc["stream"] == "quotes":
            # After subscribing, so no update can fall between snapshot and stream.
            quote = await self.res.quotes.get(desc["symbol"])
            if quote is not None:
                self.send(
                    {"type": "quote", "symbol": desc["symbol"], "snapshot": True, "data": quote}
                )

    async def unsubscribe(self, channel: str, desc: dict[str, str], ref: dict[str, Any]) -> None:
        if self.subscriptions.pop(channel, None) is None:
            self.send(
                {"type": "error", "code": "not_subscribed", "message": "not subscribed", **ref}
            )
            return
        await self.res.hub.unsubscribe(channel, self)
        self.send({"type": "unsubscribed", **desc, **ref})

    async def reauthenticate(self, token: Any, ref: dict[str, Any]) -> None:
        try:
            principal = await self.res.verifier.verify(token if isinstance(token, str) else "")
        except AuthError as exc:
            AUTH_FAILURES.labels(exc.reason).inc()
            self.send({"type": "error", "code": "unauthorized", "message": exc.description, **ref})
            return
        except KeysUnavailable:
            self.send({"type": "error", "code": "unavailable", "message": "try again", **ref})
            return
        if principal.subject != self.principal.subject:
            self.send(
                {
                    "type": "error",
                    "code": "forbidden",
                    "message": "a session cannot change its subject",
                    **ref,
                }
            )
            return
        self.principal = principal
        self.send({"type": "authenticated", "expires_at": principal.expires_at, **ref})

    async def release(self) -> None:
        for channel in list(self.subscriptions):
            with contextlib.suppress(Exception):
                await self.res.hub.unsubscribe(channel, self)
        self.subscriptions.clear()


async def _first_message_token(ws: WebSocket, wait: float) -> str | None:
    try:
        async with asyncio.timeout(wait):
            message = await ws.receive()
    except TimeoutError:
        return None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if not text or len(text) > 16_384:
        return None
    try:
        msg = json.loads(text)
    except ValueError:
        return None
    if isinstance(msg, dict) and msg.get("type") == "auth" and isinstance(msg.get("token"), str):
        return str(msg["token"])
    return None


async def _refuse(ws: WebSocket, close_code: int, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(_dumps({"type": "error", "code": code, "message": message}))
        await ws.close(close_code, message[:120])


async def stream_endpoint(ws: WebSocket) -> None:
    res = ws.app.state.resources
    settings = res.settings
    token, subprotocol = handshake_credentials(ws)
    await ws.accept(subprotocol=subprotocol)
    WS_CONNECTIONS.inc()
    client: StreamClient | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if token is None:
            token = await _first_message_token(ws, settings.api_ws_auth_timeout_seconds)
        if token is None:
            AUTH_FAILURES.labels("missing").inc()
            await _refuse(
                ws,
                CLOSE_UNAUTHORIZED,
                "unauthorized",
                "authenticate with a bearer token (header, subprotocol or first message)",
            )
            return
        try:
            principal = await res.verifier.verify(token)
        except AuthError as exc:
            AUTH_FAILURES.labels(exc.reason).inc()
            await _refuse(ws, CLOSE_UNAUTHORIZED, "unauthorized", exc.description)
            return
        except KeysUnavailable:
            await _refuse(ws, 1013, "unavailable", "token verification is unavailable; retry")
            return
        decision = await res.limiter.hit(principal.token_hash)
        if not decision.allowed:
            await _refuse(ws, CLOSE_RATE_LIMITED, "rate_limited", "too many requests; retry later")
            return
        client = StreamClient(ws, principal, res)
        client.send(
            {
                "type": "welcome",
                "subject": principal.subject,
                "heartbeat_seconds": client.heartbeat,
                "max_subscriptions": client.max_subscriptions,
                "expires_at": principal.expires_at,
            }
        )
        writer = asyncio.create_task(client.writer())
        tasks = [
            writer,
            asyncio.create_task(client.reader()),
            asyncio.create_task(client.heartbeats()),
            asyncio.create_task(client.expiry()),
            asyncio.create_task(client.watchdog(writer)),
        ]
        # The writer ends when the server closes; the reader when the client leaves.
        done, _ = await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None and not isinstance(failure, WebSocketDisconnect):
                log.warning("stream connection failed", error_class=type(failure).__name__)
        if tasks[1] in done and client.closing is not None and not tasks[0].done():
            # The reader asked to close: let the writer send the notice and close.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tasks[0], SEND_TIMEOUT)
    except WebSocketDisconnect:
        pass
    finally:
        WS_CONNECTIONS.dec()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if client is not None:
            await client.release()
