"""Fake Yahoo Finance: cookie, crumb, v7 quote and v8 chart.

``GET /fc`` answers 404 and sets cookie ``A3`` (like fc.yahoo.com);
``GET /v1/test/getcrumb`` needs the cookie and answers the crumb as plain
text; ``/v7/finance/quote`` and ``/v8/finance/chart/{symbol}`` need both and
answer 401 ``{"finance": {"error": {"code": "Unauthorized", "description":
"Invalid Crumb"}}}`` otherwise. :meth:`FakeYahoo.expire_crumb` makes the
current crumb stale.

Modes: ok; throttle (429 "Too Many Requests", optional ``retry_after``);
crumb_throttled (getcrumb answers "Too Many Requests" with HTTP 200, as
yfinance users have seen); html; truncated; quote_error (quoteResponse.error
set); error500.

Symbols in ``delisted`` have no quote: v7 quote leaves them out of a request
that has other symbols, and answers 404 ``{"finance": {"error": {"code":
"Not Found", "description": "Quote not found for symbol: X"}}}`` when asked
for nothing else (with ``delisted_404 = "any"``: whenever one is asked,
naming them, or with ``"unnamed"`` without naming them); v8 chart answers
its own 404 for them.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter

from aiohttp import web
from tests.fakes.marketdata.market import FakeMarket, epoch

INVALID_CRUMB = {
    "finance": {"result": None, "error": {"code": "Unauthorized", "description": "Invalid Crumb"}}
}


class FakeYahoo:
    def __init__(self, market: FakeMarket) -> None:
        self.market = market
        self.mode = "ok"
        self.retry_after: str | None = None
        self.cookie = secrets.token_hex(8)
        self.crumb = secrets.token_urlsafe(8).replace("-", "a").replace("_", "b")
        self.delisted: set[str] = set()
        self.delisted_404 = "alone"  # or "any", "unnamed"
        self.calls: Counter[str] = Counter()
        self.served: Counter[str] = Counter()

    def expire_crumb(self) -> None:
        self.crumb = secrets.token_urlsafe(8).replace("-", "a").replace("_", "b")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/fc", self.fc)
        app.router.add_get("/v1/test/getcrumb", self.getcrumb)
        app.router.add_get("/v7/finance/quote", self.quote)
        app.router.add_get("/v8/finance/chart/{symbol}", self.chart)
        return app

    def _throttled(self) -> web.Response | None:
        if self.mode == "throttle":
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=429, text="Too Many Requests\r\n", headers=headers)
        if self.mode == "error500":
            return web.Response(
                status=502, text="<html><body>Bad Gateway</body></html>", content_type="text/html"
            )
        return None

    async def fc(self, request: web.Request) -> web.Response:
        self.calls["fc"] += 1
        resp = web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        resp.set_cookie("A3", self.cookie, httponly=True)
        return resp

    def _has_cookie(self, request: web.Request) -> bool:
        return request.cookies.get("A3") == self.cookie

    async def getcrumb(self, request: web.Request) -> web.Response:
        self.calls["getcrumb"] += 1
        if (r := self._throttled()) is not None:
            return r
        if self.mode == "crumb_throttled":
            return web.Response(text="Too Many Requests", content_type="text/plain")
        if not self._has_cookie(request):
            return web.Response(status=401, text="", content_type="text/plain")
        return web.Response(text=self.crumb, content_type="text/plain")

    def _authorized(self, request: web.Request) -> bool:
        return self._has_cookie(request) and request.query.get("crumb") == self.crumb

    async def quote(self, request: web.Request) -> web.Response:
        self.calls["quote"] += 1
        if (r := self._throttled()) is not None:
            return r
        if not self._authorized(request):
            return web.json_response(INVALID_CRUMB, status=401)
        if self.mode == "html":
            return web.Response(
                text="<!doctype html><html><head><title>Yahoo</title></head></html>",
                content_type="text/html",
            )
        if self.mode == "quote_error":
            return web.json_response(
                {
                    "quoteResponse": {
                        "result": None,
                        "error": {
                            "code": "Bad Request",
                            "description": 'Missing value for the "symbols" argument',
                        },
                    }
                }
            )
        symbols = [
            s.strip().upper() for s in request.query.get("symbols", "").split(",") if s.strip()
        ]
        gone = [s for s in symbols if s in self.delisted]
        known = [s for s in symbols if self.market.knows(s) and s not in self.delisted]
        if gone and (not known or self.delisted_404 != "alone"):
            which = "" if self.delisted_404 == "unnamed" else f": {','.join(gone)}"
            noun = "symbols" if len(gone) > 1 else "symbol"
            return web.json_response(
                {
                    "finance": {
                        "result": None,
                        "error": {
                            "code": "Not Found",
                            "description": f"Quote not found for {noun}{which}",
                        },
                    }
                },
                status=404,
            )
        result = []
        for sym in symbols:
            if not self.market.knows(sym) or sym in self.delisted:
                continue  # Yahoo silently leaves unknown symbols out
            q = self.market.quote(sym)
            self.served[sym] += 1
            result.append(
                {
                    "language": "en-US",
                    "region": "US",
                    "quoteType": "EQUITY",
                    "currency": "USD",
                    "marketState": "REGULAR",
                    "shortName": f"{sym} Inc.",
                    "symbol": sym,
                    "regularMarketPrice": float(q.price),
                    "regularMarketChange": float(q.price - q.prev_close),
                    "regularMarketChangePercent": float(
                        (q.price - q.prev_close) / q.prev_close * 100
                    ),
                    "regularMarketTime": epoch(q.ts),
                    "regularMarketDayHigh": float(q.price + 1),
                    "regularMarketDayLow": float(q.prev_close - 1),
                    "regularMarketVolume": q.volume,
                    "regularMarketPreviousClose": float(q.prev_close),
                    "bid": float(q.price - q.price / 1000),
                    "ask": 0,
                }
            )
        text = json.dumps({"quoteResponse": {"result": result, "error": None}})
        if self.mode == "truncated":
            text = text[: len(text) - 7]
        return web.Response(text=text, content_type="application/json")

    async def chart(self, request: web.Request) -> web.Response:
        self.calls["chart"] += 1
        if (r := self._throttled()) is not None:
            return r
        if not self._authorized(request):
            return web.json_response(INVALID_CRUMB, status=401)
        sym = request.match_info["symbol"].upper()
        if not self.market.knows(sym) or sym in self.delisted:
            return web.json_response(
                {
                    "chart": {
                        "result": None,
                        "error": {
                            "code": "Not Found",
                            "description": "No data found, symbol may be delisted",
                        },
                    }
                },
                status=404,
            )
        bars = self.market.minute_bars(sym, 30)
        closes: list[float | None] = [float(c) for _, c, _ in bars]
        closes[3] = None  # a minute without trades
        return web.json_response(
            {
                "chart": {
                    "result": [
                        {
                            "meta": {
                                "currency": "USD",
                                "symbol": sym,
                                "dataGranularity": "1m",
                                "regularMarketPrice": closes[-1],
                            },
                            "timestamp": [epoch(s) for s, _, _ in bars],
                            "indicators": {
                                "quote": [
                                    {
                                        "close": closes,
                                        "open": closes,
                                        "high": closes,
                                        "low": closes,
                                        "volume": [v for _, _, v in bars],
                                    }
                                ]
                            },
                        }
                    ],
                    "error": None,
                }
            }
        )
