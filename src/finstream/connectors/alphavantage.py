"""Alpha Vantage: GLOBAL_QUOTE polling, TIME_SERIES_INTRADAY for backfill.

Wire format (https://www.alphavantage.co/documentation/): every value is a
string; errors and throttling come back as HTTP 200 with a single message key
instead of data:

* ``"Note"`` — the per-minute call frequency was exceeded (throttled);
* ``"Information"`` — a per-second burst ("spreading out your free API
  requests more sparingly (1 request per second)", throttled for a second),
  the daily limit (throttled until the daily reset), a premium-only endpoint
  (permanent) or a demo/invalid key (auth). The burst message also mentions
  the daily limit, so it is recognized first;
* ``"Error Message"`` — an invalid call: a bad key (auth), or "Invalid API
  call", which for a one-symbol request (GLOBAL_QUOTE, the time series) is
  that symbol's problem: it is parked as unknown to Alpha Vantage and the
  other symbols are still asked;
* ``{"Global Quote": {}}`` — GLOBAL_QUOTE's way of saying "unknown symbol".

When the daily quota renews is not documented (unverified): the pause after
the daily limit lasts until the earliest of ``FINSTREAM_MD_ALPHAVANTAGE_DAILY_RESET``
(default midnight UTC and midnight New York), never a fixed hour.

GLOBAL_QUOTE has a trading day but no time of day, so a quote's id comes from
its content (day, price, volume) and its event time is when that content was
first seen. Intraday series are stamped in US/Eastern wall-clock time ("6.
Time Zone" in the metadata) and converted to UTC with zoneinfo, DST-correct.
A series timestamp is taken as the bar's start (the documentation does not say;
Alpha Vantage's own charts read it that way), so a bar's close is stamped at
start + interval.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any, ClassVar

from finstream.connectors.base import ConnectorOptions, PollResult
from finstream.connectors.http import HttpConnector, per_symbol
from finstream.domain.marketdata.dedupe import SnapshotClock
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    DailyReset,
    load_json,
    local_to_utc,
    malformed,
    optional_positive,
    optional_size,
    parse_daily_resets,
    price,
    provider_tick,
    quote_id,
    quote_marker,
    require,
    require_mapping,
    seconds_until_reset,
    zone,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, normalize_symbol
from finstream.domain.resilience import ErrorClass, ProviderError
from finstream.domain.time import utcnow

NAME = "alphavantage"
INTERVALS = {"1min": 1, "5min": 5, "15min": 15, "30min": 30, "60min": 60}
_THROTTLE_WORDS = re.compile(
    r"rate limit|call frequency|requests per (day|minute|second)|per day|per minute"
    r"|per second|more sparingly|api call volume",
    re.I,
)
_BURST_WORDS = re.compile(r"per second|more sparingly", re.I)
_MINUTE_WORDS = re.compile(r"per minute|call frequency", re.I)
_DAILY_WORDS = re.compile(r"per day|daily", re.I)
_AUTH_WORDS = re.compile(r"apikey|api key|demo", re.I)
_INVALID_CALL = re.compile(r"invalid api call", re.I)
BURST_PAUSE = 1.0  # "1 request per second"
DEFAULT_DAILY_RESETS = parse_daily_resets("00:00 UTC,00:00 America/New_York")


def _throttle(
    key: str, text: str, short: str, received_at: datetime | None, resets: Sequence[DailyReset]
) -> ProviderError:
    """Which of Alpha Vantage's limits a throttling message is about, and how long to wait."""
    if _BURST_WORDS.search(text):
        retry_after: float | None = BURST_PAUSE
        code = "burst"
    elif key == "Note" or _MINUTE_WORDS.search(text) or not _DAILY_WORDS.search(text):
        retry_after, code = None, "frequency"  # the chain's throttle pause (a minute)
    else:
        retry_after = seconds_until_reset(received_at or utcnow(), resets)
        code = "daily_limit"
    return ProviderError(
        ErrorClass.THROTTLED,
        f"{key}: {short}",
        provider=NAME,
        retry_after=retry_after,
        code=code,
    )


