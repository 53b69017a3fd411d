"""`finstream status`: one table of every role and service of a `finstream run`.

For each worker role it reads what any operator can read: ``/readyz`` (up,
ready, the reason when not) and ``/metrics`` (consumer lag, events in/out,
dead letters) on the role's health port, and the last error line of its
log. Ports and logs come from ``.stack/run.json`` (written by
``finstream run``), or from ``FINSTREAM_RUN_ROLES`` and
``FINSTREAM_RUN_BASE_PORT`` when no run file exists. Throughput is the
change of the events counter over the last minute: every call appends a
sample to ``.stack/status-samples.json``, so ``--watch`` (or two calls a
minute apart) measures it; a first call takes two samples a few seconds
apart. Services (Kafka, PostgreSQL, Redis, Mailpit, the sandbox) get a row
each: up or not, and where.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from finstream.settings import Settings

WINDOW = 60.0
FIRST_SAMPLE_GAP = 3.0
ERROR_TAIL_BYTES = 256 * 1024


@dataclass
class RoleRow:
    role: str
    port: int
    up: bool = False
    ready: bool = False
    reason: str = ""
    lag: float | None = None
    events: float | None = None  # counter: events in (or out, for sources; requests for the api)
    dead_letters: float | None = None
    rate: float | None = None
    rate_window: float | None = None
    last_error: str = ""


def parse_metrics(text: str) -> dict[str, float]:
    """The figures the table shows, summed over their labels."""
    sums = {"lag": 0.0, "in": 0.0, "out": 0.0, "dlq": 0.0, "api": 0.0}
    seen: set[str] = set()
    names = {
        "finstream_consumer_lag": "lag",
        "finstream_events_in_total": "in",
        "finstream_events_out_total": "out",
        "finstream_dead_letters_total": "dlq",
        "finstream_api_requests_total": "api",
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = names.get(sample.name)
            if key is not None:
                sums[key] += float(sample.value)
                seen.add(key)
    return {k: v for k, v in sums.items() if k in seen}


def events_counter(figures: Mapping[str, float]) -> float | None:
    for key in ("in", "api", "out"):
        if figures.get(key):
            return figures[key]
    return figures.get("in")


def last_error(log: Path) -> str:
    """The newest error-level line of a structlog JSON log: "HH:MM:SS event"."""
    try:
        with log.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(size - ERROR_TAIL_BYTES, 0))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if '"level": "error"' not in line and '"level": "critical"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            stamp = str(entry.get("timestamp", ""))[11:19]
            return f"{stamp} {entry.get('event', '')}".strip()
    return ""


def rate(
    samples: Sequence[tuple[float, float]], now: float, value: float
) -> tuple[float | None, float | None]:
    """Events per second since the oldest sample within the window (and that span)."""
    older = [(t, v) for t, v in samples if now - t <= WINDOW + 5 and now - t >= 1.0]
    if not older:
        return None, None
    t0, v0 = min(older)
    if value < v0:  # the role restarted: its counter began again
        return None, None
    return (value - v0) / (now - t0), now - t0


def run_file(settings: Settings) -> Path:
    """Where `finstream run` writes what it started (read by `finstream status`)."""
    return settings.stack_dir / "run.json"


def targets(settings: Settings) -> tuple[dict[str, int], dict[str, str | None]]:
    """(role -> health port, sandbox name -> URL) of the current run."""
    path = run_file(settings)
    with contextlib.suppress(OSError, ValueError, KeyError):
        state = json.loads(path.read_text())
        roles = {r: int(v["port"]) for r, v in state["roles"].items()}
        return roles, dict(state.get("sandboxes") or {})
    names = [r.strip() for r in settings.run_roles.split(",") if r.strip()]
    roles = {r: settings.run_base_port + i for i, r in enumerate(names)}
    sandboxes: dict[str, str | None] = {}
    if settings.run_sandboxes:
        sandboxes = {"mailpit": settings.mailpit_url, "sandbox": settings.sandbox_url}
    return roles, sandboxes


def _probe(client: httpx.Client, row: RoleRow, host: str) -> None:
    base = f"http://{host}:{row.port}"
    try:
        ready = client.get(f"{base}/readyz")
    except httpx.HTTPError:
        row.reason = "not answering"
        return
    row.up = True
    with contextlib.suppress(ValueError):
        body = ready.json()
        row.ready = bool(body.get("ready"))
        row.reason = "" if row.ready else str(body.get("reason") or body.get("checks") or "")
    with contextlib.suppress(httpx.HTTPError, ValueError):
        figures = parse_metrics(client.get(f"{base}/metrics").text)
        row.lag = figures.get("lag")
        row.events = events_counter(figures)
        row.dead_letters = figures.get("dlq", 0.0)


def collect(settings: Settings, *, sleep: Any = time.sleep) -> list[RoleRow]:
    roles, _ = targets(settings)
    rows = [RoleRow(role, port) for role, port in roles.items()]
    samples_file = settings.stack_dir / "status-samples.json"
    history: dict[str, list[list[float]]] = {}
    with contextlib.suppress(OSError, ValueError):
        history = json.loads(samples_file.read_text())
    with httpx.Client(timeout=settings.status_timeout) as client:
        for row in rows:
            _probe(client, row, settings.http_host)
        now = time.time()
        fresh = any(
            len([s for s in history.get(r.role, []) if now - s[0] <= WINDOW + 5]) == 0
            for r in rows
            if r.events is not None
        )
        if fresh:
            # No sample to compare with: take a second one a little later.
            for row in rows:
                if row.events is not None:
                    history.setdefault(row.role, []).append([now, row.events])
            sleep(FIRST_SAMPLE_GAP)
            for row in rows:
                _probe(client, row, settings.http_host)
            now = time.time()
    for row in rows:
        if row.events is None:
            continue
        kept = [s for s in history.get(row.role, []) if now - s[0] <= WINDOW + 5]
        row.rate, row.rate_window = rate([(t, v) for t, v in kept], now, row.events)
        kept.append([now, row.events])
        history[row.role] = kept
        row.last_error = last_error(settings.stack_dir / "logs" / f"{row.role}.log")
    for row in rows:
        if row.events is None:
            row.last_error = last_error(settings.stack_dir / "logs" / f"{row.role}.log")
    with contextlib.suppress(OSError):
        samples_file.parent.mkdir(parents=True, exist_ok=True)
        samples_file.write_text(json.dumps(history))
    return rows


def services(settings: Settings) -> list[tuple[str, bool, str]]:
    """(name, up, where) of the stack's services and the run's sandboxes."""
    from finstream.stack import Stack

    out = [(s.name, s.running, s.where) for s in Stack(settings).status()]
    _, sandboxes = targets(settings)
    checks = {
        "mailpit": ("/readyz", "Mailpit (email)"),
        "sandbox": ("/api/messages", "push + SMS sandbox"),
    }
    with httpx.Client(timeout=settings.status_timeout) as client:
        for name, url in sandboxes.items():
            if not url or name not in checks:
                continue
            path, label = checks[name]
            try:
                up = client.get(url + path).status_code < 500
            except httpx.HTTPError:
                up = False
            out.append((label, up, url))
    return out


def _num(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(rows: Sequence[RoleRow], svc: Sequence[tuple[str, bool, str]]) -> str:
    head = f"{'ROLE':<15} {'PORT':>5}  {'UP':<4} {'READY':<6} {'LAG':>6} {'EVENTS/S':>9} {'DLQ':>5}  LAST ERROR"
    lines = [head]
    for r in rows:
        ready = "yes" if r.ready else ("no" if r.up else "-")
        per_s = _num(r.rate, "{:.1f}")
        if r.rate is not None and r.rate_window is not None and r.rate_window < WINDOW - 5:
            per_s += "*"
        problem = r.last_error or ("" if r.ready else r.reason)
        lines.append(
            f"{r.role:<15} {r.port:>5}  {'up' if r.up else 'down':<4} {ready:<6} "
            f"{_num(r.lag):>6} {per_s:>9} {_num(r.dead_letters):>5}  {problem[:70]}"
        )
    lines.append("")
    lines.append(f"{'SERVICE':<22} {'UP':<5} WHERE")
    lines += [f"{name:<22} {'up' if up else 'down':<5} {where}" for name, up, where in svc]
    if any(
        r.rate is not None and r.rate_window is not None and r.rate_window < WINDOW - 5
        for r in rows
    ):
        lines.append("")
        lines.append("* over less than a minute (no older sample yet; --watch builds one up)")
    return "\n".join(lines)
