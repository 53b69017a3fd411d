"""Scheduled notifications under control, through real router and statestore workers:
held items are listed (API and CLI), rescheduled and cancelled (API, CLI, the topic),
every command's outcome is audited, malformed commands are dead letters, and a cancel
racing the release of the same hold ends one way only: cancelled and never sent, or
sent once and the cancel reports "already released"."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from finstream.domain.deadletter import H_ERROR_CLASS, H_ERROR_MESSAGE
from finstream.domain.notify.preferences import parse_preferences
from finstream.domain.time import utcnow
from tests.support.api import Keys, api_client, api_settings, auth
from tests.support.services import TestEnv, group_caught_up, wait_until, workers

pytestmark = pytest.mark.e2e

USER = "sam-sched"


def request(request_id: str, deliver_at: datetime | None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "user_id": USER,
        "category": "account",
        "priority": "NORMAL",
        "template": "message",
        "data": {"title": f"About {request_id}", "body": "Details inside."},
        "channels": [],
        "deliver_at": deliver_at,
        "expires_at": None,
        "collapse_key": None,
        "created_at": utcnow(),
        "source": "scheduled-test",
        "correlation_id": f"cid-{request_id}",
    }


def command(item_id: str, action: str = "CANCEL", at: datetime | None = None) -> dict[str, Any]:
    return {
        "command_id": f"sc-{uuid.uuid4().hex}",
        "user_id": USER,
        "item_id": item_id,
        "action": action,
        "deliver_at": at,
        "requested_at": utcnow(),
        "requested_by": "test",
        "correlation_id": None,
    }


def hold(env: TestEnv, *items: tuple[str, datetime]) -> None:
    env.produce_records(
        "notify.requests", "NotificationRequest", [(USER, request(r, at)) for r, at in items]
    )


def send(env: TestEnv, *commands: dict[str, Any]) -> None:
    env.produce_records(
        "notify.scheduled.commands", "ScheduleCommand", [(USER, c) for c in commands]
    )


def sent(env: TestEnv) -> list[str]:
    """The request ids of every in-app message the router published (committed)."""
    return [
        env.codec.decode(m.value(), "OutboundMessage")["request_id"]
        for m in env.consume_all("notify.outbound.inapp", timeout=5)
    ]


def outcomes(env: TestEnv) -> dict[str, dict[str, Any]]:
    """Audited command outcomes, by command id."""
    events = env.decode_all("audit.events", "AuditEvent", timeout=5)
    return {e["details"]["command_id"]: e for e in events if e["details"].get("command_id")}


def outcome(env: TestEnv, command_id: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: outcomes(env).get(command_id), timeout=60, message=f"outcome of {command_id}"
    )
    return found


def dead_letters(env: TestEnv, count: int) -> list[dict[str, bytes]] | None:
    found = [dict(m.headers() or []) for m in env.consume_all("dlq", timeout=5)]
    return found if len(found) >= count else None


async def eventually(probe: Callable[[], Awaitable[Any]], message: str) -> Any:
    """wait_until for a probe that needs this event loop (the in-process API)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = await probe()
        if found:
            return found
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out waiting for {message}")


def cli(env: TestEnv, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "scheduled", *args],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listed(env: TestEnv) -> dict[str, dict[str, Any]]:
    out = cli(env, "list", USER, "--json")
    assert out.returncode == 0, out.stderr
    return {i["item_id"]: i for i in json.loads(out.stdout)}


