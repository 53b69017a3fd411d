"""Fake Polygon.io / Massive stocks WebSocket at ``/stocks``.

Greets with ``[{"ev":"status","status":"connected"}]``, expects
``{"action":"auth","params":KEY}`` (``auth_success`` / ``auth_failed`` then
close), then ``{"action":"subscribe","params":"T.AAPL,AM.AAPL"}`` (a
``success`` status per channel). Trades ``T`` flow every ``trade_every``
seconds; ``AM`` aggregates once per ``am_every`` seconds. Every message is an
array. Modes: ok; max_connections (after auth, the status Polygon sends when
another client took the key's connection, then close); silent; resend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import WSMsgType, web
from tests.fakes.marketdata.market import FakeMarket, millis


class FakePolygon:
    def __init__(self, market: FakeMarket, api_key: str = "pg-test-key") -> None:
        self.market = market
        self.api_key = api_key
        self.mode = "ok"
        self.trade_every = 0.05
        self.am_every = 0.5
        self.connections = 0
        self.auth_attempts = 0
        self.subscribed: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stocks", self.ws)
        return app

    async def ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        self.connections += 1
        await ws.send_str(
            json.dumps(
                [{"ev": "status", "status": "connected", "message": "Connected Successfully"}]
            )
        )
        sender: asyncio.Task[None] | None = None
        self.subscribed = set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                action = data.get("action")
                if action == "auth":
                    self.auth_attempts += 1
                    if data.get("params") != self.api_key:
                        await ws.send_str(
                            json.dumps(
                                [
                                    {
                                        "ev": "status",
                                        "status": "auth_failed",
                                        "message": "authentication failed",
                                    }
                                ]
                            )
                        )
                        await ws.close()
                        break
                    await ws.send_str(
                        json.dumps(
                            [{"ev": "status", "status": "auth_success", "message": "authenticated"}]
                        )
                    )
                    if self.mode == "max_connections":
                        await ws.send_str(
                            json.dumps(
                                [
                                    {
                                        "ev": "status",
                                        "status": "max_connections",
                                        "message": "Maximum number of websocket connections exceeded. You have reached the connection limit for your account.",
                                    }
                                ]
                            )
                        )
                        await ws.close()
                        break
                    if self.mode != "silent":
                        sender = asyncio.create_task(self._send_loop(ws))
                elif action in ("subscribe", "unsubscribe"):
                    params = [
                        p.strip() for p in str(data.get("params", "")).split(",") if p.strip()
                    ]
                    for p in params:
                        if action == "subscribe":
                            self.subscribed.add(p)
                        else:
                            self.subscribed.discard(p)
                    if self.mode != "silent":
                        await ws.send_str(
                            json.dumps(
                                [
                                    {
                                        "ev": "status",
                                        "status": "success",
                                        "message": f"{action}d to: {p}",
                                    }
                                    for p in params
                                ]
                            )
                        )
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        return ws

    async def _send_loop(self, ws: web.WebSocketResponse) -> None:
        last: dict[str, int] = {}
        since_am = 0.0
        while not ws.closed:
            await asyncio.sleep(self.trade_every)
            since_am += self.trade_every
            events: list[dict[str, object]] = []
            for channel in sorted(self.subscribed):
                ev, _, sym = channel.partition(".")
                if not self.market.knows(sym):
                    continue
                q = self.market.quote(sym)
                if ev == "T" and last.get(sym) != q.step:
                    last[sym] = q.step
                    events.append(
                        {
                            "ev": "T",
                            "sym": sym,
                            "i": str(q.step),
                            "x": 4,
                            "p": float(q.price),
                            "s": 100,
                            "c": [12, 37],
                            "t": millis(q.ts),
                            "q": q.step,
                            "z": 3,
                        }
                    )
                if ev == "AM" and since_am >= self.am_every:
                    start = millis(q.ts) // 60000 * 60000 - 60000
                    events.append(
                        {
                            "ev": "AM",
                            "sym": sym,
                            "v": 4110,
                            "av": q.volume,
                            "op": float(q.open),
                            "vw": float(q.price),
                            "o": float(q.price),
                            "c": float(q.price),
                            "h": float(q.price),
                            "l": float(q.price),
                            "a": float(q.price),
                            "z": 68,
                            "s": start,
                            "e": start + 60000,
                        }
                    )
            if since_am >= self.am_every:
                since_am = 0.0
            if events:
                message = json.dumps(events)
                await ws.send_str(message)
                if self.mode == "resend":
                    await ws.send_str(message)
