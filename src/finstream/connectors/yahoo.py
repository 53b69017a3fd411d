"""Yahoo Finance (unofficial, as used by the yfinance library): v7 quote, v8 chart.

Session: a cookie from ``https://fc.yahoo.com`` (which answers 404 but sets
it), then a crumb from ``/v1/test/getcrumb`` (a short plain-text body), sent
as ``crumb=`` with every request. A stale crumb gets HTTP 401 with
``{"finance": {"error": {"code": "Unauthorized", "description": "Invalid
Crumb"}}}``: the session is renewed once and the request repeated. Throttling
is HTTP 429 (often a plain-text or HTML "Too Many Requests" body; yfinance
users have also seen that text come back *as the crumb*, with HTTP 200). A
throttling text where the crumb should be is throttling, so the provider is
paused instead of asking for a cookie and a crumb again every cycle; any
other crumb that does not look like one is malformed.

v7 quote answers many symbols in one request and silently leaves out symbols
it does not know; asked only for symbols it cannot quote (delisted), it
answers 404 with a ``finance`` error "Not Found". Such a 404 parks the
symbols it is about as unknown to Yahoo (the symbols named in the
description, or each one asked alone when none is named) and is no failure
of Yahoo's, exactly as the chart endpoint's 404 for a delisted symbol. v8
chart (backfill) gives bars whose values may be null (minutes without
trades), which are skipped rather than treated as errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

from finstream.connectors.base import ConnectorOptions, PollResult
from finstream.connectors.http import HttpConnector, HttpReply
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    body_hint,
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
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, make_tick, normalize_symbol
from finstream.domain.resilience import ErrorClass, ProviderError

NAME = "yahoo"
_CRUMB_RE = re.compile(r"^[A-Za-z0-9./_\-]{4,64}$")
_THROTTLED_RE = re.compile(r"too many requests|rate limit|throttl", re.I)
_GRANULARITY = {"1m": 1, "2m": 2, "5m": 5, "15m": 15, "30m": 30, "60m": 60, "90m": 90, "1h": 60}


def finance_error(body: bytes) -> str | None:
    """The description in a ``{"finance"|"quoteResponse"|"chart": {"error": ...}}`` body."""
    try:
        data = load_json(body, NAME)
    except ProviderError:
        return None
    if not isinstance(data, Mapping):
        return None
    for outer in ("finance", "quoteResponse", "chart"):
        inner = data.get(outer)
        if isinstance(inner, Mapping) and isinstance(inner.get("error"), Mapping):
            err = inner["error"]
            return f"{err.get('code', '')}: {err.get('description', '')}".strip(": ")
    return None


def check_crumb(body: bytes, retry_after: float | None = None) -> str:
    """The crumb in a getcrumb body; a throttling text there is throttling, not malformed."""
    crumb = body.decode("utf-8", "replace").strip()
    if not _CRUMB_RE.match(crumb):
        if _THROTTLED_RE.search(crumb):
            raise ProviderError(
                ErrorClass.THROTTLED,
                f"getcrumb answered {body_hint(body, 60)!r} instead of a crumb",
                provider=NAME,
                retry_after=retry_after,
                code="crumb_throttled",
            )
        raise malformed(
            NAME, f"getcrumb returned {body_hint(body, 60)!r}, not a crumb", "bad_crumb"
        )
    return crumb


def not_found(body: bytes) -> str | None:
    """The description of a 404 that says the symbols have no quote (delisted), else None."""
    text = finance_error(body)
    if text is None:
        return None
    lowered = text.lower()
    return text if "not found" in lowered or "delisted" in lowered else None


def named_symbols(description: str, symbols: Sequence[str]) -> list[str]:
    """Which of ``symbols`` an error description names ("... for symbols: X,Y")."""
    words = set(re.split(r"[\s,:;()'\"]+", description.upper()))
    return [s for s in symbols if s in words]


def _quote_tick(item: Mapping[str, Any], symbol: str, received_at: datetime) -> Tick:
    last = price(require(item, "regularMarketPrice", NAME, symbol), NAME, "regularMarketPrice")
    ts = epoch_to_utc(
        require(item, "regularMarketTime", NAME, symbol), NAME, "s", "regularMarketTime"
    )
    volume = optional_size(item.get("regularMarketVolume"), NAME, "regularMarketVolume")
    currency = item.get("currency")
    try:
        return make_tick(
            tick_id=quote_id(symbol, quote_marker(ts), last, volume),
            symbol=symbol,
            kind="QUOTE",
            price=last,
            size=volume,
            bid=optional_positive(item.get("bid"), NAME, "bid"),
            ask=optional_positive(item.get("ask"), NAME, "ask"),
            prev_close=optional_positive(
                item.get("regularMarketPreviousClose"), NAME, "regularMarketPreviousClose"
            ),
            currency=currency.upper()[:8] if isinstance(currency, str) and currency else None,
            ts=ts,
            received_at=received_at,
            source=NAME,
        )
    except TickValidationError as exc:
        raise malformed(NAME, f"{symbol}: {exc.detail}", exc.reason) from None


def parse_quote_response(
    body: bytes | str, symbols: Sequence[str], received_at: datetime
) -> tuple[dict[str, Tick], dict[str, ProviderError], set[str]]:
    """A v7 quote body: ticks, per-symbol errors, and the requested symbols it left out."""
    data = require_mapping(load_json(body, NAME), NAME, "body")
    response = require_mapping(require(data, "quoteResponse", NAME, "body"), NAME, "quoteResponse")
    if response.get("error"):
        err = response["error"]
        text = (
            f"{err.get('code', '')}: {err.get('description', '')}"
            if isinstance(err, Mapping)
            else str(err)
        )
        raise ProviderError(ErrorClass.PERMANENT, text[:200], provider=NAME, code="quote_error")
    items = require_list(require(response, "result", NAME, "quoteResponse"), NAME, "result")
    wanted = set(symbols)
    ticks: dict[str, Tick] = {}
    errors: dict[str, ProviderError] = {}
    for item in items:
        if not isinstance(item, Mapping):
            raise malformed(NAME, "a result entry is not an object", "shape")
        try:
            symbol = normalize_symbol(item.get("symbol"))
        except TickValidationError as exc:
            raise malformed(NAME, exc.detail, "bad_symbol") from None
        if symbol not in wanted:
            continue
        try:
            ticks[symbol] = _quote_tick(item, symbol, received_at)
        except ProviderError as exc:
            errors[symbol] = exc
    unknown = wanted - ticks.keys() - errors.keys()
    return ticks, errors, unknown


def parse_chart(body: bytes | str, symbol: str, received_at: datetime) -> list[Tick]:
    """A v8 chart body as one QUOTE tick per bar with a close, stamped at the bar's end."""
    data = require_mapping(load_json(body, NAME), NAME, "body")
    chart = require_mapping(require(data, "chart", NAME, "body"), NAME, "chart")
    if chart.get("error"):
        err = chart["error"]
        text = (
            f"{err.get('code', '')}: {err.get('description', '')}"
            if isinstance(err, Mapping)
            else str(err)
        )
        cls = (
            ErrorClass.UNKNOWN_SYMBOL
            if "not found" in text.lower() or "delisted" in text.lower()
            else ErrorClass.PERMANENT
        )
        raise ProviderError(cls, text[:200], provider=NAME, code="chart_error")
    results = require_list(require(chart, "result", NAME, "chart"), NAME, "chart.result")
    if not results:
        raise ProviderError(ErrorClass.UNKNOWN_SYMBOL, f"{symbol}: empty chart", provider=NAME)
    result = require_mapping(results[0], NAME, "chart.result[0]")
    meta = require_mapping(result.get("meta", {}), NAME, "meta")
    if isinstance(meta.get("symbol"), str) and meta["symbol"].strip().upper() != symbol:
        raise malformed(
            NAME, f"asked for {symbol}, got a chart of {meta['symbol']}", "symbol_mismatch"
        )
    minutes = _GRANULARITY.get(str(meta.get("dataGranularity", "1m")))
    if minutes is None:
        raise malformed(NAME, f"unsupported granularity {meta.get('dataGranularity')!r}", "shape")
    width = timedelta(minutes=minutes)
    stamps = require_list(result.get("timestamp", []), NAME, "timestamp")
    indicators = require_mapping(
        require(result, "indicators", NAME, "chart.result[0]"), NAME, "indicators"
    )
    quotes = require_list(
        require(indicators, "quote", NAME, "indicators"), NAME, "indicators.quote"
    )
    if not stamps:
        return []
    quote = require_mapping(quotes[0] if quotes else None, NAME, "indicators.quote[0]")
    closes = require_list(quote.get("close"), NAME, "close")
    volumes = require_list(quote.get("volume", [None] * len(stamps)), NAME, "volume")
    if len(closes) != len(stamps) or len(volumes) != len(stamps):
        raise malformed(NAME, f"{len(stamps)} timestamps but {len(closes)} closes", "shape")
    currency = meta.get("currency") if isinstance(meta.get("currency"), str) else None
    ticks: list[Tick] = []
    for stamp, close, volume in zip(stamps, closes, volumes, strict=True):
        if close is None:
            continue  # a minute without trades
        start = epoch_to_utc(stamp, NAME, "s", "timestamp")
        last = price(close, NAME, "close")
        size = optional_size(volume, NAME, "volume")
        ticks.append(
            provider_tick(
                NAME,
                tick_id=quote_id(symbol, f"bar{minutes}m:{quote_marker(start)}", last, size),
                symbol=symbol,
                kind="QUOTE",
                price=last,
                size=size,
                currency=currency,
                ts=min(start + width, received_at),
                received_at=received_at,
                source=NAME,
            )
        )
    return ticks


