"""Prometheus metrics shared by every worker role.

Role-specific metrics live next to the code that moves them; these are the
ones every worker has: events in, out and failed, dead letters, processing
latency and consumer lag.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter("finstream_events_in_total", "Events consumed", ["role", "topic"])
EVENTS_OUT = Counter("finstream_events_out_total", "Events produced", ["role", "topic"])
EVENTS_FAILED = Counter(
    "finstream_events_failed_total",
    "Events that could not be processed (sent to the dead-letter topic)",
    ["role", "topic", "error_class"],
)
DEAD_LETTERS = Counter(
    "finstream_dead_letters_total",
    "Messages written to the dlq topic",
    ["role", "source_topic", "error_class"],
)
PROCESSING_SECONDS = Histogram(
    "finstream_processing_seconds",
    "Time to process one event (or one batch, for batch sinks)",
    ["role", "step"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_LAG = Gauge(
    "finstream_consumer_lag",
    "Messages between the high watermark and the consumer's position",
    ["role", "topic", "partition"],
)
READY = Gauge("finstream_ready", "1 when the worker reports ready", ["role"])
DEPENDENCY_UP = Gauge(
    "finstream_dependency_up",
    "1 when the worker's last probe of a dependency it needs (kafka, postgresql, redis) succeeded",
    ["role", "dependency"],
)
