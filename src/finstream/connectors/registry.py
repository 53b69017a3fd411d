"""Every market-data provider by name (one line each), and the chains configured in settings.

A chain is an ordered list of provider names for a set of symbols:
``FINSTREAM_MD_CHAIN`` for ``FINSTREAM_MD_SYMBOLS`` (default: the simulated
market's symbols), plus any number of extra sets in ``FINSTREAM_MD_CHAINS``
(JSON: ``{"BTC-USD,ETH-USD": "yahoo"}``). A symbol belongs to one set only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from finstream.connectors.alphavantage import AlphaVantageConnector
from finstream.connectors.base import Connector, ConnectorOptions
from finstream.connectors.file_feed import ReplayConnector
from finstream.connectors.finnhub import FinnhubConnector, FinnhubStreamConnector
from finstream.connectors.iex import IexConnector
from finstream.connectors.polygon import PolygonConnector
from finstream.connectors.simulated import SimulatedConnector
from finstream.connectors.yahoo import YahooConnector
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    DailyReset,
    LimitSpec,
    parse_daily_resets,
    parse_limits,
)
from finstream.domain.marketdata.ticks import TickValidationError, normalize_symbol
from finstream.domain.resilience import Backoff
from finstream.settings import Settings


def _secret(value: object) -> str | None:
    get = getattr(value, "get_secret_value", None)
    return str(get()) if get is not None else None


def _daily_resets(spec: str, field: str) -> list[DailyReset]:
    try:
        return parse_daily_resets(spec)
    except ValueError as exc:
        raise ConfigError(f"FINSTREAM_{field.upper()}: {exc}") from None


Factory = Callable[[Settings, ProviderGate, ConnectorOptions, Sequence[str]], Connector]


@dataclass(frozen=True)
class Provider:
    factory: Factory
    limits: str = ""  # the name of the Settings field with its rate limits, if any


# name: how to build it from settings. Adding a provider is one module and one line here.
PROVIDERS: dict[str, Provider] = {
    "simulated": Provider(lambda s, g, o, u: SimulatedConnector(g, o, u, s.sim_rate, s.sim_seed)),
    "replay": Provider(lambda s, g, o, u: ReplayConnector(g, o, s.md_replay_path, s.md_replay_speed)),
    "alphavantage": Provider(lambda s, g, o, u: AlphaVantageConnector(g, o, s.md_alphavantage_url, _secret(s.md_alphavantage_key), _daily_resets(s.md_alphavantage_daily_reset, "md_alphavantage_daily_reset")), "md_alphavantage_limits"),
    "yahoo": Provider(lambda s, g, o, u: YahooConnector(g, o, s.md_yahoo_url, s.md_yahoo_cookie_url), "md_yahoo_limits"),
    "finnhub": Provider(lambda s, g, o, u: FinnhubConnector(g, o, s.md_finnhub_url, _secret(s.md_finnhub_key)), "md_finnhub_limits"),
    "finnhub-ws": Provider(lambda s, g, o, u: FinnhubStreamConnector(g, o, s.md_finnhub_ws_url, _secret(s.md_finnhub_key))),
    "polygon": Provider(lambda s, g, o, u: PolygonConnector(g, o, s.md_polygon_ws_url, _secret(s.md_polygon_key), [c.strip() for c in s.md_polygon_channels.split(",") if c.strip()])),
    "iex": Provider(lambda s, g, o, u: IexConnector(g, o, s.md_iex_url, _secret(s.md_iex_key), s.md_iex_enabled), "md_iex_limits"),
}  # fmt: skip


class ConfigError(ValueError):
    """The chains or provider settings do not make sense; the message says which."""


@dataclass(frozen=True)
class ChainSpec:
    name: str
    symbols: tuple[str, ...]
    providers: tuple[str, ...]


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _symbols(text: str, where: str) -> tuple[str, ...]:
    out: list[str] = []
    for raw in _split(text):
        try:
            sym = normalize_symbol(raw)
        except TickValidationError as exc:
            raise ConfigError(f"{where}: {exc.detail}") from None
        if sym not in out:
            out.append(sym)
    if not out:
        raise ConfigError(f"{where}: no symbols")
    return tuple(out)


def _providers(text: str, where: str) -> tuple[str, ...]:
    names = [n.lower() for n in _split(text)]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ConfigError(f"{where}: unknown providers {unknown}; known: {', '.join(PROVIDERS)}")
    if not names:
        raise ConfigError(f"{where}: no providers")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a provider is listed twice: {names}")
    return tuple(names)


def chain_specs(settings: Settings) -> list[ChainSpec]:
    specs = [
        ChainSpec(
            "default",
            _symbols(settings.md_symbols or settings.sim_symbols, "FINSTREAM_MD_SYMBOLS"),
            _providers(settings.md_chain, "FINSTREAM_MD_CHAIN"),
        )
    ]
    for key, chain in settings.md_chains.items():
        symbols = _symbols(key, f"FINSTREAM_MD_CHAINS[{key!r}]")
        specs.append(
            ChainSpec(
                ",".join(symbols)[:60], symbols, _providers(chain, f"FINSTREAM_MD_CHAINS[{key!r}]")
            )
        )
    refusal = settings.synthetic_market_refusal({p for spec in specs for p in spec.providers})
    if refusal is not None:
        raise ConfigError(refusal)
    seen: dict[str, str] = {}
    for spec in specs:
        for sym in spec.symbols:
            if sym in seen:
                raise ConfigError(f"{sym} is in two symbol sets ({seen[sym]!r} and {spec.name!r})")
            seen[sym] = spec.name
    return specs


def options(settings: Settings) -> ConnectorOptions:
    return ConnectorOptions(
        timeout=settings.md_request_timeout,
        # Waiting for a token longer than a quarter poll would delay the whole cycle.
        max_wait=settings.md_poll_interval / 4,
        max_future=timedelta(seconds=settings.tick_max_future_seconds),
        silence_timeout=settings.md_silence_timeout,
        backoff=Backoff(base=settings.md_reconnect_base, cap=settings.md_reconnect_cap),
    )


def limits(settings: Settings, name: str) -> list[LimitSpec]:
    field = PROVIDERS[name].limits
    if not field:
        return []
    try:
        return parse_limits(str(getattr(settings, field)))
    except ValueError as exc:
        raise ConfigError(f"FINSTREAM_{field.upper()}: {exc}") from None


def build_gate(settings: Settings, name: str) -> ProviderGate:
    return ProviderGate.build(
        name, limits(settings, name), settings.md_failure_threshold, settings.md_circuit_reset
    )


def build(
    settings: Settings, names: Sequence[str], universe: Sequence[str]
) -> tuple[dict[str, Connector], dict[str, ProviderGate]]:
    """Connectors and their gates for ``names``; ``universe`` is every symbol they may be asked."""
    opts = options(settings)
    gates = {name: build_gate(settings, name) for name in names}
    connectors = {
        name: PROVIDERS[name].factory(settings, gates[name], opts, universe) for name in names
    }
    return connectors, gates
