"""Pictures of the dashboards' panels, from a local run: `.venv/bin/python deploy/grafana/screenshots.py`.

No Grafana server runs on the build machines, so this draws what each
dashboard shows with matplotlib, from Grafana's own JSON model
(helm/finstream/files/dashboards/*.json): the panels' grid positions, titles,
types, units, thresholds, value mappings, stacking and legends, and each
panel's own PromQL, evaluated the way Grafana's Prometheus data source does
(query_range over the time range, `$__rate_interval` as Grafana computes it,
`$namespace` set). It is not Grafana's renderer: fonts, spacing and colours
are an approximation.

What it does:

1. starts `finstream run` (its roles, Mailpit and the sandboxes, and the
   feedback and retention roles it leaves out by default) against the
   local stack in a namespace of its own (finstream.testing.services), with the
   Yahoo provider ahead of the simulator in the market-data chain and pointed
   at a closed local port, so that errors, a breaker and failovers show; and
   some API traffic (requests with and without a token, two WebSocket clients),
   and for the privacy dashboard the providers' webhooks and a user's export
   and erasure, through the API (privacy_traffic);
2. scrapes every role's /metrics into a local VictoriaMetrics (`make tools`
   builds it; it answers PromQL), every 5 s, as Prometheus would, with the
   labels a ServiceMonitor adds (namespace, pod, container);
3. evaluates every panel's queries over the run and draws each dashboard to
   deploy/grafana/screenshots/<dashboard>.png;
4. records the samples those queries read in tests/deploy/data/metrics-sample.jsonl.gz,
   which tests/deploy/test_screenshots.py loads into a VictoriaMetrics of its
   own to evaluate and draw every panel again.

`--from-sample` skips the run and draws from the recorded sample.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "helm" / "finstream" / "files" / "dashboards"
BOARDS = (
    "finstream.json",
    "finstream-market-data.json",
    "finstream-notifications.json",
    "finstream-api.json",
    "finstream-privacy.json",
)
OUT = ROOT / "deploy" / "grafana" / "screenshots"
SAMPLE = ROOT / "tests" / "deploy" / "data" / "metrics-sample.jsonl.gz"
TOOLS_ENV = ROOT / ".tools" / "deploy-tools.env"
# The Kubernetes namespace label Prometheus adds to every target (the chart's default).
NAMESPACE = "finstream"
SCRAPE_SECONDS = 5
# Panels a local run leaves empty, and why (the pictures say so; the test holds
# this list to what the sample shows).
EMPTY_LOCALLY = {
    "Container restarts, last hour": "no restarts (kube-state-metrics; shows only restarted pods)",
    "Dead letters, last 15 minutes": "no message reached dlq",
    "Dead letters per minute": "no message reached dlq",
    "Failed events per minute": "no event failed",
    "Ticks suppressed per second": "the simulator sends no duplicates",
    "Coverage gaps and backfill": "no coverage gap",
    # Whether a poll finds Yahoo's bucket empty is timing: some runs have a wait of a few
    # milliseconds, the one recorded none.
    "Rate-limit waits": "no Yahoo request had to wait for a token",
    "Failures per minute by provider and class": "the sandboxes accept every message",
    "Retries and deferrals per minute": "no retry or rate-limit deferral",
    "Slow clients dropped, last hour": "no slow WebSocket client",
    "Slow-client drops per minute": "no slow WebSocket client",
    "Server errors": "no 5xx answer",
    "AWS KMS requests per second (retried: throttled or failed, then tried again)": (
        "local master keys, no KMS"
    ),
}


# -- tools ---------------------------------------------------------------------------


def victoria_metrics_binary() -> Path:
    """The victoria-metrics binary `make tools` builds (.tools/deploy-tools.env)."""
    if not TOOLS_ENV.exists():
        raise SystemExit(f"{TOOLS_ENV} is missing: run `make tools`")
    values = dict(line.split("=", 1) for line in TOOLS_ENV.read_text().splitlines() if "=" in line)
    path = Path(values.get("VICTORIA_METRICS", ""))
    if not values.get("VICTORIA_METRICS") or not path.is_file():
        raise SystemExit(f"victoria-metrics ({path}) is missing: run `make tools`")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def victoria_metrics(
    binary: Path, data_dir: Path, scrape_config: Path | None = None
) -> Iterator[str]:
    """A single-node VictoriaMetrics on a free port; yields its URL."""
    port = free_port()
    args = [
        str(binary),
        f"-storageDataPath={data_dir / 'vm-data'}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-retentionPeriod=100y",
        # Answer with the newest samples too (the default hides the last 30 s),
        # and never from a cache filled before a backfill.
        "-search.latencyOffset=0s",
        "-search.disableCache",
        "-loggerLevel=ERROR",
    ]
    if scrape_config is not None:
        args.append(f"-promscrape.config={scrape_config}")
    log = (data_dir / "victoria-metrics.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"victoria-metrics exited with {proc.returncode}: "
                    f"{(data_dir / 'victoria-metrics.log').read_text()[-2000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("victoria-metrics did not answer /health within 30 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def scrape_config(targets: dict[str, int], topic_prefix: str = "") -> str:
    """Every role's /metrics, with the labels a ServiceMonitor adds; topic labels
    without the run's own topic namespace, as a deployment names them."""
    jobs = []
    for role, port in sorted(targets.items()):
        jobs.append(
            {
                "targets": [f"127.0.0.1:{port}"],
                "labels": {
                    "namespace": NAMESPACE,
                    "pod": f"fs-finstream-{role}-0",
                    "container": "worker",
                    "service": f"fs-finstream-{role}",
                },
            }
        )
    config = {
        "scrape_configs": [
            {
                "job_name": "finstream",
                "scrape_interval": f"{SCRAPE_SECONDS}s",
                "static_configs": jobs,
                "metric_relabel_configs": [
                    {
                        "source_labels": [label],
                        "regex": re.escape(topic_prefix) + "(.+)",
                        "target_label": label,
                        "replacement": "$1",
                    }
                    for label in ("topic", "source_topic")
                    if topic_prefix
                ],
            }
        ]
    }
    return json.dumps(config, indent=2)  # JSON is YAML


