"""Back-testing alert rules on history: what would these rules have fired?

The evaluation is :func:`finstream.domain.alerts.engine.evaluate`, the very
function the live alerts agent runs, fed with the same ticks in the same
order, so a back-test over the ticks the agent saw reports the firings the
agent made (same fired ids). Two sources of history:

``kafka``
    ``md.ticks`` from the offsets of the start time (Kafka's time index,
    ``--slack`` earlier because record timestamps and exchange times differ
    slightly) to the end of each partition as it was when the test began, in
    offset order: exactly the order the live agent evaluates. Ticks are kept
    by exchange time within ``[from, to)``.
``postgres``
    The ``ticks`` table (the history sink's copy), ordered per symbol by
    exchange time. It reaches further back than Kafka's retention; when the
    feed delivered ticks out of order, the live agent skipped the stale ones
    while this order does not, so results can differ there.

Differences from live evaluation, on purpose: rules apply to the whole period
whatever their ``created_at`` (that is the question a back-test asks), and
ticks that fail validation are counted, not dead-lettered.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from finstream.codec import DecodeError
from finstream.domain.alerts.books import RuleBook
from finstream.domain.alerts.engine import SymbolState, evaluate
from finstream.domain.alerts.firings import Firing
from finstream.domain.alerts.rules import AlertRule, RuleValidationError, parse_rule
from finstream.domain.marketdata.bars import Interval, decimal_text
from finstream.domain.marketdata.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.time import utcnow
from finstream.runtime.topic_reader import read_range
from finstream.settings import Settings
from finstream.topics import Contract


class BacktestError(ValueError):
    """Bad back-test input (rules file, time range); the message says what and where."""


# -- rules files -------------------------------------------------------------------------


def load_rules(path: Path, *, now: datetime) -> list[AlertRule]:
    """Rules from JSON (a list, or {"rules": [...]}), JSON lines, or YAML.

    Every rule is validated like user input (``parse_rule``) with ``now`` as
    the present, so an expiry must fall after the start of the tested period.
    Rules without a rule_id get ``<file stem>-<n>``.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise BacktestError(f"cannot read rules file {path}: {exc.strerror}") from None
    docs = _parse_rules_text(text, path)
    rules: list[AlertRule] = []
    seen: set[str] = set()
    for n, raw in enumerate(docs, start=1):
        if not isinstance(raw, dict):
            raise BacktestError(f"{path}: rule #{n} is not an object")
        doc = {"rule_id": f"{path.stem}-{n}", "user_id": "backtest", **raw}
        try:
            rule = parse_rule(doc, now=now)
        except RuleValidationError as exc:
            raise BacktestError(f"{path}: rule #{n}: {exc.message}") from None
        if rule.rule_id in seen:
            raise BacktestError(f"{path}: rule #{n}: rule_id {rule.rule_id!r} appears twice")
        seen.add(rule.rule_id)
        rules.append(rule)
    if not rules:
        raise BacktestError(f"{path}: no rules")
    return rules


def _parse_rules_text(text: str, path: Path) -> list[Any]:
    stripped = text.strip()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(stripped)
        except yaml.YAMLError as exc:
            raise BacktestError(f"{path}: not valid YAML: {exc}") from None
    elif path.suffix == ".jsonl" or (stripped.startswith("{") and "\n{" in stripped):
        doc = []
        for lineno, line in enumerate(stripped.splitlines(), start=1):
            if line.strip():
                try:
                    doc.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BacktestError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
    else:
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise BacktestError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if isinstance(doc, dict):
        doc = doc.get("rules", [doc])
    if not isinstance(doc, list):
        raise BacktestError(f"{path}: expected a list of rules")
    return doc


# -- the evaluation ------------------------------------------------------------------------


