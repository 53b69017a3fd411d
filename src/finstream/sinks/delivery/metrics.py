"""Prometheus metrics of the delivery workers."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import Counter, Gauge, Histogram

from finstream.domain.resilience import CircuitState

SENT = Counter(
    "finstream_delivery_sent_total", "Provider calls that delivered", ["channel", "provider"]
)
FAILED = Counter(
    "finstream_delivery_failed_total",
    "Provider calls that failed",
    ["channel", "provider", "error_class"],
)
RETRIED = Counter(
    "finstream_delivery_retried_total",
    "Failed calls followed by another try (failover or a scheduled retry)",
    ["channel", "provider"],
)
OUTCOMES = Counter(
    "finstream_delivery_outcomes_total",
    "Messages that reached a final state",
    ["channel", "status"],
)
DUPLICATES = Counter(
    "finstream_delivery_duplicates_total",
    "Messages consumed again and not sent again, by who recognized them",
    ["channel", "source"],
)
RECONCILED = Counter(
    "finstream_delivery_reconciled_total",
    "Sends of unknown outcome settled, by how",
    ["channel", "provider", "outcome"],
)
DEFERRED = Counter(
    "finstream_delivery_deferred_total",
    "Messages put back because every provider was open-circuited or rate limited",
    ["channel"],
)
FEEDBACK = Counter(
    "finstream_delivery_feedback_total",
    "Sends refused for a reason the feedback role records in the preferences (token, STOP)",
    ["channel", "kind"],
)
LATENCY = Histogram(
    "finstream_delivery_latency_seconds",
    "Provider call latency",
    ["channel", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
END_TO_END = Histogram(
    "finstream_delivery_end_to_end_seconds",
    "From the message's created_at to the provider's acceptance",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
SUCCESS_RATIO = Gauge(
    "finstream_delivery_success_ratio",
    "Share of provider calls that delivered, since the worker started",
    ["channel", "provider"],
)
CIRCUIT = Gauge(
    "finstream_delivery_circuit_state",
    "Circuit breaker per provider: 0 closed, 1 half-open, 2 open",
    ["channel", "provider"],
)
BACKLOG = Gauge(
    "finstream_delivery_backlog",
    "Messages claimed but not finished, by state (queued, sending, retry, unknown); "
    "retries wait here, not in Kafka, so consumer lag alone does not show them",
    ["channel", "state"],
)
CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class Ratio:
    """Keeps the success-ratio gauge in step with the call outcomes."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])

    def record(self, channel: str, provider: str, ok: bool) -> None:
        counts = self._counts[(channel, provider)]
        counts[0 if ok else 1] += 1
        SUCCESS_RATIO.labels(channel, provider).set(counts[0] / (counts[0] + counts[1]))