# -- the JSON model and its queries ------------------------------------------------------


def load_board(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return board


def board_metrics(boards: list[dict[str, Any]]) -> set[str]:
    """Metric names the panels read (histograms by their _bucket/_count series)."""
    names: set[str] = set()
    for board in boards:
        for panel in board["panels"]:
            for t in panel["targets"]:
                names |= set(re.findall(r"\b((?:finstream|kube)_\w+)\{", t["expr"]))
    return names


def rate_interval(step: float) -> int:
    """Grafana's $__rate_interval: max(interval + scrape interval, 4 x scrape interval)."""
    return int(max(step + SCRAPE_SECONDS, 4 * SCRAPE_SECONDS))


def expand(expr: str, step: float) -> str:
    """The query Grafana sends: its variables replaced."""
    expr = re.sub(r"\$\{?__rate_interval\}?", f"{rate_interval(step)}s", expr)
    return re.sub(r"\$\{?namespace\}?", NAMESPACE, expr)


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    times: list[float]
    values: list[float]


@dataclass
class PanelData:
    panel: dict[str, Any]
    series: list[Series] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    # The dashboard's time range: every graph's x axis.
    start: float = 0.0
    end: float = 0.0

    @property
    def title(self) -> str:
        return str(self.panel["title"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    got = httpx.get(
        f"{url}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": f"{step:g}s"},
        timeout=30,
    )
    body = got.json()
    if got.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"query failed ({got.status_code}): {expr}\n{body.get('error', body)}")
    if body["data"]["resultType"] != "matrix":
        raise RuntimeError(f"query_range answered {body['data']['resultType']}: {expr}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def evaluate(
    url: str, board: dict[str, Any], start: float, end: float, step: float
) -> list[PanelData]:
    """Every panel's targets over [start, end], as Grafana's Prometheus data source asks."""
    start = math.floor(start / step) * step
    end = math.floor(end / step) * step
    panels = []
    for panel in board["panels"]:
        data = PanelData(panel, start=start, end=end)
        for t in panel["targets"]:
            expr = expand(t["expr"], step)
            data.queries.append(expr)
            for r in query_range(url, expr, start, end, step):
                labels = {k: v for k, v in r["metric"].items() if k != "__name__"}
                points = [(float(ts), float(v)) for ts, v in r["values"]]
                data.series.append(
                    Series(
                        legend(t.get("legendFormat", ""), labels),
                        labels,
                        [p[0] for p in points],
                        [p[1] for p in points],
                    )
                )
        panels.append(data)
    return panels


# -- the recorded sample ----------------------------------------------------------------------


def export_sample(url: str, metrics: set[str], start: float, end: float, path: Path) -> int:
    """The raw samples of these metrics over [start, end], as VictoriaMetrics exports them."""
    names = "|".join(sorted(m + "(_bucket|_count|_sum)?" for m in metrics))
    got = httpx.get(
        f"{url}/api/v1/export",
        params={"match[]": f'{{__name__=~"{names}"}}', "start": start, "end": end},
        timeout=120,
    )
    got.raise_for_status()
    lines = sorted(line for line in got.text.splitlines() if line.strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode())
    return len(lines)


def import_sample(url: str, path: Path) -> tuple[float, float]:
    """Loads a recorded sample; returns the time range it covers (seconds)."""
    text = gzip.decompress(path.read_bytes()).decode()
    first, last = math.inf, -math.inf
    for line in text.splitlines():
        stamps = json.loads(line)["timestamps"]
        first, last = min(first, stamps[0] / 1000), max(last, stamps[-1] / 1000)
    got = httpx.post(f"{url}/api/v1/import", content=text.encode(), timeout=120)
    got.raise_for_status()
    httpx.get(f"{url}/internal/force_flush", timeout=30).raise_for_status()
    return first, last


# -- drawing ------------------------------------------------------------------------------------

BG, PANEL_BG, BORDER, TEXT, DIM, GRID = (
    "#111217",
    "#181b1f",
    "#2c3235",
    "#ccccdc",
    "#8e8e9e",
    "#2a2d33",
)
PALETTE = [
    "#73BF69",
    "#F2CC0C",
    "#8AB8FF",
    "#FF780A",
    "#F2495C",
    "#5794F2",
    "#B877D9",
    "#705DA0",
    "#37872D",
    "#FADE2A",
    "#447EBC",
    "#C15C17",
    "#890F02",
    "#0A437C",
    "#6D1F62",
    "#584477",
]
NAMED = {
    "green": "#73BF69",
    "red": "#F2495C",
    "orange": "#FF9830",
    "yellow": "#FADE2A",
    "blue": "#5794F2",
    "purple": "#B877D9",
}
COL_PX, ROW_PX, HEADER_PX, FOOTER_PX = 66.0, 34.0, 56.0, 30.0


def color(name: str) -> str:
    return NAMED.get(name, name)


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value * 100:.3g}%" if value < 0.99 else f"{value * 100:.2f}%"
    if unit == "s":
        a = abs(value)
        if a == 0:
            return "0 s"
        if a < 1e-3:
            return f"{value * 1e6:.3g} µs"
        if a < 1:
            return f"{value * 1e3:.3g} ms"
        if a < 120:
            return f"{value:.3g} s"
        return f"{value / 60:.3g} min"
    suffix = {"ops": " ops/s", "reqps": " req/s"}.get(unit, "")
    a = abs(value)
    for scale, letter in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if a >= scale:
            return f"{value / scale:.3g}{letter}{suffix}"
    if a == 0:
        return f"0{suffix}"
    return f"{value:.3g}{suffix}"


