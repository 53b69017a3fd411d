"""A router killed with SIGKILL mid-stream and restarted routes every request exactly
once (read_committed), including requests held for later when it died."""

from __future__ import annotations

import collections
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.services import TestEnv, WorkerProcess, group_caught_up, wait_until

pytestmark = pytest.mark.integration

USERS = 60
TOTAL = 2400
HELD = 40
BATCH = 20


def _request(user: str, rid: str, deliver_at: datetime | None = None) -> dict[str, Any]:
    return {
        "request_id": rid,
        "user_id": user,
        "category": "account",
        "priority": "NORMAL",
        "template": "welcome",
        "data": {"title": rid, "body": "restart test"},
        "channels": [],
        "deliver_at": deliver_at,
        "expires_at": None,
        "collapse_key": None,
        "created_at": datetime.now(UTC),
        "source": "test",
        "correlation_id": None,
    }


def test_router_killed_mid_stream_loses_and_duplicates_nothing(env: TestEnv, log_dir: Path) -> None:
    # A short session lets the restarted router take the dead one's partitions
    # in seconds rather than waiting out the default 30.
    settings = {
        "consumer_session_timeout": "6",
        "router_batch_size": str(BATCH),
        "router_batch_ms": "5",
        "router_tick_seconds": "0.1",
        "instance_id": "router-0",
    }
    inapp = WorkerProcess(env, "inapp", log_dir).start()
    first = WorkerProcess(env, "router", log_dir, **settings).start()

    # Held requests due after the kill: the restarted router must release them, once.
    due = datetime.now(UTC) + timedelta(seconds=6)
    held = [
        (f"user-{i % USERS}", _request(f"user-{i % USERS}", f"held-{i}", due)) for i in range(HELD)
    ]
    env.produce_records("notify.requests", "NotificationRequest", held)
    requests = [
        (f"user-{i % USERS}", _request(f"user-{i % USERS}", f"req-{i}")) for i in range(TOTAL)
    ]

    killed = threading.Event()

    def produce() -> None:
        # A steady stream; its second half waits for the kill, so the kill lands
        # in the middle of it however fast the router drains.
        for start in range(0, TOTAL, 100):
            if start == TOTAL // 2:
                killed.wait(120)
            env.produce_records(
                "notify.requests", "NotificationRequest", requests[start : start + 100]
            )
            time.sleep(0.1)

    producer = threading.Thread(target=produce)
    producer.start()

    def routed() -> list[Any]:
        return env.decode_all("notify.outbound.inapp", "OutboundMessage", timeout=5)

    try:
        wait_until(lambda: len(routed()) >= TOTAL // 5, timeout=60, message="router progress")
        first.kill()
        killed.set()
        second = WorkerProcess(env, "router", log_dir, **settings).start()
        producer.join()
        try:
            expected = {f"req-{i}" for i in range(TOTAL)} | {f"held-{i}" for i in range(HELD)}
            try:
                wait_until(
                    lambda: {m["request_id"] for m in routed()} >= expected,
                    timeout=60,
                    message=f"{len(expected)} routed requests",
                )
            except AssertionError:
                missing = expected - {m["request_id"] for m in routed()}
                raise AssertionError(
                    f"{len(missing)} never routed: {sorted(missing)[:20]}"
                ) from None
            wait_until(
                lambda: group_caught_up(env, env.settings.group("router"), ["notify.requests"]),
                timeout=60,
                message="router caught up",
            )
            messages = routed()
            ids = collections.Counter(m["message_id"] for m in messages)
            assert {m["request_id"] for m in messages} == expected
            assert len(ids) == len(expected)
            # Exactly once: what the killed router had published since its last
            # commit was aborted; nothing is published twice.
            assert set(ids.values()) == {1}
            for m in messages:
                if m["request_id"].startswith("held-"):
                    assert m["created_at"] >= due

            # What the user sees: every message once in the in-app inbox.
            r = redis.Redis.from_url(env.settings.redis_url.get_secret_value())
            try:

                def stored() -> int:
                    return sum(
                        int(r.zcard(env.settings.redis_key(f"inbox:{{user-{u}}}:index")))
                        for u in range(USERS)
                    )

                wait_until(lambda: stored() == len(expected), timeout=60, message="inbox filled")
                wait_until(
                    lambda: group_caught_up(
                        env, env.settings.group("inapp"), ["notify.outbound.inapp"]
                    ),
                    timeout=60,
                    message="inapp caught up",
                )
                assert stored() == len(expected)
            finally:
                r.close()

            # Every decision audited once (replays carry the same event id).
            events = env.decode_all("audit.events", "AuditEvent", timeout=10)
            routed_ids = {e["event_id"]: e["subject_id"] for e in events if e["action"] == "routed"}
            per_request = collections.Counter(routed_ids.values())
            assert set(per_request) == expected
            assert max(per_request.values()) == 1
        finally:
            assert second.stop() == 0, second.log_tail()
    finally:
        killed.set()
        producer.join()
        first.kill()
        inapp.stop()


def test_two_replicas_share_users_and_release_each_hold_once(env: TestEnv, log_dir: Path) -> None:
    from finstream.domain.notify.preferences import parse_preferences

    users = [f"rep-{i}" for i in range(30)]
    prefs = [
        (
            u,
            parse_preferences(
                {"user_id": u, "emails": [f"{u}@example.com"]}, now=datetime.now(UTC)
            ),
        )
        for u in users
    ]
    env.produce_records("notify.preferences", "UserPreferences", prefs)
    settings = {
        "router_batch_size": str(BATCH),
        "router_tick_seconds": "0.1",
        "consumer_session_timeout": "6",
    }
    a = WorkerProcess(env, "router", log_dir, **settings).start()
    b = WorkerProcess(env, "router", log_dir, **settings).start()
    try:
        due = datetime.now(UTC) + timedelta(seconds=5)
        held = [(u, _request(u, f"rep-held-{u}", due)) for u in users]
        now_ = [(users[i % 30], _request(users[i % 30], f"rep-now-{i}")) for i in range(300)]
        env.produce_records("notify.requests", "NotificationRequest", held + now_)
        expected = {r["request_id"] for _, r in held + now_}

        def routed() -> list[Any]:
            messages = env.decode_all("notify.outbound.inapp", "OutboundMessage", timeout=5)
            return [m for m in messages if m["request_id"].startswith("rep-")]

        wait_until(
            lambda: {m["request_id"] for m in routed()} >= expected,
            timeout=60,
            message="all routed",
        )
        wait_until(
            lambda: group_caught_up(env, env.settings.group("router"), ["notify.requests"]),
            timeout=60,
            message="router caught up",
        )
        ids = collections.Counter(m["message_id"] for m in routed())
        assert len(ids) == len(expected)
        # Exactly once across the rebalance of two replicas joining.
        assert set(ids.values()) == {1}
        for m in routed():
            if m["request_id"].startswith("rep-held-"):
                assert m["created_at"] >= due
        # Both replicas own partitions; each user's state is on exactly one.
        owned = []
        for w in (a, b):
            assigned = [
                json.loads(line)
                for line in w.log_path.read_text().splitlines()
                if '"partitions assigned"' in line
            ]
            owned.append(set(assigned[-1]["partitions"]))
        assert owned[0]
        assert owned[1]
        assert not owned[0] & owned[1]
        assert owned[0] | owned[1] == set(range(6))
    finally:
        assert a.stop() == 0, a.log_tail()
        assert b.stop() == 0, b.log_tail()
