"""The router through real Kafka and Redis: routing, consent, dedupe, collapse, dead
letters, schedules, quiet hours and digests; the CLI's preferences commands.

The router alone runs here (no statestore role): a test knows the router has read
a user's preferences when its group has committed past them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from finstream.domain.notify.ids import outbound_message_id
from finstream.domain.notify.preferences import parse_preferences
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.quiet_hours import next_allowed
from finstream.stores.read_models import PreferencesStore
from finstream.stores.redis import connect
from tests.support.privacy import opened_messages
from tests.support.services import TestEnv, WorkerProcess, group_caught_up, wait_until

pytestmark = pytest.mark.integration

DIGEST_SECONDS = 4


@pytest.fixture(scope="module")
def router(env: TestEnv, log_dir: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        env,
        "router",
        log_dir,
        router_collapse_seconds="30",
        router_digest_seconds=str(DIGEST_SECONDS),
        router_tick_seconds="0.1",
    ).start()
    try:
        yield worker
    finally:
        assert worker.stop() == 0, worker.log_tail()


def now() -> datetime:
    return datetime.now(UTC)


def publish_prefs(env: TestEnv, user: str, **fields: Any) -> dict[str, Any]:
    record = parse_preferences({"user_id": user, **fields}, now=now())
    env.produce_records("notify.preferences", "UserPreferences", [(user, record)])
    return record


def request(user: str, rid: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": rid,
        "user_id": user,
        "category": "account",
        "priority": "NORMAL",
        "template": "welcome",
        "data": {"title": "Hello", "body": "Body text"},
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": now(),
        "source": "test",
        "correlation_id": None,
    }
    record.update(fields)
    return record


def send(env: TestEnv, *records: dict[str, Any]) -> None:
    env.produce_records(
        "notify.requests", "NotificationRequest", [(r["user_id"], r) for r in records]
    )


def outbound(
    env: TestEnv, channel: str, user: str, min_count: int = 0, timeout: float = 30
) -> list[dict[str, Any]]:
    def mine() -> list[dict[str, Any]]:
        # Messages are sealed under the user's key: opened here as a delivery worker would.
        return opened_messages(
            env.settings,
            [
                m
                for m in env.decode_all(f"notify.outbound.{channel}", "OutboundMessage", timeout=5)
                if m["user_id"] == user
            ],
        )

    if min_count:
        return wait_until(
            lambda: (got := mine()) and len(got) >= min_count and got,
            timeout=timeout,
            message=f"{min_count} {channel} messages for {user}",
        )  # type: ignore[no-any-return]
    return mine()


def audits(
    env: TestEnv, user: str, min_count: int = 0, timeout: float = 30
) -> list[dict[str, Any]]:
    def mine() -> list[dict[str, Any]]:
        return [
            e
            for e in env.decode_all("audit.events", "AuditEvent", timeout=5)
            if e["user_id"] == user
        ]

    if min_count:
        return wait_until(
            lambda: (got := mine()) and len(got) >= min_count and got,
            timeout=timeout,
            message=f"{min_count} audit events for {user}",
        )  # type: ignore[no-any-return]
    return mine()


def letters(env: TestEnv, min_count: int) -> list[Any]:
    return env.consume_all("dlq", min_count=min_count, timeout=30)


def router_read_prefs(env: TestEnv) -> bool:
    return group_caught_up(env, env.settings.group("router"), ["notify.preferences"])


def read_model(env: TestEnv, user: str) -> dict[str, Any] | None:
    async def go() -> dict[str, Any] | None:
        redis = connect(env.settings)
        try:
            return await PreferencesStore(redis, env.settings, env.codec).get(user)
        finally:
            await redis.aclose()

    return asyncio.run(go())


CONTACTS: dict[str, Any] = {
    "emails": [{"address": "ann@example.com", "verified": True}],
    "phones": [{"number": "+14155552671", "verified": True}],
    "push_tokens": [
        {"platform": "FCM", "token": "fcm-token-aaa"},
        {"platform": "APNS", "token": "apns-token-bbb"},
    ],
    "consents": [{"purpose": "sms", "granted": True}],
}


def test_routes_to_every_chosen_channel_and_contact(env: TestEnv, router: WorkerProcess) -> None:
    user = "u-route"
    publish_prefs(env, user, locale="de", **CONTACTS)
    wait_until(
        lambda: router_read_prefs(env), timeout=30, message="the router read the preferences"
    )
    send(
        env,
        request(user, "sec-1", category="security", data={"title": "Login", "body": "Neues Gerät"}),
    )
    email = outbound(env, "email", user, 1)
    push = outbound(env, "push", user, 2)
    sms = outbound(env, "sms", user, 1)
    inapp = outbound(env, "inapp", user, 1)
    assert email[0]["recipient"] == "ann@example.com"
    assert email[0]["locale"] == "de"  # welcome has a German email
    assert email[0]["subject"] == "Login"
    assert "Willkommen" in email[0]["body_text"]
    assert email[0]["body_html"].startswith("<!DOCTYPE html>")
    assert email[0]["transactional"] is True
    assert sorted((m["platform"], m["recipient"]) for m in push) == [
        ("APNS", "apns-token-bbb"),
        ("FCM", "fcm-token-aaa"),
    ]
    assert sms[0]["recipient"] == "+14155552671"
    assert inapp[0]["recipient"] == user
    for m in [*email, *push, *sms, *inapp]:
        assert m["message_id"] == outbound_message_id("sec-1", m["channel"], m["recipient"])
    events = audits(env, user, 1)
    routed = [e for e in events if e["action"] == "routed"]
    assert len(routed) == 1
    blob = json.dumps(routed[0]["details"])
    assert routed[0]["details"]["channels"] == "email,push,sms,inapp"
    for secret in ("ann@example.com", "+14155552671", "fcm-token-aaa", "apns-token-bbb"):
        assert secret not in blob
    # The worker's own logs carry no contact details either.
    log_text = router.log_path.read_text()
    for secret in ("ann@example.com", "+14155552671", "fcm-token-aaa"):
        assert secret not in log_text


def test_users_category_choice_routes_price_alerts_to_email_and_inapp(
    env: TestEnv, router: WorkerProcess
) -> None:
    user = "u-price"
    publish_prefs(
        env,
        user,
        emails=[{"address": "p@example.com", "verified": True}],
        push_tokens=[{"platform": "FCM", "token": "tok-price"}],
        categories={"price_alert": {"channels": ["email", "inapp"]}},
    )
    wait_until(
        lambda: router_read_prefs(env), timeout=30, message="the router read the preferences"
    )
    data = {"symbol": "AAPL", "price": "191.20", "description": "AAPL crossed above 190.00"}
    send(
        env,
        request(
            user, "pa-1", category="price_alert", priority="HIGH", template="price_alert", data=data
        ),
    )
    email = outbound(env, "email", user, 1)
    assert email[0]["subject"] == "Price alert: AAPL at 191.20"
    assert outbound(env, "inapp", user, 1)[0]["subject"] == "Price alert: AAPL at 191.20"
    assert outbound(env, "push", user) == []


def test_consent_and_global_opt_out_suppress_with_a_record(
    env: TestEnv, router: WorkerProcess
) -> None:
    user = "u-consent"
    publish_prefs(env, user, emails=[{"address": "c@example.com", "verified": True}])
    wait_until(
        lambda: router_read_prefs(env), timeout=30, message="the router read the preferences"
    )
    send(env, request(user, "mkt-1", category="marketing", template="message", priority="CRITICAL"))
    events = audits(env, user, 1)
    assert events[0]["action"] == "suppressed"
    assert events[0]["reason"] == "consent for marketing not given"
    # Consent given: marketing goes out, not transactional (email gets List-Unsubscribe).
    publish_prefs(
        env,
        user,
        emails=[{"address": "c@example.com", "verified": True}],
        consents=[{"purpose": "marketing", "granted": True}],
    )
    wait_until(lambda: router_read_prefs(env), timeout=30, message="the router read the consent")
    send(env, request(user, "mkt-2", category="marketing", template="message"))
    email = outbound(env, "email", user, 1)
    assert email[0]["transactional"] is False
    publish_prefs(
        env, user, emails=[{"address": "c@example.com", "verified": True}], global_opt_out=True
    )
    wait_until(lambda: router_read_prefs(env), timeout=30, message="the router read the opt-out")
    send(env, request(user, "sec-9", category="security", priority="CRITICAL"))
    events = audits(env, user, 3)
    assert events[-1]["subject_id"] == "sec-9"
    assert events[-1]["action"] == "suppressed"
    assert len(outbound(env, "email", user)) == 1


def test_duplicates_and_collapsed_requests_go_once(env: TestEnv, router: WorkerProcess) -> None:
    user = "u-once"
    send(
        env,
        request(user, "dup-1"),
        request(user, "dup-1"),
        request(user, "col-1", collapse_key="rule-7"),
        request(user, "col-2", collapse_key="rule-7"),
    )
    actions = {(e["subject_id"], e["action"]) for e in audits(env, user, 4)}
    assert actions == {
        ("dup-1", "routed"),
        ("dup-1", "duplicate"),
        ("col-1", "routed"),
        ("col-2", "collapsed"),
    }
    inapp = outbound(env, "inapp", user, 2)
    assert sorted(m["request_id"] for m in inapp) == ["col-1", "dup-1"]
    # Redelivered later (a producer retry): still a duplicate.
    send(env, request(user, "dup-1"))
    wait_until(lambda: len(audits(env, user)) >= 5, timeout=30, message="fifth audit event")
    assert len(outbound(env, "inapp", user)) == 2


def test_bad_requests_become_dead_letters_with_the_reason(
    env: TestEnv, router: WorkerProcess
) -> None:
    user = "u-bad"
    env.produce("notify.requests", [(user.encode(), b"\xc3\x01not avro")])
    send(
        env,
        request(
            user, "bad-var", category="price_alert", template="price_alert", data={"symbol": "X"}
        ),
    )
    send(env, request(user, "bad-tpl", template="no_such_template"))
    send(env, request(user, "expired", expires_at=now() - timedelta(minutes=1)))
    env.produce_records(
        "notify.requests", "NotificationRequest", [("someone-else", request(user, "bad-key"))]
    )
    found = letters(env, 4)
    reasons = {
        dict(m.headers()).get("dlq.error.class", b"").decode(): dict(m.headers())[
            "dlq.error.message"
        ].decode()
        for m in found
    }
    assert any("price" in r and "undefined" in r for r in reasons.values()), reasons
    assert any("no_such_template" in r for r in reasons.values()), reasons
    assert "DecodeError" in reasons
    assert "InvalidKey" in reasons
    events = {e["subject_id"]: e for e in audits(env, user, 3)}
    assert events["bad-var"]["action"] == "dropped"
    assert "price" in events["bad-var"]["reason"]
    assert events["bad-tpl"]["action"] == "dropped"
    assert events["expired"]["action"] == "expired"
    assert outbound(env, "inapp", user) == []


def test_deliver_at_is_held_and_released_at_its_time(env: TestEnv, router: WorkerProcess) -> None:
    user = "u-later"
    at = now() + timedelta(seconds=4)
    send(env, request(user, "later-1", deliver_at=at))
    first = audits(env, user, 1)
    assert first[0]["action"] == "scheduled"
    assert first[0]["details"]["release_at"] == at.isoformat()
    # Nothing before its time (on a loaded machine the time may have come already).
    assert all(m["created_at"] >= at for m in outbound(env, "inapp", user))
    message = outbound(env, "inapp", user, 1, timeout=30)[0]
    # Released by the router's next tick (0.1 s); the bound allows for a loaded machine,
    # the release delay itself is a metric (finstream_router_release_delay_seconds).
    assert at <= message["created_at"] < at + timedelta(seconds=10)
    released = [e for e in audits(env, user, 2) if e["action"] == "routed"]
    assert released[0]["details"]["phase"] == "release.deliver_at"


def test_quiet_hours_hold_email_until_the_next_allowed_moment(
    env: TestEnv, router: WorkerProcess
) -> None:
    user = "u-quiet"
    zone = "Asia/Kolkata"  # +05:30: windows are on the user's clock, not UTC
    local = now().astimezone(__import__("zoneinfo").ZoneInfo(zone))
    start = (local - timedelta(hours=1)).strftime("%H:%M")
    end = (local + timedelta(hours=2)).strftime("%H:%M")
    record = publish_prefs(
        env,
        user,
        timezone=zone,
        emails=[{"address": "q@example.com", "verified": True}],
        quiet_hours=[{"start": start, "end": end}],
    )
    wait_until(
        lambda: router_read_prefs(env), timeout=30, message="the router read the preferences"
    )
    sent_at = now()
    send(env, request(user, "quiet-1"), request(user, "quiet-crit", priority="CRITICAL"))
    events = audits(env, user, 3)
    by = {(e["subject_id"], e["action"]): e for e in events}
    assert by[("quiet-1", "routed")]["details"]["channels"] == "inapp"
    held = by[("quiet-1", "scheduled")]
    assert held["details"]["channels"] == "email"
    expected = next_allowed(Preferences.from_record(record).quiet_hours, zone, sent_at)
    assert expected is not None
    assert held["details"]["release_at"] == expected.isoformat()
    assert by[("quiet-crit", "routed")]["details"]["channels"] == "email,inapp"
    emails = outbound(env, "email", user, 1)
    assert [m["request_id"] for m in emails] == ["quiet-crit"]


def test_low_priority_messages_fold_into_one_digest(env: TestEnv, router: WorkerProcess) -> None:
    user = "u-digest"
    publish_prefs(env, user, categories={"price_alert": {"digest": True}})
    wait_until(
        lambda: router_read_prefs(env), timeout=30, message="the router read the preferences"
    )
    started = time.monotonic()
    # In one produce: three on a loaded machine could straddle the digest's window.
    send(
        env,
        *(
            request(
                user,
                f"low-{i}",
                category="price_alert",
                template="price_alert",
                priority="LOW",
                data={"symbol": f"S{i}", "price": f"{10 + i}.00", "description": f"S{i} moved"},
            )
            for i in range(3)
        ),
    )
    digested = [e for e in audits(env, user, 3) if e["action"] == "digested"]
    assert len(digested) == 3
    digest = outbound(env, "inapp", user, 1, timeout=30)
    assert time.monotonic() - started >= DIGEST_SECONDS - 1
    assert len(digest) == 1
    assert digest[0]["subject"] == "3 price alert notifications"
    for i in range(3):
        assert f"Price alert: S{i} at {10 + i}.00" in digest[0]["body_text"]
    assert digest[0]["request_id"].startswith("digest-")
    time.sleep(1)
    assert len(outbound(env, "inapp", user)) == 1


def test_tombstone_forgets_the_user(env: TestEnv, router: WorkerProcess) -> None:
    user = "u-forget"
    publish_prefs(env, user, emails=[{"address": "f@example.com", "verified": True}])
    wait_until(
        lambda: router_read_prefs(env), timeout=30, message="the router read the preferences"
    )
    env.produce("notify.preferences", [(user.encode(), None)])
    wait_until(lambda: router_read_prefs(env), timeout=30, message="the router read the tombstone")
    send(env, request(user, "after-forget"))
    inapp = outbound(env, "inapp", user, 1)
    assert inapp[0]["request_id"] == "after-forget"
    assert outbound(env, "email", user) == []


def test_records_from_other_partitioners_are_moved_home(
    env: TestEnv, router: WorkerProcess
) -> None:
    # librdkafka's default partitioner hashes keys with crc32, not Kafka's
    # murmur2: such a producer puts most users on the "wrong" partition.
    from confluent_kafka import Producer

    users = [f"crc-{n}" for n in range(12)]
    producer = Producer(
        {
            "bootstrap.servers": env.settings.kafka_bootstrap,
            "partitioner": "consistent_random",
            "log_level": 3,
        }
    )
    for user in users:
        record = request(user, f"crc-{user}")
        producer.produce(
            env.topic("notify.requests"),
            key=user.encode(),
            value=env.codec.encode("NotificationRequest", record),
        )
    assert producer.flush(10) == 0
    for user in users:
        assert outbound(env, "inapp", user, 1)[0]["request_id"] == f"crc-{user}"
    forwarded = [
        float(line.split()[-1])
        for line in router.metrics().splitlines()
        if line.startswith("finstream_router_forwarded_total{")
    ]
    assert sum(forwarded) > 0


def _cli(env: TestEnv, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prefs_commands_set_and_show_through_the_statestore(
    env: TestEnv, router: WorkerProcess, log_dir: Path
) -> None:
    statestore = WorkerProcess(env, "statestore", log_dir).start()
    try:
        _set_and_show(env)
    finally:
        assert statestore.stop() == 0, statestore.log_tail()


def _set_and_show(env: TestEnv) -> None:
    user = "u-cli"
    done = _cli(
        env,
        "prefs",
        "set",
        user,
        "--email",
        "cli@example.com",
        "--verified",
        "--category",
        "price_alert=email,inapp",
        "--quiet",
        "22:00-07:00@1,2,3,4,5",
    )
    assert done.returncode == 0, done.stderr
    assert "cli@example.com" not in done.stdout  # masked
    assert "c**@example.com" in done.stdout
    assert "not applied" not in done.stderr
    # `set` answers once the statestore has applied the version: no wait here.
    assert read_model(env, user) is not None
    shown = _cli(env, "prefs", "show", user)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["categories"]["price_alert"]["channels"] == ["email", "inapp"]
    assert record["emails"][0]["address"] == "c**@example.com"
    # A second set merges onto the current version.
    assert _cli(env, "prefs", "set", user, "--channel", "push=off").returncode == 0
    model = read_model(env, user)
    assert model is not None
    assert model["channels"] == {"push": False}
    assert model["quiet_hours"][0]["start"] == "22:00"
    bad = _cli(env, "prefs", "set", user, "--phone", "12345")
    assert bad.returncode == 1
    assert "phones[0].number" in bad.stderr
    assert _cli(env, "prefs", "show", "nobody").returncode == 1