def raise_for_message(
    data: Mapping[str, Any],
    invalid_call: ErrorClass = ErrorClass.PERMANENT,
    *,
    received_at: datetime | None = None,
    daily_resets: Sequence[DailyReset] = DEFAULT_DAILY_RESETS,
) -> None:
    """Raise the classified error of a 200 body that carries a message instead of data.

    ``invalid_call`` is what "Invalid API call" means for the request at hand:
    for a one-symbol request, that the symbol is unknown.
    """
    for key in ("Note", "Information", "Error Message"):
        if key not in data:
            continue
        text = str(data[key])
        short = " ".join(text.split())[:200]
        if key == "Note" or _THROTTLE_WORDS.search(text):
            raise _throttle(key, text, short, received_at, daily_resets)
        if "premium" in text.lower():
            raise ProviderError(
                ErrorClass.PERMANENT, f"{key}: {short}", provider=NAME, code="premium"
            )
        if _AUTH_WORDS.search(text):
            raise ProviderError(ErrorClass.AUTH, f"{key}: {short}", provider=NAME, code="apikey")
        if key == "Error Message" and _INVALID_CALL.search(text):
            raise ProviderError(invalid_call, f"{key}: {short}", provider=NAME, code="invalid_call")
        raise ProviderError(ErrorClass.PERMANENT, f"{key}: {short}", provider=NAME, code="message")


def _trading_day(value: Any) -> str:
    if not isinstance(value, str):
        raise malformed(NAME, f"latest trading day {value!r} is not a date", "bad_time")
    try:
        return date.fromisoformat(value.strip()).isoformat()
    except ValueError:
        raise malformed(NAME, f"latest trading day {value!r} is not a date", "bad_time") from None


def parse_global_quote(
    body: bytes | str,
    symbol: str,
    received_at: datetime,
    clock: SnapshotClock | None = None,
    daily_resets: Sequence[DailyReset] = DEFAULT_DAILY_RESETS,
) -> Tick:
    """A GLOBAL_QUOTE body as a QUOTE tick for ``symbol`` (raises ProviderError)."""
    data = require_mapping(load_json(body, NAME), NAME, "body")
    quote = data.get("Global Quote")
    if quote is None:
        raise_for_message(
            data,
            invalid_call=ErrorClass.UNKNOWN_SYMBOL,
            received_at=received_at,
            daily_resets=daily_resets,
        )
        raise malformed(NAME, f"no 'Global Quote' in a body with keys {sorted(data)[:5]}", "shape")
    quote = require_mapping(quote, NAME, "'Global Quote'")
    if not quote:
        raise ProviderError(
            ErrorClass.UNKNOWN_SYMBOL,
            f"{symbol}: empty 'Global Quote'",
            provider=NAME,
            code="empty",
        )
    try:
        got = normalize_symbol(require(quote, "01. symbol", NAME, "'Global Quote'"))
    except TickValidationError as exc:
        raise malformed(NAME, exc.detail, "bad_symbol") from None
    if got != symbol:
        raise malformed(NAME, f"asked for {symbol}, got a quote for {got}", "symbol_mismatch")
    last = price(require(quote, "05. price", NAME, "'Global Quote'"), NAME, "05. price")
    volume = optional_size(quote.get("06. volume"), NAME, "06. volume")
    day = _trading_day(require(quote, "07. latest trading day", NAME, "'Global Quote'"))
    content = f"{day}:{last}:{volume}"
    ts = clock.stamp(symbol, content, received_at) if clock else received_at
    return provider_tick(
        NAME,
        tick_id=quote_id(symbol, f"d{day}", last, volume),
        symbol=symbol,
        kind="QUOTE",
        price=last,
        size=volume,
        prev_close=optional_positive(quote.get("08. previous close"), NAME, "08. previous close"),
        ts=ts,
        received_at=received_at,
        source=NAME,
    )


