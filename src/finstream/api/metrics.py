"""Prometheus metrics of the API and its WebSocket streams."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "finstream_api_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "finstream_api_request_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
AUTH_FAILURES = Counter(
    "finstream_api_auth_failures_total", "Refused credentials, by reason", ["reason"]
)
RATE_LIMITED = Counter("finstream_api_rate_limited_total", "Requests refused by the rate limit")
RATE_LIMITER_ERRORS = Counter(
    "finstream_api_rate_limiter_errors_total",
    "Requests let through because the rate limiter's Redis could not answer",
)
IDEMPOTENT_REPLAYS = Counter(
    "finstream_api_idempotent_replays_total", "Requests answered from a stored idempotent response"
)
WEBHOOK_EVENTS = Counter(
    "finstream_api_webhook_events_total",
    "Provider webhook events, by provider and outcome",
    ["provider", "outcome"],
)
WS_CONNECTIONS = Gauge("finstream_api_ws_connections", "Open WebSocket connections")
WS_SUBSCRIPTIONS = Gauge(
    "finstream_api_ws_channels", "Redis channels the shared pub/sub connection listens to"
)
WS_MESSAGES = Counter(
    "finstream_api_ws_messages_total", "Messages sent to WebSocket clients", ["kind"]
)
WS_NONFINITE = Counter(
    "finstream_api_ws_nonfinite_frames_total",
    "WebSocket frames whose data held NaN or Infinity (sent as null, listed in 'nonfinite')",
    ["kind"],
)
WS_DROPPED = Counter(
    "finstream_api_ws_dropped_total",
    "WebSocket clients closed by the server, by reason",
    ["reason"],
)
