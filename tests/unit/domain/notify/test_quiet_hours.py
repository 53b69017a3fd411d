"""Quiet hours across time zones and daylight-saving transitions."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from finstream.domain.notify.preferences_view import QuietWindow
from finstream.domain.notify.quiet_hours import is_quiet, next_allowed

# Zones with DST in both hemispheres, a 30-minute DST shift, odd offsets, none.
ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "America/Los_Angeles",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/St_Johns",
    "Asia/Kolkata",
    "UTC",
]
ALL_DAYS = frozenset(range(1, 8))


def w(start: str, end: str | None, days: frozenset[int] = ALL_DAYS) -> QuietWindow:
    s = time.fromisoformat(start)
    return QuietWindow(days, s, None if end is None else time.fromisoformat(end))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def local(zone: str, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(zone), fold=fold).astimezone(UTC)  # type: ignore[misc]


# -- examples -----------------------------------------------------------------------


def test_overnight_window_in_the_users_zone() -> None:
    windows = [w("22:00", "01:00")]
    # 23:30 in New York is 03:30 UTC the next day: quiet there, not in UTC.
    at = local("America/New_York", 2025, 6, 10, 23, 30)
    assert is_quiet(windows, "America/New_York", at)
    assert not is_quiet(windows, "UTC", at)
    assert next_allowed(windows, "America/New_York", at) == local(
        "America/New_York", 2025, 6, 11, 1, 0
    )


def test_days_are_the_days_a_window_starts() -> None:
    friday_night = [w("22:00", "07:00", frozenset({5}))]
    # Saturday 06:00 is inside Friday's window; Saturday 23:00 is not quiet.
    assert is_quiet(friday_night, "UTC", utc(2025, 6, 14, 6, 0))
    assert not is_quiet(friday_night, "UTC", utc(2025, 6, 14, 23, 0))
    assert not is_quiet(friday_night, "UTC", utc(2025, 6, 12, 23, 0))  # Thursday


def test_end_of_day_and_chained_windows() -> None:
    weekend = [w("00:00", None, frozenset({6, 7}))]
    saturday = utc(2025, 6, 14, 9, 0)
    assert next_allowed(weekend, "UTC", saturday) == utc(2025, 6, 16, 0, 0)
    chained = [w("20:00", "23:00"), w("23:00", "06:00")]
    assert next_allowed(chained, "UTC", utc(2025, 6, 10, 21, 0)) == utc(2025, 6, 11, 6, 0)


def test_allowed_instant_is_returned_unchanged() -> None:
    at = utc(2025, 6, 10, 12, 0, 1)
    assert next_allowed([w("22:00", "07:00")], "UTC", at) == at
    assert next_allowed([], "Europe/Berlin", at) == at


def test_windows_covering_the_whole_week_never_allow() -> None:
    assert next_allowed([w("00:00", None)], "Europe/Berlin", utc(2025, 1, 1)) is None
    halves = [w("00:00", "12:00"), w("12:00", None)]
    assert next_allowed(halves, "UTC", utc(2025, 1, 1, 11, 30)) is None
    # 12:00 to 11:00 the next day leaves an hour free every day.
    assert next_allowed([w("12:00", "11:00")], "UTC", utc(2025, 1, 1, 10)) == utc(2025, 1, 1, 11)


def test_spring_forward_window_ending_in_the_gap_ends_at_the_jump() -> None:
    # Berlin, 2025-03-30: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
    windows = [w("01:00", "02:30")]
    at = local("Europe/Berlin", 2025, 3, 30, 1, 15)
    assert next_allowed(windows, "Europe/Berlin", at) == utc(2025, 3, 30, 1, 0)


def test_spring_forward_shortens_a_night_window_by_an_hour() -> None:
    windows = [w("22:00", "07:00")]
    start = local("Europe/Berlin", 2025, 3, 29, 22, 0)
    end = next_allowed(windows, "Europe/Berlin", start)
    assert end == local("Europe/Berlin", 2025, 3, 30, 7, 0)
    assert end is not None
    assert end - start == timedelta(hours=8)


def test_fall_back_repeated_hour_is_quiet_both_times() -> None:
    # Berlin, 2025-10-26: 03:00 CEST goes back to 02:00 CET; 02:00-03:00 is read twice.
    windows = [w("02:00", "02:30")]
    first = local("Europe/Berlin", 2025, 10, 26, 2, 10, fold=0)
    second = local("Europe/Berlin", 2025, 10, 26, 2, 10, fold=1)
    assert second - first == timedelta(hours=1)
    assert is_quiet(windows, "Europe/Berlin", first)
    assert is_quiet(windows, "Europe/Berlin", second)
    assert next_allowed(windows, "Europe/Berlin", first) == local(
        "Europe/Berlin", 2025, 10, 26, 2, 30, fold=0
    )
    assert next_allowed(windows, "Europe/Berlin", second) == local(
        "Europe/Berlin", 2025, 10, 26, 2, 30, fold=1
    )


def test_fall_back_lengthens_a_night_window_by_an_hour() -> None:
    windows = [w("22:00", "07:00")]
    start = local("America/New_York", 2025, 11, 1, 22, 0)
    end = next_allowed(windows, "America/New_York", start)
    assert end is not None
    assert end - start == timedelta(hours=10)


def test_lord_howe_half_hour_shift() -> None:
    # Lord Howe, 2025-10-05: 02:00 (+10:30) jumps to 02:30 (+11).
    windows = [w("01:00", "02:15")]
    at = local("Australia/Lord_Howe", 2025, 10, 5, 1, 30)
    result = next_allowed(windows, "Australia/Lord_Howe", at)
    assert result == utc(2025, 10, 4, 15, 30)  # the jump instant
    assert result is not None
    assert result.astimezone(ZoneInfo("Australia/Lord_Howe")).time() == time(2, 30)


# -- properties -----------------------------------------------------------------------

_times = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45, 59]))
_windows = st.lists(
    st.builds(
        QuietWindow,
        st.frozensets(st.integers(1, 7), min_size=1),
        _times,
        st.one_of(st.none(), _times),
    ).filter(lambda q: q.end != q.start),
    min_size=1,
    max_size=3,
)
# Instants near this decade's DST transitions, minute-aligned or not.
_TRANSITIONS = [
    utc(2025, 3, 9, 7),
    utc(2025, 3, 30, 1),
    utc(2025, 4, 6, 2),
    utc(2025, 10, 4, 15, 30),
    utc(2025, 10, 26, 1),
    utc(2025, 11, 2, 6),
    utc(2026, 3, 29, 1),
    utc(2024, 3, 10, 10),
]


@st.composite
def _instants(draw: st.DrawFn, aligned: bool = False) -> datetime:
    base = draw(st.sampled_from(_TRANSITIONS))
    minutes = draw(st.integers(-36 * 60, 36 * 60))
    at = base + timedelta(minutes=minutes)
    if not aligned:
        at += timedelta(microseconds=draw(st.integers(0, 59_999_999)))
    return at


@settings(max_examples=400, deadline=None)
@given(_windows, st.sampled_from(ZONES), _instants())
def test_next_allowed_is_the_first_allowed_instant(
    windows: list[QuietWindow], zone: str, at: datetime
) -> None:
    result = next_allowed(windows, zone, at)
    assume(result is not None)
    assert result is not None
    assert result >= at
    assert not is_quiet(windows, zone, result)
    if not is_quiet(windows, zone, at):
        assert result == at
    else:
        # Every instant before the answer is quiet: it is the *next* allowed one.
        span = result - at
        for k in range(9):
            assert is_quiet(windows, zone, at + span * k / 9)
        assert is_quiet(windows, zone, result - timedelta(microseconds=1))


def _brute_force(windows: list[QuietWindow], zone: str, at: datetime) -> datetime | None:
    """Step minute by minute: every boundary (and every DST jump) is minute-aligned."""
    if not is_quiet(windows, zone, at):
        return at
    step = at.replace(second=0, microsecond=0)
    for _ in range(3 * 24 * 60):
        step += timedelta(minutes=1)
        if not is_quiet(windows, zone, step):
            return step
    return None


@settings(max_examples=150, deadline=None)
@given(_windows, st.sampled_from(ZONES), _instants(aligned=True))
def test_next_allowed_matches_a_minute_by_minute_scan(
    windows: list[QuietWindow], zone: str, at: datetime
) -> None:
    expected = _brute_force(windows, zone, at)
    assume(expected is not None)
    assert next_allowed(windows, zone, at) == expected


@settings(max_examples=200, deadline=None)
@given(_windows, st.sampled_from(ZONES), _instants())
def test_quiet_is_what_the_wall_clock_reads(
    windows: list[QuietWindow], zone: str, at: datetime
) -> None:
    wall = at.astimezone(ZoneInfo(zone))
    clock = wall.time().replace(tzinfo=None)
    day = wall.isoweekday()
    prev = ((day - 2) % 7) + 1  # the previous date's ISO weekday
    expected = False
    for q in windows:
        if q.end is None:
            expected |= day in q.days and clock >= q.start
        elif q.start < q.end:
            expected |= day in q.days and q.start <= clock < q.end
        else:
            expected |= (day in q.days and clock >= q.start) or (prev in q.days and clock < q.end)
    assert is_quiet(windows, zone, at) == expected


@pytest.mark.parametrize("zone", ZONES)
def test_every_zone_round_trips_a_year_of_nights(zone: str) -> None:
    windows = [w("22:30", "06:45")]
    at = local(zone, 2025, 1, 1, 12)
    for _ in range(366):
        start = next_allowed([w("06:45", "22:30")], zone, at)  # the next 22:30
        assert start is not None
        assert is_quiet(windows, zone, start)
        end = next_allowed(windows, zone, start)
        assert end is not None
        assert end.astimezone(ZoneInfo(zone)).time() == time(6, 45)
        assert timedelta(hours=7) <= end - start <= timedelta(hours=9, minutes=15)
        at = end + timedelta(hours=1)
