"""Fake Alpha Vantage: GET /query with function=GLOBAL_QUOTE | TIME_SERIES_INTRADAY.

Modes (``fake.mode``):
  ok           the documented data shape
  note         HTTP 200 {"Note": ...}: the per-minute call frequency message
  information  HTTP 200 {"Information": ...}: the daily limit message
  burst        HTTP 200 {"Information": ...}: the per-second burst message (which
               also mentions the daily limit)
  premium      HTTP 200 {"Information": ...}: a premium-only endpoint
  invalid      HTTP 200 {"Error Message": "Invalid API call ..."}
  html         HTTP 200 with an HTML page (a proxy or maintenance page)
  truncated    HTTP 200 with JSON cut in the middle
  zero         a zero-filled Global Quote
  error500     HTTP 503
Unknown symbols get {"Global Quote": {}} (GLOBAL_QUOTE) or an "Invalid API
call" Error Message (intraday), as the real service answers; symbols in
``invalid_symbols`` get the "Invalid API call" Error Message from GLOBAL_QUOTE
too (what Alpha Vantage answers for symbols it cannot parse); a wrong key gets
the "apikey is invalid or missing" Error Message.
"""

from __future__ import annotations

import json
from collections import Counter

from aiohttp import web
from tests.fakes.marketdata.market import FakeMarket, day, eastern

NOTE = (
    "Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls per minute "
    "and 500 calls per day. Please visit https://www.alphavantage.co/premium/ if you would like "
    "to target a higher API call frequency."
)
DAILY = (
    "Thank you for using Alpha Vantage! Our standard API rate limit is 25 requests per day. "
    "Please subscribe to any of the premium plans at https://www.alphavantage.co/premium/ to "
    "instantly remove all daily rate limits."
)
BURST = (
    "Thank you for using Alpha Vantage! Please consider spreading out your free API requests "
    "more sparingly (1 request per second). You may subscribe to any of the premium plans at "
    "https://www.alphavantage.co/premium/ to lift the free key rate limit (25 requests per day) "
    "and instantly remove all daily rate limits."
)
PREMIUM = (
    "Thank you for using Alpha Vantage! This is a premium endpoint. You may subscribe to any of "
    "the premium plans at https://www.alphavantage.co/premium/ to instantly unlock all premium endpoints"
)
BAD_KEY = (
    "the parameter apikey is invalid or missing. Please claim your free API key on "
    "(https://www.alphavantage.co/support/#api-key). It should take less than 20 seconds."
)


class FakeAlphaVantage:
    def __init__(self, market: FakeMarket, api_key: str = "av-test-key") -> None:
        self.market = market
        self.api_key = api_key
        self.mode = "ok"
        self.invalid_symbols: set[str] = set()
        self.calls: Counter[str] = Counter()  # by function
        self.served: Counter[str] = Counter()  # quotes answered, by symbol

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/query", self.query)
        return app

    async def query(self, request: web.Request) -> web.Response:
        q = request.query
        function = q.get("function", "")
        self.calls[function] += 1
        if q.get("apikey") != self.api_key:
            return web.json_response({"Error Message": BAD_KEY})
        mode = self.mode
        if mode == "note":
            return web.json_response({"Note": NOTE})
        if mode == "information":
            return web.json_response({"Information": DAILY})
        if mode == "burst":
            return web.json_response({"Information": BURST})
        if mode == "premium":
            return web.json_response({"Information": PREMIUM})
        if mode == "invalid":
            return web.json_response(
                {
                    "Error Message": f"Invalid API call. Please retry or visit the documentation for {function}."
                }
            )
        if mode == "html":
            return web.Response(
                text="<!DOCTYPE html><html><body>Service Unavailable</body></html>",
                content_type="text/html",
            )
        if mode == "error500":
            return web.Response(status=503, text="Service Unavailable")
        symbol = q.get("symbol", "").upper()
        if function == "GLOBAL_QUOTE":
            body = self.global_quote(symbol)
        elif function == "TIME_SERIES_INTRADAY":
            body = self.intraday(symbol, q.get("interval", "1min"))
        else:
            body = {"Error Message": f"This API function ({function}) does not exist."}
        text = json.dumps(body)
        if mode == "truncated":
            text = text[: len(text) // 2]
        return web.Response(text=text, content_type="application/json")

    def global_quote(self, symbol: str) -> dict[str, object]:
        if symbol in self.invalid_symbols:
            return {
                "Error Message": "Invalid API call. Please retry or visit the documentation "
                "(https://www.alphavantage.co/documentation/) for GLOBAL_QUOTE."
            }
        if not self.market.knows(symbol):
            return {"Global Quote": {}}
        q = self.market.quote(symbol)
        self.served[symbol] += 1
        price = "0.0000" if self.mode == "zero" else f"{q.price:.4f}"
        change = q.price - q.prev_close
        return {
            "Global Quote": {
                "01. symbol": symbol,
                "02. open": f"{q.open:.4f}",
                "03. high": f"{q.price + 1:.4f}",
                "04. low": f"{q.prev_close - 1:.4f}",
                "05. price": price,
                "06. volume": str(q.volume),
                "07. latest trading day": day(q.ts),
                "08. previous close": f"{q.prev_close:.4f}",
                "09. change": f"{change:.4f}",
                "10. change percent": f"{change / q.prev_close * 100:.4f}%",
            }
        }

    def intraday(self, symbol: str, interval: str) -> dict[str, object]:
        if not self.market.knows(symbol):
            return {
                "Error Message": "Invalid API call. Please retry or visit the documentation "
                "(https://www.alphavantage.co/documentation/) for TIME_SERIES_INTRADAY."
            }
        bars = self.market.minute_bars(symbol, 100)
        series = {
            eastern(start): {
                "1. open": f"{close:.4f}",
                "2. high": f"{close:.4f}",
                "3. low": f"{close:.4f}",
                "4. close": f"{close:.4f}",
                "5. volume": str(volume),
            }
            for start, close, volume in reversed(bars)  # newest first, like the service
        }
        return {
            "Meta Data": {
                "1. Information": f"Intraday ({interval}) open, high, low, close prices and volume",
                "2. Symbol": symbol,
                "3. Last Refreshed": eastern(bars[-1][0]),
                "4. Interval": interval,
                "5. Output Size": "Compact",
                "6. Time Zone": "US/Eastern",
            },
            f"Time Series ({interval})": series,
        }
