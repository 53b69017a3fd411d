"""The REST API against real Redis, Kafka and PostgreSQL (in-process ASGI).

Authorization negatives on every endpoint, "someone else's looks missing",
roles, read-after-write through the compacted topics, idempotency keys,
webhook signatures, and problem documents for every error status.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlparse, urlunparse

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from finstream.api.deps import Resources
from finstream.api.webhooks import sign_sendgrid
from finstream.domain.deadletter import H_ERROR_MESSAGE, H_SOURCE_TOPIC
from finstream.domain.marketdata.ticks import make_tick
from finstream.domain.time import utcnow
from finstream.settings import Settings
from tests.support.api import Keys, api_client, api_settings, auth
from tests.support.services import TestEnv, WorkerProcess, free_port
from tests.support.toxiproxy import Proxy, Toxiproxy

pytestmark = pytest.mark.integration

TWILIO_TOKEN = "twilio-auth-token-for-tests"
PUBLIC_URL = "https://hooks.finstream.test"
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def sendgrid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def settings(env: TestEnv, keys: Keys, sendgrid_key: ec.EllipticCurvePrivateKey) -> Settings:
    der = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return api_settings(
        env.settings,
        keys,
        api_twilio_auth_token=SecretStr(TWILIO_TOKEN),
        api_sendgrid_webhook_public_key=base64.b64encode(der).decode(),
        api_public_url=PUBLIC_URL,
        api_max_body_bytes=16 * 1024,
        prefs_apply_wait=2.0,
    )


@pytest.fixture(scope="module")
async def api(
    settings: Settings, statestore: WorkerProcess
) -> AsyncIterator[tuple[httpx.AsyncClient, Resources]]:
    async with api_client(settings) as pair:
        yield pair


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == PROBLEM
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["type"].startswith("https://finstream.dev/problems/")
    assert body["title"]
    assert body["detail"]
    return body


def records(env: TestEnv, topic: str, key: str | None = None, **kw: Any) -> list[Any]:
    msgs = env.consume_all(topic, **kw)
    return [m for m in msgs if key is None or m.key() == key.encode()]


RULE = {"symbol": "aapl", "condition": "GREATER_THAN", "value": "190.5"}
PREFS = {"locale": "de-at", "timezone": "Europe/Vienna", "emails": ["Alice@Example.COM"]}
WELCOME = {"title": "Welcome", "body": "Hello."}
MERGE = {"content-type": "application/merge-patch+json"}

# Every authenticated endpoint, with a body that would be valid.
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("GET", "/v1/quotes/AAPL", None),
    ("GET", "/v1/bars/AAPL", None),
    ("GET", "/v1/users/me/rules", None),
    ("POST", "/v1/users/me/rules", RULE),
    ("GET", "/v1/users/me/rules/r-1", None),
    ("PUT", "/v1/users/me/rules/r-1", RULE),
    ("PATCH", "/v1/users/me/rules/r-1", {"enabled": False}),
    ("DELETE", "/v1/users/me/rules/r-1", None),
    ("GET", "/v1/users/me/preferences", None),
    ("PUT", "/v1/users/me/preferences", PREFS),
    ("PATCH", "/v1/users/me/preferences", {"locale": "fr"}),
    ("GET", "/v1/users/me/inbox", None),
    ("GET", "/v1/users/me/inbox/m-1", None),
    ("PATCH", "/v1/users/me/inbox/m-1", {"read": True}),
    (
        "POST",
        "/v1/notifications",
        {"user_id": "alice", "category": "account", "template": "welcome", "data": WELCOME},
    ),
]


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    h = dict(headers or {})
    if token is not None:
        h.update(auth(token))
    if method == "PATCH":
        h.update(MERGE)
    if path == "/v1/notifications":
        h.setdefault("Idempotency-Key", uuid.uuid4().hex)
    content = json.dumps(body) if body is not None else None
    if content is not None and "content-type" not in h:
        h["content-type"] = "application/json"
    return await client.request(method, path, content=content, headers=h)


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
async def test_every_endpoint_refuses_bad_tokens(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, method: str, path: str, body: Any
) -> None:
    client, _ = api
    bad = {
        "no token": None,
        "expired": keys.token(ttl=-120),
        "wrong audience": keys.token(aud="another-api"),
        "wrong issuer": keys.token(iss="https://evil.example"),
        "wrong signature": keys.forged(),
        "not yet valid": keys.token(nbf=time.time() + 600),
        "unsigned": keys.token(alg="HS256", key="x" * 40, kid=None),
    }
    for what, token in bad.items():
        resp = await call(client, method, path, body, token)
        p = problem(resp, 401)
        assert resp.headers["www-authenticate"].startswith("Bearer realm="), what
        if token is not None:
            assert 'error="invalid_token"' in resp.headers["www-authenticate"], what
            assert token not in resp.text
        assert p["type"].endswith("/unauthorized"), what
    # Basic auth or a token in the URL is not a bearer token.
    resp = await client.request(method, path, headers={"Authorization": "Basic YTpi"})
    problem(resp, 401)
    resp = await client.request(method, f"{path}?access_token={keys.token()}")
    problem(resp, 401)


async def test_someone_elses_resources_look_missing(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys
) -> None:
    client, res = api
    alice, bob = keys.token("alice"), keys.token("bob")
    created = await call(client, "POST", "/v1/users/me/rules", RULE, alice)
    assert created.status_code == 201, created.text
    rule_id = created.json()["rule_id"]
    assert (await call(client, "PUT", "/v1/users/me/preferences", PREFS, alice)).status_code == 200
    await res.inbox.add("alice", "m-secret", {"body": "for alice", "created_at": "x"}, 1.0)

    missing = (await call(client, "GET", "/v1/users/me/rules/r-does-not-exist", None, bob)).json()
    attempts = [
        ("GET", f"/v1/users/me/rules/{rule_id}", None),
        ("GET", f"/v1/users/alice/rules/{rule_id}", None),
        ("GET", "/v1/users/alice/rules", None),
        ("PUT", f"/v1/users/me/rules/{rule_id}", RULE),
        ("PATCH", f"/v1/users/me/rules/{rule_id}", {"enabled": False}),
        ("DELETE", f"/v1/users/me/rules/{rule_id}", None),
        ("DELETE", f"/v1/users/alice/rules/{rule_id}", None),
        ("GET", "/v1/users/alice/preferences", None),
        ("PUT", "/v1/users/alice/preferences", PREFS),
        ("PATCH", "/v1/users/alice/preferences", {"locale": "fr"}),
        ("GET", "/v1/users/me/preferences", None),  # bob has none: the same answer
        ("GET", "/v1/users/me/inbox/m-secret", None),
        ("PATCH", "/v1/users/me/inbox/m-secret", {"read": True}),
        ("GET", "/v1/users/alice/inbox", None),
        ("GET", "/v1/users/alice/inbox/m-secret", None),
    ]
    for method, path, body in attempts:
        resp = await call(client, method, path, body, bob)
        assert resp.status_code == 404, (method, path, resp.text)
        assert resp.json() == missing, (method, path)
        assert (
            resp.content
            == (await call(client, "GET", "/v1/users/me/rules/r-nope", None, bob)).content
        )
    # Nothing of alice's changed.
    mine = await call(client, "GET", f"/v1/users/me/rules/{rule_id}", None, alice)
    assert mine.json()["enabled"] is True
    assert (await call(client, "GET", "/v1/users/me/preferences", None, alice)).json()[
        "locale"
    ] == "de-AT"
    message = await call(client, "GET", "/v1/users/me/inbox/m-secret", None, alice)
    assert message.json()["read"] is False


async def test_roles(api: tuple[httpx.AsyncClient, Resources], keys: Keys) -> None:
    client, res = api
    alice = keys.token("alice")
    service = keys.token("billing", ["service"])
    operator = keys.token("ops-1", ["operator"])
    await call(client, "PUT", "/v1/users/me/preferences", PREFS, alice)
    await res.inbox.add("alice", "m-ops", {"body": "hi", "created_at": "x"}, 2.0)

    note = {"user_id": "carol", "category": "account", "template": "welcome", "data": WELCOME}
    assert (await call(client, "POST", "/v1/notifications", note, service)).status_code == 202
    problem(await call(client, "POST", "/v1/notifications", note, alice), 403)
    problem(await call(client, "POST", "/v1/notifications", note, operator), 403)
    problem(await call(client, "GET", "/v1/users/alice/rules", None, service), 403)
    problem(await call(client, "GET", "/v1/users/me/preferences", None, service), 403)

    for path in ("/v1/users/alice/rules", "/v1/users/alice/preferences", "/v1/users/alice/inbox"):
        assert (await call(client, "GET", path, None, operator)).status_code == 200, path
    assert (await call(client, "GET", "/v1/users/alice/inbox/m-ops", None, operator)).json()[
        "body"
    ] == "hi"
    for method, path, body in (
        ("POST", "/v1/users/alice/rules", RULE),
        ("PUT", "/v1/users/alice/preferences", PREFS),
        ("PATCH", "/v1/users/alice/inbox/m-ops", {"read": True}),
    ):
        problem(await call(client, method, path, body, operator), 403)
    # Market data is for every authenticated caller.
    await res.quotes.update(
        make_tick(symbol="ROLE", price="1", ts=utcnow(), received_at=utcnow(), source="test")
    )
    for token in (alice, service, operator):
        assert (await call(client, "GET", "/v1/quotes/ROLE", None, token)).status_code == 200


async def test_rule_lifecycle_reads_its_own_writes(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, env: TestEnv
) -> None:
    client, res = api
    token = keys.token("dora")
    created = await call(client, "POST", "/v1/users/me/rules", RULE, token)
    assert created.status_code == 201, created.text
    rule = created.json()
    rule_id = rule["rule_id"]
    assert created.headers["location"] == f"/v1/users/me/rules/{rule_id}"
    assert (rule["user_id"], rule["symbol"], rule["value"]) == ("dora", "AAPL", "190.5")
    etag1 = created.headers["etag"]
    # Read-after-write: no wait for the statestore role.
    listed = await call(client, "GET", "/v1/users/me/rules", None, token)
    assert [r["rule_id"] for r in listed.json()["items"]] == [rule_id]

    put = await call(
        client,
        "PUT",
        f"/v1/users/me/rules/{rule_id}",
        {"symbol": "AAPL", "condition": "ENTERING_CHANNEL", "lower": "180", "upper": "200"},
        token,
        {"If-Match": etag1},
    )
    assert put.status_code == 200, put.text
    assert put.json()["created_at"] == rule["created_at"]
    assert put.json()["updated_at"] > rule["updated_at"]
    stale = await call(
        client,
        "PATCH",
        f"/v1/users/me/rules/{rule_id}",
        {"enabled": False},
        token,
        {"If-Match": etag1},
    )
    problem(stale, 412)
    patched = await call(
        client, "PATCH", f"/v1/users/me/rules/{rule_id}", {"enabled": False}, token
    )
    assert patched.json()["enabled"] is False
    assert patched.json()["lower"] == "180"
    wrong_params = await call(
        client, "PATCH", f"/v1/users/me/rules/{rule_id}", {"condition": "GREATER_THAN"}, token
    )
    assert problem(wrong_params, 422)["errors"][0]["pointer"] in ("/lower", "/value")

    first_version = (await res.rules.get(rule_id)) or {}
    v1_bytes = res.codec.encode("AlertRule", {**first_version, "enabled": True})
    assert (
        await call(client, "DELETE", f"/v1/users/me/rules/{rule_id}", None, token)
    ).status_code == 204
    problem(await call(client, "GET", f"/v1/users/me/rules/{rule_id}", None, token), 404)
    # A lagging statestore re-applying an older version cannot bring it back.
    assert await res.rules.put(v1_bytes) is False
    problem(await call(client, "GET", f"/v1/users/me/rules/{rule_id}", None, token), 404)

    published = records(env, "alerts.rules", rule_id, min_count=4)
    assert len(published) == 4
    values = [m.value() for m in published]
    assert values[-1] is None, "delete is a tombstone"
    decoded = [env.codec.decode(v, "AlertRule") for v in values[:-1]]
    assert [d["enabled"] for d in decoded] == [True, True, False]
    assert [d["condition"] for d in decoded] == [
        "GREATER_THAN",
        "ENTERING_CHANNEL",
        "ENTERING_CHANNEL",
    ]
    stamps = [d["updated_at"] for d in decoded]
    assert stamps == sorted(stamps), "versions grow in topic order"


async def test_rule_validation_names_the_field(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys
) -> None:
    client, _ = api
    token = keys.token("erin")
    cases = [
        ({"symbol": "AAPL", "condition": "GREATER_THAN"}, "/value"),
        ({"symbol": "AAPL", "condition": "INSIDE_CHANNEL", "lower": 5, "upper": 2}, "/lower"),
        ({**RULE, "bogus": 1}, "/bogus"),
        ({**RULE, "value": "abc"}, "/value"),
        ({**RULE, "expires_at": "2001-01-01T00:00:00Z"}, "/expires_at"),
        ({**RULE, "expires_at": "2031-01-01T00:00:00"}, "/expires_at"),
        ({**RULE, "condition": "SIDEWAYS"}, "/condition"),
        ({"condition": "GREATER_THAN", "value": 1}, "/symbol"),
        ({**RULE, "symbol": "not a symbol!"}, "/symbol"),
    ]
    for body, pointer in cases:
        p = problem(await call(client, "POST", "/v1/users/me/rules", body, token), 422)
        assert p["errors"][0]["pointer"] == pointer, (body, p)
        assert p["errors"][0]["in"] == "body"
    bad_json = await client.post(
        "/v1/users/me/rules",
        content=b"{not json",
        headers={**auth(token), "content-type": "application/json"},
    )
    problem(bad_json, 422)
    p = problem(await call(client, "GET", "/v1/bars/AAPL?limit=0", None, token), 422)
    assert p["errors"][0] == {
        "in": "query",
        "pointer": "/limit",
        "detail": p["errors"][0]["detail"],
    }


async def test_idempotent_rule_create(api: tuple[httpx.AsyncClient, Resources], keys: Keys) -> None:
    client, _ = api
    token = keys.token("frank")
    key = {"Idempotency-Key": f'"{uuid.uuid4()}"'}
    first = await call(client, "POST", "/v1/users/me/rules", RULE, token, key)
    again = await call(client, "POST", "/v1/users/me/rules", RULE, token, key)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert again.headers["idempotent-replayed"] == "true"
    listed = await call(client, "GET", "/v1/users/me/rules", None, token)
    assert len(listed.json()["items"]) == 1
    other = await call(client, "POST", "/v1/users/me/rules", {**RULE, "value": "1"}, token, key)
    assert problem(other, 422)["type"].endswith("/idempotency-key-reused")


async def test_preferences(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, env: TestEnv
) -> None:
    client, res = api
    token = keys.token("gina")
    body = {
        "emails": [{"address": "Gina@Example.COM", "verified": True}],
        "phones": ["+1 415 555 2671"],
        "consents": [{"purpose": "marketing", "granted": True, "at": "2001-01-01T00:00:00Z"}],
        "quiet_hours": [{"days": [5, 1], "start": "22:00", "end": "07:00"}],
    }
    put = await call(client, "PUT", "/v1/users/me/preferences", body, token)
    assert put.status_code == 200, put.text
    prefs = put.json()
    assert prefs["user_id"] == "gina"
    (email,) = prefs["emails"]
    assert email["id"].startswith("c-")
    assert email == {
        "address": "Gina@example.com",
        "verified": False,
        "bounced": False,
        "complained": False,
        "id": email["id"],
    }
    assert prefs["phones"][0]["number"] == "+14155552671"
    # Stored and published sealed under the user's key (issue 14).
    stored_raw = await res.prefs.get_bytes("gina")
    assert stored_raw is not None
    assert b"Gina@example.com" not in stored_raw
    assert b"4155552671" not in stored_raw
    assert prefs["quiet_hours"][0]["days"] == [1, 5]
    consent = prefs["consents"][0]
    assert consent["source"] == "api"
    assert consent["at"] > "2020", "consent is stamped by the server"
    etag = put.headers["etag"]

    got = await call(client, "GET", "/v1/users/me/preferences", None, token)
    assert got.json() == prefs
    assert got.headers["etag"] == etag

    patch = await call(
        client, "PATCH", "/v1/users/me/preferences", {"locale": "fr", "quiet_hours": None}, token
    )
    assert patch.status_code == 200, patch.text
    assert patch.json()["locale"] == "fr"
    assert patch.json()["quiet_hours"] == []
    assert patch.json()["emails"] == prefs["emails"], "a merge patch keeps what it does not name"
    assert patch.json()["consents"] == prefs["consents"]
    problem(
        await call(
            client, "PATCH", "/v1/users/me/preferences", {"locale": "de"}, token, {"If-Match": etag}
        ),
        412,
    )
    bad = await call(client, "PATCH", "/v1/users/me/preferences", {"phones": ["+1 000"]}, token)
    assert problem(bad, 422)["errors"][0]["pointer"] == "/phones/0/number"
    bad = await call(client, "PUT", "/v1/users/me/preferences", {"timezone": "Mars/Olympus"}, token)
    assert problem(bad, 422)["errors"][0]["pointer"] == "/timezone"
    bad = await call(client, "PUT", "/v1/users/me/preferences", {"user_id": "someone"}, token)
    assert problem(bad, 422)["errors"][0]["pointer"] == "/user_id"
    bad = await call(client, "PATCH", "/v1/users/me/preferences", {"caps": [{"limit": 0}]}, token)
    assert problem(bad, 422)["errors"][0]["pointer"].startswith("/caps/0/")

    # A platform flag set since (a verified address) survives the user's next edit.
    stored = await res.prefs.get("gina")
    assert stored is not None
    assert stored["emails"][0]["address"].startswith("fse1:")
    stored["emails"][0]["verified"] = True
    stored["updated_at"] = stored["updated_at"] + timedelta(microseconds=1)
    await res.prefs.put("gina", res.codec.encode("UserPreferences", stored))
    again = await call(
        client, "PUT", "/v1/users/me/preferences", {"emails": ["gina@example.com"]}, token
    )
    assert again.json()["emails"][0]["verified"] is True

    published = records(env, "notify.preferences", "gina", min_count=3)
    assert len(published) == 3
    last = env.codec.decode(published[-1].value(), "UserPreferences")
    assert last == await res.prefs.get("gina")


async def test_a_change_the_statestore_has_not_applied_is_answered_202_and_the_next_waits(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, statestore: WorkerProcess
) -> None:
    client, res = api
    token = keys.token("ivan")
    first = await call(client, "PUT", "/v1/users/me/preferences", {"locale": "en"}, token)
    assert first.status_code == 200, first.text
    assert (await res.prefs.get("ivan") or {}).get("locale") == "en"  # read its own write

    statestore.stop()
    try:
        put = await call(client, "PUT", "/v1/users/me/preferences", {"locale": "fr"}, token)
        assert put.status_code == 202, put.text  # on the topic, not in the read model
        assert put.json()["locale"] == "fr"
        got = await call(client, "GET", "/v1/users/me/preferences", None, token)
        assert got.json()["locale"] == "en"
        # A change built on "en" would undo "fr": refused until "fr" is applied.
        busy = await call(client, "PATCH", "/v1/users/me/preferences", {"timezone": "UTC"}, token)
        assert problem(busy, 409)["detail"].startswith("the last change")
        assert busy.headers["retry-after"] == "1"
    finally:
        statestore.start()

    deadline = time.monotonic() + 60
    while (await res.prefs.get("ivan") or {}).get("locale") != "fr":
        assert time.monotonic() < deadline, "the restarted statestore never applied the change"
        await asyncio.sleep(0.05)
    patch = await call(client, "PATCH", "/v1/users/me/preferences", {"timezone": "UTC"}, token)
    assert patch.status_code == 200, patch.text
    assert (patch.json()["locale"], patch.json()["timezone"]) == ("fr", "UTC")


async def test_inbox(api: tuple[httpx.AsyncClient, Resources], keys: Keys) -> None:
    client, res = api
    token = keys.token("hank")
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(5):
        created = base + timedelta(minutes=i)
        await res.inbox.add(
            "hank",
            f"m{i}",
            {"body": f"message {i}", "created_at": created.isoformat(), "data": {}},
            created.timestamp(),
        )
    page = (await call(client, "GET", "/v1/users/me/inbox?limit=2", None, token)).json()
    assert [m["message_id"] for m in page["items"]] == ["m4", "m3"]
    assert (page["unread"], page["total"]) == (5, 5)
    page2 = await call(
        client, "GET", f"/v1/users/me/inbox?limit=2&before={page['next_before']}", None, token
    )
    assert [m["message_id"] for m in page2.json()["items"]] == ["m2", "m1"]

    read = await call(client, "PATCH", "/v1/users/me/inbox/m4", {"read": True}, token)
    assert read.json()["read"] is True
    archived = await call(client, "PATCH", "/v1/users/me/inbox/m3", {"archived": True}, token)
    assert archived.json()["archived"] is True
    unread = await call(client, "PATCH", "/v1/users/me/inbox/m4", {"read": False}, token)
    assert unread.json()["read"] is False
    await call(client, "PATCH", "/v1/users/me/inbox/m0", {"read": True}, token)
    listing = (await call(client, "GET", "/v1/users/me/inbox", None, token)).json()
    assert [m["message_id"] for m in listing["items"]] == ["m4", "m2", "m1", "m0"]
    assert listing["unread"] == 4
    assert listing["next_before"] is None
    with_archived = await call(
        client, "GET", "/v1/users/me/inbox?include_archived=true", None, token
    )
    assert len(with_archived.json()["items"]) == 5
    only_unread = await call(client, "GET", "/v1/users/me/inbox?unread_only=true", None, token)
    assert "m0" not in [m["message_id"] for m in only_unread.json()["items"]]
    problem(await call(client, "PATCH", "/v1/users/me/inbox/nope", {"read": True}, token), 404)


async def test_notifications_are_idempotent(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, env: TestEnv
) -> None:
    client, _ = api
    service = keys.token("shop", ["service"])
    body = {
        "user_id": "ivy",
        "category": "account",
        "priority": "HIGH",
        "template": "message",
        "data": {"title": "Order 42 shipped", "body": "On its way."},
        "channels": ["EMAIL", "INAPP"],
        "expires_at": (utcnow() + timedelta(hours=1)).isoformat(),
    }
    key = {"Idempotency-Key": "order-42-shipped"}
    first = await call(client, "POST", "/v1/notifications", body, service, key)
    assert first.status_code == 202, first.text
    again = await call(
        client, "POST", "/v1/notifications", dict(reversed(body.items())), service, key
    )
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    conflict = await call(
        client, "POST", "/v1/notifications", {**body, "priority": "LOW"}, service, key
    )
    p = problem(conflict, 422)
    assert "Idempotency-Key" in p["detail"]
    # Keys are per calling service: another service's same key is its own request.
    other = await call(
        client, "POST", "/v1/notifications", body, keys.token("crm", ["service"]), key
    )
    assert other.status_code == 202
    assert other.json()["request_id"] != first.json()["request_id"]

    concurrent_key = {"Idempotency-Key": "race"}
    answers = await asyncio.gather(
        *(
            call(client, "POST", "/v1/notifications", body, service, concurrent_key)
            for _ in range(5)
        )
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(202) >= 1
    assert set(statuses) <= {202, 409}
    race_ids = {a.json()["request_id"] for a in answers if a.status_code == 202}
    assert len(race_ids) == 1

    missing = await client.post("/v1/notifications", json=body, headers=auth(service))
    assert problem(missing, 422)["errors"][0]["in"] == "header"
    past = await call(
        client, "POST", "/v1/notifications", {**body, "expires_at": "2001-01-01T00:00:00Z"}, service
    )
    assert problem(past, 422)["errors"][0]["pointer"] == "/expires_at"

    published = [
        env.codec.decode(m.value(), "NotificationRequest")
        for m in records(env, "notify.requests", "ivy", min_count=3)
    ]
    by_id: dict[str, int] = {}
    for r in published:
        by_id[r["request_id"]] = by_id.get(r["request_id"], 0) + 1
    assert by_id[first.json()["request_id"]] == 1, "a replay publishes nothing"
    assert by_id[next(iter(race_ids))] == 1, "concurrent retries publish once"
    request = next(r for r in published if r["request_id"] == first.json()["request_id"])
    assert (request["priority"], request["channels"], request["source"]) == (
        "HIGH",
        ["EMAIL", "INAPP"],
        "api:shop",
    )


async def _deliveries_row(res: Resources, message_id: str, provider: str, provider_id: str) -> None:
    exists = await res.pg.fetchval("SELECT to_regclass('deliveries') IS NOT NULL")
    if not exists:  # the delivery workers' migration has not landed: the columns we read
        await res.pg.execute(
            "CREATE TABLE deliveries (message_id text PRIMARY KEY, request_id text NOT NULL, "
            "user_id text NOT NULL, attempts integer NOT NULL DEFAULT 0, provider text, "
            "provider_message_id text)"
        )
        await res.pg.execute(
            "INSERT INTO deliveries (message_id, request_id, user_id, attempts, provider, "
            "provider_message_id) VALUES ($1, 'req-db', 'jill', 2, $2, $3)",
            message_id,
            provider,
            provider_id,
        )
        return
    await res.pg.execute(
        "INSERT INTO deliveries (message_id, channel, user_id, request_id, state, attempts, "
        "provider, provider_message_id, deadline, source_topic, source_partition, source_offset, "
        "message) VALUES ($1, 'EMAIL', 'jill', 'req-db', 'sent', 2, $2, $3, now() + interval '1 day', "
        "'notify.outbound.email', 0, 0, '\\x00')",
        message_id,
        provider,
        provider_id,
    )


def twilio_post(
    client: httpx.AsyncClient,
    query: dict[str, str],
    form: dict[str, str],
    token: str = TWILIO_TOKEN,
) -> Any:
    path = "/v1/webhooks/twilio/status" + (f"?{urlencode(query)}" if query else "")
    signature = RequestValidator(token).compute_signature(PUBLIC_URL + path, form)
    return client.post(
        path,
        content=urlencode(form),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        },
    )


async def test_twilio_status_callbacks(
    api: tuple[httpx.AsyncClient, Resources], env: TestEnv
) -> None:
    client, res = api
    ids = {"message_id": "sms-1", "request_id": "req-1", "user_id": "kim"}
    form = {"MessageSid": "SM100", "MessageStatus": "delivered", "AccountSid": "AC1"}
    ok = await twilio_post(client, ids, form)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"accepted": 1, "ignored": 0}
    assert (await twilio_post(client, ids, {**form, "MessageStatus": "sending"})).json() == {
        "accepted": 0,
        "ignored": 1,
    }
    await _deliveries_row(res, "sms-2", "twilio", "SM200")
    by_db = await twilio_post(
        client,
        {"message_id": "sms-2"},
        {**form, "MessageSid": "SM200", "MessageStatus": "undelivered", "ErrorCode": "30006"},
    )
    assert by_db.json() == {"accepted": 1, "ignored": 0}
    unknown = await twilio_post(client, {}, {**form, "MessageSid": "SM-unknown"})
    assert unknown.json() == {"accepted": 0, "ignored": 1}

    forged = await twilio_post(client, ids, form, token="not-the-token")
    assert problem(forged, 403)["detail"] == "The request is not signed by Twilio."
    tampered_url = await client.post(
        "/v1/webhooks/twilio/status?" + urlencode({**ids, "user_id": "mallory"}),
        content=urlencode(form),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": RequestValidator(TWILIO_TOKEN).compute_signature(
                PUBLIC_URL + "/v1/webhooks/twilio/status?" + urlencode(ids), form
            ),
        },
    )
    problem(tampered_url, 403)
    problem(await client.post("/v1/webhooks/twilio/status", content=urlencode(form)), 403)

    results = [
        env.codec.decode(m.value(), "DeliveryResult")
        for m in env.consume_all("notify.delivery", min_count=2)
    ]
    kim = [r for r in results if r["user_id"] == "kim"]
    assert [(r["status"], r["provider_message_id"]) for r in kim] == [("DELIVERED", "SM100")]
    jill = [r for r in results if r["message_id"] == "sms-2"]
    assert [
        (r["status"], r["error_class"], r["request_id"], r["user_id"], r["attempt"]) for r in jill
    ] == [("FAILED", "invalid_recipient", "req-db", "jill", 2)]
    letters = [
        m
        for m in env.consume_all("dlq", min_count=1)
        if dict(m.headers() or [])[H_SOURCE_TOPIC] == b"webhook:twilio"
    ]
    assert len(letters) == 1
    assert b"no delivery of ours" in dict(letters[0].headers())[H_ERROR_MESSAGE]


async def test_sendgrid_events(
    api: tuple[httpx.AsyncClient, Resources],
    env: TestEnv,
    sendgrid_key: ec.EllipticCurvePrivateKey,
) -> None:
    client, res = api
    await _deliveries_row(res, "mail-2", "sendgrid", "sg-msg-2")

    async def post(
        events: Any, key: ec.EllipticCurvePrivateKey = sendgrid_key, tamper: bool = False
    ) -> httpx.Response:
        body = json.dumps(events).encode()
        ts = str(int(time.time()))
        sig = sign_sendgrid(key, ts, body)
        return await client.post(
            "/v1/webhooks/sendgrid/events",
            content=body + (b" " if tamper else b""),
            headers={
                "content-type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": sig,
                "X-Twilio-Email-Event-Webhook-Timestamp": ts,
            },
        )

    events = [
        {
            "event": "delivered",
            "sg_event_id": "e1",
            "sg_message_id": "sg-msg-1",
            "timestamp": 1_700_000_000,
            "message_id": "mail-1",
            "request_id": "req-9",
            "user_id": "lea",
        },
        {
            "event": "open",
            "sg_event_id": "e2",
            "sg_message_id": "sg-msg-2",
            "timestamp": 1_700_000_100,
            "message_id": "mail-2",
        },
        {"event": "group_unsubscribe", "sg_event_id": "e3", "message_id": "mail-1"},
        {
            "event": "bounce",
            "sg_event_id": "e4",
            "sg_message_id": "sg-unknown",
            "timestamp": 1_700_000_000,
        },
    ]
    ok = await post(events)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"accepted": 2, "ignored": 2}
    problem(await post(events, key=ec.generate_private_key(ec.SECP256R1())), 403)
    problem(await post(events, tamper=True), 403)
    problem(await client.post("/v1/webhooks/sendgrid/events", json=events), 403)
    problem(await post({"not": "a list"}), 400)

    results = [
        env.codec.decode(m.value(), "DeliveryResult")
        for m in env.consume_all("notify.delivery", min_count=2)
        if m.key() in (b"lea", b"jill")
    ]
    by_message = {r["message_id"]: r for r in results if r["provider"] == "sendgrid"}
    assert by_message["mail-1"]["status"] == "DELIVERED"
    assert by_message["mail-2"]["status"] == "OPENED"
    assert (by_message["mail-2"]["user_id"], by_message["mail-2"]["request_id"]) == (
        "jill",
        "req-db",
    )


async def test_problems_for_every_error_status(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, settings: Settings
) -> None:
    client, _ = api
    token = keys.token("max")
    problem(await client.get("/v1/no/such/thing"), 404)
    problem(await client.delete("/healthz"), 405)
    big = {**RULE, "message": "x" * 20_000}
    too_big = await call(client, "POST", "/v1/users/me/rules", big, token)
    assert "limit" in problem(too_big, 413)["detail"]

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"symbol": "AAPL", "condition": "GREATER_THAN", "message": "'
        for _ in range(40):
            yield b"y" * 1024
        yield b'"}'

    streamed = await client.post(
        "/v1/users/me/rules",
        content=chunks(),
        headers={**auth(token), "content-type": "application/json"},
    )
    problem(streamed, 413)

    limited = settings.model_copy(update={"api_rate_limit": 3, "api_rate_window_seconds": 30})
    async with api_client(limited) as (small, _):
        t = keys.token("nina")
        answers = [await small.get("/v1/users/me/rules", headers=auth(t)) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["ratelimit-limit"] == "3"
        assert answers[2].headers["ratelimit-remaining"] == "0"
        p = problem(answers[3], 429)
        assert "Rate limit" in p["detail"]
        assert int(answers[3].headers["retry-after"]) >= 1
        # Another token has its own budget.
        assert (
            await small.get("/v1/users/me/rules", headers=auth(keys.token("nina")))
        ).status_code == 200


async def test_quotes_and_bars(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, env: TestEnv
) -> None:
    client, res = api
    token = keys.token("olga")
    now = utcnow()
    await res.quotes.update(
        make_tick(
            symbol="QQQ", price="401.2500", ts=now, received_at=now, source="test", bid="401.2"
        )
    )
    quote = await call(client, "GET", "/v1/quotes/qqq", None, token)
    assert quote.status_code == 200, quote.text
    assert (quote.json()["symbol"], quote.json()["price"], quote.json()["bid"]) == (
        "QQQ",
        "401.25",
        "401.2",
    )
    problem(await call(client, "GET", "/v1/quotes/NOPE", None, token), 404)

    start = datetime(2025, 3, 3, 14, 30, tzinfo=UTC)
    for i in range(25):
        s = start + timedelta(minutes=i)
        await res.pg.execute(
            'INSERT INTO bars (symbol, interval, start, "end", open, high, low, close, volume, trades, final) '
            "VALUES ('QQQ', '1m', $1, $2, $3, $3, $3, $3, 10, 3, true)",
            s,
            s + timedelta(minutes=1),
            Decimal(400 + i),
        )
    frm, to = start.isoformat(), (start + timedelta(hours=1)).isoformat()
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"from": frm, "to": to, "limit": 10}
        if cursor:
            params["cursor"] = cursor
        page = await client.get("/v1/bars/QQQ", params=params, headers=auth(token))
        assert page.status_code == 200, page.text
        pages += 1
        seen += [b["open"] for b in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [str(400 + i) for i in range(25)]
    window = await client.get(
        "/v1/bars/QQQ",
        params={
            "from": (start + timedelta(minutes=5)).isoformat(),
            "to": (start + timedelta(minutes=7)).isoformat(),
        },
        headers=auth(token),
    )
    assert [b["open"] for b in window.json()["items"]] == ["405", "406"]
    assert window.json()["items"][0]["end"] == (start + timedelta(minutes=6)).isoformat()
    p = problem(await client.get("/v1/bars/QQQ", params={"cursor": "!!"}, headers=auth(token)), 422)
    assert p["errors"][0]["pointer"] == "/cursor"
    problem(
        await client.get("/v1/bars/QQQ", params={"from": to, "to": frm}, headers=auth(token)), 422
    )


async def ready_when(
    client: httpx.AsyncClient, check: Any, what: str, within: float = 60.0
) -> tuple[int, dict[str, str]]:
    """The first /readyz answer (status, checks) that ``check`` accepts: one probe of a
    loaded machine may miss its 2 s deadline, which is a fact for the next one to correct."""
    deadline = time.monotonic() + within
    while True:
        r = await client.get("/readyz")
        answer = (r.status_code, r.json()["checks"])
        if check(*answer):
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"/readyz never showed {what} within {within} s: {answer}")
        await asyncio.sleep(0.2)


async def test_health_readiness_metrics(api: tuple[httpx.AsyncClient, Resources]) -> None:
    client, _ = api
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    _, checks = await ready_when(client, lambda status, _: status == 200, "ready")
    assert checks == {
        "redis": "ok",
        "postgresql": "ok",
        "kafka": "ok",
        "pubsub": "ok",
        "keys": "ok",
    }
    metrics = (await client.get("/metrics")).text
    assert 'finstream_api_requests_total{method="GET",route="/healthz",status="200"}' in metrics
    assert "finstream_api_auth_failures_total" in metrics


async def test_readiness_names_each_dependency_that_is_gone(
    settings: Settings, log_dir: Path
) -> None:
    """/readyz is 503 while PostgreSQL, Redis or Kafka is unreachable, names which,
    and is 200 again once it is back (the api role's /readyz says the same)."""
    dead_kafka = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    async with api_client(dead_kafka) as (client, _):
        _, checks = await ready_when(
            client,
            lambda status, checks: (
                status == 503 and {k for k, v in checks.items() if v != "ok"} == {"kafka"}
            ),
            "kafka named alone",
        )
        assert checks["kafka"].startswith("unreachable"), checks

    def through(url: str, proxy: Proxy) -> SecretStr:
        parsed = urlparse(url)
        netloc = parsed.netloc.rsplit("@", 1)
        netloc[-1] = proxy.listen
        return SecretStr(urlunparse(parsed._replace(netloc="@".join(netloc))))

    def upstream(url: str, port: int) -> str:
        parsed = urlparse(url)
        return f"{parsed.hostname}:{parsed.port or port}"

    database_url = settings.database_url.get_secret_value()
    redis_url = settings.redis_url.get_secret_value()
    with Toxiproxy(log_dir) as toxiproxy:
        pg = toxiproxy.proxy("postgres", upstream(database_url, 5432))
        rds = toxiproxy.proxy("redis", upstream(redis_url, 6379))
        proxied = settings.model_copy(
            update={"database_url": through(database_url, pg), "redis_url": through(redis_url, rds)}
        )
        async with api_client(proxied) as (client, _):
            await ready_when(client, lambda status, _: status == 200, "ready")
            # The live-update link (pubsub) runs on Redis too.
            for proxy, name, also in ((pg, "postgresql", set()), (rds, "redis", {"pubsub"})):
                proxy.enable(False)

                def names_it(
                    status: int, checks: dict[str, str], name: str = name, also: set[str] = also
                ) -> bool:
                    failing = {k for k, v in checks.items() if v != "ok"}
                    return status == 503 and name in failing <= {name, *also}

                _, checks = await ready_when(client, names_it, f"{name} named alone")
                assert checks[name].startswith("unreachable"), checks
                proxy.enable(True)
                # Back without a restart: the pool and the client reconnect.
                await ready_when(client, lambda status, _: status == 200, "ready again")