async def test_list_reschedule_cancel_and_the_race(
    env: TestEnv, log_dir: Path, tmp_path: Path
) -> None:
    keys = Keys.create(tmp_path / "jwks")
    prefs = parse_preferences(
        {"user_id": USER, "categories": {"account": {"channels": ["inapp"]}}}, now=utcnow()
    )
    with workers(env, log_dir, "router", "statestore", router_tick_seconds="0.1") as running:
        env.produce_records("notify.preferences", "UserPreferences", [(USER, prefs)])
        # The router's own commit: the read model is the statestore's, not the router's.
        wait_until(
            lambda: group_caught_up(env, env.settings.group("router"), ["notify.preferences"]),
            timeout=30,
            message="the router knows the user's preferences",
        )
        later = utcnow() + timedelta(hours=1)
        hold(env, ("h-keep", later), ("h-api-move", later), ("h-api-cancel", later))
        hold(env, ("h-cli-move", later), ("h-cli-cancel", later))
        names = {"h-keep", "h-api-move", "h-api-cancel", "h-cli-move", "h-cli-cancel"}
        wait_until(lambda: set(listed(env)) == names, timeout=60, message="five items listed")
        assert listed(env)["h-keep"]["reason"] == "deliver_at"
        assert listed(env)["h-keep"]["state"] == "HELD"

        # -- the API ----------------------------------------------------------------------
        async with api_client(api_settings(env.settings, keys)) as (client, _res):
            me = auth(keys.token(USER))
            page = (await client.get("/v1/users/me/scheduled", headers=me)).json()
            assert {i["item_id"] for i in page["items"]} == names
            soon = utcnow() + timedelta(seconds=2)
            moved = await client.patch(
                "/v1/users/me/scheduled/h-api-move",
                headers=me,
                json={"deliver_at": soon.isoformat()},
            )
            assert moved.status_code == 202, moved.text
            gone = await client.delete("/v1/users/me/scheduled/h-api-cancel", headers=me)
            assert gone.status_code == 202, gone.text
            moved_event = outcome(env, moved.json()["command_id"])
            assert moved_event["action"] == "rescheduled"
            assert moved_event["details"]["requested_by"] == f"user:{USER}"
            assert moved_event["details"]["release_at"] == later.isoformat()
            cancelled_event = outcome(env, gone.json()["command_id"])
            assert cancelled_event["action"] == "cancelled"
            assert cancelled_event["subject_id"] == "h-api-cancel"
            # The rescheduled one is released at its new time, once; the cancelled one never.
            wait_until(lambda: "h-api-move" in sent(env), timeout=60, message="moved, released")
            wait_until(
                lambda: not {"h-api-move", "h-api-cancel"} & set(listed(env)),
                timeout=30,
                message="released and cancelled items leave the list",
            )
            again = await client.delete("/v1/users/me/scheduled/h-api-cancel", headers=me)
            assert again.status_code == 404

        # -- the CLI ----------------------------------------------------------------------
        out = cli(env, "reschedule", USER, "h-cli-move", "--at", "+3h")
        assert out.returncode == 0, out.stderr
        cli_move = out.stdout.split("command ")[-1].strip()
        out = cli(env, "cancel", USER, "h-cli-cancel")
        assert out.returncode == 0, out.stderr
        cli_cancel = out.stdout.split("command ")[-1].strip()
        assert outcome(env, cli_move)["action"] == "rescheduled"
        assert outcome(env, cli_cancel)["action"] == "cancelled"
        wait_until(
            lambda: (
                listed(env).get("h-cli-move", {}).get("state") == "RESCHEDULED"
                and "h-cli-cancel" not in listed(env)
            ),
            timeout=30,
            message="the CLI's commands in the list",
        )
        item = listed(env)["h-cli-move"]
        assert item["command_id"] == cli_move
        assert datetime.fromisoformat(item["due"]) > later + timedelta(hours=1)
        out = cli(env, "cancel", USER, "h-cli-cancel")
        assert out.returncode == 1
        assert "no scheduled notification 'h-cli-cancel'" in out.stderr
        out = cli(env, "reschedule", USER, "h-keep", "--at", "-1h")
        assert out.returncode == 1
        assert "not in the future" in out.stderr

        # -- the race, both orders ----------------------------------------------------------
        # Release first: h-rel is released, then cancelled: "already released", sent once.
        hold(env, ("h-rel", utcnow() + timedelta(seconds=1)))
        wait_until(lambda: "h-rel" in sent(env), timeout=60, message="h-rel released")
        late = command("h-rel")
        send(env, late)
        refused = outcome(env, late["command_id"])
        assert refused["action"] == "command_refused"
        assert refused["details"]["outcome"] == "already_released"
        assert refused["reason"] == "already released"

        # Cancel first: h-first is due in 20 s and cancelled at once; h-mark is due at the
        # same time and not cancelled. Once h-mark is out, h-first's time has come and gone.
        due = utcnow() + timedelta(seconds=20)
        hold(env, ("h-first", due), ("h-mark", due))
        first = command("h-first")
        send(env, first)
        assert outcome(env, first["command_id"])["action"] == "cancelled"
        wait_until(lambda: "h-mark" in sent(env), timeout=90, message="h-mark released")

        # Racing: cancels sent as their holds fall due, on one partition; either wins.
        base = utcnow()
        racing = [f"h-race-{i}" for i in range(8)]
        hold(env, *((r, base + timedelta(milliseconds=150 * i)) for i, r in enumerate(racing)))
        cancels = {r: command(r) for r in racing}
        send(env, *cancels.values())
        hold(env, ("h-end", base + timedelta(seconds=2)))
        wait_until(lambda: "h-end" in sent(env), timeout=90, message="h-end released")

        # Malformed commands are dead letters with the reason; the partition moves on.
        bad = command("h-keep", "RESCHEDULE")  # no time
        env.produce(
            "notify.scheduled.commands",
            [
                (USER.encode(), env.codec.encode("ScheduleCommand", bad)),
                (b"someone-else", env.codec.encode("ScheduleCommand", command("h-keep"))),
                (USER.encode(), b"\x00not avro"),
            ],
        )
        letters = wait_until(lambda: dead_letters(env, 3), timeout=60, message="3 dead letters")

        # A restarted router announces what it holds again: the read model heals.
        r = redis.Redis.from_url(env.settings.redis_url.get_secret_value())
        r.delete(env.settings.redis_key(f"scheduled:{{{USER}}}"))
        r.close()
        assert listed(env) == {}
        router = running[0]
        router.stop()
        router.start()
        wait_until(
            lambda: set(listed(env)) == {"h-keep", "h-cli-move"},
            timeout=60,
            message="the held items announced again",
        )

    out_ids = sent(env)
    done = outcomes(env)
    # Exactly once: every released hold went out once; nothing cancelled went out.
    assert sorted(out_ids) == sorted(set(out_ids))
    for never in ("h-api-cancel", "h-cli-cancel", "h-first", "h-keep", "h-cli-move"):
        assert never not in out_ids, never
    assert {"h-api-move", "h-rel", "h-mark", "h-end"} <= set(out_ids)
    won = {"cancelled": 0, "already_released": 0}
    for r, c in cancels.items():
        event = done[c["command_id"]]
        result = event["details"]["outcome"]
        assert result in won, event
        won[result] += 1
        assert (r in out_ids) == (result == "already_released"), (r, result)
    assert sum(won.values()) == len(racing)

    reasons = [h.get(H_ERROR_MESSAGE, b"").decode() for h in letters]
    assert any("a reschedule needs the new time" in m for m in reasons), reasons
    assert any("key does not match user_id" in m for m in reasons), reasons
    assert {h.get(H_ERROR_CLASS, b"").decode() for h in letters} >= {"InvalidKey"}
    # What is still held is listed: h-keep and the CLI's rescheduled one.
    assert set(listed(env)) == {"h-keep", "h-cli-move"}


