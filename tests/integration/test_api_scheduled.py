"""``/v1/users/{user}/scheduled``: listing from the read model, commands onto the topic,
who may do what, and validation at the edge (in-process ASGI, real Redis and Kafka)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from finstream.api.deps import Resources
from finstream.domain.notify.scheduled import Item, item_key
from finstream.domain.time import to_micros, utcnow
from finstream.settings import Settings
from finstream.stores.read_models import ScheduledStore
from tests.support.api import Keys, api_client, api_settings, auth
from tests.support.services import TestEnv

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def settings(env: TestEnv, keys: Keys) -> Settings:
    return api_settings(env.settings, keys)


@pytest.fixture(scope="module")
async def api(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Resources]]:
    async with api_client(settings) as pair:
        yield pair


async def hold(res: Resources, user: str, item_id: str, minutes: int) -> None:
    """An item as the statestore role writes it from notify.scheduled.items."""
    due = utcnow() + timedelta(minutes=minutes)
    item = Item(item_id, user, "REQUEST", "deliver_at", to_micros(due), "account", "welcome")
    value = res.topic("notify.scheduled.items").encode(item.record("HELD", utcnow()))
    await ScheduledStore(res.redis, res.settings, res.codec).put(user, item_id, value)


def problem(resp: httpx.Response, status: int, text: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, Any] = resp.json()
    assert text in body["detail"], body
    return body


def commands(env: TestEnv, count: int) -> list[tuple[bytes, dict[str, Any]]]:
    found = env.consume_all("notify.scheduled.commands", min_count=count, timeout=20)
    return [(m.key(), env.codec.decode(m.value(), "ScheduleCommand")) for m in found]


async def test_list_reschedule_cancel_and_who_may(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, env: TestEnv
) -> None:
    client, res = api
    await hold(res, "ann", "r-late", 90)
    await hold(res, "ann", "r-soon", 5)
    await hold(res, "ben", "r-ben", 5)
    ann = auth(keys.token("ann"))

    listed = await client.get("/v1/users/me/scheduled", headers=ann)
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["user_id"] == "ann"
    assert [i["item_id"] for i in body["items"]] == ["r-soon", "r-late"]  # soonest first
    first = body["items"][0]
    assert (first["kind"], first["state"], first["reason"]) == ("request", "held", "deliver_at")
    one = await client.get("/v1/users/ann/scheduled/r-late", headers=ann)
    assert one.json()["item_id"] == "r-late"

    # Someone else's items look missing to a user; operators read and change anyone's.
    problem(await client.get("/v1/users/ben/scheduled", headers=ann), 404)
    problem(await client.delete("/v1/users/ben/scheduled/r-ben", headers=ann), 404)
    service = auth(keys.token("svc", ("service",)))
    problem(await client.get("/v1/users/ann/scheduled", headers=service), 403)
    problem(await client.delete("/v1/users/ann/scheduled/r-late", headers=service), 403)
    problem(await client.get("/v1/users/ann/scheduled", headers={}), 401)
    ops = auth(keys.token("ops-1", ("operator",)))
    assert (await client.get("/v1/users/ben/scheduled", headers=ops)).status_code == 200

    new_time = utcnow() + timedelta(hours=3)
    moved = await client.patch(
        "/v1/users/ann/scheduled/r-late", headers=ann, json={"deliver_at": new_time.isoformat()}
    )
    assert moved.status_code == 202, moved.text
    assert moved.json()["action"] == "reschedule"
    assert moved.json()["status"] == "accepted"
    cancelled = await client.delete("/v1/users/ann/scheduled/r-soon", headers=ann)
    assert cancelled.status_code == 202, cancelled.text
    by_operator = await client.delete("/v1/users/ben/scheduled/r-ben", headers=ops)
    assert by_operator.status_code == 202, by_operator.text

    sent = {c["command_id"]: (k, c) for k, c in commands(env, 3)}
    key, c = sent[moved.json()["command_id"]]
    assert key == b"ann"
    assert (c["action"], c["item_id"], c["requested_by"]) == ("RESCHEDULE", "r-late", "user:ann")
    assert c["deliver_at"] == new_time
    key, c = sent[cancelled.json()["command_id"]]
    assert (c["action"], c["item_id"], c["deliver_at"]) == ("CANCEL", "r-soon", None)
    key, c = sent[by_operator.json()["command_id"]]
    assert (key, c["requested_by"]) == (b"ben", "operator:ops-1")
    assert item_key("ann", "x") == b"ann/x"


async def test_validation_at_the_edge(api: tuple[httpx.AsyncClient, Resources], keys: Keys) -> None:
    client, res = api
    await hold(res, "cy", "r-1", 30)
    cy = auth(keys.token("cy"))
    url = "/v1/users/cy/scheduled/r-1"
    past = (utcnow() - timedelta(minutes=1)).isoformat()
    body = problem(await client.patch(url, headers=cy, json={"deliver_at": past}), 422)
    assert "not in the future" in body["detail"]
    assert body["errors"][0]["pointer"] == "/deliver_at"
    far = (utcnow() + timedelta(days=400)).isoformat()
    problem(await client.patch(url, headers=cy, json={"deliver_at": far}), 422, "366 days")
    naive = "2030-01-01T10:00:00"
    problem(await client.patch(url, headers=cy, json={"deliver_at": naive}), 422)
    problem(await client.patch(url, headers=cy, json={}), 422)
    problem(await client.patch(url, headers=cy, json={"deliver_at": "soon"}), 422)
    soon = (utcnow() + timedelta(hours=1)).isoformat()
    unknown = "/v1/users/cy/scheduled/nope"
    problem(await client.patch(unknown, headers=cy, json={"deliver_at": soon}), 404, "'nope'")
    problem(await client.delete(unknown, headers=cy), 404, "released or cancelled")
    problem(await client.get(unknown, headers=cy), 404)
