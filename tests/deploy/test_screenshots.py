"""The dashboards' pictures in deploy/README.md: every panel's queries evaluated and drawn.

No Grafana server can run here (test_dashboards.py says why), so
deploy/grafana/screenshots.py draws the panels from Grafana's JSON model with
matplotlib, from a local run scraped by VictoriaMetrics, and records the
samples the panels read (tests/deploy/data/metrics-sample.jsonl.gz). This
test loads that sample into a VictoriaMetrics of its own (`make tools` builds
it; a missing binary fails the test with that command), evaluates every
panel's queries from the JSON model the chart ships as Grafana's Prometheus
data source would (query_range, `$__rate_interval`, `$namespace`), checks
the answers have the shape each panel draws, and draws each dashboard to a PNG.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT

README = ROOT / "deploy" / "README.md"
MAX_PNG_BYTES = 300 * 1024


def _module() -> Any:
    path = ROOT / "deploy" / "grafana" / "screenshots.py"
    spec = importlib.util.spec_from_file_location("finstream_screenshots", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


shots = _module()


def _victoria_metrics() -> Path:
    try:
        binary: Path = shots.victoria_metrics_binary()
    except SystemExit as exc:
        pytest.fail(str(exc))
    return binary


@pytest.fixture(scope="module")
def sample_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float, float]]:
    """A VictoriaMetrics holding the recorded sample: its URL and the run's time range."""
    assert shots.SAMPLE.exists(), (
        f"{shots.SAMPLE} is missing: run `.venv/bin/python deploy/grafana/screenshots.py`"
    )
    meta = json.loads(shots.SAMPLE.with_suffix("").with_suffix(".json").read_text())
    with shots.victoria_metrics(_victoria_metrics(), tmp_path_factory.mktemp("vm")) as url:
        first, last = shots.import_sample(url, shots.SAMPLE)
        assert first <= meta["start"] + 60
        assert last >= meta["end"] - 2 * shots.SCRAPE_SECONDS
        yield url, meta["start"], meta["end"]


@pytest.fixture(scope="module")
def evaluated(sample_vm: tuple[str, float, float]) -> dict[str, list[Any]]:
    url, start, end = sample_vm
    return {
        name: shots.evaluate(url, shots.load_board(name), start, end, float(shots.SCRAPE_SECONDS))
        for name in shots.BOARDS
    }


def test_every_generated_dashboard_is_pictured() -> None:
    generated = {p.name for p in shots.DASHBOARDS.glob("finstream*.json")} - {
        "finstream-database.json",  # written by hand (issue 13): its metrics need PostgreSQL's role
    }
    assert set(shots.BOARDS) == generated


def test_the_queries_grafana_would_send() -> None:
    expr = (
        'sum by (role) (rate(finstream_events_in_total{namespace="$namespace"}[$__rate_interval]))'
    )
    assert shots.expand(expr, 5.0) == (
        'sum by (role) (rate(finstream_events_in_total{namespace="finstream"}[20s]))'
    )
    # Grafana: max(interval + scrape interval, 4 x scrape interval)
    assert shots.rate_interval(30.0) == 35
    assert (
        shots.legend(
            "{{role}} {{topic}}[{{partition}}]", {"role": "quotes", "topic": "t", "partition": "0"}
        )
        == "quotes t[0]"
    )


def test_every_panel_query_returns_data_of_the_shape_its_panel_draws(
    evaluated: dict[str, list[Any]], sample_vm: tuple[str, float, float]
) -> None:
    _url, start, end = sample_vm
    step = shots.SCRAPE_SECONDS
    problems: list[str] = []
    empty: set[str] = set()
    for name, panels in evaluated.items():
        for data in panels:
            panel = data.panel
            where = f"{name} {panel['title']!r}"
            assert len(data.queries) == len(panel["targets"]), where
            for q in data.queries:
                if "$" in q:
                    problems.append(f"{where}: a variable left in {q}")
            series = [s for s in data.series if any(not math.isnan(v) for v in s.values)]
            if not series:
                empty.add(panel["title"])
                continue
            targets = {t["refId"]: t for t in panel["targets"]}
            wanted = set()
            for t in targets.values():
                wanted |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            for s in series:
                if not s.name or "{{" in s.name:
                    problems.append(f"{where}: legend {s.name!r}")
                if s.times != sorted(s.times) or len(set(s.times)) != len(s.times):
                    problems.append(f"{where}: timestamps out of order")
                if s.times[0] < start - step or s.times[-1] > end + step:
                    problems.append(f"{where}: points outside the run")
                if any(round(b - a) % step for a, b in zip(s.times, s.times[1:], strict=False)):
                    problems.append(f"{where}: points off the {step}s step")
                if any(math.isinf(v) for v in s.values):
                    problems.append(f"{where}: infinite value in {s.name}")
                finite = [v for v in s.values if not math.isnan(v)]
                if min(finite) < 0:
                    problems.append(f"{where}: {s.name} goes negative")
                defaults = panel["fieldConfig"]["defaults"]
                if "max" in defaults and max(finite) > defaults["max"]:
                    problems.append(f"{where}: {s.name} above the panel's max {defaults['max']}")
                if defaults.get("mappings") and any(
                    shots.mapped(v, defaults) is None for v in finite
                ):
                    problems.append(f"{where}: {s.name} has a value no mapping names")
            # Over time: some series of a graph has a line, not a dot.
            longest = max(sum(not math.isnan(v) for v in s.values) for s in series)
            if panel["type"] != "stat" and longest < 3:
                problems.append(f"{where}: {longest} points at most, a graph needs more")
            # A legend's labels are in every series it names.
            if len(panel["targets"]) == 1:
                for s in series:
                    if wanted - set(s.labels):
                        problems.append(f"{where}: series lack {wanted - set(s.labels)}")
    assert not problems, "\n".join(problems)
    assert empty == set(shots.EMPTY_LOCALLY), (
        "panels empty in the recorded run differ from EMPTY_LOCALLY (what the pictures "
        f"explain): empty but not listed {sorted(empty - set(shots.EMPTY_LOCALLY))}, "
        f"listed but with data {sorted(set(shots.EMPTY_LOCALLY) - empty)}"
    )


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_every_dashboard_draws_to_a_png(evaluated: dict[str, list[Any]], tmp_path: Path) -> None:
    for name, panels in evaluated.items():
        board = shots.load_board(name)
        out = tmp_path / name.replace(".json", ".png")
        shots.draw_board(board, panels, "test", out)
        width, height = _png_size(out)
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
        assert width == round(24 * shots.COL_PX), name
        assert height == round(shots.HEADER_PX + rows * shots.ROW_PX + shots.FOOTER_PX), name
        assert out.stat().st_size < MAX_PNG_BYTES, f"{name}: {out.stat().st_size} bytes"


def test_the_readme_shows_every_dashboard_and_how_to_redraw_it() -> None:
    text = README.read_text()
    assert "DASHBOARD_PICTURES" not in text
    assert "deploy/grafana/screenshots.py" in text
    for name in shots.BOARDS:
        png = shots.OUT / name.replace(".json", ".png")
        rel = png.relative_to(README.parent).as_posix()
        assert f"]({rel})" in text, f"deploy/README.md does not show {rel}"
        assert png.exists(), f"{png} is missing: run deploy/grafana/screenshots.py"
        assert png.stat().st_size < MAX_PNG_BYTES, f"{png}: keep it under 300 KB"
        _png_size(png)
