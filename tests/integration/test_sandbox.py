"""The `sandbox` role's servers take what the real FCM, APNs and Twilio clients send, with
the credentials `finstream run` writes, and show it on their pages and as JSON."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from finstream.domain.time import utcnow
from finstream.sandbox import credentials
from finstream.sandbox.server import Sandbox
from finstream.settings import Settings
from finstream.sinks.delivery import apns, fcm, twilio_sms
from tests.support.services import free_port


def outbound(channel: str, recipient: str, platform: str | None = None) -> dict[str, Any]:
    mid = f"m-{uuid.uuid4().hex[:16]}"
    return {
        "message_id": mid,
        "request_id": f"r-{mid}",
        "user_id": "u-sandbox",
        "channel": channel,
        "category": "price_alert",
        "priority": "NORMAL",
        "recipient": recipient,
        "platform": platform,
        "locale": "en",
        "subject": "AAPL above 200",
        "body_text": f"AAPL crossed 200 <{mid}>",
        "body_html": None,
        "data": {"symbol": "AAPL"},
        "transactional": True,
        "created_at": utcnow(),
        "expires_at": None,
        "attempt": 0,
        "correlation_id": None,
    }


@pytest.fixture
def sandbox_settings(tmp_path: Path, base_settings: Settings) -> Settings:
    return base_settings.model_copy(
        update={
            "stack_dir": tmp_path,
            "sandbox_port": free_port(),
            "sandbox_apns_port": free_port(),
            "sandbox_keep": 3,
        }
    )


async def test_sandbox_takes_push_and_sms_from_the_real_clients_and_shows_them(
    sandbox_settings: Settings,
) -> None:
    creds = credentials.create(sandbox_settings)
    overrides = credentials.delivery_overrides(sandbox_settings, creds)
    # The delivery workers read these as FINSTREAM_* strings; parse them the same way.
    cfg = Settings.model_validate(
        {**sandbox_settings.model_dump(), **overrides, "delivery_timeout": 5.0}
    )
    sandbox = Sandbox(sandbox_settings, credentials.load(sandbox_settings))
    await sandbox.start()
    providers = [fcm.create(cfg), apns.create(cfg), twilio_sms.create(cfg)]
    try:
        fcm_p, apns_p, sms_p = providers
        assert fcm_p is not None
        assert apns_p is not None
        assert sms_p is not None
        to_fcm = outbound("PUSH", "fcm-device-token-1", "FCM")
        to_apns = outbound("PUSH", "ab" * 32, "APNS")
        to_sms = outbound("SMS", "+14155552671")
        await fcm_p.send(to_fcm)
        sent = await apns_p.send(to_apns)
        assert sent.detail == "HTTP/2"
        await sms_p.send(to_sms)

        async with httpx.AsyncClient(base_url=sandbox_settings.sandbox_url) as http:
            push = (await http.get("/api/messages", params={"channel": "push"})).json()["items"]
            sms = (await http.get("/api/messages", params={"channel": "sms"})).json()["items"]
            assert {(i["provider"], i["message_id"], i["body"]) for i in push} == {
                ("fcm", to_fcm["message_id"], to_fcm["body_text"]),
                ("apns", to_apns["message_id"], to_apns["body_text"]),
            }
            assert [(i["to"], i["body"]) for i in sms] == [("+14155552671", to_sms["body_text"])]
            push_page = await http.get("/push")
            assert push_page.headers["content-type"].startswith("text/html")
            # Shown escaped: what a provider received is data, never markup.
            assert f"&lt;{to_apns['message_id']}&gt;" in push_page.text
            assert "AAPL above 200" in push_page.text
            assert f"&lt;{to_sms['message_id']}&gt;" in (await http.get("/sms")).text
            assert (await http.get("/api/messages", params={"channel": "fax"})).status_code == 400

            # It keeps the latest sandbox_keep messages.
            for n in range(4):
                await sms_p.send(outbound("SMS", f"+1415555{2600 + n}"))
            sms = (await http.get("/api/messages", params={"channel": "sms"})).json()["items"]
            assert [i["to"] for i in sms] == ["+14155552603", "+14155552602", "+14155552601"]
    finally:
        for p in providers:
            if p is not None:
                await p.close()
        await sandbox.stop()


def test_sandbox_credentials_must_exist_before_the_role_starts(
    sandbox_settings: Settings,
) -> None:
    with pytest.raises(FileNotFoundError, match="finstream run"):
        credentials.load(sandbox_settings)
