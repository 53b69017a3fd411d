"""Replay of CSV and Parquet files of ticks or bars, at a chosen speed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finstream.connectors.file_feed import ReplayConnector, parse_speed, parse_time, row_to_tick
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import ProviderError
from tests.fakes.marketdata.helpers import RECEIVED, gate, options
from tests.support.clock import FakeClock

T0 = datetime(2024, 5, 10, 13, 30, tzinfo=UTC)


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


async def play(
    path: Path, speed: str, symbols: set[str] | None = None
) -> tuple[list[Tick], ReplayConnector, list[float]]:
    """Play ``path`` on a fake clock: the ticks, the connector, and when each was emitted
    (seconds after the start, on that clock)."""
    clock = FakeClock()
    conn = ReplayConnector(
        gate("replay"),
        options(max_future=timedelta(days=36500), clock=clock, sleep=clock.sleep),
        path,
        speed,
    )
    if symbols is None:
        conn.all_symbols = True
    else:
        conn.set_symbols(symbols)
    got: list[Tick] = []
    at: list[float] = []
    start = clock()

    async def emit(_: str, tick: Tick) -> None:
        got.append(tick)
        at.append(clock() - start)

    await asyncio.wait_for(conn.run(emit, asyncio.Event()), 30)
    return got, conn, at


def test_speed() -> None:
    assert parse_speed("10x") == 10
    assert parse_speed("1") == 1
    assert parse_speed("max") is None
    for bad in ("-1", "fast", "inf"):
        with pytest.raises(ValueError, match="speed"):
            parse_speed(bad)


def test_times() -> None:
    assert parse_time("2024-05-10T13:30:00Z") == T0
    assert parse_time("2024-05-10 13:30:00") == T0  # naive means UTC
    assert parse_time("1715347800") == T0
    assert parse_time("1715347800000") == T0
    assert parse_time(1715347800000000) == T0
    assert parse_time(datetime(2024, 5, 10, 13, 30)) == T0
    with pytest.raises(ProviderError):
        parse_time("yesterday")


def test_rows_of_ticks_and_bars() -> None:
    tick = row_to_tick(
        {"symbol": "aapl", "ts": "2024-05-10T13:30:00Z", "price": "183.05", "size": "100"}, RECEIVED
    )
    assert (tick.symbol, tick.kind, tick.price, tick.size, tick.source) == (
        "AAPL",
        "TRADE",
        Decimal("183.05"),
        Decimal(100),
        "replay",
    )
    bar = row_to_tick(
        {
            "symbol": "AAPL",
            "start": "2024-05-10T13:30:00Z",
            "open": "1",
            "close": "183.1",
            "volume": "900",
        },
        RECEIVED,
    )
    assert (bar.kind, bar.price, bar.size) == ("QUOTE", Decimal("183.1"), Decimal(900))
    given = row_to_tick(
        {"symbol": "AAPL", "ts": "1715347800", "price": "1", "tick_id": "orig-1"}, RECEIVED
    )
    assert given.tick_id == "orig-1"
    for bad in (
        {"symbol": "AAPL", "price": "1"},
        {"symbol": "AAPL", "ts": "x", "price": "1"},
        {"symbol": "AAPL", "ts": "1715347800", "price": "0"},
        {"ts": "1715347800", "price": "1"},
    ):
        with pytest.raises(ProviderError):
            row_to_tick(bad, RECEIVED)


async def test_csv_at_speed_with_a_bad_row_counted(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "ticks.csv",
        [
            "symbol,ts,price,size",
            "AAPL,2024-05-10T13:30:00Z,183.05,100",
            "MSFT,2024-05-10T13:30:00.5Z,414.2,10",
            "AAPL,2024-05-10T13:30:01Z,not-a-price,1",
            "AAPL,2024-05-10T13:30:02Z,183.10,50",
        ],
    )
    got, conn, at = await play(path, "10")
    assert [t.symbol for t in got] == ["AAPL", "MSFT", "AAPL"]
    assert conn.stats.rejected == 1
    assert conn.finished
    assert at == pytest.approx([0.0, 0.05, 0.2])  # two seconds of history at 10x
    assert [t.ts for t in got][-1] == T0 + timedelta(seconds=2)
    again, _, _ = await play(path, "max")
    assert [t.tick_id for t in again] == [t.tick_id for t in got]  # stable ids


async def test_parquet_bars_filtered_by_symbol(tmp_path: Path) -> None:
    n = 200
    table = pa.table(
        {
            "symbol": ["AAPL", "MSFT"] * (n // 2),
            "start": pa.array(
                [T0 + timedelta(minutes=i) for i in range(n)], pa.timestamp("us", tz="UTC")
            ),
            "open": pa.array([Decimal("100.00")] * n, pa.decimal128(12, 2)),
            "close": pa.array([Decimal("100.00") + i for i in range(n)], pa.decimal128(12, 2)),
            "volume": list(range(1, n + 1)),
        }
    )
    path = tmp_path / "bars.parquet"
    pq.write_table(table, path)
    got, conn, at = await play(path, "max", {"MSFT"})
    assert len(got) == n // 2
    assert {t.symbol for t in got} == {"MSFT"}
    assert got[0].price == Decimal("101.00")  # decimals straight from Parquet's decimal128
    assert conn.stats.skipped == n // 2
    assert set(at) == {0.0}  # "max" never pauses


async def test_a_file_that_is_not_there_or_not_a_table(tmp_path: Path) -> None:
    conn = ReplayConnector(gate("replay"), options(), tmp_path / "missing.csv")
    assert "not a file" in (conn.configuration_problem() or "")
    with pytest.raises(ValueError, match="no header"):
        await play(write_csv(tmp_path / "x.csv", ["a,b", "1,2"]), "max")
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        await play(write_csv(tmp_path / "x.json", ["{}"]), "max")
