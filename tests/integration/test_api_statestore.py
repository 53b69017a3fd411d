"""The statestore role: compacted topics -> Redis read models, with dead letters for bad input."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from finstream.codec import Codec
from finstream.domain.deadletter import H_ERROR_CLASS, H_SOURCE_TOPIC
from finstream.stores.read_models import PreferencesStore, RulesStore
from finstream.stores.redis import connect
from tests.support.services import TestEnv, WorkerProcess, wait_until

pytestmark = pytest.mark.integration

T0 = datetime(2025, 5, 1, 12, tzinfo=UTC)


def rule(rule_id: str, user: str, at: datetime, value: str = "100") -> dict[str, Any]:
    return {
        "rule_id": rule_id,
        "user_id": user,
        "symbol": "AAPL",
        "condition": "GREATER_THAN",
        "value": Decimal(value),
        "frequency": "ONLY_ONCE",
        "enabled": True,
        "created_at": T0,
        "updated_at": at,
    }


def prefs(user: str, at: datetime, locale: str = "en") -> dict[str, Any]:
    return {"user_id": user, "locale": locale, "updated_at": at}


def read(env: TestEnv) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        redis = connect(env.settings)
        try:
            rules = RulesStore(redis, env.settings, env.codec)
            store = PreferencesStore(redis, env.settings, env.codec)
            return {
                "ann": [(r["rule_id"], r["value"]) for r in await rules.list_for_user("ann")],
                "ben": await rules.list_for_user("ben"),
                "p-ann": await store.get("ann"),
                "p-ben": await store.get("ben"),
            }
        finally:
            await redis.aclose()

    return asyncio.run(go())


def test_statestore_mirrors_the_topics(env: TestEnv, log_dir: Path) -> None:
    codec = Codec()
    enc = codec.encode
    env.produce(
        "alerts.rules",
        [
            (b"r-1", enc("AlertRule", rule("r-1", "ann", T0, "100"))),
            (b"r-1", enc("AlertRule", rule("r-1", "ann", T0 + timedelta(seconds=2), "120"))),
            # A replayed older version after the newer one: refused by version.
            (b"r-1", enc("AlertRule", rule("r-1", "ann", T0 + timedelta(seconds=1), "110"))),
            (b"r-2", enc("AlertRule", rule("r-2", "ben", T0))),
            (b"r-2", None),  # tombstone
            (b"r-3", b"\x00garbage"),
            (b"r-wrong-key", enc("AlertRule", rule("r-4", "ann", T0))),
        ],
    )
    env.produce(
        "notify.preferences",
        [
            (b"ann", enc("UserPreferences", prefs("ann", T0, "de"))),
            (b"ben", enc("UserPreferences", prefs("ben", T0))),
            (b"ben", None),
            (b"cat", enc("UserPreferences", prefs("ann", T0 - timedelta(days=1)))),
        ],
    )
    worker = WorkerProcess(env, "statestore", log_dir).start()
    try:
        expected = {"ann": [("r-1", Decimal("120"))], "ben": [], "p-ben": None}

        def settled() -> bool:
            state = read(env)
            p_ann = state.pop("p-ann")
            return state == expected and p_ann is not None and p_ann["locale"] == "de"

        wait_until(settled, timeout=60, message="read models mirror the topics")
        letters = env.consume_all("dlq", min_count=3)
        reasons = sorted(
            (dict(m.headers())[H_SOURCE_TOPIC].decode(), dict(m.headers())[H_ERROR_CLASS].decode())
            for m in letters
        )
        assert reasons == [
            (env.topic("alerts.rules"), "DecodeError"),
            (env.topic("alerts.rules"), "KeyMismatch"),
            (env.topic("notify.preferences"), "KeyMismatch"),
        ]
        # Live: a newer version, then a delete.
        env.produce(
            "alerts.rules",
            [(b"r-1", enc("AlertRule", rule("r-1", "ann", T0 + timedelta(seconds=9), "130")))],
        )
        wait_until(lambda: read(env)["ann"] == [("r-1", Decimal("130"))], message="live update")
        env.produce("alerts.rules", [(b"r-1", None)])
        wait_until(lambda: read(env)["ann"] == [], message="live delete")
    finally:
        assert worker.stop() == 0, worker.log_tail()
