"""The journey of a notification, through real router, audit and email delivery workers:
a suppressed request, a held-and-released one, and one that failed over from SendGrid
to SES, read back through the API (operator; the owning user; nobody else) and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from finstream.domain.notify.preferences import parse_preferences
from finstream.domain.time import utcnow
from tests.fakes.delivery.kit import DeliveryFakes
from tests.support.api import Keys, api_client, api_settings, auth
from tests.support.services import TestEnv, group_caught_up, wait_until, workers

pytestmark = pytest.mark.e2e

USER = "jo-journey"


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryFakes]:
    with DeliveryFakes(tmp_path_factory.mktemp("journey-fakes")) as f:
        yield f


def request(request_id: str, category: str = "account", **over: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": request_id,
        "user_id": USER,
        "category": category,
        "priority": "NORMAL",
        "template": "message",
        "data": {"title": f"About {request_id}", "body": "Details inside."},
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": utcnow(),
        "source": "journey-test",
        "correlation_id": f"cid-{request_id}",
    }
    record.update(over)
    return record


def journey_cli(env: TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "journey", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def settled(
    env: TestEnv, request_id: str, state: str, steps: frozenset[str] = frozenset()
) -> dict[str, Any] | None:
    """The journey once it is in ``state`` and shows ``steps``: the router's steps come
    from audit rows the audit sink writes, which may land after the delivery rows."""
    out = journey_cli(env, request_id, "--json")
    if out.returncode != 0:
        return None
    found: dict[str, Any] = json.loads(out.stdout)
    shown = {s["kind"] for s in found["steps"]}
    return found if found["state"] == state and steps <= shown else None


async def test_journeys_of_a_suppressed_a_held_and_a_failed_over_request(
    env: TestEnv, log_dir: Path, fakes: DeliveryFakes, tmp_path: Path
) -> None:
    fakes.reset()
    # Every SendGrid call fails (503): each email fails over to SES at once.
    fakes.sendgrid.faults.mode = "error"
    now = utcnow()
    prefs = parse_preferences(
        {
            "user_id": USER,
            "locale": "de",
            "timezone": "Europe/Berlin",
            "emails": [{"address": "jo@example.com", "verified": True}],
            "categories": {"account": {"channels": ["email"]}},
        },
        now=now,
    )
    overrides = fakes.env(delivery_email_providers="sendgrid,ses,smtp")
    with workers(env, log_dir, "router", "audit", "delivery-email", **overrides):
        env.produce_records("notify.preferences", "UserPreferences", [(USER, prefs)])
        # The router's own commit: the read model is the statestore's, not the router's.
        wait_until(
            lambda: group_caught_up(env, env.settings.group("router"), ["notify.preferences"]),
            timeout=30,
            message="the router knows the user's preferences",
        )
        env.produce_records(
            "notify.requests",
            "NotificationRequest",
            [
                (USER, request("j-suppressed", category="marketing")),
                (USER, request("j-failover")),
                (USER, request("j-held", deliver_at=utcnow() + timedelta(seconds=3))),
            ],
        )

        routed = frozenset({"received", "decision", "rendered", "attempt", "delivered"})
        suppressed = wait_until(
            lambda: settled(env, "j-suppressed", "suppressed", frozenset({"received", "decision"})),
            timeout=60,
            message="suppressed",
        )
        failover = wait_until(
            lambda: settled(env, "j-failover", "delivered", routed),
            timeout=60,
            message="failed over",
        )
        held = wait_until(
            lambda: settled(env, "j-held", "delivered", routed | {"hold", "release"}),
            timeout=60,
            message="held, released",
        )

    # Suppressed: the reason, no message, no attempt.
    kinds = [s["kind"] for s in suppressed["steps"]]
    assert kinds[0] == "received"
    decision = next(s for s in suppressed["steps"] if s["kind"] == "decision")
    assert decision["action"] == "suppressed"
    assert "consent for marketing" in decision["reason"]
    assert "attempt" not in kinds
    assert suppressed["source"] == "journey-test"

    # Failed over: SendGrid's transient failure, then SES sent it.
    email = failover["channels"]["email"]
    assert email["decision"] == "sent"
    (message,) = email["messages"]
    assert [(a["provider"], a["status"]) for a in message["attempts"]] == [
        ("sendgrid", "RETRYING"),  # transient: failed over at once
        ("ses", "SENT"),
    ]
    assert all(a["latency_ms"] is not None for a in message["attempts"])
    assert message["state"] == "sent"
    assert message["locale"] == "en"  # `message` has no German file: the fallback is shown
    assert message["recipient"].endswith(".com")
    assert "jo@" not in json.dumps(failover)
    steps = failover["steps"]
    order = [s["kind"] for s in steps]
    assert order.index("received") < order.index("decision") < order.index("rendered")
    assert order.index("rendered") < order.index("attempt") < order.index("delivered")
    assert [s["elapsed_ms"] for s in steps] == sorted(s["elapsed_ms"] for s in steps)

    # Held and released: the hold with its release time, the release, then delivery.
    hold = next(s for s in held["steps"] if s["kind"] == "hold")
    release = next(s for s in held["steps"] if s["kind"] == "release")
    assert hold["reason"] == "deliver_at"
    assert release["phase"] == "release.deliver_at"
    assert release["elapsed_ms"] >= 2500  # deliver_at was three seconds after the request
    assert held["channels"]["email"]["messages"][0]["state"] == "sent"

    # The CLI's table, and the search by user and time range.
    table = journey_cli(env, "j-failover")
    assert table.returncode == 0, table.stderr
    assert "email via sendgrid: retrying" in table.stdout
    assert "email via ses: sent" in table.stdout
    listing = journey_cli(env, "--user", USER, "--from", "-10m")
    assert {"j-suppressed", "j-failover", "j-held"} <= {
        line.split()[1] for line in listing.stdout.splitlines() if line.strip()
    }
    missing = journey_cli(env, "j-nope")
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == "error: no journey for request 'j-nope' (nothing audited or delivered yet)"
    )

    # The API: operators read any journey, the owner their own, anyone else gets 404.
    keys = Keys.create(tmp_path / "jwks")
    async with api_client(api_settings(env.settings, keys)) as (client, _):
        operator = keys.token("ops", ["operator"])
        answer = await client.get("/v1/notifications/j-held/journey", headers=auth(operator))
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == "delivered"
        own = await client.get("/v1/notifications/j-held/journey", headers=auth(keys.token(USER)))
        assert own.status_code == 200
        other = await client.get(
            "/v1/notifications/j-held/journey", headers=auth(keys.token("someone"))
        )
        assert other.status_code == 404
        listed = await client.get(
            f"/v1/users/{USER}/journeys",
            params={"from": (utcnow() - timedelta(minutes=10)).isoformat()},
            headers=auth(operator),
        )
        assert {i["request_id"] for i in listed.json()["items"]} >= {
            "j-suppressed",
            "j-failover",
            "j-held",
        }
        mine = await client.get("/v1/users/me/journeys", headers=auth(keys.token(USER)))
        assert len(mine.json()["items"]) == 3
        theirs = await client.get(f"/v1/users/{USER}/journeys", headers=auth(keys.token("x")))
        assert theirs.status_code == 404