def threshold_color(value: float, defaults: dict[str, Any]) -> str:
    chosen = "green"
    for step in defaults.get("thresholds", {}).get("steps", []):
        if step.get("value") is None or value >= step["value"]:
            chosen = step["color"]
    return color(chosen)


def mapped(value: float, defaults: dict[str, Any]) -> tuple[str, str] | None:
    for mapping in defaults.get("mappings", []):
        if mapping.get("type") == "value":
            key = f"{value:g}"
            if key in mapping["options"]:
                m = mapping["options"][key]
                return str(m.get("text", key)), color(m.get("color", "green"))
    return None


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def draw_board(board: dict[str, Any], panels: list[PanelData], caption: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows = max(p.panel["gridPos"]["y"] + p.panel["gridPos"]["h"] for p in panels)
    width_px = 24 * COL_PX
    height_px = HEADER_PX + rows * ROW_PX + FOOTER_PX
    dpi = 100
    fig = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor=BG)
    plt.rcParams.update({"font.size": 8, "font.family": "DejaVu Sans"})

    def box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """Pixels from the top left to figure fractions (left, bottom, width, height)."""
        return (x / width_px, 1 - (y + h) / height_px, w / width_px, h / height_px)

    fig.text(
        12 / width_px,
        1 - 22 / height_px,
        board["title"],
        color=TEXT,
        fontsize=14,
        weight="bold",
        va="center",
    )
    fig.text(12 / width_px, 1 - 42 / height_px, caption, color=DIM, fontsize=8, va="center")
    fig.text(
        12 / width_px,
        12 / height_px,
        "Drawn from Grafana's JSON model (helm/finstream/files/dashboards/) by "
        "deploy/grafana/screenshots.py with matplotlib, not by Grafana.",
        color=DIM,
        fontsize=7.5,
        va="center",
    )
    gap = 4.0
    for data in panels:
        panel = data.panel
        g = panel["gridPos"]
        x, y = g["x"] * COL_PX + gap, HEADER_PX + g["y"] * ROW_PX + gap
        w, h = g["w"] * COL_PX - 2 * gap, g["h"] * ROW_PX - 2 * gap
        frame = fig.add_axes(box(x, y, w, h))
        frame.set_xlim(0, 1)
        frame.set_ylim(0, 1)
        frame.axis("off")
        frame.add_patch(
            Rectangle(
                (0, 0),
                1,
                1,
                facecolor=PANEL_BG,
                edgecolor=BORDER,
                linewidth=1,
                transform=frame.transAxes,
            )
        )
        frame.text(
            8 / w,
            1 - 13 / h,
            panel["title"],
            color=TEXT,
            fontsize=9,
            weight="bold",
            va="center",
            transform=frame.transAxes,
        )
        defaults = panel["fieldConfig"]["defaults"]
        unit = defaults.get("unit", "short")
        inner = (x + 8, y + 28, w - 16, h - 36)
        series = [s for s in data.series if _finite(s.values)]
        if not series:
            reason = EMPTY_LOCALLY.get(panel["title"], "")
            frame.text(0.5, 0.5, "No data", color=DIM, fontsize=12, ha="center", va="center")
            if reason:
                frame.text(
                    0.5,
                    0.5 - 18 / h,
                    f"(here: {reason})",
                    color=DIM,
                    fontsize=7.5,
                    ha="center",
                    va="center",
                )
            continue
        if panel["type"] == "stat":
            _draw_stat(fig, box, inner, series=series, defaults=defaults, unit=unit)
        elif panel["type"] == "bargauge":
            _draw_bargauge(fig, box, inner, series=series, defaults=defaults, unit=unit)
        elif panel["type"] == "table":
            _draw_table(fig, box, inner, panel=panel, series=series, unit=unit)
        elif panel["type"] == "state-timeline":
            span = (data.start, data.end)
            _draw_timeline(
                fig, box, inner, series=series, defaults=defaults, mdates=mdates, span=span
            )
        else:
            span = (data.start, data.end)
            _draw_timeseries(
                fig, box, inner, panel=panel, series=series, unit=unit, mdates=mdates, span=span
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=BG)
    plt.close(fig)
    # 256 colours without dithering: the same picture at a third of the bytes.
    from PIL import Image

    image = Image.open(buffer).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True
    )


