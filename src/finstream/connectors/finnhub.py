"""Finnhub: REST quote polling (``finnhub``) and the WebSocket trade stream (``finnhub-ws``).

REST ``GET /api/v1/quote?symbol=AAPL&token=...`` answers
``{"c", "d", "dp", "h", "l", "o", "pc", "t"}``. A symbol Finnhub does not
cover comes back as a zero-filled quote (``c`` and ``t`` 0), which Finnhub
has also sent for real symbols under load (Finnhub-API issue #54), so it is
a malformed answer for that symbol, never a price. 401 carries
``{"error": "Invalid API key"}`` (auth: the provider is unusable); 403 with
``{"error": "You don't have access to this resource."}`` is what a plan gets
for a symbol it does not cover (a non-US listing on the free tier): that
symbol is parked as unknown to Finnhub, the others are still asked and the
provider's circuit is not touched. 429 carries ``X-Ratelimit-Remaining`` /
``X-Ratelimit-Reset`` (epoch seconds).

WebSocket ``wss://ws.finnhub.io?token=...``: send
``{"type":"subscribe","symbol":"AAPL"}``; receive
``{"type":"trade","data":[{"s","p","t" (ms),"v","c"}]}``, keepalive
``{"type":"ping"}`` and ``{"type":"error","msg":...}``. A bad token is
refused at the handshake (HTTP 401).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import urlencode

from finstream.connectors.base import ConnectorOptions, PollResult
from finstream.connectors.http import HttpConnector, per_symbol
from finstream.connectors.websocket import WebSocketConnector
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    decimal_value,
    epoch_to_utc,
    load_json,
    malformed,
    optional_positive,
    optional_size,
    price,
    provider_tick,
    quote_id,
    quote_marker,
    require,
    require_list,
    require_mapping,
    trade_id,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, normalize_symbol
from finstream.domain.resilience import ErrorClass, ProviderError

NAME = "finnhub"
WS_NAME = "finnhub-ws"


def _error_body(data: Mapping[str, Any], provider: str) -> ProviderError:
    text = str(data.get("error"))[:200]
    lowered = text.lower()
    code = "error_body"
    if "limit" in lowered:
        cls = ErrorClass.THROTTLED
    elif "access" in lowered:
        cls, code = ErrorClass.UNKNOWN_SYMBOL, "no_access"  # not on this plan
    elif "key" in lowered or "token" in lowered:
        cls = ErrorClass.AUTH
    else:
        cls = ErrorClass.PERMANENT
    return ProviderError(cls, text, provider=provider, code=code)


def parse_quote(body: bytes | str, symbol: str, received_at: datetime) -> Tick:
    data = require_mapping(load_json(body, NAME), NAME, "body")
    if "error" in data and "c" not in data:
        raise _error_body(data, NAME)
    current = decimal_value(require(data, "c", NAME, "quote"), NAME, "c")
    stamp = decimal_value(data.get("t"), NAME, "t")
    if not current and not stamp:
        raise malformed(
            NAME, f"{symbol}: zero-filled quote (unknown symbol or no data)", "zero_filled"
        )
    last = price(current, NAME, "c")
    ts = epoch_to_utc(require(data, "t", NAME, "quote"), NAME, "s", "t")
    return provider_tick(
        NAME,
        tick_id=quote_id(symbol, quote_marker(ts), last, None),
        symbol=symbol,
        kind="QUOTE",
        price=last,
        prev_close=optional_positive(data.get("pc"), NAME, "pc"),
        ts=ts,
        received_at=received_at,
        source=NAME,
    )


def parse_ws_message(
    raw: str | bytes, received_at: datetime
) -> tuple[list[Tick], list[ProviderError]]:
    """One WebSocket message: trades become ticks; a bad trade is an error, not a crash."""
    data = require_mapping(load_json(raw, WS_NAME), WS_NAME, "message")
    kind = data.get("type")
    if kind == "ping":
        return [], []
    if kind == "error":
        msg = str(data.get("msg", ""))[:200]
        if "token" in msg.lower() or "auth" in msg.lower():
            raise ProviderError(ErrorClass.AUTH, msg, provider=WS_NAME, code="ws_error")
        return [], [
            ProviderError(
                ErrorClass.PERMANENT, msg or "error message", provider=WS_NAME, code="ws_error"
            )
        ]
    if kind != "trade":
        return [], [malformed(WS_NAME, f"unknown message type {kind!r}", "shape")]
    ticks: list[Tick] = []
    errors: list[ProviderError] = []
    for item in require_list(data.get("data"), WS_NAME, "data"):
        try:
            ticks.append(_trade(item, received_at))
        except ProviderError as exc:
            errors.append(exc)
    return ticks, errors


def _trade(item: Any, received_at: datetime) -> Tick:
    item = require_mapping(item, WS_NAME, "trade")
    try:
        symbol = normalize_symbol(require(item, "s", WS_NAME, "trade"))
    except TickValidationError as exc:
        raise malformed(WS_NAME, exc.detail, "bad_symbol") from None
    last = price(require(item, "p", WS_NAME, "trade"), WS_NAME, "p")
    ts = epoch_to_utc(require(item, "t", WS_NAME, "trade"), WS_NAME, "ms", "t")
    size = optional_size(item.get("v"), WS_NAME, "v")
    return provider_tick(
        WS_NAME,
        tick_id=trade_id(symbol, ts, last, size),
        symbol=symbol,
        kind="TRADE",
        price=last,
        size=size,
        ts=ts,
        received_at=received_at,
        source=NAME,
    )


class FinnhubConnector(HttpConnector):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = "Finnhub REST quote polling"
    documented_limits: ClassVar[str] = (
        "free tier: 60 calls/min, and at most 30 calls/sec on any plan"
    )

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        base_url: str,
        api_key: str | None,
        **kw: Any,
    ) -> None:
        super().__init__(gate, options, base_url, **kw)
        self.api_key = api_key

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if self.api_key else ()

    def configuration_problem(self) -> str | None:
        return None if self.api_key else "no API key (FINSTREAM_MD_FINNHUB_KEY)"

    async def fetch(self, symbols: Sequence[str]) -> PollResult:
        result = PollResult()
        if not self.api_key:
            result.error = ProviderError(ErrorClass.AUTH, "no API key configured", provider=NAME)
            return result
        for symbol in symbols:
            try:
                reply = await self.get(
                    f"{self.base_url}/api/v1/quote", {"symbol": symbol, "token": self.api_key}
                )
                detail = None
                if reply.status >= 400:
                    try:
                        body = load_json(reply.body, NAME)
                        detail = str(body.get("error")) if isinstance(body, Mapping) else None
                    except ProviderError:
                        detail = None
                if reply.status == 403 and detail and "access" in detail.lower():
                    raise ProviderError(
                        ErrorClass.UNKNOWN_SYMBOL,
                        f"{symbol}: {detail[:200]} (not covered by this plan)",
                        provider=NAME,
                        status=403,
                        code="no_access",
                    )
                error = self.status_error(reply, not_found=ErrorClass.PERMANENT, detail=detail)
                if error is not None:
                    raise error
                result.add(
                    symbol, self.validated(parse_quote(reply.body, symbol, reply.received_at))
                )
            except ProviderError as exc:
                if not per_symbol(result, symbol, exc):
                    break
        return result


class FinnhubStreamConnector(WebSocketConnector):
    name: ClassVar[str] = WS_NAME
    description: ClassVar[str] = "Finnhub WebSocket trades"
    documented_limits: ClassVar[str] = "free tier: 1 connection, 50 symbols"

    def __init__(
        self, gate: ProviderGate, options: ConnectorOptions, ws_url: str, api_key: str | None
    ) -> None:
        super().__init__(gate, options, ws_url)
        self.api_key = api_key

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if self.api_key else ()

    def configuration_problem(self) -> str | None:
        return None if self.api_key else "no API key (FINSTREAM_MD_FINNHUB_KEY)"

    def connect_url(self) -> str:
        sep = "&" if "?" in self.ws_url else "?"
        return f"{self.ws_url}{sep}{urlencode({'token': self.api_key or ''})}"

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        return [json.dumps({"type": "subscribe", "symbol": s}) for s in symbols]

    def unsubscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        return [json.dumps({"type": "unsubscribe", "symbol": s}) for s in symbols]

    def parse(
        self, raw: str | bytes, received_at: datetime
    ) -> tuple[list[Tick], list[ProviderError]]:
        try:
            return parse_ws_message(raw, received_at)
        except ProviderError as exc:
            if exc.error_class is ErrorClass.AUTH:
                raise
            return [], [exc]
