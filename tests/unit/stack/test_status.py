"""Pure parts of `finstream status` (metrics, throughput, last error) and of the journey."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from finstream.domain.notify import journey as j
from finstream.stack.status import RoleRow, last_error, parse_metrics, rate, render

METRICS = """\
# HELP finstream_consumer_lag Messages behind
# TYPE finstream_consumer_lag gauge
finstream_consumer_lag{partition="0",role="router",topic="notify.requests"} 3.0
finstream_consumer_lag{partition="1",role="router",topic="notify.requests"} 4.0
# HELP finstream_events_in_total Events consumed
# TYPE finstream_events_in_total counter
finstream_events_in_total{role="router",topic="notify.requests"} 100.0
finstream_events_in_total{role="router",topic="notify.preferences"} 20.0
# HELP finstream_dead_letters_total Messages written to the dlq topic
# TYPE finstream_dead_letters_total counter
finstream_dead_letters_total{error_class="x",role="router",source_topic="t"} 2.0
"""


def test_metrics_are_summed_over_their_labels() -> None:
    assert parse_metrics(METRICS) == {"lag": 7.0, "in": 120.0, "dlq": 2.0}


def test_throughput_is_measured_against_the_oldest_sample_of_the_last_minute() -> None:
    samples = [(0.0, 0.0), (50.0, 400.0), (99.5, 500.0)]
    assert rate(samples, 100.0, 600.0) == (4.0, 50.0)  # (600-400)/50; 0 is too old
    assert rate([(99.5, 1.0)], 100.0, 2.0) == (None, None)  # nothing a second old
    assert rate([(50.0, 900.0)], 100.0, 10.0) == (None, None)  # the counter restarted


def test_last_error_is_the_newest_error_line_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "router.log"
    lines = [
        {"event": "old", "level": "error", "timestamp": "2026-01-01T10:00:00Z"},
        {"event": "fine", "level": "info", "timestamp": "2026-01-01T10:00:01Z"},
        {"event": "broker down", "level": "error", "timestamp": "2026-01-01T10:00:02Z"},
        {"event": "later", "level": "warning", "timestamp": "2026-01-01T10:00:03Z"},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert last_error(log) == "10:00:02 broker down"
    assert last_error(tmp_path / "missing.log") == ""


def test_table_marks_short_windows_and_down_roles() -> None:
    rows = [
        RoleRow("router", 9204, up=True, ready=True, lag=7, rate=4.0, rate_window=50.0),
        RoleRow("audit", 9205, reason="not answering"),
    ]
    text = render(rows, [("kafka", True, "127.0.0.1:9092")])
    router = next(line for line in text.splitlines() if line.startswith("router"))
    assert router.split()[:7] == ["router", "9204", "up", "yes", "7", "4.0*", "-"]
    assert "* over less than a minute" in text
    assert "audit" in text
    assert "down" in next(line for line in text.splitlines() if line.startswith("audit"))
    assert "kafka" in text


T0 = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def event(seconds: float, action: str, **details: str) -> j.AuditRow:
    return j.AuditRow(
        at=T0 + timedelta(seconds=seconds),
        actor="router",
        action=action,
        subject_type="request",
        subject_id="r1",
        user_id="u1",
        reason=details.pop("reason", None),
        details={"category": "account", "template": "message", **details},
    )


def test_journey_of_a_quiet_hours_hold_released_later() -> None:
    requested = T0.isoformat()
    events = [
        event(0.01, "routed", phase="intake", channels="inapp", locales="inapp:de",
              message_ids="m-in", requested_at=requested),
        event(0.01, "scheduled", reason="quiet_hours", phase="intake", channels="email",
              release_at=(T0 + timedelta(hours=2)).isoformat(), requested_at=requested,
              **{"skipped.sms": "no verified phone number that has not opted out"}),
    ]  # fmt: skip
    inapp = j.MessageRow("m-in", "inapp", "delivered", 1, "redis-inbox", T0, T0, locale="de")
    held = j.build("r1", events, [inapp], [])
    assert held is not None
    assert held["state"] == "held"
    assert held["channels"]["email"]["decision"] == "held"
    assert held["channels"]["sms"] == {
        "decision": "skipped",
        "reason": "no verified phone number that has not opted out",
        "held_until": None,
        "released_at": None,
        "locale": None,
        "messages": [],
    }
    events.append(
        event(
            7200.2,
            "routed",
            phase="release.quiet_hours",
            channels="email",
            locales="email:de",
            message_ids="m-em",
            requested_at=requested,
        )
    )
    at = T0 + timedelta(seconds=7200.3)
    email = j.MessageRow("m-em", "email", "sent", 1, "smtp", at, at, locale="de", subject="S")
    tries = [j.AttemptRow("m-em", "email", "smtp", "SENT", 1, 12.5, None, None, at)]
    done = j.build("r1", events, [inapp, email], tries)
    assert done is not None
    assert done["state"] == "delivered"
    assert done["channels"]["email"]["decision"] == "released"
    kinds = [s["kind"] for s in done["steps"]]
    assert kinds.index("hold") < kinds.index("release") < kinds.index("attempt")
    attempt = next(s for s in done["steps"] if s["kind"] == "attempt")
    assert attempt["elapsed_ms"] == 7200300.0
    assert attempt["summary"] == "email via smtp: sent in 12 ms"  # 12.5 rounds to even


def test_nothing_known_is_no_journey() -> None:
    assert j.build("r-none", [], [], []) is None