class YahooConnector(HttpConnector):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = (
        "Yahoo Finance v7 quote polling (v8 chart for backfill), cookie + crumb"
    )
    documented_limits: ClassVar[str] = "unofficial API, no published limit; throttles with HTTP 429"
    supports_backfill: ClassVar[bool] = True

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        base_url: str,
        cookie_url: str,
        **kw: Any,
    ) -> None:
        super().__init__(gate, options, base_url, **kw)
        self.cookie_url = cookie_url
        self.crumb: str | None = None
        self.sessions = 0

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.crumb,) if self.crumb else ()

    async def new_session(self) -> None:
        """Cookie, then crumb. fc.yahoo.com answers 404 while setting the cookie."""
        self.crumb = None
        self.client.cookies.clear()
        reply = await self.get(self.cookie_url)
        if reply.status == 429 or reply.status >= 500:
            raise self.status_error(reply) or ProviderError(
                ErrorClass.TRANSIENT, "cookie", provider=NAME
            )
        reply = await self.get(f"{self.base_url}/v1/test/getcrumb")
        error = self.status_error(reply, not_found=ErrorClass.PERMANENT)
        if error is not None:
            raise error
        self.crumb = check_crumb(reply.body, reply.retry_after())
        self.sessions += 1

    async def _get_with_crumb(self, path: str, params: dict[str, str]) -> HttpReply:
        for attempt in (1, 2):
            if self.crumb is None:
                await self.new_session()
            reply = await self.get(f"{self.base_url}{path}", {**params, "crumb": self.crumb or ""})
            if reply.status == 401 and attempt == 1:
                self.crumb = None  # stale crumb or cookie: one fresh session, then give up
                continue
            return reply
        raise AssertionError("unreachable")

    async def fetch(self, symbols: Sequence[str]) -> PollResult:
        result = PollResult()
        try:
            await self._quote(list(symbols), result)
        except ProviderError as exc:
            result.error = exc  # after whatever the requests before it served
        return result

    async def _quote(self, symbols: list[str], result: PollResult) -> None:
        reply = await self._get_with_crumb("/v7/finance/quote", {"symbols": ",".join(symbols)})
        if reply.status == 404 and (description := not_found(reply.body)) is not None:
            if len(symbols) == 1:
                result.unknown.add(symbols[0])
                return
            named = named_symbols(description, symbols)
            if named:
                result.unknown.update(named)
                rest = [s for s in symbols if s not in named]
                if rest:
                    await self._quote(rest, result)
                return
            for symbol in symbols:  # it did not say which: ask each alone
                await self._quote([symbol], result)
            return
        error = self.status_error(
            reply,
            not_found=ErrorClass.PERMANENT,
            detail=finance_error(reply.body) or body_hint(reply.body),
        )
        if error is not None:
            raise error
        ticks, errors, unknown = parse_quote_response(reply.body, symbols, reply.received_at)
        for symbol, tick in ticks.items():
            try:
                result.add(symbol, self.validated(tick))
            except ProviderError as exc:
                result.symbol_errors[symbol] = exc
        result.symbol_errors.update(errors)
        result.unknown |= unknown

    async def backfill(self, symbol: str, start: datetime, end: datetime) -> list[Tick]:
        reply = await self._get_with_crumb(
            f"/v8/finance/chart/{symbol}",
            {
                "period1": str(int(start.timestamp())),
                "period2": str(int(end.timestamp()) + 60),
                "interval": "1m",
            },
        )
        error = self.status_error(reply, detail=finance_error(reply.body) or body_hint(reply.body))
        if error is not None:
            raise error
        ticks = parse_chart(reply.body, symbol, self.options.wall())
        return [self.validated(t) for t in ticks if start < t.ts < end]
