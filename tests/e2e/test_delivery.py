"""Delivery worker processes end to end: every channel, and SIGKILL mid-batch.

The fakes run in this process (a background thread); the workers are real
`finstream worker <role>` subprocesses pointed at them by environment.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finstream.domain.time import utcnow
from tests.fakes.delivery.kit import DeliveryFakes
from tests.support.services import TestEnv, WorkerProcess, group_caught_up, wait_until, workers

pytestmark = pytest.mark.e2e

CHAOS_MESSAGES = 300
FINAL = ("sent", "delivered", "rejected", "failed", "expired")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryFakes]:
    with DeliveryFakes(tmp_path_factory.mktemp("e2e-delivery")) as f:
        yield f


def outbound(channel: str, recipient: str, **over: Any) -> dict[str, Any]:
    mid = f"m-{uuid.uuid4().hex[:24]}"
    msg: dict[str, Any] = {
        "message_id": mid,
        "request_id": f"r-{mid}",
        "user_id": f"u-{uuid.uuid4().hex[:6]}",
        "channel": channel,
        "category": "price_alert",
        "priority": "NORMAL",
        "recipient": recipient,
        "platform": None,
        "locale": "en",
        "subject": "Your alert fired",
        "body_text": f"AAPL crossed 200 [{mid}]",
        "body_html": "<p>AAPL crossed 200</p>",
        "data": {"symbol": "AAPL"},
        "transactional": False,
        "created_at": utcnow(),
        "expires_at": None,
        "attempt": 0,
        "correlation_id": None,
    }
    msg.update(over)
    return msg


def states(env: TestEnv, ids: list[str]) -> dict[str, str]:
    rows = env.sql(
        "SELECT message_id, state FROM deliveries WHERE message_id = ANY($1::text[])", ids
    )
    return {r["message_id"]: r["state"] for r in rows}


def settled(env: TestEnv, ids: list[str]) -> dict[str, str] | None:
    """One snapshot of the states of ``ids``, when every one of them is final; else None."""
    got = states(env, ids)
    if len(got) == len(ids) and all(s in FINAL for s in got.values()):
        return got
    return None


def test_every_channel_through_its_worker(
    env: TestEnv, log_dir: Path, fakes: DeliveryFakes
) -> None:
    fakes.reset()
    messages = {
        "notify.outbound.email": outbound("EMAIL", "ann@example.com"),
        "notify.outbound.push": outbound("PUSH", "e5" * 32, platform="APNS"),
        "notify.outbound.sms": outbound("SMS", "+14155552671"),
        "notify.outbound.inapp": outbound("INAPP", "u-inapp", user_id="u-inapp"),
    }
    overrides = fakes.env()
    with workers(
        env, log_dir, "delivery-email", "delivery-push", "delivery-sms", "inapp", **overrides
    ) as procs:
        for topic, msg in messages.items():
            env.produce_records(topic, "OutboundMessage", [(msg["user_id"], msg)])
        ids = [m["message_id"] for m in messages.values()]
        # One snapshot per poll, asserted on as it was read: a second query could
        # see a row that the first one did not (still 'sending').
        final = wait_until(lambda: settled(env, ids), timeout=60, message="four deliveries")
        assert final == {
            messages["notify.outbound.email"]["message_id"]: "sent",
            messages["notify.outbound.push"]["message_id"]: "sent",
            messages["notify.outbound.sms"]["message_id"]: "sent",
            messages["notify.outbound.inapp"]["message_id"]: "delivered",
        }

        def results_of_all() -> list[dict[str, Any]] | None:
            found = [
                r
                for r in env.decode_all("notify.delivery", "DeliveryResult")
                if r["message_id"] in ids
            ]
            return found if {r["message_id"] for r in found} == set(ids) else None

        results = wait_until(results_of_all, timeout=30, message="results on notify.delivery")
        assert {(r["channel"], r["provider"], r["status"]) for r in results} == {
            ("EMAIL", "sendgrid", "SENT"),
            ("PUSH", "apns", "SENT"),
            ("SMS", "twilio", "SENT"),
            ("INAPP", "redis-inbox", "DELIVERED"),
        }
        email = fakes.sendgrid.recorder.accepted[-1]
        assert email["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        metrics = procs[0].metrics()
        assert 'finstream_delivery_sent_total{channel="EMAIL",provider="sendgrid"} 1.0' in metrics
        assert (
            'finstream_delivery_circuit_state{channel="EMAIL",provider="sendgrid"} 0.0' in metrics
        )
        assert "finstream_delivery_latency_seconds_bucket" in metrics
        assert (
            'finstream_delivery_success_ratio{channel="EMAIL",provider="sendgrid"} 1.0' in metrics
        )


def test_sigkill_mid_batch_then_restart_delivers_every_message_exactly_once(
    env: TestEnv, log_dir: Path, fakes: DeliveryFakes
) -> None:
    fakes.reset()
    fakes.sendgrid.faults.latency = 0.03  # slow enough for the kill to land mid-batch
    fakes.sendgrid.faults.error_rate = 0.02  # and some transient failures to retry
    batch = [outbound("EMAIL", f"user{i}@example.com") for i in range(CHAOS_MESSAGES)]
    ids = [m["message_id"] for m in batch]
    # SendGrid alone: this test is about the kill, not failover (an SES send
    # whose answer is lost under load would be dead-lettered, by design).
    overrides = fakes.env(
        delivery_concurrency=8,
        delivery_batch_size=100,
        delivery_email_providers="sendgrid",
        delivery_timeout=2.0,
    )
    env.produce_records(
        "notify.outbound.email", "OutboundMessage", [(m["user_id"], m) for m in batch]
    )

    def taken() -> int:
        counts = fakes.sendgrid.recorder.counts()
        return sum(1 for i in ids if counts[i])

    first = WorkerProcess(env, "delivery-email", log_dir, **overrides).start()
    try:
        wait_until(lambda: taken() >= CHAOS_MESSAGES // 3, timeout=60, message="first third sent")
        first.kill()
    finally:
        first.kill()
    at_kill = taken()
    in_flight = env.sql(
        "SELECT count(*) AS n FROM deliveries WHERE message_id = ANY($1::text[]) AND state IN ('queued', 'sending')",
        ids,
    )[0]["n"]
    assert 0 < at_kill < CHAOS_MESSAGES, "the kill did not land mid-run"
    assert in_flight > 0, "nothing was in flight at the kill"

    second = WorkerProcess(env, "delivery-email", log_dir, **overrides).start()
    try:
        # The killed member holds its partitions until Kafka's session timeout
        # (30 s) ends; the rows it had claimed are taken over from PostgreSQL
        # as soon as their leases lapse.
        final = wait_until(
            lambda: settled(env, ids),
            timeout=90,
            message=f"{CHAOS_MESSAGES} messages settled",
        )
        assert {i: s for i, s in final.items() if s != "sent"} == {}
        # Every row final and every record taken in: nothing is left that could
        # be sent again.
        wait_until(
            lambda: group_caught_up(
                env, env.settings.group("delivery-email"), ["notify.outbound.email"]
            ),
            timeout=60,
            message="delivery-email caught up",
        )
        counts: dict[str, int] = {}
        for fake in fakes.all:
            for mid, n in fake.recorder.counts().items():
                counts[mid] = counts.get(mid, 0) + n
        delivered = {i: counts.get(i, 0) for i in ids}
        assert [i for i, n in delivered.items() if n != 1] == []
        sent_results = env.sql(
            "SELECT count(DISTINCT message_id) AS n FROM delivery_results "
            "WHERE status = 'SENT' AND message_id = ANY($1::text[])",
            ids,
        )[0]["n"]
        assert sent_results == CHAOS_MESSAGES
        metrics = second.metrics()
        assert "finstream_delivery_sent_total" in metrics
    finally:
        second.stop()
        fakes.reset()
