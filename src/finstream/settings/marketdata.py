"""Market-data connectors and provider failover (issue 3)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr


class MarketDataSettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- market data -------------------------------------------------------------
    sim_symbols: str = "AAPL,MSFT,GOOG,AMZN,NVDA,TSLA,META,JPM"
    sim_rate: float = Field(default=20.0, gt=0, description="Simulated ticks per second, total.")
    sim_seed: int | None = None
    sim_count: int | None = Field(default=None, description="Stop after this many ticks.")
    tick_max_future_seconds: float = 300.0

    # Market-data connectors and provider failover (issue 3). The `connector`
    # role runs one failover chain per symbol set: an ordered list of providers
    # (simulated, replay, alphavantage, yahoo, finnhub, finnhub-ws, polygon,
    # iex). Base URLs are settings so that tests point them at local fakes.
    # Limits are comma-separated "N/sec|min|hour|day" token buckets, all of
    # which must allow a request; the defaults follow each provider's
    # documented free-tier limits.
    md_chain: str = Field(default="simulated", description="Ordered providers, comma-separated.")
    md_allow_synthetic: bool = Field(
        default=False,
        description="Let the connector run the simulated and replay providers when env is "
        "production (their prices are not real, yet would fire real users' alerts).",
    )
    md_symbols: str = Field(default="", description="Symbols of md_chain (empty: sim_symbols).")
    md_chains: dict[str, str] = Field(
        default_factory=dict,
        description='More symbol sets and their chains, JSON: {"BTC-USD,ETH-USD": "yahoo"}.',
    )
    md_poll_interval: float = Field(default=5.0, gt=0, description="Seconds between polls.")
    md_request_timeout: float = Field(default=10.0, gt=0)
    md_failure_threshold: int = Field(default=3, ge=1, description="Failures that open a circuit.")
    md_circuit_reset: float = Field(default=30.0, gt=0, description="Seconds before a probe.")
    md_throttle_pause: float = Field(
        default=60.0, ge=0, description="Pause after throttling that names no Retry-After."
    )
    md_unknown_symbol_retry: float = Field(
        default=600.0,
        gt=0,
        description="Seconds before asking a provider again for a symbol it did not know.",
    )
    md_silence_timeout: float = Field(
        default=30.0, gt=0, description="WebSocket: reconnect after this long without a message."
    )
    md_reconnect_base: float = Field(default=0.5, gt=0)
    md_reconnect_cap: float = Field(default=30.0, gt=0)
    md_dedupe_window: int = Field(
        default=4096, gt=0, description="Recent tick ids kept per symbol."
    )
    md_backfill_gaps: bool = Field(
        default=True, description="Fill coverage gaps from intraday bars when a provider has them."
    )
    md_alphavantage_url: str = "https://www.alphavantage.co"
    md_alphavantage_key: SecretStr | None = None
    md_alphavantage_limits: str = Field(
        default="1/sec,5/min,25/day",
        description="Free tier: 25 a day, 5 a minute, and bursts refused above 1 a second.",
    )
    md_alphavantage_daily_reset: str = Field(
        default="00:00 UTC,00:00 America/New_York",
        description="When the daily quota renews (HH:MM ZONE, comma-separated; undocumented, "
        "so the earliest candidate is tried first): the pause after the daily-limit message.",
    )
    md_yahoo_url: str = "https://query1.finance.yahoo.com"
    md_yahoo_cookie_url: str = "https://fc.yahoo.com"
    md_yahoo_limits: str = "60/min"
    md_finnhub_url: str = "https://finnhub.io"
    md_finnhub_ws_url: str = "wss://ws.finnhub.io"
    md_finnhub_key: SecretStr | None = None
    md_finnhub_limits: str = "60/min,30/sec"
    md_polygon_ws_url: str = "wss://socket.polygon.io/stocks"
    md_polygon_key: SecretStr | None = None
    md_polygon_channels: str = Field(default="T", description="T (trades) and/or AM (minute bars).")
    md_iex_enabled: bool = Field(default=False, description="IEX Cloud was retired on 2024-08-31.")
    md_iex_url: str = "https://cloud.iexapis.com"
    md_iex_key: SecretStr | None = None
    md_iex_limits: str = "100/sec"
    md_replay_path: Path | None = Field(
        default=None, description="CSV or Parquet of ticks or bars."
    )
    md_replay_speed: str = Field(default="1", description="Playback speed: 1, 10, ... or max.")
