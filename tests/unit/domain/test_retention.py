"""Retention policies, partition ranges and the delivery purge cutoff (pure logic)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.db.partitions import parse_bound
from finstream.domain.retention import (
    Finding,
    Policy,
    PolicyError,
    Range,
    add_months,
    delivery_cutoff,
    expired,
    floor,
    missing,
    score,
    step,
    wanted,
)

NOW = datetime(2025, 3, 31, 15, 30, tzinfo=UTC)


def test_policies_parse_and_cut_by_the_calendar() -> None:
    assert Policy.parse("13mo").cutoff(NOW) == datetime(2024, 2, 29, 15, 30, tzinfo=UTC)
    assert Policy.parse("2y").cutoff(NOW) == datetime(2023, 3, 31, 15, 30, tzinfo=UTC)
    assert Policy.parse("30d").cutoff(NOW) == NOW - timedelta(days=30)
    assert Policy.parse(" 6w ").cutoff(NOW) == NOW - timedelta(weeks=6)
    for bad in ("", "2", "y", "-1y", "0d", "2 years"):
        with pytest.raises(PolicyError):
            Policy.parse(bad)


@given(
    st.datetimes(
        min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.integers(-600, 600),
)
def test_add_months_lands_in_the_right_month_and_never_overflows(when: datetime, n: int) -> None:
    later = add_months(when, n)
    assert (later.year * 12 + later.month) - (when.year * 12 + when.month) == n
    assert later.day <= when.day
    assert later.time() == when.time()


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.sampled_from(["day", "month"]),
    st.integers(0, 40),
)
def test_wanted_partitions_are_contiguous_and_hold_now(
    now: datetime, grain: str, ahead: int
) -> None:
    parts = wanted("t", now, grain, ahead)  # type: ignore[arg-type]
    assert len(parts) == ahead + 1
    assert parts[0][1] <= now < parts[0][2]
    assert all(a[2] == b[1] for a, b in itertools.pairwise(parts))
    assert len({name for name, _, _ in parts}) == len(parts)


def test_missing_skips_existing_and_starts_after_a_legacy_range() -> None:
    legacy = Range("t_legacy", None, datetime(2025, 3, 31, 12, tzinfo=UTC))
    day = floor(NOW, "day")
    have = Range("t_p20250401", step(day, "day"), step(day, "day", 2))
    todo = missing([legacy, have], "t", NOW, "day", 2)
    assert todo == [
        ("t_p20250331", datetime(2025, 3, 31, 12, tzinfo=UTC), step(day, "day")),
        ("t_p20250402", step(day, "day", 2), step(day, "day", 3)),
    ]


def test_expired_takes_only_ranges_wholly_before_the_cutoff() -> None:
    cutoff = datetime(2025, 3, 15, tzinfo=UTC)
    ranges = [
        Range("legacy", None, datetime(2025, 1, 1, tzinfo=UTC)),
        Range("feb", datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)),
        Range("mar", datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)),
    ]
    assert [r.name for r in expired(reversed(ranges), cutoff)] == ["legacy", "feb"]


def test_delivery_cutoff_waits_for_topic_retention_and_never_purges_forever_topics() -> None:
    policy = Policy.parse("30d")
    week, month40 = 7 * 86_400_000, 40 * 86_400_000
    assert delivery_cutoff(NOW, policy, [week]) == NOW - timedelta(days=30)
    # A dead letter kept 40 days can still be redriven: its row stays 40 days.
    assert delivery_cutoff(NOW, policy, [week, month40]) == NOW - timedelta(days=40)
    assert delivery_cutoff(NOW, policy, [week, -1]) is None


def test_score_counts_warnings_and_criticals() -> None:
    findings = [
        Finding("a", "ok", ""),
        Finding("b", "warning", ""),
        Finding("c", "critical", ""),
        Finding("d", "info", ""),
    ]
    assert score(findings) == 60
    assert score([Finding("x", "critical", "")] * 5) == 0


def test_partition_bounds_as_postgresql_prints_them() -> None:
    assert parse_bound("DEFAULT") is None
    start, end = parse_bound(  # type: ignore[misc]
        "FOR VALUES FROM ('2025-06-01 00:00:00+00') TO ('2025-06-02 00:00:00+00')"
    )
    assert start == datetime(2025, 6, 1, tzinfo=UTC)
    assert end == datetime(2025, 6, 2, tzinfo=UTC)
    assert parse_bound("FOR VALUES FROM (MINVALUE) TO ('2025-06-01 02:00:00+02')") == (
        None,
        datetime(2025, 6, 1, tzinfo=UTC),
    )
