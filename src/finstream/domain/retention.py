"""Time partitions and retention policies: pure calendar arithmetic, no I/O.

Tables partitioned by time (``ticks`` by day; ``bars``, ``delivery_results``
and ``audit_events`` by month) have one partition per period, named
``<table>_pYYYYMMDD`` or ``<table>_pYYYYMM``. A retention policy is a
duration such as ``2y``, ``13mo``, ``90d`` or ``6w``; a partition may go once
its whole range ends at or before ``now - policy`` (never while any row in it
could still be inside the window).

Delivery rows hold message bodies. They are purged past their policy, but
never while the message can still come back: a dead letter can be redriven
as long as the ``dlq`` topic keeps it, and a message on an outbound topic can
be consumed again as long as that topic keeps it. :func:`delivery_cutoff`
therefore moves the cutoff back by the longest of those retentions, and
refuses to purge at all when one keeps records forever.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

Granularity = Literal["day", "month"]

_POLICY = re.compile(r"^\s*(\d+)\s*(d|w|mo|y)\s*$")


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Policy:
    """A retention window: a number of days, weeks, calendar months or years."""

    count: int
    unit: Literal["d", "w", "mo", "y"]

    @classmethod
    def parse(cls, text: str) -> Policy:
        match = _POLICY.match(text)
        if not match:
            raise PolicyError(
                f"{text!r} is not a retention policy: use a number and d, w, mo or y (e.g. 13mo, 2y)"
            )
        count, unit = int(match.group(1)), match.group(2)
        if count <= 0:
            raise PolicyError(f"{text!r}: a retention policy must be positive")
        return cls(count, unit)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    def cutoff(self, now: datetime) -> datetime:
        """The oldest instant still inside the window."""
        if self.unit == "d":
            return now - timedelta(days=self.count)
        if self.unit == "w":
            return now - timedelta(weeks=self.count)
        months = self.count * (12 if self.unit == "y" else 1)
        return add_months(now, -months)


def add_months(when: datetime, months: int) -> datetime:
    """Calendar months later (or earlier), clamping the day to the month's length."""
    index = when.year * 12 + (when.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    day = min(when.day, _days_in_month(year, month))
    return when.replace(year=year, month=month, day=day)


def _days_in_month(year: int, month: int) -> int:
    following = datetime(year + (month == 12), month % 12 + 1, 1)
    return (following - timedelta(days=1)).day


def floor(when: datetime, granularity: Granularity) -> datetime:
    """Start of the period holding ``when`` (in UTC)."""
    utc = when.astimezone(UTC)
    if granularity == "day":
        return utc.replace(hour=0, minute=0, second=0, microsecond=0)
    return utc.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def step(start: datetime, granularity: Granularity, n: int = 1) -> datetime:
    if granularity == "day":
        return start + timedelta(days=n)
    return add_months(start, n)


def partition_name(table: str, start: datetime, granularity: Granularity) -> str:
    fmt = "%Y%m%d" if granularity == "day" else "%Y%m"
    return f"{table}_p{start.astimezone(UTC).strftime(fmt)}"


@dataclass(frozen=True)
class Range:
    """One partition's bounds: [start, end). ``start`` None is MINVALUE (a legacy table)."""

    name: str
    start: datetime | None
    end: datetime | None

    def overlaps(self, start: datetime, end: datetime) -> bool:
        lo = self.start is None or self.start < end
        hi = self.end is None or self.end > start
        return lo and hi


def wanted(
    table: str, now: datetime, granularity: Granularity, ahead: int
) -> list[tuple[str, datetime, datetime]]:
    """The current period and ``ahead`` more: (name, start, end) each."""
    first = floor(now, granularity)
    out = []
    for i in range(ahead + 1):
        start = step(first, granularity, i)
        out.append((partition_name(table, start, granularity), start, step(start, granularity)))
    return out


def missing(
    existing: Sequence[Range], table: str, now: datetime, granularity: Granularity, ahead: int
) -> list[tuple[str, datetime, datetime]]:
    """Partitions to create: wanted ones that no existing partition overlaps.

    A wanted period that an existing partition covers only in part (a legacy
    partition ending mid-period) is started at that partition's end, so that
    ranges never overlap.
    """
    out = []
    for name, start, end in wanted(table, now, granularity, ahead):
        clash = [r for r in existing if r.overlaps(start, end)]
        if not clash:
            out.append((name, start, end))
            continue
        ends = [r.end for r in clash if r.end is not None and start < r.end < end]
        if len(clash) == 1 and ends and (clash[0].start is None or clash[0].start <= start):
            out.append((name, ends[0], end))
    return out


def expired(ranges: Iterable[Range], cutoff: datetime) -> list[Range]:
    """Partitions whose whole range ends at or before the cutoff, oldest first."""
    old = [r for r in ranges if r.end is not None and r.end <= cutoff]
    return sorted(old, key=lambda r: r.end or cutoff)


def delivery_cutoff(
    now: datetime, policy: Policy, topic_retention_ms: Iterable[int]
) -> datetime | None:
    """Oldest finish time a final delivery row must have to be kept; None: purge nothing.

    A row is needed while its message can be redriven from ``dlq`` or read
    again from its outbound topic: the cutoff is the earlier of the policy's
    and the longest topic retention's. A topic that keeps records forever
    (-1) means a message can always come back, so nothing is purged.
    """
    longest = 0
    for ms in topic_retention_ms:
        if ms < 0:
            return None
        longest = max(longest, ms)
    return min(policy.cutoff(now), now - timedelta(milliseconds=longest))


# -- health score -------------------------------------------------------------------

Severity = Literal["ok", "info", "warning", "critical"]
PENALTY: dict[str, int] = {"ok": 0, "info": 0, "warning": 10, "critical": 30}


@dataclass(frozen=True)
class Finding:
    check: str
    severity: Severity
    message: str

    def render(self) -> str:
        return f"[{self.severity.upper():<8}] {self.check}: {self.message}"


def score(findings: Iterable[Finding]) -> int:
    """100 less 10 per warning and 30 per critical finding, never below 0."""
    return max(0, 100 - sum(PENALTY[f.severity] for f in findings))


def ratio_severity(value: float, warn: float, critical: float) -> Severity:
    """Severity of a ratio that is bad when high (connections used of the limit)."""
    if value >= critical:
        return "critical"
    if value >= warn:
        return "warning"
    return "ok"


def backup_severity(age: timedelta | None, every: timedelta) -> Severity:
    """A backup older than its schedule (with half a period of slack) is late."""
    if age is None:
        return "critical"
    if age > every * 3:
        return "critical"
    if age > every * 1.5:
        return "warning"
    return "ok"
