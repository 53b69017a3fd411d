"""Normalization helpers shared by every market-data connector (pure, no I/O).

A provider response becomes ticks only when it has the provider's documented
data shape; everything else raises a classified :class:`ProviderError`:

* a body that is empty, HTML, not UTF-8, truncated or invalid JSON, or that
  uses NaN/Infinity, is ``malformed``;
* a price that is missing, zero, negative or not a number is ``malformed``
  (a zero-filled quote is the classic way providers say "no data");
* HTTP statuses map to throttled / auth / unknown_symbol / transient /
  permanent by :func:`classify_status`.

JSON is parsed with ``parse_float=Decimal`` so that no price passes through a
binary float on its way to the ``Tick``.

Tick ids are derived from content, never from which provider said it, so the
same observation gets the same id from every provider (see :func:`trade_id`
and :func:`quote_id`): that is what lets the failover chain publish a quote
seen from two providers once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from finstream.domain.marketdata.ticks import Tick, TickValidationError, make_tick, to_decimal
from finstream.domain.resilience import ErrorClass, ProviderError

EASTERN = ZoneInfo("America/New_York")
# Far above any quote response; a bigger body is not what we asked for.
MAX_BODY_BYTES = 8 * 1024 * 1024
# Epoch values outside this window are garbage (0, seconds read as millis, ...).
_EPOCH_MIN = datetime(1990, 1, 1, tzinfo=UTC)
_EPOCH_MAX = datetime(2200, 1, 1, tzinfo=UTC)
# Query parameters that carry credentials in provider URLs.
SECRET_PARAMS = frozenset({"apikey", "api_key", "token", "crumb", "key", "access_key", "secret"})
REDACTED = "[redacted]"
# Error codes that say nothing about the provider's health (no circuit breaker failure):
LOCAL_RATE_LIMIT = "local_rate_limit"  # our own token bucket is empty
STREAM_NOT_READY = "stream_not_ready"  # a stream still (re)connecting; it keeps its own breaker


def malformed(provider: str, message: str, code: str = "malformed") -> ProviderError:
    return ProviderError(ErrorClass.MALFORMED, message, provider=provider, code=code)


def provider_tick(provider: str, **fields: Any) -> Tick:
    """``make_tick`` for a provider's values: what fails validation is the
    provider's malformed answer (a classified ProviderError), never a tick."""
    try:
        return make_tick(**fields)
    except TickValidationError as exc:
        raise malformed(provider, exc.detail, exc.reason) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not a number")


