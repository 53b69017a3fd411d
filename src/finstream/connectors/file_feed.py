"""Replay feed: plays a CSV or Parquet file of historical ticks or bars at a chosen speed.

A row is a **tick** when it has a ``price`` column, a **bar** when it has
``close`` (then ``open/high/low`` are ignored, ``volume`` becomes the size and
the tick is the bar's close). Columns, case-insensitive:

* ``symbol`` (required);
* a time: ``ts`` / ``timestamp`` / ``time`` / ``datetime`` (ISO 8601, or epoch
  seconds / milliseconds / microseconds told apart by magnitude; naive times
  are UTC), or for bars ``end`` / ``start``;
* optional ``size`` / ``volume``, ``bid``, ``ask``, ``prev_close``,
  ``currency``, ``kind`` (TRADE / QUOTE), ``tick_id``.

Rows are played in file order; the pause before a row is the difference
between its time and the first row's, divided by the speed (``max`` plays
without pauses). A row that cannot be a tick is counted and logged with its
line number, and the replay goes on. Ticks keep their historical time and a
stable id (the file's ``tick_id``, else one derived from content), so playing
a file twice publishes the same ids.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from finstream.connectors.base import ConnectorOptions, Emit, StreamConnector
from finstream.connectors.metrics import PROVIDER_ERRORS
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    epoch_to_utc,
    malformed,
    optional_positive,
    optional_size,
    price,
    provider_tick,
    quote_id,
    quote_marker,
    trade_id,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, normalize_symbol
from finstream.domain.resilience import ProviderError
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger

log = get_logger(__name__)

NAME = "replay"
_TIME_COLUMNS = ("ts", "timestamp", "time", "datetime", "end", "start", "date")


def parse_speed(value: str | float) -> float | None:
    """Playback speed: a positive factor, or None for "max" (no pauses)."""
    text = str(value).strip().lower()
    if text == "max":
        return None
    text = text.removesuffix("x")
    try:
        speed = float(text)
    except ValueError:
        raise ValueError(f"replay speed {value!r} is not a number or 'max'") from None
    if not speed > 0 or speed == float("inf"):
        raise ValueError(f"replay speed {value!r} must be positive")
    return speed


def parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return _epoch(Decimal(str(value)))
    if isinstance(value, str):
        text = value.strip()
        try:
            return _epoch(Decimal(text))
        except ArithmeticError:
            pass
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise malformed(NAME, f"time {value!r} is not ISO 8601 or epoch", "bad_time") from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    raise malformed(NAME, f"time {value!r} is not a time", "bad_time")


def _epoch(number: Decimal) -> datetime:
    if not number.is_finite():
        raise malformed(NAME, f"time {number} is not finite", "bad_time")
    magnitude = abs(number)
    unit = "s" if magnitude < 10**11 else "ms" if magnitude < 10**14 else "us"
    return epoch_to_utc(number, NAME, unit)


def row_to_tick(row: Mapping[str, Any], received_at: datetime) -> Tick:
    """One file row (keys lower-cased) as a tick; raises ProviderError when it cannot be one."""
    try:
        symbol = normalize_symbol(row.get("symbol"))
    except TickValidationError as exc:
        raise malformed(NAME, exc.detail, "bad_symbol") from None
    stamp = next((row[c] for c in _TIME_COLUMNS if row.get(c) not in (None, "")), None)
    if stamp is None:
        raise malformed(NAME, f"no time column ({', '.join(_TIME_COLUMNS)})", "missing_field")
    ts = parse_time(stamp)
    is_bar = row.get("price") in (None, "") and row.get("close") not in (None, "")
    last = price(
        row.get("close") if is_bar else row.get("price"), NAME, "close" if is_bar else "price"
    )
    size = optional_size(
        row.get("volume") if is_bar else row.get("size", row.get("volume")), NAME, "size"
    )
    kind = str(row.get("kind") or ("QUOTE" if is_bar else "TRADE")).strip().upper()
    given_id = row.get("tick_id")
    if given_id not in (None, ""):
        tick_id = str(given_id)
    elif kind == "TRADE":
        tick_id = trade_id(symbol, ts, last, size)
    else:
        tick_id = quote_id(symbol, ("bar:" if is_bar else "") + quote_marker(ts), last, size)
    currency = row.get("currency")
    return provider_tick(
        NAME,
        tick_id=tick_id,
        symbol=symbol,
        kind=kind,
        price=last,
        size=size,
        bid=optional_positive(row.get("bid"), NAME, "bid"),
        ask=optional_positive(row.get("ask"), NAME, "ask"),
        prev_close=optional_positive(row.get("prev_close"), NAME, "prev_close"),
        currency=str(currency).upper() if currency not in (None, "") else None,
        ts=ts,
        received_at=received_at,
        source=NAME,
    )


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, row with lower-case keys) from a CSV or Parquet file, streamed."""
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, {str(k).lower(): v for k, v in row.items()}
    elif suffix in (".csv", ".txt"):
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "symbol" not in [f.lower() for f in reader.fieldnames]:
                raise ValueError(f"{path}: no header with a 'symbol' column")
            for row in reader:
                yield reader.line_num, {k.lower(): v for k, v in row.items() if k is not None}
    else:
        raise ValueError(f"{path}: replay reads .csv or .parquet files")


