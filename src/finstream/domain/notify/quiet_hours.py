"""Quiet hours: is an instant quiet for a user, and when is the next allowed moment.

A quiet window is defined on the user's wall clock: ISO weekdays on which it
*starts*, a local start time and a local end time (an end before the start
runs past midnight; ``24:00``, held as ``None``, is the end of the day). An
instant is quiet when the user's clock, at that instant, reads a time inside
a window:

* same-day window (start < end): the local date's weekday is one of the
  window's days and start <= time < end;
* overnight window (end <= start): the local date's weekday is one of the
  days and time >= start, or the *previous* date's weekday is one of them
  and time < end.

Defining quiet hours by what the clock reads makes daylight-saving changes
unambiguous: a wall time skipped in spring simply never happens, and a wall
time repeated in autumn is quiet both times it is read. The next allowed
moment is the first instant, at or after the given one, whose wall clock is
outside every window; when the clock jumps over a window's end (spring
forward), that is the instant of the jump.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from finstream.domain.notify.preferences_view import QuietWindow

# Windows repeat weekly; if a whole week and a day pass without an allowed
# moment, the windows cover every minute and nothing ever becomes allowed.
_HORIZON = timedelta(days=8)
_MAX_STEPS = 1000


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _local(at: datetime, tz: ZoneInfo) -> datetime:
    """The wall clock (naive) of an instant in a zone."""
    return at.astimezone(tz).replace(tzinfo=None)


def _contains(window: QuietWindow, wall: datetime) -> datetime | None:
    """The wall-clock end of the window occurrence containing ``wall``, or None."""
    day = wall.isoweekday()
    clock = wall.time()
    midnight = datetime.combine(wall.date(), time(0))
    if not window.overnight:
        if (
            day in window.days
            and clock >= window.start
            and (window.end is None or clock < window.end)
        ):
            if window.end is None:
                return midnight + timedelta(days=1)
            return datetime.combine(wall.date(), window.end)
        return None
    assert window.end is not None  # overnight windows have an end
    if day in window.days and clock >= window.start:
        return datetime.combine(wall.date() + timedelta(days=1), window.end)
    previous = (wall - timedelta(days=1)).isoweekday()
    if previous in window.days and clock < window.end:
        return datetime.combine(wall.date(), window.end)
    return None


def is_quiet(windows: Sequence[QuietWindow], tz: str | ZoneInfo, at: datetime) -> bool:
    """Whether the user's wall clock at ``at`` reads a time inside a quiet window."""
    if not windows:
        return False
    zi = zone(tz) if isinstance(tz, str) else tz
    wall = _local(at, zi)
    return any(_contains(w, wall) is not None for w in windows)


def _first_instant_reading(wall_end: datetime, tz: ZoneInfo, after: datetime) -> datetime:
    """The first instant later than ``after`` whose wall clock reads ``wall_end`` or later.

    A wall time exists once (the usual case), twice (autumn: both folds) or
    not at all (spring: the clock jumps over it, and the jump is the answer).
    """
    candidates = []
    for fold in (0, 1):
        instant = wall_end.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if instant > after and _local(instant, tz) == wall_end:
            candidates.append(instant)
    if candidates:
        return min(candidates)
    # In a gap: between the two fold readings the clock jumps past wall_end.
    low = wall_end.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = wall_end.replace(tzinfo=tz, fold=0).astimezone(UTC)
    low, high = min(low, high), max(low, high)
    low = max(low, after)
    if _local(high, tz) < wall_end or high <= after:
        # Not a gap after all (a wall time before ``after``): take the next day's.
        return _first_instant_reading(wall_end + timedelta(days=1), tz, after)
    # Invariant: clock(low) < wall_end <= clock(high); bisect to the microsecond.
    while high - low > timedelta(microseconds=1):
        mid = low + (high - low) / 2
        if _local(mid, tz) >= wall_end:
            high = mid
        else:
            low = mid
    return high


def next_allowed(
    windows: Sequence[QuietWindow], tz: str | ZoneInfo, at: datetime
) -> datetime | None:
    """The first instant at or after ``at`` outside every quiet window (UTC).

    None when the windows cover the whole week, so that no moment is allowed.
    """
    zi = zone(tz) if isinstance(tz, str) else tz
    at = at.astimezone(UTC)
    current = at
    for _ in range(_MAX_STEPS):
        wall = _local(current, zi)
        ends = [end for w in windows if (end := _contains(w, wall)) is not None]
        if not ends:
            return current
        # Leave the occurrence that ends first; another window may still hold.
        current = _first_instant_reading(min(ends), zi, current)
        if current - at > _HORIZON:
            return None
    return None