def load_json(body: bytes | str, provider: str) -> Any:
    """A provider's JSON body, floats as ``Decimal``; anything else is a malformed error."""
    if isinstance(body, bytes):
        if len(body) > MAX_BODY_BYTES:
            raise malformed(provider, f"body of {len(body)} bytes is over the limit", "oversized")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise malformed(provider, f"body is not UTF-8 ({exc.reason})", "encoding") from None
    else:
        text = body
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise malformed(provider, "empty body", "empty")
    if stripped[0] == "<":
        raise malformed(provider, "an HTML page instead of JSON", "html")
    try:
        return json.loads(stripped, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        what = "truncated JSON" if exc.pos >= len(stripped) - 1 else "invalid JSON"
        raise malformed(provider, f"{what}: {exc.msg} at char {exc.pos}", "bad_json") from None
    except (ValueError, RecursionError) as exc:
        raise malformed(provider, f"invalid JSON: {exc}", "bad_json") from None


def require(obj: Any, key: str, provider: str, where: str) -> Any:
    """``obj[key]``, or a malformed error naming what is missing."""
    if not isinstance(obj, Mapping):
        raise malformed(provider, f"{where} is {type(obj).__name__}, not an object", "shape")
    if key not in obj or obj[key] is None:
        raise malformed(provider, f"{where} has no {key!r}", "missing_field")
    return obj[key]


def require_mapping(value: Any, provider: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise malformed(provider, f"{where} is {type(value).__name__}, not an object", "shape")
    return value


def require_list(value: Any, provider: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise malformed(provider, f"{where} is {type(value).__name__}, not a list", "shape")
    return value


def price(value: Any, provider: str, field: str = "price") -> Decimal:
    """A strictly positive price; zero means "no data" at every provider we know."""
    number = decimal_value(value, provider, field)
    if number is None:
        raise malformed(provider, f"{field} is missing", "missing_field")
    if number <= 0:
        raise malformed(provider, f"{field} is {number} (a zero-filled or bogus quote)", "zero")
    return number


def decimal_value(value: Any, provider: str, field: str) -> Decimal | None:
    """An optional provider number as a quantized Decimal (None for null/empty/'-')."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "-", "None", "null")):
        return None
    if isinstance(value, bool):
        raise malformed(provider, f"{field} is a boolean", "bad_number")
    if isinstance(value, str):
        value = value.strip().rstrip("%")
    try:
        return to_decimal(value, field)
    except TickValidationError as exc:
        raise malformed(provider, exc.detail, "bad_number") from None


def optional_positive(value: Any, provider: str, field: str) -> Decimal | None:
    """An optional price-like number; zero or negative counts as absent (providers' 'no bid')."""
    number = decimal_value(value, provider, field)
    return number if number is not None and number > 0 else None


def optional_size(value: Any, provider: str, field: str) -> Decimal | None:
    number = decimal_value(value, provider, field)
    if number is not None and number < 0:
        raise malformed(provider, f"{field} is negative ({number})", "bad_number")
    return number


def epoch_to_utc(value: Any, provider: str, unit: str = "s", field: str = "time") -> datetime:
    """An epoch timestamp in seconds, milliseconds or nanoseconds as an aware UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise malformed(provider, f"{field} {value!r} is not an epoch number", "bad_time")
    divisor = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    if isinstance(value, int):  # the common case, exact without Decimal
        micros = value * 1_000_000 // divisor
    else:
        try:
            number = Decimal(str(value).strip())
        except ArithmeticError:
            raise malformed(
                provider, f"{field} {value!r} is not an epoch number", "bad_time"
            ) from None
        if not number.is_finite():
            raise malformed(provider, f"{field} is {number}", "bad_time")
        micros = int(number * 1_000_000 / divisor)
    try:
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    except OverflowError:
        raise malformed(provider, f"{field} {value!r} is out of range", "bad_time") from None
    if not _EPOCH_MIN <= when < _EPOCH_MAX:
        raise malformed(provider, f"{field} {value!r} ({unit}) is not a plausible time", "bad_time")
    return when


def zone(name: Any, provider: str) -> ZoneInfo:
    """The provider's named time zone; Alpha Vantage says "US/Eastern", an alias of New York."""
    if name is None:
        return EASTERN
    if not isinstance(name, str):
        raise malformed(provider, f"time zone {name!r} is not a name", "bad_time")
    if name.strip() in ("", "US/Eastern", "America/New_York", "EST5EDT"):
        return EASTERN
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise malformed(provider, f"unknown time zone {name!r}", "bad_time") from None


def local_to_utc(text: Any, provider: str, tz: ZoneInfo = EASTERN) -> datetime:
    """A provider's local wall-clock time ("YYYY-MM-DD HH:MM[:SS]") in UTC, DST-correct.

    A wall time that does not exist (the spring-forward hour) is malformed; an
    ambiguous one (the fall-back hour) is read as its first occurrence, which
    is what a series in ascending order means there. US exchanges are closed
    at both hours, so neither happens with real equity data.
    """
    if not isinstance(text, str):
        raise malformed(provider, f"time {text!r} is not text", "bad_time")
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            naive = datetime.strptime(text.strip(), fmt)
            break
        except ValueError:
            continue
    else:
        raise malformed(provider, f"time {text!r} is not YYYY-MM-DD HH:MM:SS", "bad_time")
    local = naive.replace(tzinfo=tz, fold=0)
    utc = local.astimezone(UTC)
    if utc.astimezone(tz).replace(tzinfo=None) != naive:
        raise malformed(provider, f"time {text!r} does not exist in {tz.key}", "bad_time")
    return utc


# -- stable ids ---------------------------------------------------------------------


def _micros(ts: datetime) -> int:
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _num(value: Decimal | None) -> str:
    return "-" if value is None else format(value.normalize(), "f")


def trade_id(symbol: str, ts: datetime, price_: Decimal, size: Decimal | None) -> str:
    """One trade: the same print from any provider, or re-sent, gets the same id.

    Two genuinely different trades in the same symbol, microsecond, price and
    size collapse into one; no provider we use gives a cross-provider trade id,
    and for prices and alerts they are indistinguishable anyway.
    """
    return f"{symbol}:T:{_micros(ts)}:{_num(price_)}:{_num(size)}"


def quote_id(symbol: str, marker: str, price_: Decimal, size: Decimal | None) -> str:
    """One quote snapshot; ``marker`` is its event time in micros, or for providers
    without one (Alpha Vantage) the trading day."""
    return f"{symbol}:Q:{marker}:{_num(price_)}:{_num(size)}"


def quote_marker(ts: datetime) -> str:
    return str(_micros(ts))


# -- HTTP classification -------------------------------------------------------------


def classify_status(
    status: int,
    provider: str,
    *,
    detail: str = "",
    retry_after: float | None = None,
    not_found: ErrorClass = ErrorClass.UNKNOWN_SYMBOL,
) -> ProviderError | None:
    """The error class of an HTTP status (None for 2xx)."""
    if 200 <= status < 300:
        return None
    detail = detail.strip()[:200]
    text = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status == 429:
        cls = ErrorClass.THROTTLED
    elif status in (401, 403):
        cls = ErrorClass.AUTH
    elif status == 404:
        cls = not_found
    elif status in (408, 425) or status >= 500:
        cls = ErrorClass.TRANSIENT
    else:
        cls = ErrorClass.PERMANENT
    return ProviderError(cls, text, provider=provider, status=status, retry_after=retry_after)


def body_hint(body: bytes, limit: int = 160) -> str:
    """A short, single-line, printable excerpt of a body for error messages."""
    text = body[:limit].decode("utf-8", "replace")
    return " ".join(text.split())


# -- secrets in URLs and messages -----------------------------------------------------------


def scrub_url(url: str) -> str:
    """The URL with the values of credential parameters masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if not parts.query:
        return url
    query = [
        (k, REDACTED if k.lower() in SECRET_PARAMS else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="[]")))


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every known secret value masked (exception messages may quote URLs)."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    return re.sub(
        r"((?:apikey|api_key|token|crumb|key)=)[^&\s\"']+", r"\1" + REDACTED, text, flags=re.I
    )


# -- rate limit specifications ------------------------------------------------------------

_PERIODS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_PERIODS |= {"d": 86_400, "day": 86_400}


@dataclass(frozen=True)
class LimitSpec:
    """``count`` requests per ``period`` seconds: a token bucket of that burst and rate."""

    count: float
    period: float

    @property
    def rate(self) -> float:
        return self.count / self.period

    @property
    def burst(self) -> float:
        return max(1.0, self.count)

    def render(self) -> str:
        name = {1: "sec", 60: "min", 3600: "hour", 86_400: "day"}.get(int(self.period), "s")
        return f"{self.count:g}/{name}"


def parse_limits(spec: str) -> list[LimitSpec]:
    """Parse "5/min,25/day" into token-bucket specs; an empty string means no limit."""
    out: list[LimitSpec] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        count_s, sep, period_s = part.partition("/")
        period = _PERIODS.get(period_s.strip().lower()) if sep else None
        try:
            count = float(count_s)
        except ValueError:
            count = math.nan
        if period is None or not math.isfinite(count) or count <= 0:
            raise ValueError(f"bad rate limit {part!r}: expected N/sec, N/min, N/hour or N/day")
        out.append(LimitSpec(count, float(period)))
    return out


# -- daily quota resets ----------------------------------------------------------------


@dataclass(frozen=True)
class DailyReset:
    """A provider's daily quota renews at ``at`` wall-clock time in ``zone``."""

    at: time
    zone: ZoneInfo

    def render(self) -> str:
        return f"{self.at.strftime('%H:%M')} {self.zone.key}"


def parse_daily_resets(spec: str) -> list[DailyReset]:
    """Parse "00:00 UTC,00:00 America/New_York" (at least one; "HH:MM ZONE", comma-separated)."""
    out: list[DailyReset] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        clock, _, zone_name = part.partition(" ")
        try:
            at = datetime.strptime(clock.strip(), "%H:%M").time()
            zone_ = ZoneInfo(zone_name.strip() or "UTC")
        except (ValueError, ZoneInfoNotFoundError):
            raise ValueError(
                f"bad daily reset {part!r}: expected HH:MM and a time zone, e.g. 00:00 UTC"
            ) from None
        out.append(DailyReset(at, zone_))
    if not out:
        raise ValueError("no daily reset time given")
    return out


def seconds_until_reset(now: datetime, resets: Iterable[DailyReset]) -> float:
    """Seconds from ``now`` (aware) to the next daily reset of any of ``resets``, DST-correct.

    With several candidates (a provider that does not document its reset), the
    earliest is taken: asking once too early costs one refused request, asking
    too late loses hours of data.
    """
    best: float | None = None
    for reset in resets:
        local = now.astimezone(reset.zone)
        for days in (0, 1, 2):
            day = local.date() + timedelta(days=days)
            at = datetime.combine(day, reset.at).replace(tzinfo=reset.zone)
            wait = (at.astimezone(UTC) - now.astimezone(UTC)).total_seconds()
            if wait > 0:
                best = wait if best is None else min(best, wait)
                break
    if best is None:
        raise ValueError("no daily reset time given")
    return best
