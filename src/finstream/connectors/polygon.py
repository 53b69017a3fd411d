"""Polygon.io (renamed Massive in 2025, APIs unchanged): WebSocket trades and minute bars.

Every message is a JSON array of events. The server greets with
``[{"ev":"status","status":"connected"}]``; the client sends
``{"action":"auth","params":KEY}`` and gets ``auth_success`` or
``auth_failed``; then ``{"action":"subscribe","params":"T.AAPL,AM.AAPL"}``.
Trades ``T`` carry ``sym, p, s, t (ms), x, c``; minute aggregates ``AM``
carry ``sym, o, h, l, c, v, vw, s, e (ms)``. A ``max_connections`` status
means another client took the key's only connection.

Trades become TRADE ticks; a minute aggregate becomes one QUOTE tick at its
close, stamped at the bar's end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from websockets.asyncio.client import ClientConnection

from finstream.connectors.base import ConnectorOptions
from finstream.connectors.websocket import WebSocketConnector
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    epoch_to_utc,
    load_json,
    malformed,
    optional_size,
    price,
    quote_id,
    quote_marker,
    require,
    require_list,
    require_mapping,
    trade_id,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, make_tick, normalize_symbol
from finstream.domain.resilience import ErrorClass, ProviderError

NAME = "polygon"
CHANNELS = ("T", "AM")


def _events(raw: str | bytes) -> list[Any]:
    data = load_json(raw, NAME)
    if isinstance(data, dict):  # be lenient with a single bare event
        data = [data]
    return require_list(data, NAME, "message")


def status_error(event: dict[str, Any]) -> ProviderError | None:
    """The error a status event means, if any."""
    status = str(event.get("status", ""))
    message = str(event.get("message", ""))[:200]
    if status == "auth_failed":
        return ProviderError(
            ErrorClass.AUTH, message or "authentication failed", provider=NAME, code=status
        )
    if status == "max_connections":
        return ProviderError(
            ErrorClass.THROTTLED, message or "too many connections", provider=NAME, code=status
        )
    if status == "error":
        return ProviderError(ErrorClass.PERMANENT, message or "error", provider=NAME, code=status)
    return None


def _symbol(event: dict[str, Any]) -> str:
    try:
        return normalize_symbol(require(event, "sym", NAME, "event"))
    except TickValidationError as exc:
        raise malformed(NAME, exc.detail, "bad_symbol") from None


def parse_event(event: Any, received_at: datetime) -> Tick | None:
    event = require_mapping(event, NAME, "event")
    ev = event.get("ev")
    try:
        if ev == "T":
            symbol = _symbol(event)
            last = price(require(event, "p", NAME, "trade"), NAME, "p")
            ts = epoch_to_utc(require(event, "t", NAME, "trade"), NAME, "ms", "t")
            size = optional_size(event.get("s"), NAME, "s")
            return make_tick(
                tick_id=trade_id(symbol, ts, last, size),
                symbol=symbol,
                kind="TRADE",
                price=last,
                size=size,
                ts=ts,
                received_at=received_at,
                source=NAME,
            )
        if ev == "AM":
            symbol = _symbol(event)
            close = price(require(event, "c", NAME, "aggregate"), NAME, "c")
            start = epoch_to_utc(require(event, "s", NAME, "aggregate"), NAME, "ms", "s")
            end = epoch_to_utc(require(event, "e", NAME, "aggregate"), NAME, "ms", "e")
            volume = optional_size(event.get("v"), NAME, "v")
            return make_tick(
                tick_id=quote_id(symbol, f"AM:{quote_marker(start)}", close, volume),
                symbol=symbol,
                kind="QUOTE",
                price=close,
                size=volume,
                ts=end,
                received_at=received_at,
                source=NAME,
            )
    except TickValidationError as exc:
        raise malformed(NAME, exc.detail, exc.reason) from None
    return None


def parse_message(
    raw: str | bytes, received_at: datetime
) -> tuple[list[Tick], list[ProviderError]]:
    """Ticks and per-event errors; raises when a status event ends the session."""
    ticks: list[Tick] = []
    errors: list[ProviderError] = []
    for event in _events(raw):
        if isinstance(event, dict) and event.get("ev") == "status":
            error = status_error(event)
            if error is not None:
                raise error
            continue
        try:
            tick = parse_event(event, received_at)
        except ProviderError as exc:
            errors.append(exc)
            continue
        if tick is not None:
            ticks.append(tick)
        elif isinstance(event, dict):
            errors.append(malformed(NAME, f"unknown event type {event.get('ev')!r}", "shape"))
    return ticks, errors


class PolygonConnector(WebSocketConnector):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = "Polygon.io / Massive WebSocket trades (T) and minute bars (AM)"
    documented_limits: ClassVar[str] = "one concurrent WebSocket connection per cluster per key"

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        ws_url: str,
        api_key: str | None,
        channels: Sequence[str] = ("T",),
    ) -> None:
        super().__init__(gate, options, ws_url)
        self.api_key = api_key
        bad = [c for c in channels if c not in CHANNELS]
        if bad or not channels:
            raise ValueError(f"polygon channels must be among {CHANNELS}, got {list(channels)}")
        self.channels = tuple(channels)

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.api_key,) if self.api_key else ()

    def configuration_problem(self) -> str | None:
        return None if self.api_key else "no API key (FINSTREAM_MD_POLYGON_KEY)"

    async def _expect(self, ws: ClientConnection, wanted: str) -> None:
        """Read status events until ``wanted`` arrives (errors raise)."""
        while True:
            raw = await ws.recv()
            self.last_message = time.monotonic()
            for event in _events(raw):
                if not isinstance(event, dict) or event.get("ev") != "status":
                    continue
                error = status_error(event)
                if error is not None:
                    raise error
                if event.get("status") == wanted:
                    return

    async def handshake(self, ws: ClientConnection) -> None:
        await self._expect(ws, "connected")
        await ws.send(json.dumps({"action": "auth", "params": self.api_key or ""}))
        await self._expect(ws, "auth_success")

    def _params(self, symbols: Sequence[str]) -> str:
        return ",".join(f"{c}.{s}" for s in symbols for c in self.channels)

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        return [json.dumps({"action": "subscribe", "params": self._params(symbols)})]

    def unsubscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        return [json.dumps({"action": "unsubscribe", "params": self._params(symbols)})]

    def parse(
        self, raw: str | bytes, received_at: datetime
    ) -> tuple[list[Tick], list[ProviderError]]:
        try:
            return parse_message(raw, received_at)
        except ProviderError as exc:
            if exc.code in ("auth_failed", "max_connections"):
                raise
            return [], [exc]