def _draw_stat(
    fig: Any,
    box: Any,
    inner: tuple[float, ...],
    *,
    series: list[Series],
    defaults: dict[str, Any],
    unit: str,
) -> None:
    x, y, w, h = inner
    n = len(series)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    cw, ch = w / cols, h / rows
    for i, s in enumerate(sorted(series, key=lambda s: s.name)):
        value = _finite(s.values)[-1]
        ax = fig.add_axes(box(x + (i % cols) * cw + 2, y + (i // cols) * ch + 2, cw - 4, ch - 4))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor(threshold_color(value, defaults))
        for spine in ax.spines.values():
            spine.set_visible(False)
        text = mapped(value, defaults)
        shown = text[0] if text else fmt_value(value, unit)
        size = max(9.0, min(26.0, ch / 3.2))
        ax.text(
            0.5, 0.42, shown, color="white", fontsize=size, weight="bold", ha="center", va="center"
        )
        ax.text(0.5, 0.84, s.name, color="white", fontsize=8, ha="center", va="center")


def _draw_bargauge(
    fig: Any,
    box: Any,
    inner: tuple[float, ...],
    *,
    series: list[Series],
    defaults: dict[str, Any],
    unit: str,
) -> None:
    """Grafana's bar gauge (horizontal, basic, unfilled part shown): each series reduced
    to its last value, one bar each, scaled to the largest."""
    x, y, w, h = inner
    ordered = sorted(series, key=lambda s: s.name)
    values = [_finite(s.values)[-1] for s in ordered]
    top = max(*values, defaults.get("max", 0.0)) or 1.0
    row_h = min(28.0, h / len(ordered))
    label_w = min(w * 0.3, 7.0 * max(len(s.name) for s in ordered) + 8)
    value_w = 64.0
    ax = fig.add_axes(box(x, y, w, row_h * len(ordered)))
    ax.axis("off")
    ax.set_xlim(0, w)
    ax.set_ylim(len(ordered), 0)
    bar_w = w - label_w - value_w
    for i, (s, v) in enumerate(zip(ordered, values, strict=True)):
        c = threshold_color(v, defaults)
        ax.text(label_w - 8, i + 0.5, s.name, color=TEXT, fontsize=7.5, ha="right", va="center")
        ax.barh(i + 0.5, bar_w, left=label_w, height=0.7, color=GRID, linewidth=0)
        ax.barh(i + 0.5, bar_w * max(v, 0) / top, left=label_w, height=0.7, color=c, linewidth=0)
        ax.text(w, i + 0.5, fmt_value(v, unit), color=c, fontsize=8, ha="right", va="center")


def _draw_table(
    fig: Any,
    box: Any,
    inner: tuple[float, ...],
    *,
    panel: dict[str, Any],
    series: list[Series],
    unit: str,
) -> None:
    """Grafana's table after the panel's reduce transformation (series to rows): one
    row per series, its last value; rows that do not fit continue in a column beside."""
    x, y, w, h = inner
    reducers = [
        r
        for t in panel.get("transformations", [])
        if t["id"] == "reduce"
        for r in t["options"].get("reducers", [])
    ]
    if reducers != ["lastNotNull"]:
        raise ValueError(f"{panel['title']}: only a reduce to lastNotNull is drawn")
    ordered = sorted(series, key=lambda s: s.name)
    line = 14.0
    per_block = max(1, int(h / line) - 1)
    blocks = math.ceil(len(ordered) / per_block)
    block_w = w / blocks
    for b in range(blocks):
        rows = ordered[b * per_block : (b + 1) * per_block]
        ax = fig.add_axes(box(x + b * block_w, y, block_w - 12, line * (len(rows) + 1)))
        ax.axis("off")
        ax.set_xlim(0, 1)
        ax.set_ylim(len(rows) + 1, 0)
        ax.text(0, 0.5, "Field", color=DIM, fontsize=7.5, va="center", weight="bold")
        ax.text(1, 0.5, "Last *", color=DIM, fontsize=7.5, va="center", ha="right", weight="bold")
        ax.axhline(1, color=BORDER, linewidth=0.8)
        for i, s in enumerate(rows, start=1):
            ax.text(0, i + 0.5, s.name, color=TEXT, fontsize=7.5, va="center")
            value = fmt_value(_finite(s.values)[-1], unit)
            ax.text(1, i + 0.5, value, color=TEXT, fontsize=7.5, va="center", ha="right")
            ax.axhline(i + 1, color=GRID, linewidth=0.5)


def _draw_timeseries(
    fig: Any,
    box: Any,
    inner: tuple[float, ...],
    *,
    panel: dict[str, Any],
    series: list[Series],
    unit: str,
    mdates: Any,
    span: tuple[float, float],
) -> None:
    x, y, w, h = inner
    legend_w = w * 0.36 if w > 500 else w * 0.42
    ax = fig.add_axes(box(x + 52, y, w - legend_w - 60, h - 16))
    ax.set_facecolor("none")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=DIM, labelsize=7, length=0)
    ax.grid(True, color=GRID, linewidth=0.6)
    stacked = (
        panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode")
        == "normal"
    )
    ordered = sorted(series, key=lambda s: -max(_finite(s.values)))
    base: dict[float, float] = {}
    for i, s in enumerate(ordered):
        c = PALETTE[i % len(PALETTE)]
        times = [datetime.fromtimestamp(t, UTC) for t in s.times]
        values = s.values
        if stacked:
            lower = [base.get(t, 0.0) for t in s.times]
            values = [
                lo + (0.0 if math.isnan(v) else v) for lo, v in zip(lower, s.values, strict=True)
            ]
            ax.fill_between(times, lower, values, color=c, alpha=0.12, linewidth=0)
            base.update(zip(s.times, values, strict=True))
        ax.plot(times, values, color=c, linewidth=1.1)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
    ax.xaxis.set_major_locator(mdates.MinuteLocator())
    ax.set_xlim(*(datetime.fromtimestamp(t, UTC) for t in span))
    ax.yaxis.set_major_formatter(lambda v, _pos: fmt_value(v, unit))
    ax.set_ylim(bottom=0)
    # The legend: a table on the right, as the JSON model asks (displayMode table).
    lx = x + w - legend_w + 8
    leg = fig.add_axes(box(lx, y, legend_w - 8, h))
    leg.axis("off")
    leg.set_xlim(0, 1)
    leg.set_ylim(0, 1)
    line_h = 13 / h
    fits = max(1, int(1 / line_h) - 1)
    shown = ordered if len(ordered) <= fits else ordered[: fits - 1]
    chars = int((legend_w - 24) / 5.2)
    leg.text(0.0, 1 - line_h * 0.5, "Name", color=DIM, fontsize=7, va="center")
    leg.text(1.0, 1 - line_h * 0.5, "Last", color=DIM, fontsize=7, va="center", ha="right")
    for i, s in enumerate(shown):
        row = 1 - line_h * (i + 1.5)
        leg.plot([0, 0.04], [row, row], color=PALETTE[i % len(PALETTE)], linewidth=2.5)
        name = s.name if len(s.name) <= chars - 10 else s.name[: chars - 11] + "…"
        leg.text(0.06, row, name, color=TEXT, fontsize=7, va="center")
        leg.text(
            1.0,
            row,
            fmt_value(_finite(s.values)[-1], unit),
            color=TEXT,
            fontsize=7,
            va="center",
            ha="right",
        )
    if len(shown) < len(ordered):
        row = 1 - line_h * (len(shown) + 1.5)
        leg.text(
            0.06, row, f"… and {len(ordered) - len(shown)} more", color=DIM, fontsize=7, va="center"
        )


def _draw_timeline(
    fig: Any,
    box: Any,
    inner: tuple[float, ...],
    *,
    series: list[Series],
    defaults: dict[str, Any],
    mdates: Any,
    span: tuple[float, float],
) -> None:
    x, y, w, h = inner
    legend_h = 16.0
    ordered = sorted(series, key=lambda s: s.name)
    label_w = min(220.0, 7.0 * max(len(s.name) for s in ordered) + 12)
    ax = fig.add_axes(box(x + label_w, y, w - label_w, h - legend_h - 14))
    ax.set_facecolor("none")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=DIM, labelsize=7, length=0)
    seen: dict[str, str] = {}
    step = min(
        (b - a for s in ordered for a, b in zip(s.times, s.times[1:], strict=False)),
        default=SCRAPE_SECONDS,
    )
    for row, s in enumerate(ordered):
        for t, v in zip(s.times, s.values, strict=True):
            if math.isnan(v):
                continue
            text = mapped(v, defaults)
            label, c = (
                text
                if text
                else (fmt_value(v, defaults.get("unit", "short")), threshold_color(v, defaults))
            )
            seen[label] = c
            start = datetime.fromtimestamp(t, UTC)
            ax.barh(
                row,
                mdates.date2num(datetime.fromtimestamp(t + step, UTC)) - mdates.date2num(start),
                left=mdates.date2num(start),
                height=0.8,
                color=c,
                linewidth=0,
            )
    ax.set_yticks(range(len(ordered)), [s.name for s in ordered], color=TEXT, fontsize=7)
    ax.invert_yaxis()
    ax.xaxis_date(tz=UTC)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))
    ax.xaxis.set_major_locator(mdates.MinuteLocator())
    ax.set_xlim(*(datetime.fromtimestamp(t, UTC) for t in span))
    leg = fig.add_axes(box(x, y + h - legend_h, w, legend_h))
    leg.axis("off")
    leg.set_xlim(0, w)
    leg.set_ylim(0, 1)
    px = 0.0
    for label, c in seen.items():
        leg.plot([px, px + 12], [0.5, 0.5], color=c, linewidth=4)
        leg.text(px + 16, 0.5, label, color=TEXT, fontsize=7, va="center")
        px += 30 + 6 * len(label)