@dataclass
class ReplayStats:
    played: int = 0
    rejected: int = 0
    skipped: int = 0  # rows of symbols not wanted


class ReplayConnector(StreamConnector):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = "Replay of a CSV or Parquet file of ticks or bars"
    documented_limits: ClassVar[str] = "none (local file)"

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        path: Path | None,
        speed: str | float = "1",
    ) -> None:
        super().__init__(gate, options)
        self.path = path
        self.speed = parse_speed(speed)
        self.stats = ReplayStats()
        self.running = False
        self.all_symbols = False  # the `connect` command plays every symbol in the file

    def configuration_problem(self) -> str | None:
        if self.path is None:
            return "no file (FINSTREAM_MD_REPLAY_PATH)"
        if not self.path.is_file():
            return f"{self.path} is not a file"
        return None

    def healthy(self, now: float) -> bool:
        return self.running and not self.finished

    def status(self, now: float) -> str:
        if self.finished:
            return f"finished: {self.stats.played} played, {self.stats.rejected} rejected"
        return "playing" if self.running else "not started"

    async def run(self, emit: Emit, stop: asyncio.Event) -> None:
        problem = self.configuration_problem()
        if problem is not None:
            raise ValueError(problem)
        assert self.path is not None
        while not self.all_symbols and not self.want:
            # In a chain, play only once the chain asks for symbols.
            self._changed.clear()
            waiter = asyncio.create_task(self._changed.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if stop.is_set():
                return
        self.running = True
        first_ts: datetime | None = None
        started = self.options.clock()
        try:
            for number, row in read_rows(self.path):
                if stop.is_set():
                    return
                try:
                    tick = self.validated(row_to_tick(row, utcnow()))
                except ProviderError as exc:
                    self.stats.rejected += 1
                    PROVIDER_ERRORS.labels(NAME, exc.error_class.value).inc()
                    log.warning(
                        "replay row rejected", file=str(self.path), row=number, error=str(exc)
                    )
                    continue
                if not self.all_symbols and tick.symbol not in self.want:
                    self.stats.skipped += 1
                    continue
                if self.speed is not None:
                    first_ts = first_ts or tick.ts
                    due = started + (tick.ts - first_ts).total_seconds() / self.speed
                    if await self.wait(stop, due - self.options.clock()):
                        return
                else:
                    await asyncio.sleep(0)  # let the publisher and the chain breathe
                # received_at is when it was played, not when the row was read
                await emit(self.name, dataclasses.replace(tick, received_at=utcnow()))
                self.stats.played += 1
            self.finished = True
            log.info("replay finished", file=str(self.path), **vars(self.stats))
        finally:
            self.running = False