def parse_intraday(
    body: bytes | str,
    symbol: str,
    interval: str,
    received_at: datetime,
    daily_resets: Sequence[DailyReset] = DEFAULT_DAILY_RESETS,
) -> list[Tick]:
    """A TIME_SERIES_INTRADAY body as one QUOTE tick per bar (its close), oldest first."""
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {sorted(INTERVALS)}")
    data = require_mapping(load_json(body, NAME), NAME, "body")
    key = f"Time Series ({interval})"
    if key not in data:
        raise_for_message(
            data,
            invalid_call=ErrorClass.UNKNOWN_SYMBOL,
            received_at=received_at,
            daily_resets=daily_resets,
        )
        raise malformed(NAME, f"no {key!r} in a body with keys {sorted(data)[:5]}", "shape")
    meta = require_mapping(data.get("Meta Data", {}), NAME, "'Meta Data'")
    meta_symbol = meta.get("2. Symbol")
    if isinstance(meta_symbol, str) and meta_symbol.strip().upper() != symbol:
        raise malformed(
            NAME, f"asked for {symbol}, got a series for {meta_symbol}", "symbol_mismatch"
        )
    tz = zone(meta.get("6. Time Zone"), NAME)
    width = timedelta(minutes=INTERVALS[interval])
    series = require_mapping(data[key], NAME, key)
    ticks: list[Tick] = []
    for stamp, raw_bar in series.items():
        bar = require_mapping(raw_bar, NAME, f"bar {stamp}")
        start = local_to_utc(stamp, NAME, tz)
        close = price(require(bar, "4. close", NAME, f"bar {stamp}"), NAME, "4. close")
        volume = optional_size(bar.get("5. volume"), NAME, "5. volume")
        ticks.append(
            provider_tick(
                NAME,
                tick_id=quote_id(symbol, f"bar{interval}:{quote_marker(start)}", close, volume),
                symbol=symbol,
                kind="QUOTE",
                price=close,
                size=volume,
                ts=min(start + width, received_at),
                received_at=received_at,
                source=NAME,
            )
        )
    ticks.sort(key=lambda t: t.ts)
    return ticks


class AlphaVantageConnector(HttpConnector):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = "Alpha Vantage GLOBAL_QUOTE polling (intraday bars for backfill)"
    documented_limits: ClassVar[str] = "free tier: 25 requests/day; premium: 75-1200 requests/min"
    supports_backfill: ClassVar[bool] = True

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        base_url: str,
        api_key: str | None,
        daily_resets: Sequence[DailyReset] = DEFAULT_DAILY_RESETS,
        **kw: Any,
    ) -> None:
        super().__init__(gate, options, base_url, **kw)
        self.api_key = api_key
        self.daily_resets = tuple(daily_resets)
        self.clock = SnapshotClock()

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if self.api_key else ()

    def configuration_problem(self) -> str | None:
        return None if self.api_key else "no API key (FINSTREAM_MD_ALPHAVANTAGE_KEY)"

    async def _query(self, params: dict[str, str]) -> bytes:
        # A full intraday series is megabytes: more time than a quote.
        reply = await self.get(
            f"{self.base_url}/query",
            {**params, "apikey": self.api_key or ""},
            deadline=self.options.timeout * 3,
        )
        error = self.status_error(reply, not_found=ErrorClass.PERMANENT)
        if error is not None:
            raise error
        return reply.body

    async def fetch(self, symbols: Sequence[str]) -> PollResult:
        result = PollResult()
        if not self.api_key:
            result.error = ProviderError(ErrorClass.AUTH, "no API key configured", provider=NAME)
            return result
        # GLOBAL_QUOTE is one symbol per request: each costs a rate-limit token.
        for symbol in symbols:
            try:
                reply = await self.get(
                    f"{self.base_url}/query",
                    {"function": "GLOBAL_QUOTE", "symbol": symbol, "apikey": self.api_key},
                )
                error = self.status_error(reply, not_found=ErrorClass.PERMANENT)
                if error is not None:
                    raise error
                tick = parse_global_quote(
                    reply.body, symbol, reply.received_at, self.clock, self.daily_resets
                )
                result.add(symbol, self.validated(tick))
            except ProviderError as exc:
                if not per_symbol(result, symbol, exc):
                    break
        return result

    async def backfill(self, symbol: str, start: datetime, end: datetime) -> list[Tick]:
        minutes = (end - start).total_seconds() / 60
        body = await self._query(
            {
                "function": "TIME_SERIES_INTRADAY",
                "symbol": symbol,
                "interval": "1min",
                "outputsize": "compact" if minutes <= 95 else "full",
            }
        )
        ticks = parse_intraday(body, symbol, "1min", self.options.wall(), self.daily_resets)
        return [self.validated(t) for t in ticks if start < t.ts < end]