@dataclass
class Backtest:
    """Feeds ticks through the live evaluation, symbol by symbol, collecting firings."""

    rules: Sequence[AlertRule]
    interval: Interval
    since: datetime
    until: datetime
    max_future: timedelta = timedelta(seconds=300)
    firings: list[Firing] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    _books: dict[str, RuleBook] = field(default_factory=dict)
    _states: dict[str, SymbolState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.until <= self.since:
            raise BacktestError("--to must be after --from")
        by_symbol: dict[str, list[AlertRule]] = {}
        for r in self.rules:
            by_symbol.setdefault(r.symbol, []).append(r)
        self._books = {s: RuleBook.build(rs, self.interval) for s, rs in by_symbol.items()}

    @property
    def symbols(self) -> list[str]:
        return sorted(self._books)

    def feed(self, tick: Tick) -> list[Firing]:
        self.counts["read"] += 1
        if not self.since <= tick.ts < self.until:
            self.counts["outside range"] += 1
            return []
        book = self._books.get(tick.symbol)
        if book is None:
            self.counts["no rules"] += 1
            return []
        try:
            validate_tick(tick, utcnow(), self.max_future)
        except TickValidationError:
            self.counts["invalid"] += 1
            return []
        ev = evaluate(
            self._states.get(tick.symbol, SymbolState()), book, tick, respect_created_at=False
        )
        if ev.stale or ev.duplicate:
            self.counts["stale" if ev.stale else "duplicate"] += 1
            return []
        self.counts["evaluated"] += 1
        self._states[tick.symbol] = ev.state
        self.firings.extend(ev.firings)
        return list(ev.firings)


# -- sources ---------------------------------------------------------------------------------


@dataclass
class KafkaSource:
    """md.ticks from ``since - slack`` to the end each partition had when the test began."""

    settings: Settings
    ticks_topic: Contract
    since: datetime
    slack: timedelta = timedelta(minutes=5)
    misrouted: int = 0
    undecodable: int = 0

    def ticks(self, on_progress: Callable[[int, int], None] | None = None) -> Iterator[Tick]:
        """Ticks in offset order per partition (a symbol's ticks share one); a tick on
        the wrong partition is skipped, as the live agent does (its rules live elsewhere).

        Raises :class:`~finstream.runtime.topic_reader.TopicReadError`.
        """
        for record in read_range(
            self.settings,
            self.ticks_topic.name,
            self.since - self.slack,
            None,
            isolation="read_committed",
            group="finstream-backtest",
            on_progress=on_progress,
        ):
            try:
                tick = Tick.from_record(self.ticks_topic.decode_record(record.value))
            except DecodeError:
                self.undecodable += 1
                continue
            if self.ticks_topic.partition(tick.symbol.encode()) != record.partition:
                self.misrouted += 1
                continue
            yield tick


async def postgres_ticks(
    database_url: str, since: datetime, until: datetime, symbols: Sequence[str]
) -> tuple[int, Any]:
    """(row count, async iterator of ticks) from the ticks table."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    total = await conn.fetchval(
        "SELECT count(*) FROM ticks WHERE ts >= $1 AND ts < $2 AND symbol = ANY($3)",
        since,
        until,
        list(symbols),
    )

    async def rows() -> Any:
        try:
            async with conn.transaction():
                async for r in conn.cursor(
                    "SELECT * FROM ticks WHERE ts >= $1 AND ts < $2 AND symbol = ANY($3) "
                    "ORDER BY symbol, ts, received_at, tick_id",
                    since,
                    until,
                    list(symbols),
                    prefetch=2000,
                ):
                    yield Tick(
                        tick_id=r["tick_id"],
                        symbol=r["symbol"],
                        price=r["price"],
                        ts=r["ts"],
                        received_at=r["received_at"],
                        source=r["source"],
                        kind=r["kind"],
                        size=r["size"],
                        bid=r["bid"],
                        ask=r["ask"],
                        prev_close=r["prev_close"],
                        currency=r["currency"],
                    )
        finally:
            await conn.close()

    return int(total), rows()


# -- output ------------------------------------------------------------------------------------

COLUMNS = (
    "tick_ts",
    "symbol",
    "rule_id",
    "user_id",
    "condition",
    "frequency",
    "price",
    "tick_id",
    "at_bar_close",
    "fired_id",
)


def firing_row(f: Firing) -> dict[str, Any]:
    return {
        "tick_ts": f.tick_ts.isoformat(),
        "symbol": f.rule.symbol,
        "rule_id": f.rule.rule_id,
        "user_id": f.rule.user_id,
        "condition": f.rule.condition,
        "frequency": f.rule.frequency,
        "price": decimal_text(f.price),
        "tick_id": f.tick_id,
        "at_bar_close": f.at_bar_close,
        "fired_id": f.fired_id,
    }


def write_firings(firings: Iterable[Firing], out: IO[str], fmt: str) -> int:
    rows = [firing_row(f) for f in sorted(firings, key=lambda f: (f.tick_ts, f.rule.rule_id))]
    if fmt == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    else:
        buf = io.StringIO()
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in COLUMNS[:9]}
        buf.write("  ".join(c.ljust(widths[c]) for c in widths).rstrip() + "\n")
        for row in rows:
            buf.write("  ".join(str(row[c]).ljust(widths[c]) for c in widths).rstrip() + "\n")
        out.write(buf.getvalue())
    return len(rows)
