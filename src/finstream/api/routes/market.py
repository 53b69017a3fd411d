"""Market data: the latest quote (Redis) and bars over a time range (PostgreSQL)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse

from finstream.api.deps import Caller, Res
from finstream.api.models import BarPage, Quote
from finstream.api.policy import to_json
from finstream.api.problems import Problem, field_problem, not_found, problem_responses
from finstream.domain.marketdata.ticks import SYMBOL_RE
from finstream.domain.time import from_micros, to_micros, utcnow

router = APIRouter(tags=["market data"])

MAX_PAGE = 1000
SymbolPath = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9^][A-Za-z0-9.\-=^/:_]{0,31}$",
        description="Ticker, e.g. AAPL (case-insensitive).",
    ),
]
_QUOTE_FIELDS = set(Quote.model_fields)


def _symbol(raw: str) -> str:
    symbol = raw.strip().upper()
    if not SYMBOL_RE.match(symbol):
        raise field_problem("path", "symbol", f"symbol: {raw!r} is not a valid symbol")
    return symbol


@router.get(
    "/v1/quotes/{symbol}",
    response_model=Quote,
    summary="Latest quote of a symbol",
    responses=problem_responses(401, 404, 422, 429),
)
async def get_quote(symbol: SymbolPath, res: Res, caller: Caller) -> Any:
    quote = await res.quotes.get(_symbol(symbol))
    if quote is None:
        raise not_found()
    return JSONResponse({k: v for k, v in quote.items() if k in _QUOTE_FIELDS})


def _encode_cursor(start: datetime) -> str:
    return base64.urlsafe_b64encode(str(to_micros(start)).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> datetime:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return from_micros(int(raw.decode("ascii")))
    except (binascii.Error, ValueError, UnicodeDecodeError, OverflowError, OSError):
        raise field_problem("query", "cursor", "cursor: not a cursor this API issued") from None


_BARS_SQL = """
SELECT symbol, interval, start, "end", open, high, low, close, volume, vwap, trades, final, revision
FROM bars
WHERE symbol = $1 AND interval = $2 AND start >= $3 AND start < $4 AND start > $5
ORDER BY start
LIMIT $6
"""


@router.get(
    "/v1/bars/{symbol}",
    response_model=BarPage,
    summary="Bars of a symbol over a time range, oldest first, paginated",
    responses=problem_responses(401, 422, 429),
)
async def get_bars(
    *,
    symbol: SymbolPath,
    res: Res,
    caller: Caller,
    interval: Annotated[str, Query(pattern=r"^[1-9][0-9]{0,2}[smhd]$")] = "1m",
    from_: Annotated[
        datetime | None,
        Query(
            alias="from", description="Inclusive start (ISO 8601 with zone); default to - 1 day."
        ),
    ] = None,
    to: Annotated[
        datetime | None, Query(description="Exclusive end (ISO 8601 with zone); default now.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 500,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    sym = _symbol(symbol)
    for name, value in (("from", from_), ("to", to)):
        if value is not None and value.tzinfo is None:
            raise field_problem("query", name, f"{name}: needs a time zone (e.g. ...Z)")
    try:
        end = to or utcnow()
        start = from_ or end - timedelta(days=1)
        after = _decode_cursor(cursor) if cursor else start - timedelta(microseconds=1)
    except OverflowError:
        raise Problem(422, "The time range is outside what can be represented.") from None
    if start >= end:
        raise field_problem("query", "from", "from: must be before to")
    rows = await res.pg.fetch(_BARS_SQL, sym, interval, start, end, after, limit + 1)
    items = [to_json(dict(r)) for r in rows[:limit]]
    next_cursor = _encode_cursor(rows[limit - 1]["start"]) if len(rows) > limit else None
    return JSONResponse({"items": items, "next_cursor": next_cursor})
