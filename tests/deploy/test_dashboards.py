"""The Grafana dashboards and the alert rules an operator opens first (issue 15).

No Grafana server can run here (it is under the AGPL, and Grafana's
dashboard-linter is not served by the Go module proxy), so the JSON model is
linted here instead: what Grafana needs to load and draw each panel, the
layout, the variables, and each query's legend against the labels the query
keeps. Every query names only metrics the code defines
(test_chart.py::test_alert_and_dashboard_queries_parse_and_use_real_metrics);
deploy/grafana/screenshots.py draws the panels' data from a local run into
deploy/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Any

import pytest

from .conftest import ROOT, Render

DASHBOARDS = ROOT / "helm" / "finstream" / "files" / "dashboards"
GENERATED = (
    "finstream.json",
    "finstream-market-data.json",
    "finstream-notifications.json",
    "finstream-api.json",
)
PANEL_TYPES = {"timeseries", "stat", "state-timeline", "table", "bargauge", "gauge", "text"}
VARIABLES = {"datasource", "namespace", "__rate_interval"}


def generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "dashboards", ROOT / "deploy" / "grafana" / "dashboards.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return board


def test_dashboards_are_what_the_generator_writes() -> None:
    gen = generator()
    assert set(gen.BOARDS) == set(GENERATED)
    for name in GENERATED:
        assert (DASHBOARDS / name).read_text() == gen.render(name), (
            f"{name} differs from deploy/grafana/dashboards.py: run it"
        )


def _grouping(expr: str) -> set[str]:
    """Labels that survive the query's aggregations (every `by (...)` list)."""
    labels: set[str] = set()
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    return labels - {"le"}


@pytest.mark.parametrize("name", sorted(p.name for p in DASHBOARDS.glob("*.json")))
def test_dashboard_json_model_lints_clean(name: str) -> None:
    board = load(name)
    problems: list[str] = []
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        if key not in board:
            problems.append(f"no {key}")
    declared = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace"} <= declared, name
    ids = [p["id"] for p in board["panels"]]
    if len(ids) != len(set(ids)):
        problems.append("panel ids repeat")
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("type") not in PANEL_TYPES:
            problems.append(f"{where}: unknown type {panel.get('type')}")
        if not panel.get("title"):
            problems.append(f"{where}: no title")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource is not the ${{datasource}} variable")
        grid = panel["gridPos"]
        if grid["x"] + grid["w"] > 24 or min(grid.values()) < 0:
            problems.append(f"{where}: outside the 24-column grid")
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    problems.append(f"{where}: overlaps {cells[(x, y)]}")
                cells[(x, y)] = where
        if "unit" not in panel.get("fieldConfig", {}).get("defaults", {}):
            problems.append(f"{where}: no unit")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no query")
        refs = [t["refId"] for t in targets]
        if len(refs) != len(set(refs)):
            problems.append(f"{where}: refIds repeat")
        for t in targets:
            expr = t["expr"]
            for var in re.findall(r"\$\{?(\w+)", expr):
                if var not in VARIABLES:
                    problems.append(f"{where}: unknown variable ${var}")
            if 'namespace="$namespace"' not in expr:
                problems.append(f"{where}: query not scoped to $namespace: {expr}")
            # A counter is only ever read through rate() or increase().
            for counter in re.findall(r"\b(finstream_\w+_total)\b", expr):
                if not re.search(rf"(rate|increase)\({counter}\{{", expr):
                    problems.append(f"{where}: raw counter {counter}")
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            kept = _grouping(expr)
            if legend - kept:
                problems.append(f"{where}: legend names {legend - kept}, the query keeps {kept}")
    assert not problems, "\n".join(problems)


def test_dashboards_cover_what_an_operator_opens_first() -> None:
    uids = {load(n)["uid"] for n in (p.name for p in DASHBOARDS.glob("*.json"))}
    assert len(uids) == len(list(DASHBOARDS.glob("*.json"))), "dashboard uids must be unique"

    def queries(name: str) -> str:
        return "\n".join(t["expr"] for p in load(name)["panels"] for t in p["targets"])

    pipeline = queries("finstream.json")
    for metric in (
        "finstream_events_in_total",
        "finstream_consumer_lag",
        "finstream_dead_letters_total",
        "kube_pod_container_status_restarts_total",
    ):
        assert metric in pipeline, metric
    assert "by (role, topic, partition)" in pipeline
    market = queries("finstream-market-data.json")
    for metric in (
        "finstream_md_ticks_published_total",
        "finstream_md_symbol_staleness_seconds",
        "finstream_md_failovers_total",
        "finstream_md_circuit_state",
        "finstream_md_rate_limit_wait_seconds_total",
    ):
        assert metric in market, metric
    notify = queries("finstream-notifications.json")
    for metric in (
        "finstream_router_decisions_total",
        "finstream_router_release_delay_seconds",
        "finstream_router_held_users",
        "finstream_delivery_outcomes_total",
        "finstream_delivery_latency_seconds",
    ):
        assert metric in notify, metric
    api = queries("finstream-api.json")
    for metric in (
        "finstream_api_requests_total",
        "finstream_api_ws_connections",
        "finstream_api_ws_dropped_total",
    ):
        assert metric in api, metric


def test_every_dashboard_ships_in_the_chart(renders: dict[str, Render]) -> None:
    (config,) = renders["prod"].of_kind("ConfigMap")
    assert set(config["data"]) == {p.name for p in DASHBOARDS.glob("*.json")}
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"


def _alerts(render: Render) -> dict[str, dict[str, Any]]:
    return {
        r["alert"]: r
        for rule in render.of_kind("PrometheusRule")
        for g in rule["spec"]["groups"]
        for r in g["rules"]
    }


def test_the_alerts_an_operator_needs_exist_with_their_thresholds(
    renders: dict[str, Render],
) -> None:
    alerts = _alerts(renders["prod"])
    wanted = {
        "FinstreamMarketDataStale": "finstream_md_symbol_staleness_seconds",
        "FinstreamDeadLettersGrowing": "finstream_dead_letters_total",
        "FinstreamConsumerLagHigh": "finstream_consumer_lag",
        "FinstreamDeliverySuccessLow": "finstream_delivery_outcomes_total",
        "FinstreamDeliveryCircuitOpen": "finstream_delivery_circuit_state",
        "FinstreamMarketDataCircuitOpen": "finstream_md_circuit_state",
        "FinstreamAuditChainBroken": "finstream_audit_chain_ok",
    }
    for alert, metric in wanted.items():
        rule = alerts[alert]
        assert metric in rule["expr"], alert
        assert rule["labels"]["severity"] in ("warning", "critical"), alert
        assert rule["annotations"]["summary"], alert
        assert 'namespace="finstream"' in rule["expr"], alert
    assert alerts["FinstreamDeliverySuccessLow"]["expr"].rstrip().endswith("< 0.999")
    assert "> 300" in alerts["FinstreamMarketDataStale"]["expr"]
    assert alerts["FinstreamAuditChainBroken"]["labels"]["severity"] == "critical"