def draw_all(
    url: str, start: float, end: float, caption: str, out: Path
) -> dict[str, list[PanelData]]:
    step = float(SCRAPE_SECONDS)
    drawn = {}
    for name in BOARDS:
        board = load_board(name)
        panels = evaluate(url, board, start, end, step)
        draw_board(board, panels, caption, out / name.replace(".json", ".png"))
        drawn[name] = panels
    return drawn


# -- the local run ------------------------------------------------------------------------------


@dataclass
class LocalRun:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    stack_dir: Path
    api: str
    log: Path
    namespace: str
    mailpit: str
    sandbox: str
    # What the API verifies provider webhooks with (the run's own SendGrid key pair).
    sendgrid_key: Any

    def roles(self) -> dict[str, int]:
        state = json.loads((self.stack_dir / "run.json").read_text())
        return {role: int(v["port"]) for role, v in state["roles"].items()}


@contextlib.contextmanager
def fake_yahoo(symbols: list[str], outage: tuple[float, float]) -> Iterator[str]:
    """The tests' fake Yahoo Finance, answering 502 during ``outage`` (seconds from
    now): the connector fails over to the simulator and back."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.marketdata.market import FakeMarket
    from tests.fakes.marketdata.server import FakeThread
    from tests.fakes.marketdata.yahoo import FakeYahoo

    fake = FakeYahoo(FakeMarket(symbols))
    stop = threading.Event()
    started = time.monotonic()

    def script() -> None:
        while not stop.wait(1):
            elapsed = time.monotonic() - started
            fake.mode = "error500" if outage[0] <= elapsed < outage[1] else "ok"

    with FakeThread(fake) as served:
        thread = threading.Thread(target=script, daemon=True)
        thread.start()
        try:
            yield served.urls[0]
        finally:
            stop.set()
            thread.join(5)


@contextlib.contextmanager
def local_run(work: Path, minutes: float) -> Iterator[LocalRun]:
    """`finstream run` against the shared local stack, in a namespace of its own."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from finstream.sandbox.credentials import TWILIO_TOKEN
    from finstream.settings import get_settings
    from finstream.testing.services import create_env, destroy_env

    base = get_settings()
    # SendGrid signs its Event Webhook with a key pair of the account's; this run's is made here.
    sendgrid_key = ec.generate_private_key(ec.SECP256R1())
    sendgrid_public = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Yahoo serves the default chain for the first third of the run, then fails for a third.
    third = minutes * 20
    cleanup = contextlib.ExitStack()
    yahoo_url = cleanup.enter_context(fake_yahoo(base.symbols, (30 + third, 30 + 2 * third)))
    try:
        env = create_env(base, label="shots")
    except BaseException:
        cleanup.close()
        raise
    cleanup.callback(destroy_env, env, base)
    ports = {k: str(free_port()) for k in ("api", "sandbox", "apns", "smtp", "mailpit")}
    stack_dir = work / "run"
    run_env = env.env(
        run_base_port=str(free_port()),
        api_port=ports["api"],
        sandbox_port=ports["sandbox"],
        sandbox_apns_port=ports["apns"],
        mailpit_smtp_port=ports["smtp"],
        mailpit_http_port=ports["mailpit"],
        sim_rate="40",
        stack_dir=str(stack_dir),
        md_chain="yahoo,simulated",
        md_yahoo_url=yahoo_url,
        md_yahoo_cookie_url=f"{yahoo_url}/fc",
        md_poll_interval="2",
        md_circuit_reset="20",
        md_yahoo_limits="10/min",
        # The privacy dashboard reads the feedback role (the funnel, preferences changed by
        # providers' reports) and the retention role (the audit chain's scheduled walk),
        # which `finstream run` leaves out by default; the walk every 30 s, not hourly, so
        # that a few minutes show it, and no retention pass (it would drop partitions).
        run_roles=f"{base.run_roles},feedback,retention",
        audit_verify_interval="30",
        retention_interval="0",
        # Provider webhooks as a deployment receives them: SendGrid's signed events, and
        # Twilio's status callbacks signed with the (sandbox) account's token, to the URL
        # the SMS worker gives Twilio with each message.
        api_sendgrid_webhook_public_key=base64.b64encode(sendgrid_public).decode(),
        api_twilio_auth_token=TWILIO_TOKEN,
        delivery_twilio_status_callback=f"http://127.0.0.1:{ports['api']}/v1/webhooks/twilio/status",
    )
    log = work / "finstream-run.log"
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "finstream.cli", "run"],
        env=run_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (stack_dir / "run.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"finstream run did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield LocalRun(
            proc,
            run_env,
            stack_dir,
            f"http://127.0.0.1:{ports['api']}",
            log,
            env.namespace,
            mailpit=f"http://127.0.0.1:{ports['mailpit']}",
            sandbox=f"http://127.0.0.1:{ports['sandbox']}",
            sendgrid_key=sendgrid_key,
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()
        cleanup.close()


def mint(run: LocalRun, *args: str) -> str:
    """A token the run's API accepts (`finstream api token`)."""
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "api", "token", *args],
        env=run.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


@contextlib.contextmanager
def api_traffic(run: LocalRun) -> Iterator[None]:
    """What the API and notification dashboards show: requests with and without a
    valid token, two WebSocket clients streaming quotes, and a service posting a
    notification to one of the demo's personas every two seconds (every fifth
    one scheduled a minute ahead, so that it is held and released; Pierre's by
    SMS too)."""
    from finstream.cli.demo import PERSONAS

    token = mint(run, "--sub", "demo-user")
    service = mint(run, "--sub", "screenshots", "--role", "service")
    stop = threading.Event()
    streams: list[subprocess.Popen[bytes]] = []

    def notifications() -> None:
        i = 0
        with httpx.Client(base_url=run.api, timeout=5) as http:
            while not stop.wait(2):
                persona = PERSONAS[i % len(PERSONAS)]
                body: dict[str, Any] = {
                    "user_id": persona.user_id,
                    "category": "account",
                    "template": "message",
                    "data": {"title": f"Statement {i}", "body": "Your statement is ready."},
                }
                if persona.user_id == "planner-pierre":
                    # By SMS too (his preferences allow it), for the Twilio callbacks.
                    body["channels"] = ["sms", "email", "inapp"]
                if i % 5 == 4:
                    body["deliver_at"] = datetime.fromtimestamp(time.time() + 60, UTC).isoformat()
                with contextlib.suppress(httpx.HTTPError):
                    http.post(
                        "/v1/notifications",
                        json=body,
                        headers={
                            "Authorization": f"Bearer {service}",
                            "Idempotency-Key": f"screenshots-{time.time_ns()}",
                        },
                    )
                i += 1

    def requests() -> None:
        good = {"Authorization": f"Bearer {token}"}
        paths = [
            ("/v1/quotes/AAPL", good),
            ("/v1/quotes/MSFT", good),
            ("/v1/bars/AAPL?interval=1m", good),
            ("/v1/users/demo-user/inbox", good),
            ("/v1/users/demo-user/rules", good),
            ("/v1/quotes/NOSUCH", good),
            ("/v1/quotes/AAPL", {}),
            ("/v1/quotes/AAPL", {"Authorization": "Bearer not-a-token"}),
        ]
        i = 0
        with httpx.Client(base_url=run.api, timeout=5) as http:
            while not stop.is_set():
                path, headers = paths[i % len(paths)]
                with contextlib.suppress(httpx.HTTPError):
                    http.get(path, headers=headers)
                i += 1
                stop.wait(0.25)

    threads = [threading.Thread(target=f, daemon=True) for f in (requests, notifications)]
    for thread in threads:
        thread.start()
    for symbols in (["AAPL", "MSFT"], ["NVDA", "TSLA", "META"]):
        streams.append(
            subprocess.Popen(
                [sys.executable, "-m", "finstream.cli", "api", "stream", *symbols],
                env=run.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        )
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for p in streams:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


# The user who saves an address, exports their data and erases themselves; their mail
# gets no provider events (after the erasure nothing of theirs is left to attribute
# them to, and they would be dead-lettered).
LEAVER = "screenshots-leaver"
LEAVER_EMAIL = "leaver@example.com"
# From this share of the run on, one email bounces and one SMS meets a STOP: early
# enough that the preference changes they make show for most of the run. Anna's
# address bounces (Klaus, the demo's other email user, is in quiet hours).
LATE = 0.4
BOUNCES = "anna.berger@"


@contextlib.contextmanager
def privacy_traffic(run: LocalRun, minutes: float) -> Iterator[None]:
    """What the privacy dashboard shows, through the run's API as providers and users
    reach it (the feedback role turns it into the funnel and preference changes):

    * SendGrid's Event Webhook, signed, for every email Mailpit took (the run has no
      SendGrid; its events carry the message id the sender attaches as a custom
      argument, as SendGrid's do): delivered, most opened, some clicked; in the
      later part of the run one hard bounce of Anna's address, which the feedback
      role then marks bounced (later mail to it is suppressed);
    * Twilio's status callbacks, signed, for every SMS the sandbox took: delivered;
      in the later part one carrier STOP (error 21610), which opts the number out;
    * a user who saves an address (a key is created), exports what is held about
      them (`GET /v1/users/me/export`) and erases themselves (`DELETE /v1/users/me`).
    """
    from twilio.request_validator import RequestValidator

    from finstream.api.webhooks import (
        SENDGRID_SIGNATURE,
        SENDGRID_TIMESTAMP,
        TWILIO_SIGNATURE,
        sign_sendgrid,
    )
    from finstream.sandbox.credentials import TWILIO_TOKEN

    leaver = {"Authorization": f"Bearer {mint(run, '--sub', LEAVER)}"}
    twilio = RequestValidator(TWILIO_TOKEN)
    stop = threading.Event()
    started = time.monotonic()
    seen: set[str] = set()
    bounced = stopped = False
    steps = ["prefs", "export", "erase"]

    def share(message_id: str) -> int:
        return int.from_bytes(message_id.encode()[-4:], "big")

    def emails(http: httpx.Client, elapsed: float) -> None:
        nonlocal bounced
        late = elapsed > minutes * 60 * LATE
        got = http.get(f"{run.mailpit}/api/v1/messages", params={"limit": 500})
        events: list[dict[str, Any]] = []
        reported: set[str] = set()
        bounce = False
        for m in got.json().get("messages") or []:
            message_id = str(m.get("MessageID") or "").strip("<>").split("@", 1)[0]
            to = str((m.get("To") or [{}])[0].get("Address") or "")
            if not message_id or f"mail:{m['ID']}" in seen or to == LEAVER_EMAIL:
                continue
            reported.add(f"mail:{m['ID']}")
            kinds = ["delivered"]
            if late and not (bounced or bounce) and to.startswith(BOUNCES):
                kinds, bounce = ["bounce"], True
            else:
                kinds += ["open"] if share(message_id) % 4 else []
                kinds += ["click"] if share(message_id) % 3 == 0 else []
            for kind in kinds:
                event: dict[str, Any] = {
                    "email": to,
                    "timestamp": int(time.time()),
                    "event": kind,
                    "sg_event_id": f"{m['ID']}-{kind}",
                    "sg_message_id": f"mailpit-{m['ID']}",
                    "message_id": message_id,
                }
                if kind == "bounce":
                    event |= {"type": "bounce", "reason": "550 5.1.1 mailbox unavailable"}
                events.append(event)
        if events:
            body = json.dumps(events).encode()
            stamp = str(int(time.time()))
            http.post(
                f"{run.api}/v1/webhooks/sendgrid/events",
                content=body,
                headers={
                    "Content-Type": "application/json",
                    SENDGRID_TIMESTAMP: stamp,
                    SENDGRID_SIGNATURE: sign_sendgrid(run.sendgrid_key, stamp, body),
                },
            ).raise_for_status()
        seen.update(reported)
        bounced = bounced or bounce

    def sms(http: httpx.Client, elapsed: float) -> None:
        nonlocal stopped
        late = elapsed > minutes * 60 * LATE
        got = http.get(f"{run.sandbox}/api/messages", params={"channel": "sms"})
        for item in got.json().get("items") or []:
            if not item.get("message_id") or f"sms:{item['sid']}" in seen:
                continue
            form = {"MessageSid": item["sid"], "To": item["to"], "MessageStatus": "delivered"}
            stop_now = late and not stopped
            if stop_now:
                form |= {"MessageStatus": "undelivered", "ErrorCode": "21610"}
            url = f"{run.api}/v1/webhooks/twilio/status?" + urlencode(
                {"message_id": item["message_id"]}
            )
            http.post(
                url, data=form, headers={TWILIO_SIGNATURE: twilio.compute_signature(url, form)}
            ).raise_for_status()
            seen.add(f"sms:{item['sid']}")
            stopped = stopped or stop_now

    def leaving(http: httpx.Client, elapsed: float) -> None:
        if not steps or elapsed < minutes * 60 * (0.2 + 0.15 * (3 - len(steps))):
            return
        step = steps[0]
        if step == "prefs":
            got = http.put(
                f"{run.api}/v1/users/me/preferences",
                json={"emails": [LEAVER_EMAIL]},
                headers=leaver,
            )
        elif step == "export":
            got = http.get(f"{run.api}/v1/users/me/export", headers=leaver)
        else:
            got = http.delete(f"{run.api}/v1/users/me", headers=leaver)
        got.raise_for_status()
        steps.pop(0)

    def loop() -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.wait(3):
                elapsed = time.monotonic() - started
                for part in (emails, sms, leaving):
                    try:
                        part(http, elapsed)
                    except (httpx.HTTPError, ValueError) as exc:
                        # A provider retries too; the next round tries again.
                        print(f"privacy traffic: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
        print(
            f"privacy traffic: {sum(k.startswith('mail:') for k in seen)} emails and "
            f"{sum(k.startswith('sms:') for k in seen)} SMS reported on; bounce "
            f"{'sent' if bounced else 'not sent'}, STOP {'sent' if stopped else 'not sent'}, "
            f"leaver steps left {steps}"
        )


def wait_api(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"the API at {url} did not answer within {timeout:.0f} s")


def empty_panels(drawn: dict[str, list[PanelData]]) -> set[str]:
    return {
        p.title
        for panels in drawn.values()
        for p in panels
        if not any(_finite(s.values) for s in p.series)
    }


def record(minutes: float) -> int:
    binary = victoria_metrics_binary()
    work = Path(tempfile.mkdtemp(prefix="finstream-screenshots-"))
    print(f"working in {work}")
    with local_run(work, minutes) as run:
        roles = run.roles()
        print(f"finstream run started {len(roles)} roles; scraping them every {SCRAPE_SECONDS} s")
        config = work / "scrape.yaml"
        config.write_text(scrape_config(roles, run.namespace))
        with victoria_metrics(binary, work, config) as vm:
            wait_api(run.api)
            with api_traffic(run), privacy_traffic(run, minutes):
                start = time.time()
                print(f"recording for {minutes:g} minutes (log: {run.log})")
                while time.time() - start < minutes * 60:
                    if run.proc.poll() is not None:
                        raise RuntimeError(f"finstream run exited:\n{run.log.read_text()[-3000:]}")
                    time.sleep(5)
                # The last scrape lands before the window closes.
                time.sleep(SCRAPE_SECONDS + 1)
                end = time.time()
            caption = (
                f"Local run of every role (`finstream run`), "
                f"{datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M}-"
                f'{datetime.fromtimestamp(end, UTC):%H:%M} UTC; namespace="{NAMESPACE}"; '
                "the fake Yahoo ahead of the simulator, failing for a third of the run."
            )
            drawn = draw_all(vm, start, end, caption, OUT)
            boards = [load_board(n) for n in BOARDS]
            count = export_sample(vm, board_metrics(boards), start - 60, end, SAMPLE)
            (SAMPLE.with_suffix("").with_suffix(".json")).write_text(
                json.dumps({"start": start, "end": end, "caption": caption}, indent=2) + "\n"
            )
    report(drawn, count)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(drawn: dict[str, list[PanelData]], series: int | None = None) -> None:
    for name in BOARDS:
        png = OUT / name.replace(".json", ".png")
        print(f"wrote {png.relative_to(ROOT)} ({png.stat().st_size // 1024} KB)")
    if series is not None:
        print(
            f"wrote {SAMPLE.relative_to(ROOT)} ({series} series, {SAMPLE.stat().st_size // 1024} KB)"
        )
    empty = empty_panels(drawn)
    if empty != set(EMPTY_LOCALLY):
        print(f"empty panels not in EMPTY_LOCALLY: {sorted(empty - set(EMPTY_LOCALLY))}")
        print(f"EMPTY_LOCALLY panels with data: {sorted(set(EMPTY_LOCALLY) - empty)}")


def from_sample(out: Path) -> dict[str, list[PanelData]]:
    """Draws every dashboard from the recorded sample (a VictoriaMetrics of its own)."""
    binary = victoria_metrics_binary()
    meta = json.loads(SAMPLE.with_suffix("").with_suffix(".json").read_text())
    with (
        tempfile.TemporaryDirectory(prefix="finstream-screenshots-") as tmp,
        victoria_metrics(binary, Path(tmp)) as vm,
    ):
        import_sample(vm, SAMPLE)
        return draw_all(vm, meta["start"], meta["end"], meta["caption"], out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="length of the local run")
    parser.add_argument(
        "--from-sample", action="store_true", help="draw from the recorded sample, no run"
    )
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.from_sample:
        report(from_sample(OUT))
        return 0
    return record(args.minutes)


if __name__ == "__main__":
    sys.exit(main())
