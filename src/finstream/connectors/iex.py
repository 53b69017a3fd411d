"""IEX Cloud (legacy): the service shut down on 2024-08-31.

The parser for its former quote format (``/stable/stock/{symbol}/quote``:
``symbol, latestPrice, latestUpdate`` (epoch ms), ``latestVolume``,
``iexBidPrice``/``iexAskPrice`` (0 when none), ``previousClose``) stays for
archived responses and compatible mirrors. The connector is disabled by
default; listed in a chain while disabled, or failing while enabled, it says
that the service was retired, and the chain moves on to the next provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote

from finstream.connectors.base import ConnectorOptions, PollResult
from finstream.connectors.http import HttpConnector, per_symbol
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
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
    require_mapping,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, normalize_symbol
from finstream.domain.resilience import ErrorClass, ProviderError
from finstream.runtime.logging import get_logger

log = get_logger(__name__)

NAME = "iex"
RETIRED = "IEX Cloud was retired on 2024-08-31"


def parse_legacy_quote(body: bytes | str, symbol: str, received_at: datetime) -> Tick:
    data = require_mapping(load_json(body, NAME), NAME, "body")
    try:
        got = normalize_symbol(require(data, "symbol", NAME, "quote"))
    except TickValidationError as exc:
        raise malformed(NAME, exc.detail, "bad_symbol") from None
    if got != symbol:
        raise malformed(NAME, f"asked for {symbol}, got a quote for {got}", "symbol_mismatch")
    last = price(require(data, "latestPrice", NAME, "quote"), NAME, "latestPrice")
    ts = epoch_to_utc(require(data, "latestUpdate", NAME, "quote"), NAME, "ms", "latestUpdate")
    volume = optional_size(data.get("latestVolume"), NAME, "latestVolume")
    return provider_tick(
        NAME,
        tick_id=quote_id(symbol, quote_marker(ts), last, volume),
        symbol=symbol,
        kind="QUOTE",
        price=last,
        size=volume,
        bid=optional_positive(data.get("iexBidPrice"), NAME, "iexBidPrice"),
        ask=optional_positive(data.get("iexAskPrice"), NAME, "iexAskPrice"),
        prev_close=optional_positive(data.get("previousClose"), NAME, "previousClose"),
        currency="USD",
        ts=ts,
        received_at=received_at,
        source=NAME,
    )


class IexConnector(HttpConnector):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = f"IEX Cloud legacy quote format ({RETIRED}); disabled by default"
    documented_limits: ClassVar[str] = f"{RETIRED}; formerly 100 requests/sec per IP"

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        base_url: str,
        api_key: str | None,
        enabled: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(gate, options, base_url, **kw)
        self.api_key = api_key
        self.enabled = enabled
        self._warned = False

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if self.api_key else ()

    def configuration_problem(self) -> str | None:
        if not self.enabled:
            return f"{RETIRED}; the connector is disabled (FINSTREAM_MD_IEX_ENABLED=false)"
        return f"{RETIRED}; enabled against {self.base_url} (only a legacy-compatible server can answer)"

    def _retired(self, detail: str) -> ProviderError:
        return ProviderError(
            ErrorClass.PERMANENT, f"{RETIRED} ({detail})", provider=NAME, code="retired"
        )

    async def fetch(self, symbols: Sequence[str]) -> PollResult:
        result = PollResult()
        if not self.enabled:
            result.error = self._retired(
                "connector disabled; set FINSTREAM_MD_IEX_ENABLED=true to try a mirror"
            )
            return result
        if not self._warned:
            self._warned = True
            log.warning("iex connector enabled", note=RETIRED, base_url=self.base_url)
        for symbol in symbols:
            try:
                reply = await self.get(
                    f"{self.base_url}/stable/stock/{quote(symbol, safe='')}/quote",
                    {"token": self.api_key or ""},
                )
                error = self.status_error(reply)
                if error is not None:
                    if error.error_class is ErrorClass.UNKNOWN_SYMBOL:
                        raise error
                    raise self._retired(str(error))
                result.add(
                    symbol,
                    self.validated(parse_legacy_quote(reply.body, symbol, reply.received_at)),
                )
            except ProviderError as exc:
                if exc.code in ("connect", "timeout"):
                    exc = self._retired(str(exc))
                if not per_symbol(result, symbol, exc):
                    break
        return result
