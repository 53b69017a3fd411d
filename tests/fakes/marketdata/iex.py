"""Fake IEX Cloud mirror: the legacy ``/stable/stock/{symbol}/quote`` format.

The real service was retired on 2024-08-31; this stands in for an archived
or compatible mirror. Modes: ok; gone (HTTP 410 for everything, what a shut
service's leftover front end might say).
"""

from __future__ import annotations

from aiohttp import web
from tests.fakes.marketdata.market import FakeMarket, millis


class FakeIex:
    def __init__(self, market: FakeMarket, token: str = "iex-test-token") -> None:
        self.market = market
        self.token = token
        self.mode = "ok"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/stable/stock/{symbol}/quote", self.quote)
        return app

    async def quote(self, request: web.Request) -> web.Response:
        if self.mode == "gone":
            return web.Response(status=410, text="Gone")
        if request.query.get("token") != self.token:
            return web.Response(status=403, text="The API key provided is not valid.")
        sym = request.match_info["symbol"].upper()
        if not self.market.knows(sym):
            return web.Response(status=404, text="Unknown symbol")
        q = self.market.quote(sym)
        return web.json_response(
            {
                "symbol": sym,
                "companyName": f"{sym} Inc.",
                "calculationPrice": "tops",
                "latestPrice": float(q.price),
                "latestSource": "IEX real time price",
                "latestTime": "1:23:45 PM",
                "latestUpdate": millis(q.ts),
                "latestVolume": q.volume,
                "iexBidPrice": 0,
                "iexAskPrice": float(q.price + 1),
                "open": float(q.open),
                "high": None,
                "low": None,
                "previousClose": float(q.prev_close),
                "change": float(q.price - q.prev_close),
                "changePercent": float((q.price - q.prev_close) / q.prev_close),
            }
        )
