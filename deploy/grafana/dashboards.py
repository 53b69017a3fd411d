"""The Grafana dashboards of the chart, as code: `python deploy/grafana/dashboards.py`.

Writes helm/finstream/files/dashboards/*.json (Grafana's dashboard JSON model,
schemaVersion 39), the four an operator opens first:

* finstream.json               Pipeline overview: throughput and lag per role and
                               partition, dead letters, transactions, restarts
* finstream-market-data.json   ticks per provider, staleness, failovers, breakers,
                               rate-limit waits
* finstream-notifications.json routing decisions, holds and releases, delivery by
                               channel and provider: success ratio and latency
* finstream-api.json           requests by route and status, latency, WebSocket
                               clients and slow-client drops

(finstream-database.json is written by hand, issue 13.) Every query is checked
against the metric names the code defines by tests/deploy/test_chart.py and
tests/deploy/test_dashboards.py, which also lints the JSON model and checks
that these files are what this script writes. deploy/grafana/screenshots.py draws
the panels' data from a local run for deploy/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[2] / "helm" / "finstream" / "files" / "dashboards"
NS = 'namespace="$namespace"'
DS = {"type": "prometheus", "uid": "${datasource}"}


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


class Board:
    """Panels laid out left to right in rows of 24 columns."""

    def __init__(self, uid: str, title: str, description: str, tags: list[str]) -> None:
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = self._row_h = 0

    def add(
        self,
        title: str,
        description: str,
        targets: list[tuple[str, str]],
        *,
        kind: str = "timeseries",
        unit: str = "short",
        width: int = 12,
        height: int = 8,
        mappings: list[dict[str, Any]] | None = None,
        thresholds: list[tuple[float | None, str]] | None = None,
        stack: bool = False,
        max_value: float | None = None,
    ) -> None:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + self._row_h
            self._row_h = 0
        steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
        defaults: dict[str, Any] = {
            "unit": unit,
            "thresholds": {"mode": "absolute", "steps": steps},
            "mappings": mappings or [],
        }
        if max_value is not None:
            defaults["max"] = max_value
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 10 if stack else 0,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "showPoints": "never",
            }
        options: dict[str, Any] = {"tooltip": {"mode": "multi", "sort": "desc"}}
        if kind == "timeseries":
            options["legend"] = {"displayMode": "table", "placement": "right", "showLegend": True}
        elif kind == "stat":
            options = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background",
                "graphMode": "none",
                "textMode": "value_and_name",
            }
        elif kind == "state-timeline":
            options = {
                "showValue": "never",
                "mergeValues": True,
                "rowHeight": 0.8,
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            }
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": kind,
                "title": title,
                "description": description,
                "datasource": DS,
                "gridPos": {"h": height, "w": width, "x": self._x, "y": self._y},
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": options,
                "targets": [
                    target(expr, legend, chr(ord("A") + i))
                    for i, (expr, legend) in enumerate(targets)
                ],
            }
        )
        self._x += width
        self._row_h = max(self._row_h, height)

    def model(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "uid": self.uid,
            "description": self.description,
            "tags": ["finstream", *self.tags],
            "timezone": "utc",
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "graphTooltip": 1,
            "refresh": "30s",
            "time": {"from": "now-3h", "to": "now"},
            "templating": {
                "list": [
                    {
                        "name": "datasource",
                        "type": "datasource",
                        "query": "prometheus",
                        "label": "Prometheus",
                    },
                    {
                        "name": "namespace",
                        "type": "query",
                        "label": "Namespace",
                        "datasource": DS,
                        "query": "label_values(finstream_ready, namespace)",
                        "refresh": 2,
                    },
                ]
            },
            "annotations": {"list": []},
            "links": [
                {
                    "title": "finstream dashboards",
                    "type": "dashboards",
                    "tags": ["finstream"],
                    "asDropdown": True,
                }
            ],
            "panels": self.panels,
        }


def rate(metric: str, by: str, extra: str = "") -> str:
    sel = f"{{{NS}{',' + extra if extra else ''}}}"
    return f"sum by ({by}) (rate({metric}{sel}[$__rate_interval]))"


def p_quantile(q: float, metric: str, by: str, extra: str = "") -> str:
    sel = f"{{{NS}{',' + extra if extra else ''}}}"
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{sel}[$__rate_interval])))"
    )


CIRCUIT = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green", "index": 0},
            "1": {"text": "half-open", "color": "yellow", "index": 1},
            "2": {"text": "open", "color": "red", "index": 2},
        },
    }
]


def pipeline() -> Board:
    b = Board(
        "finstream-overview",
        "finstream: pipeline overview",
        "Every role's throughput, consumer lag per partition, dead letters, stream "
        "transactions and restarts. Start here.",
        ["pipeline"],
    )
    b.add(
        "Replicas ready by role",
        "Replicas whose /readyz answers 200.",
        [(f"sum by (role) (finstream_ready{{{NS}}})", "{{role}}")],
        kind="stat",
        width=8,
        height=6,
        thresholds=[(None, "red"), (1, "green")],
    )
    b.add(
        "Consumer lag, all roles",
        "Messages not yet processed, summed over roles and partitions.",
        [(f"sum(finstream_consumer_lag{{{NS}}})", "lag")],
        kind="stat",
        width=4,
        height=6,
        thresholds=[(None, "green"), (10000, "red")],
    )
    b.add(
        "Dead letters, last 15 minutes",
        "Messages sent to dlq with their reason (finstream dlq list).",
        [(f"sum(increase(finstream_dead_letters_total{{{NS}}}[15m]))", "dead letters")],
        kind="stat",
        width=4,
        height=6,
        thresholds=[(None, "green"), (1, "orange")],
    )
    b.add(
        "Container restarts, last hour",
        "From kube-state-metrics: a crash-looping role shows here first.",
        [
            (
                f'sum by (pod) (increase(kube_pod_container_status_restarts_total{{{NS},container="worker"}}[1h])) > 0',
                "{{pod}}",
            )
        ],
        kind="stat",
        width=8,
        height=6,
        thresholds=[(None, "green"), (1, "red")],
    )
    b.add(
        "Events in per second by role",
        "Records consumed.",
        [(rate("finstream_events_in_total", "role"), "{{role}}")],
        unit="ops",
        stack=True,
    )
    b.add(
        "Events out per second by topic",
        "Records produced, by destination topic.",
        [(rate("finstream_events_out_total", "topic"), "{{topic}}")],
        unit="ops",
        stack=True,
    )
    b.add(
        "Consumer lag by role and partition",
        "Per input partition; a single partition climbing is a hot key or a stuck replica.",
        [
            (
                f"sum by (role, topic, partition) (finstream_consumer_lag{{{NS}}})",
                "{{role}} {{topic}}[{{partition}}]",
            )
        ],
        width=24,
        height=9,
    )
    b.add(
        "Dead letters per minute",
        "By role, source topic and error class.",
        [
            (
                rate("finstream_dead_letters_total", "role, source_topic, error_class") + " * 60",
                "{{role}} {{source_topic}} {{error_class}}",
            )
        ],
        width=12,
    )
    b.add(
        "Failed events per minute",
        "Events that failed processing (each is dead-lettered or retried).",
        [
            (
                rate("finstream_events_failed_total", "role, error_class") + " * 60",
                "{{role}} {{error_class}}",
            )
        ],
    )
    b.add(
        "Stream transactions per second",
        "Exactly-once roles: committed and aborted transactions.",
        [(rate("finstream_stream_transactions_total", "role, outcome"), "{{role}} {{outcome}}")],
        unit="ops",
    )
    b.add(
        "Transaction commit time p99",
        "A slow commit delays every read_committed reader.",
        [(p_quantile(0.99, "finstream_stream_commit_seconds", "role"), "{{role}}")],
        unit="s",
    )
    b.add(
        "Processing time p99 by step",
        "Per batch step of each role.",
        [(p_quantile(0.99, "finstream_processing_seconds", "role, step"), "{{role}} {{step}}")],
        unit="s",
    )
    b.add(
        "Rebalances and rewinds",
        "Partition hand-overs, and replicas rewound to their last commit.",
        [
            (
                f"sum by (role, kind) (increase(finstream_stream_rebalances_total{{{NS}}}[$__rate_interval]))",
                "{{role}} {{kind}}",
            ),
            (
                f"sum by (role, reason) (increase(finstream_stream_rewinds_total{{{NS}}}[$__rate_interval]))",
                "rewind {{role}} {{reason}}",
            ),
        ],
    )
    return b


def market_data() -> Board:
    b = Board(
        "finstream-market-data",
        "finstream: market data",
        "The connector's failover chains: ticks per provider, staleness, failovers, "
        "circuit breakers and rate limits.",
        ["market-data"],
    )
    b.add(
        "Ticks published per second by provider",
        "After deduplication, to md.ticks.",
        [(rate("finstream_md_ticks_published_total", "provider"), "{{provider}}")],
        unit="ops",
        stack=True,
    )
    b.add(
        "Staleness per symbol",
        "Seconds since each symbol's last tick; the stale-feed alert reads this.",
        [(f"max by (symbol) (finstream_md_symbol_staleness_seconds{{{NS}}})", "{{symbol}}")],
        unit="s",
        thresholds=[(None, "green"), (120, "red")],
    )
    b.add(
        "Provider serving each chain",
        "1 for the provider a chain uses now.",
        [
            (
                f"max by (chain, provider) (finstream_md_active_provider{{{NS}}}) == 1",
                "{{chain}}: {{provider}}",
            )
        ],
        kind="state-timeline",
        width=12,
        height=6,
    )
    b.add(
        "Circuit breakers",
        "0 closed, 1 half-open (probing), 2 open (skipped).",
        [(f"max by (provider) (finstream_md_circuit_state{{{NS}}})", "{{provider}}")],
        kind="state-timeline",
        width=12,
        height=6,
        mappings=CIRCUIT,
    )
    b.add(
        "Failovers",
        "A chain moving from one provider to another, and failing back.",
        [
            (
                f"sum by (chain, from_provider, to_provider) (increase(finstream_md_failovers_total{{{NS}}}[$__rate_interval]))",
                "{{chain}}: {{from_provider}} -> {{to_provider}}",
            )
        ],
    )
    b.add(
        "Provider errors per minute by class",
        "throttled, auth, transient, malformed, unknown_symbol.",
        [
            (
                rate("finstream_md_provider_errors_total", "provider, error_class") + " * 60",
                "{{provider}} {{error_class}}",
            )
        ],
    )
    b.add(
        "Rate-limit waits",
        "Seconds per second spent waiting for tokens, and requests skipped for want of one.",
        [
            (rate("finstream_md_rate_limit_wait_seconds_total", "provider"), "wait {{provider}}"),
            (
                rate("finstream_md_rate_limited_total", "provider") + " * 60",
                "skipped/min {{provider}}",
            ),
        ],
    )
    b.add(
        "Request time p95 by provider",
        "HTTP round trips to each provider.",
        [(p_quantile(0.95, "finstream_md_request_seconds", "provider"), "{{provider}}")],
        unit="s",
    )
    b.add(
        "Coverage gaps and backfill",
        "Symbols left unobserved for two poll intervals, and ticks backfilled.",
        [
            (
                f"sum by (chain) (increase(finstream_md_coverage_gaps_total{{{NS}}}[$__rate_interval]))",
                "gaps {{chain}}",
            ),
            (
                f"sum by (provider) (increase(finstream_md_backfilled_ticks_total{{{NS}}}[$__rate_interval]))",
                "backfilled {{provider}}",
            ),
        ],
    )
    b.add(
        "Ticks suppressed per second",
        "Duplicates and refused ticks, by reason.",
        [
            (
                rate("finstream_md_ticks_suppressed_total", "provider, reason"),
                "{{provider}} {{reason}}",
            )
        ],
        unit="ops",
    )
    return b


def notifications() -> Board:
    final = 'status=~"SENT|DELIVERED|READ|FAILED|EXPIRED|REJECTED"'
    ok = 'status=~"SENT|DELIVERED|READ"'
    b = Board(
        "finstream-notifications",
        "finstream: notifications",
        "From request to provider: routing decisions, holds and releases, delivery by "
        "channel and provider with success ratio and latency.",
        ["notifications"],
    )
    b.add(
        "Delivery success ratio by channel",
        "Final outcomes accepted by a provider over all final outcomes (15 min); the alert is at 99.9 %.",
        [
            (
                f"sum by (channel) (rate(finstream_delivery_outcomes_total{{{NS},{ok}}}[15m])) / "
                f"sum by (channel) (rate(finstream_delivery_outcomes_total{{{NS},{final}}}[15m]))",
                "{{channel}}",
            )
        ],
        kind="stat",
        unit="percentunit",
        width=12,
        height=6,
        thresholds=[(None, "red"), (0.999, "green")],
        max_value=1,
    )
    b.add(
        "Users with held messages",
        "Quiet hours, deliver_at and open digests.",
        [(f"sum(finstream_router_held_users{{{NS}}})", "held users")],
        kind="stat",
        width=12,
        height=6,
    )
    b.add(
        "Routing decisions per second",
        "By outcome: routed, held, digested, suppressed, deduplicated, expired...",
        [(rate("finstream_router_decisions_total", "action"), "{{action}}")],
        unit="ops",
        stack=True,
    )
    b.add(
        "Messages routed per second by channel",
        "Outbound messages written to notify.outbound.<channel>.",
        [(rate("finstream_router_messages_total", "channel"), "{{channel}}")],
        unit="ops",
        stack=True,
    )
    b.add(
        "Held messages released",
        "Releases per second and how late after their due time (p95).",
        [
            (
                f"sum(rate(finstream_router_release_delay_seconds_count{{{NS}}}[$__rate_interval]))",
                "released/s",
            ),
            (
                f"histogram_quantile(0.95, sum by (le) (rate(finstream_router_release_delay_seconds_bucket{{{NS}}}[$__rate_interval])))",
                "delay p95 (s)",
            ),
        ],
    )
    b.add(
        "Sent per second by channel and provider",
        "Provider calls that succeeded.",
        [(rate("finstream_delivery_sent_total", "channel, provider"), "{{channel}} {{provider}}")],
        unit="ops",
        stack=True,
    )
    b.add(
        "Failures per minute by provider and class",
        "Each failover or retry starts here.",
        [
            (
                rate("finstream_delivery_failed_total", "channel, provider, error_class") + " * 60",
                "{{channel}} {{provider}} {{error_class}}",
            )
        ],
    )
    b.add(
        "Final outcomes per second",
        "What became of each message.",
        [(rate("finstream_delivery_outcomes_total", "channel, status"), "{{channel}} {{status}}")],
        unit="ops",
    )
    b.add(
        "Provider latency p95",
        "One provider call.",
        [
            (
                p_quantile(0.95, "finstream_delivery_latency_seconds", "channel, provider"),
                "{{channel}} {{provider}}",
            )
        ],
        unit="s",
    )
    b.add(
        "End-to-end latency p95",
        "From the request's creation to the provider's answer.",
        [(p_quantile(0.95, "finstream_delivery_end_to_end_seconds", "channel"), "{{channel}}")],
        unit="s",
    )
    b.add(
        "Delivery circuit breakers",
        "0 closed, 1 half-open, 2 open.",
        [
            (
                f"max by (channel, provider) (finstream_delivery_circuit_state{{{NS}}})",
                "{{channel}} {{provider}}",
            )
        ],
        kind="state-timeline",
        mappings=CIRCUIT,
    )
    b.add(
        "Retries and deferrals per minute",
        "Parked for a retry with backoff, or deferred by a rate limit.",
        [
            (
                rate("finstream_delivery_retried_total", "channel, provider") + " * 60",
                "retry {{channel}} {{provider}}",
            ),
            (
                rate("finstream_delivery_deferred_total", "channel") + " * 60",
                "deferred {{channel}}",
            ),
        ],
    )
    return b


def api() -> Board:
    b = Board(
        "finstream-api",
        "finstream: API",
        "HTTP requests by route and status, latency, WebSocket clients and the "
        "slow clients that were dropped.",
        ["api"],
    )
    b.add(
        "Requests per second",
        "All routes.",
        [(f"sum(rate(finstream_api_requests_total{{{NS}}}[$__rate_interval]))", "requests/s")],
        kind="stat",
        unit="reqps",
        width=6,
        height=6,
    )
    b.add(
        "Server errors",
        "Share of 5xx answers.",
        [
            (
                f'sum(rate(finstream_api_requests_total{{{NS},status=~"5.."}}[$__rate_interval])) / '
                f"sum(rate(finstream_api_requests_total{{{NS}}}[$__rate_interval]))",
                "5xx",
            )
        ],
        kind="stat",
        unit="percentunit",
        width=6,
        height=6,
        thresholds=[(None, "green"), (0.01, "red")],
    )
    b.add(
        "WebSocket clients",
        "Open /v1/stream connections.",
        [(f"sum(finstream_api_ws_connections{{{NS}}})", "clients")],
        kind="stat",
        width=6,
        height=6,
    )
    b.add(
        "Slow clients dropped, last hour",
        "Clients closed with 4008: their queue filled.",
        [(f"sum(increase(finstream_api_ws_dropped_total{{{NS}}}[1h]))", "dropped")],
        kind="stat",
        width=6,
        height=6,
        thresholds=[(None, "green"), (1, "orange")],
    )
    b.add(
        "Requests per second by route and status",
        "",
        [(rate("finstream_api_requests_total", "route, status"), "{{route}} {{status}}")],
        unit="reqps",
        width=24,
        height=9,
    )
    b.add(
        "Latency p95 by route",
        "",
        [(p_quantile(0.95, "finstream_api_request_seconds", "route"), "{{route}}")],
        unit="s",
    )
    b.add(
        "WebSocket frames per second",
        "Frames sent to clients by kind.",
        [(rate("finstream_api_ws_messages_total", "kind"), "{{kind}}")],
        unit="ops",
    )
    b.add(
        "Slow-client drops per minute",
        "By reason.",
        [(rate("finstream_api_ws_dropped_total", "reason") + " * 60", "{{reason}}")],
    )
    b.add(
        "Refused requests per minute",
        "Authentication failures by reason, and the rate limit.",
        [
            (rate("finstream_api_auth_failures_total", "reason") + " * 60", "auth {{reason}}"),
            (
                f"sum(rate(finstream_api_rate_limited_total{{{NS}}}[$__rate_interval])) * 60",
                "rate limited",
            ),
        ],
    )
    return b


BOARDS = {
    "finstream.json": pipeline,
    "finstream-market-data.json": market_data,
    "finstream-notifications.json": notifications,
    "finstream-api.json": api,
}


def render(name: str) -> str:
    return json.dumps(BOARDS[name]().model(), indent=2) + "\n"


def main() -> int:
    for name in BOARDS:
        (OUT / name).write_text(render(name))
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
