"""Prometheus metrics of the market-data connectors and their failover chains."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from finstream.domain.resilience import CircuitState

TICKS_PUBLISHED = Counter(
    "finstream_md_ticks_published_total", "Ticks published to md.ticks", ["provider"]
)
TICKS_SUPPRESSED = Counter(
    "finstream_md_ticks_suppressed_total",
    "Ticks not published: duplicates (same_id, same_quote), stale quotes, or from a standby stream",
    ["provider", "reason"],
)
PROVIDER_ERRORS = Counter(
    "finstream_md_provider_errors_total",
    "Classified provider errors (throttled, auth, unknown_symbol, transient, permanent, malformed)",
    ["provider", "error_class"],
)
FAILOVERS = Counter(
    "finstream_md_failovers_total",
    "Changes of a chain's active provider (failover, failback, outage, recovered)",
    ["chain", "kind", "from_provider", "to_provider"],
)
CIRCUIT = Gauge(
    "finstream_md_circuit_state",
    "Circuit breaker per provider: 0 closed, 1 half-open, 2 open",
    ["provider"],
)
ACTIVE = Gauge(
    "finstream_md_active_provider", "1 for the provider serving a chain", ["chain", "provider"]
)
PUBLISH_LATENCY = Histogram(
    "finstream_md_provider_to_publish_seconds",
    "From receiving a provider's response or message to Kafka acknowledging the tick",
    ["provider"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUEST_SECONDS = Histogram(
    "finstream_md_request_seconds",
    "Provider HTTP request duration",
    ["provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GAPS = Counter(
    "finstream_md_coverage_gaps_total",
    "Symbols left unobserved for longer than two poll intervals",
    ["chain"],
)
GAP_SECONDS = Histogram(
    "finstream_md_coverage_gap_seconds",
    "Length of coverage gaps longer than two poll intervals",
    ["chain"],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
UNSERVED = Counter(
    "finstream_md_unserved_total",
    "Symbols a poll cycle ended without: no provider of the chain served them in that cycle",
    ["chain"],
)
STALENESS = Gauge(
    "finstream_md_symbol_staleness_seconds", "Seconds since a symbol was last observed", ["symbol"]
)
STREAM_RECONNECTS = Counter(
    "finstream_md_stream_reconnects_total",
    "WebSocket reconnections by cause (closed, silent, error class)",
    ["provider", "reason"],
)
BACKFILLED = Counter(
    "finstream_md_backfilled_ticks_total",
    "Ticks published from intraday bars to fill a gap",
    ["provider"],
)

_CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


def set_circuit(provider: str, state: CircuitState) -> None:
    CIRCUIT.labels(provider).set(_CIRCUIT_VALUES[state])


# issue 15: rate-limit waits on the market-data dashboard. The connector's own
# token buckets (FINSTREAM_MD_<PROVIDER>_LIMITS) pace requests: the time spent
# waiting for a token, and the requests refused for want of one within the
# cycle's budget (the chain then asks the next provider).
RATE_LIMIT_WAIT = Counter(
    "finstream_md_rate_limit_wait_seconds_total",
    "Seconds spent waiting for a provider's rate-limit tokens",
    ["provider"],
)
RATE_LIMITED = Counter(
    "finstream_md_rate_limited_total",
    "Requests not sent in a cycle because the provider's rate limit had no token in time",
    ["provider"],
)