async def test_quiet_hours_holds_and_digests_are_under_control_too(
    env: TestEnv, log_dir: Path, tmp_path: Path
) -> None:
    keys = Keys.create(tmp_path / "jwks")
    user = "quinn-sched"
    now = utcnow()
    prefs = parse_preferences(
        {
            "user_id": user,
            "timezone": "UTC",
            "emails": [{"address": "quinn@example.com", "verified": True}],
            # In quiet hours now (UTC), for the next two hours.
            "quiet_hours": [
                {
                    "start": (now - timedelta(hours=1)).strftime("%H:%M"),
                    "end": (now + timedelta(hours=2)).strftime("%H:%M"),
                }
            ],
            "categories": {
                "account": {"channels": ["email"]},
                "news": {"channels": ["inapp"], "digest": True},
            },
        },
        now=now,
    )

    def req(rid: str, category: str, priority: str) -> dict[str, Any]:
        r = request(rid, None)
        return {**r, "user_id": user, "category": category, "priority": priority}

    with workers(
        env,
        log_dir,
        "router",
        "statestore",
        router_tick_seconds="0.1",
        router_digest_seconds="3600",
    ):
        env.produce_records("notify.preferences", "UserPreferences", [(user, prefs)])
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
                (user, req("q-quiet", "account", "NORMAL")),
                (user, req("q-low-1", "news", "LOW")),
                (user, req("q-low-2", "news", "LOW")),
            ],
        )
        async with api_client(api_settings(env.settings, keys)) as (client, _res):
            me = auth(keys.token(user))

            async def items() -> dict[str, dict[str, Any]]:
                page = (await client.get("/v1/users/me/scheduled", headers=me)).json()
                return {i["kind"] + ":" + i["reason"]: i for i in page["items"]}

            async def both() -> dict[str, dict[str, Any]] | None:
                found = await items()
                digest = found.get("digest:digest")
                ready = "request:quiet_hours" in found and digest and digest["items"] == 2
                return found if ready else None

            found = await eventually(both, "a quiet-hours hold and a digest of 2 listed")
            quiet = found["request:quiet_hours"]
            assert (quiet["item_id"], quiet["channels"]) == ("q-quiet", ["email"])
            digest_id = found["digest:digest"]["item_id"]
            assert digest_id.startswith("digest-")

            # The digest, brought forward, goes out now; the quiet-hours hold is cancelled.
            soon = (utcnow() + timedelta(seconds=2)).isoformat()
            moved = await client.patch(
                f"/v1/users/me/scheduled/{digest_id}", headers=me, json={"deliver_at": soon}
            )
            assert moved.status_code == 202, moved.text
            gone = await client.delete("/v1/users/me/scheduled/q-quiet", headers=me)
            assert gone.status_code == 202, gone.text
            assert outcome(env, moved.json()["command_id"])["action"] == "rescheduled"
            assert outcome(env, gone.json()["command_id"])["action"] == "cancelled"
            wait_until(lambda: digest_id in sent(env), timeout=60, message="the digest sent")

            async def nothing() -> bool:
                return not await items()

            await eventually(nothing, "nothing held any more")
    emails = env.consume_all("notify.outbound.email", timeout=5)
    assert not [m for m in emails if m.key() == user.encode()]
