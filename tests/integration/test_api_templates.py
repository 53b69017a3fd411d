"""Templates through the API: no silent acceptance of a request the router cannot render,
previews, and FINSTREAM_TEMPLATES_DIR overriding, extending and reloading without a restart
(a broken file refused with its file and line while the last good version serves)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaException

from finstream.api.deps import Resources
from finstream.settings import Settings
from tests.support.api import Keys, api_client, api_settings, auth
from tests.support.services import TestEnv, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("templates")


@pytest.fixture(scope="module")
async def api(
    env: TestEnv, keys: Keys, overlay: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Resources]]:
    settings: Settings = api_settings(
        env.settings, keys, templates_dir=overlay, templates_reload_seconds=0.0
    )
    async with api_client(settings) as pair:
        yield pair


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    # A second write within the file system's timestamp granularity must still be seen.
    stamp = time.time_ns() + 1_000_000
    os.utime(path, ns=(stamp, stamp))


async def post(client: httpx.AsyncClient, token: str, body: dict[str, Any], key: str) -> Any:
    return await client.post(
        "/v1/notifications", json=body, headers={**auth(token), "Idempotency-Key": key}
    )


async def test_a_request_the_router_cannot_render_is_refused_naming_channel_and_variables(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, env: TestEnv
) -> None:
    client, _ = api
    service = keys.token("billing", ["service"])
    # `welcome` needs title and body on each of its channels; none were sent.
    bare = {"user_id": "u-422", "category": "account", "template": "welcome"}
    answer = await post(client, service, bare, "k-1")
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    assert problem["template"] == "welcome"
    assert {c["channel"]: c["missing"] for c in problem["channels"]} == {
        "email": ["body", "title"],
        "push": ["body", "title"],
        "sms": ["body"],  # the SMS text has no title
        "inapp": ["body", "title"],
    }
    assert "'welcome'" in problem["detail"]
    assert "email lacks body, title" in problem["detail"]

    # Only the requested channels are checked; a variable the template only tests
    # with `is defined` (price_alert's `message`) is optional.
    alert = {
        "user_id": "u-422",
        "category": "price_alert",
        "template": "price_alert",
        "channels": ["SMS"],
        "data": {"symbol": "AAPL", "price": "190.00"},
    }
    answer = await post(client, service, alert, "k-2")
    assert answer.status_code == 422
    assert answer.json()["channels"] == [{"channel": "sms", "missing": ["description"]}]
    answer = await post(client, service, {**bare, "template": "no_such"}, "k-3")
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["pointer"] == "/template"
    answer = await post(
        client, service, {**bare, "template": "message", "channels": ["EMAIL"]}, "k-4"
    )
    assert answer.json()["channels"] == [{"channel": "email", "missing": ["body", "title"]}]

    # The same key, now with what the template needs, is accepted: nothing was stored for it.
    ok = await post(client, service, {**bare, "data": {"title": "Hi", "body": "Welcome"}}, "k-1")
    assert ok.status_code == 202, ok.text
    alert["data"] = {**alert["data"], "description": "AAPL above 180"}  # type: ignore[dict-item]
    assert (await post(client, service, alert, "k-2")).status_code == 202

    def published() -> list[dict[str, Any]] | None:
        # Freshly created topics can answer "not leader" for a moment.
        try:
            return env.decode_all("notify.requests", "NotificationRequest", min_count=2)
        except KafkaException:
            return None

    records = wait_until(published, timeout=30, message="the accepted requests on Kafka")
    assert {r["template"] for r in records} == {"welcome", "price_alert"}


async def test_preview_renders_each_channel_with_sample_variables(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys
) -> None:
    client, _ = api
    operator = keys.token("ops", ["operator"])
    answer = await client.post(
        "/v1/templates/price_alert/preview",
        json={"locale": "de-AT", "data": {"symbol": "SAP", "price": "120.50"}},
        headers=auth(operator),
    )
    assert answer.status_code == 200, answer.text
    channels = {c["channel"]: c for c in answer.json()["channels"]}
    assert set(channels) == {"EMAIL", "PUSH", "SMS", "INAPP"}
    assert channels["EMAIL"]["locale"] == "de"
    assert channels["EMAIL"]["missing"] == ["description"]
    assert "SAP" in channels["EMAIL"]["subject"]
    assert "&lt;description&gt;" in channels["EMAIL"]["html"]
    assert channels["SMS"]["html"] is None
    one = await client.post(
        "/v1/templates/welcome/preview",
        json={"channel": "PUSH", "data": {"title": "T", "body": "B"}},
        headers=auth(operator),
    )
    assert one.json()["channels"] == [
        {
            "channel": "PUSH",
            "locale": "en",
            "subject": "T",
            "text": "B",
            "html": None,
            "missing": [],
        }
    ]
    user = keys.token("alice")
    assert (
        await client.post("/v1/templates/welcome/preview", json={}, headers=auth(user))
    ).status_code == 403
    assert (
        await client.post("/v1/templates/nope/preview", json={}, headers=auth(operator))
    ).status_code == 404


async def test_templates_dir_overrides_extends_and_reloads_and_refuses_a_broken_file(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys, overlay: Path
) -> None:
    client, _ = api
    operator = keys.token("ops", ["operator"])

    async def preview(name: str, channel: str = "EMAIL") -> Any:
        return await client.post(
            f"/v1/templates/{name}/preview",
            json={"channel": channel, "data": {"title": "T", "body": "B", "month": "May"}},
            headers=auth(operator),
        )

    assert (await preview("newsletter")).status_code == 404
    # A new template, using the packaged layout: live without a restart.
    newsletter = overlay / "newsletter" / "email.en.j2"
    write(
        newsletter,
        '{% extends "_layouts/email.j2" %}\n'
        "{% block subject %}Newsletter {{ month }}{% endblock %}\n"
        "{% block text %}{{ body }}{% endblock %}\n",
    )
    first = await preview("newsletter")
    assert first.status_code == 200, first.text
    assert first.json()["channels"][0]["subject"] == "Newsletter May"
    # An override of a packaged file.
    write(
        overlay / "welcome" / "push.en.j2",
        '{% extends "_layouts/push.j2" %}\n'
        "{% block subject %}[ops] {{ title }}{% endblock %}\n{% block text %}{{ body }}{% endblock %}\n",
    )
    assert (await preview("welcome", "PUSH")).json()["channels"][0]["subject"] == "[ops] T"

    # A broken edit: refused with file and line; the last good version keeps serving.
    write(
        newsletter,
        '{% extends "_layouts/email.j2" %}\n'
        "{% block subject %}Newsletter {{ month }{% endblock %}\n"
        "{% block text %}{{ body }}{% endblock %}\n",
    )
    listing = (await client.get("/v1/templates", headers=auth(operator))).json()
    assert [(e["file"], e["line"]) for e in listing["errors"]] == [(str(newsletter), 2)]
    assert "newsletter" in {t["name"] for t in listing["templates"]}
    assert (await preview("newsletter")).json()["channels"][0]["subject"] == "Newsletter May"

    # Fixed: served, and the error is gone.
    write(
        newsletter,
        '{% extends "_layouts/email.j2" %}\n'
        "{% block subject %}Issue of {{ month }}{% endblock %}\n{% block text %}{{ body }}{% endblock %}\n",
    )
    assert (await preview("newsletter")).json()["channels"][0]["subject"] == "Issue of May"
    assert (await client.get("/v1/templates", headers=auth(operator))).json()["errors"] == []
    # Removing the override brings the packaged file back.
    (overlay / "welcome" / "push.en.j2").unlink()
    assert (await preview("welcome", "PUSH")).json()["channels"][0]["subject"] == "T"
