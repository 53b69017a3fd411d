"""Fake Finnhub: REST ``/api/v1/quote`` and the WebSocket trade stream at ``/ws``.

REST modes: ok; throttle (429 ``{"error": "API limit reached..."}`` with
X-Ratelimit-Remaining 0 and X-Ratelimit-Reset); zero (a zero-filled quote);
error500. Unknown symbols answer the zero-filled quote, as Finnhub does; a
wrong token answers 401 ``{"error": "Invalid API key"}``; symbols in
``restricted`` (not covered by the key's plan) answer 403 ``{"error": "You
don't have access to this resource."}``.

WebSocket: a wrong token is refused at the handshake (401). Subscribed
symbols get a trade message every ``trade_every`` seconds and the
connection a ``{"type":"ping"}`` every ``ping_every`` seconds, plus a
protocol-level ping frame every ``protocol_ping_every`` seconds whose pongs
are counted in ``pongs_seen`` (the proof that the client answers pings).
Stream modes: ok; resend (every trade message is sent twice, as after a
provider-side retry); silent (accepts, then says nothing, not even pings);
drop (closes the connection after ``drop_after`` messages); garbage
(malformed messages mixed in).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

from aiohttp import WSMsgType, web
from tests.fakes.marketdata.market import FakeMarket, epoch, millis


class FakeFinnhub:
    def __init__(self, market: FakeMarket, token: str = "fh-test-token") -> None:
        self.market = market
        self.token = token
        self.mode = "ok"
        self.ws_mode = "ok"
        self.restricted: set[str] = set()
        self.trade_every = 0.05
        self.ping_every = 0.5
        self.drop_after = 5
        self.protocol_ping_every = 0.1
        self.calls: Counter[str] = Counter()
        self.connections = 0
        self.subscriptions: list[set[str]] = []  # per connection, as received
        self.pongs_seen = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/quote", self.quote)
        app.router.add_get("/ws", self.ws)
        return app

    async def quote(self, request: web.Request) -> web.Response:
        self.calls["quote"] += 1
        if request.query.get("token") != self.token:
            return web.json_response({"error": "Invalid API key"}, status=401)
        if self.mode == "throttle":
            return web.json_response(
                {"error": "API limit reached. Please try again later. Remaining Limit: 0"},
                status=429,
                headers={
                    "X-Ratelimit-Limit": "60",
                    "X-Ratelimit-Remaining": "0",
                    "X-Ratelimit-Reset": str(int(time.time()) + 1),
                },
            )
        if self.mode == "error500":
            return web.Response(status=500, text="Internal Server Error")
        sym = request.query.get("symbol", "").upper()
        if sym in self.restricted:
            return web.json_response(
                {"error": "You don't have access to this resource."}, status=403
            )
        if self.mode == "zero" or not self.market.knows(sym):
            return web.json_response(
                {"c": 0, "d": None, "dp": None, "h": 0, "l": 0, "o": 0, "pc": 0, "t": 0}
            )
        q = self.market.quote(sym)
        return web.Response(
            text=json.dumps(
                {
                    "c": float(q.price),
                    "d": float(q.price - q.prev_close),
                    "dp": float((q.price - q.prev_close) / q.prev_close * 100),
                    "h": float(q.price + 1),
                    "l": float(q.prev_close - 1),
                    "o": float(q.open),
                    "pc": float(q.prev_close),
                    "t": epoch(q.ts),
                }
            ),
            content_type="application/json",
        )

    async def ws(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("token") != self.token:
            return web.Response(status=401, text="Invalid API key")
        # autoping off: pings and pongs reach the loop below, so pongs can be counted.
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        self.connections += 1
        subscribed: set[str] = set()
        self.subscriptions.append(subscribed)
        sender = asyncio.create_task(self._send_loop(ws, subscribed))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data.get("type") == "subscribe":
                        subscribed.add(str(data.get("symbol")).upper())
                    elif data.get("type") == "unsubscribe":
                        subscribed.discard(str(data.get("symbol")).upper())
                elif msg.type == WSMsgType.PONG:
                    self.pongs_seen += 1
                elif msg.type == WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type == WSMsgType.CLOSE:
                    await ws.close()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        return ws

    async def _send_loop(self, ws: web.WebSocketResponse, subscribed: set[str]) -> None:
        if self.ws_mode == "silent":
            await asyncio.sleep(3600)
        sent = 0
        last_ping = last_protocol_ping = time.monotonic()
        last_step: dict[str, int] = {}
        while not ws.closed:
            await asyncio.sleep(self.trade_every)
            if time.monotonic() - last_protocol_ping >= self.protocol_ping_every:
                last_protocol_ping = time.monotonic()
                await ws.ping(b"fake")
            if time.monotonic() - last_ping >= self.ping_every:
                last_ping = time.monotonic()
                await ws.send_str(json.dumps({"type": "ping"}))
            data = []
            for sym in sorted(subscribed):
                if not self.market.knows(sym):
                    continue
                q = self.market.quote(sym)
                if last_step.get(sym) == q.step:
                    continue
                last_step[sym] = q.step
                data.append(
                    {"s": sym, "p": float(q.price), "t": millis(q.ts), "v": 100, "c": ["1", "12"]}
                )
            if not data:
                continue
            message = json.dumps({"type": "trade", "data": data})
            await ws.send_str(message)
            if self.ws_mode == "resend":
                await ws.send_str(message)
            if self.ws_mode == "garbage":
                await ws.send_str(
                    '{"type":"trade","data":[{"s":"' + data[0]["s"] + '","p":0,"t":1}]}'
                )
                await ws.send_str("{not json")
            sent += 1
            if self.ws_mode == "drop" and sent >= self.drop_after:
                await ws.close(code=1011, message=b"server restarting")
                return
