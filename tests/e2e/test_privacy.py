"""Privacy end to end, through the real API and worker processes on the real stack.

Workers (subprocesses): router, statestore, inapp, delivery-email (SendGrid
fake), delivery-sms (Twilio fake), audit, feedback. The API runs in this
process on the same environment; the provider fakes (SendGrid, Twilio, SNS)
in a background thread.

* contact verification: a code sent through the pipeline, limited attempts,
  expiry, rate limits; the verified contact used end to end;
* the feedback loop: SendGrid events, SES notifications through SNS (signed),
  Twilio status callbacks, one-click unsubscribe, each changing preferences
  (audited) and the funnel that ``/v1/analytics/deliveries`` serves;
* erasure: after ``DELETE /v1/users/me`` a scan of every PostgreSQL table,
  every Redis key and every topic, decoded with finstream's own decoders,
  finds nothing of the user in clear, and the user's sealed records on
  topics no longer open; the export before it held everything.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from finstream.api.deps import Resources
from finstream.api.routes.privacy import services
from finstream.api.webhooks import sign_sendgrid
from finstream.domain.envelope import KeyUnavailable
from finstream.domain.time import utcnow
from finstream.privacy import erasure
from finstream.privacy.keys import KeyRing
from finstream.privacy.kms import master_keys
from finstream.privacy.producer import Sealer
from finstream.sandbox.base import FakeThread
from finstream.settings import Settings
from tests.fakes.delivery.kit import DeliveryFakes
from tests.fakes.delivery.sns import FakeSns, ses_event
from tests.support.api import Keys, api_client, api_settings, auth
from tests.support.scan import containing, everything, tokens_of
from tests.support.services import TestEnv, WorkerProcess, workers

pytestmark = pytest.mark.e2e

PUBLIC_URL = "https://api.finstream.test"
TWILIO_TOKEN = "twilio-auth-token-for-privacy"
CACHE_SECONDS = 2
SWEEP_SECONDS = 4
ROLES = ("router", "statestore", "inapp", "delivery-email", "delivery-sms", "audit", "feedback")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryFakes]:
    with DeliveryFakes(tmp_path_factory.mktemp("privacy-fakes")) as f:
        yield f


@pytest.fixture(scope="module")
def sns() -> Iterator[FakeSns]:
    fake = FakeSns()
    with FakeThread([fake]):
        yield fake


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("privacy-jwks"))


@pytest.fixture(scope="module")
def sendgrid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def running(env: TestEnv, log_dir: Path, fakes: DeliveryFakes) -> Iterator[list[WorkerProcess]]:
    overrides = fakes.env(
        delivery_email_providers="sendgrid",
        delivery_email_unsubscribe_url=f"{PUBLIC_URL}/v1/unsubscribe/{{token}}",
        privacy_key_cache_seconds=str(CACHE_SECONDS),
        router_tick_seconds="0.1",
        audit_batch_ms="50",
        audit_verify_interval="0",
    )
    with workers(env, log_dir, *ROLES, **overrides) as started:
        yield started


@pytest.fixture(scope="module")
def settings(
    env: TestEnv, keys: Keys, sendgrid_key: ec.EllipticCurvePrivateKey, sns: FakeSns
) -> Settings:
    der = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return api_settings(
        env.settings,
        keys,
        api_twilio_auth_token=SecretStr(TWILIO_TOKEN),
        api_sendgrid_webhook_public_key=base64.b64encode(der).decode(),
        api_public_url=PUBLIC_URL,
        api_sns_topic_arns=sns.topic,
        api_sns_cert_url_pattern=rf"^{re.escape(sns.url)}/[A-Za-z0-9._-]+\.pem$",
        privacy_key_cache_seconds=CACHE_SECONDS,
        privacy_erasure_sweep_seconds=SWEEP_SECONDS,
        privacy_verify_sends_per_hour=3,
    )


@pytest.fixture(scope="module")
async def api(
    settings: Settings, running: list[WorkerProcess]
) -> AsyncIterator[tuple[httpx.AsyncClient, Resources]]:
    async with api_client(settings) as pair:
        yield pair


# -- helpers --------------------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[Any]], message: str, wait: float = 120.0) -> Any:
    deadline = time.monotonic() + wait
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {wait}s waiting for {message} (last: {last!r})")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def phone() -> str:
    # A valid US number per user (555-01xx is reserved for fiction).
    return f"+1415555{secrets.randbelow(10_000):04d}"


def mail_to(fakes: DeliveryFakes, address: str) -> list[dict[str, Any]]:
    return [e for e in list(fakes.sendgrid.recorder.accepted) if e["to"] == address]


def text_of(mail: dict[str, Any]) -> str:
    return next(c["value"] for c in mail["content"] if c["type"] == "text/plain")


def sms_to(fakes: DeliveryFakes, number: str) -> list[dict[str, Any]]:
    return [e for e in list(fakes.twilio.recorder.accepted) if e["to"] == number]


def code_in(text: str) -> str:
    found = re.search(r"\b(\d{6})\b", text)
    assert found, text
    return found.group(1)


async def put_prefs(client: httpx.AsyncClient, token: str, body: dict[str, Any]) -> Any:
    r = await client.put("/v1/users/me/preferences", json=body, headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


async def verified_user(
    client: httpx.AsyncClient,
    fakes: DeliveryFakes,
    keys: Keys,
    *,
    email: str,
    number: str | None = None,
    consents: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> tuple[str, str, dict[str, Any]]:
    """A user whose email address (and phone number) was confirmed with the codes sent."""
    user = uid("u")
    token = keys.token(user)
    body: dict[str, Any] = {
        "emails": [email],
        "consents": [{"purpose": p, "granted": True} for p in consents],
        **(extra or {}),
    }
    if number:
        body["phones"] = [number]
    prefs = await put_prefs(client, token, body)
    targets = [(prefs["emails"][0]["id"], lambda: mail_to(fakes, email), text_of)]
    if number:
        targets.append(
            (prefs["phones"][0]["id"], lambda: sms_to(fakes, number), lambda e: e["body"])
        )
    for contact_id, received, text in targets:
        sent = await until(lambda received=received: asyncio.to_thread(received), "a code")
        code = code_in(text(sent[-1]))
        ok = await client.post(
            f"/v1/users/me/contacts/{contact_id}/verify", json={"code": code}, headers=auth(token)
        )
        assert ok.status_code == 200, ok.text
    return user, token, prefs


async def notify(client: httpx.AsyncClient, service: str, user: str, **fields: Any) -> str:
    body = {"user_id": user, "category": "account", "template": "message", **fields}
    r = await client.post(
        "/v1/notifications",
        json=body,
        headers={**auth(service), "Idempotency-Key": uuid.uuid4().hex},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"])


async def prefs_of(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    r = await client.get("/v1/users/me/preferences", headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def audit_actions(res: Resources, user: str) -> list[str]:
    rows = await res.pg.fetch(
        "SELECT action FROM audit_events WHERE user_id = $1 ORDER BY seq", user
    )
    return [r["action"] for r in rows]


# -- contact verification ---------------------------------------------------------------------


async def test_a_new_address_is_confirmed_with_a_code_sent_through_the_pipeline_then_used(
    api: tuple[httpx.AsyncClient, Resources], fakes: DeliveryFakes, keys: Keys, env: TestEnv
) -> None:
    client, res = api
    email, number = f"{uid('vera')}@example.com", phone()
    user = uid("vera")
    token = keys.token(user)
    prefs = await put_prefs(
        client,
        token,
        {"emails": [email], "phones": [number], "consents": [{"purpose": "sms", "granted": True}]},
    )
    email_id, phone_id = prefs["emails"][0]["id"], prefs["phones"][0]["id"]
    assert not prefs["emails"][0]["verified"]
    # The codes went through the router and the delivery workers, like any message.
    mail = (await until(lambda: asyncio.to_thread(mail_to, fakes, email), "the email code"))[-1]
    assert "verification code" in mail["subject"]
    sms = (await until(lambda: asyncio.to_thread(sms_to, fakes, number), "the SMS code"))[-1]
    email_code, sms_code = code_in(text_of(mail)), code_in(sms["body"])

    wrong = "000000" if email_code != "000000" else "111111"
    bad = await client.post(
        f"/v1/users/me/contacts/{email_id}/verify", json={"code": wrong}, headers=auth(token)
    )
    assert bad.status_code == 422, bad.text
    assert (bad.json()["reason"], bad.json()["attempts_left"]) == ("wrong_code", 4)
    for contact_id, code in ((email_id, email_code), (phone_id, sms_code)):
        ok = await client.post(
            f"/v1/users/me/contacts/{contact_id}/verify", json={"code": code}, headers=auth(token)
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["verified"] is True
    shown = await prefs_of(client, token)
    assert shown["emails"][0]["verified"] is True
    assert shown["phones"][0]["verified"] is True
    again = await client.post(f"/v1/users/me/contacts/{email_id}/verification", headers=auth(token))
    assert again.status_code == 409, again.text
    await until(
        lambda: _has(audit_actions(res, user), "contact_verified"), "the verification audited"
    )

    # Verified contacts are usable end to end: an email and an SMS arrive.
    service = keys.token("svc-privacy", roles=["service"])
    await notify(client, service, user, data={"title": "Hello Vera", "body": "Welcome aboard"})
    await until(
        lambda: asyncio.to_thread(
            lambda: [m for m in mail_to(fakes, email) if m["subject"] == "Hello Vera"]
        ),
        "the notification by email",
    )
    await notify(
        client,
        service,
        user,
        category="security",
        channels=["SMS"],
        data={"title": "Login", "body": "New login from Berlin"},
    )
    await until(
        lambda: asyncio.to_thread(
            lambda: [m for m in sms_to(fakes, number) if "New login from Berlin" in m["body"]]
        ),
        "the notification by SMS",
    )


async def test_codes_expire_run_out_of_attempts_and_are_rate_limited(
    api: tuple[httpx.AsyncClient, Resources], fakes: DeliveryFakes, keys: Keys
) -> None:
    client, res = api
    email = f"{uid('walt')}@example.com"
    user = uid("walt")
    token = keys.token(user)
    prefs = await put_prefs(client, token, {"emails": [email]})
    contact = prefs["emails"][0]["id"]
    await until(lambda: asyncio.to_thread(mail_to, fakes, email), "the first code")
    # Two more codes this hour are allowed (3 in all), the fourth is not.
    for _ in range(2):
        sent = await client.post(
            f"/v1/users/me/contacts/{contact}/verification", headers=auth(token)
        )
        assert sent.status_code == 202, sent.text
    limited = await client.post(
        f"/v1/users/me/contacts/{contact}/verification", headers=auth(token)
    )
    assert limited.status_code == 429, limited.text
    assert int(limited.headers["Retry-After"]) > 0
    codes = await until(
        lambda: asyncio.to_thread(
            lambda: len(mail_to(fakes, email)) >= 3 and mail_to(fakes, email)
        ),
        "three codes",
    )
    # Only the newest code works; an old one is a wrong guess.
    newest = code_in(text_of(codes[-1]))
    await res.pg.execute(
        "UPDATE contact_verifications SET expires_at = now() - interval '1 second' "
        "WHERE user_id = $1",
        user,
    )
    expired = await client.post(
        f"/v1/users/me/contacts/{contact}/verify", json={"code": newest}, headers=auth(token)
    )
    assert expired.status_code == 422
    assert expired.json()["reason"] == "expired"
    await res.pg.execute(
        "UPDATE contact_verifications SET expires_at = now() + interval '10 minutes' "
        "WHERE user_id = $1",
        user,
    )
    wrong = "000000" if newest != "000000" else "111111"
    for left in (4, 3, 2, 1, 0):
        r = await client.post(
            f"/v1/users/me/contacts/{contact}/verify", json={"code": wrong}, headers=auth(token)
        )
        assert (r.status_code, r.json()["attempts_left"]) == (422, left), r.text
    exhausted = await client.post(
        f"/v1/users/me/contacts/{contact}/verify", json={"code": newest}, headers=auth(token)
    )
    assert exhausted.json()["reason"] == "too_many_attempts"
    # And the user's guesses per hour are bounded whatever the contact.
    await res.redis.set(res.settings.redis_key(f"verify:attempts:{{{user}}}"), 10_000, ex=60)
    hourly = await client.post(
        f"/v1/users/me/contacts/{contact}/verify", json={"code": newest}, headers=auth(token)
    )
    assert hourly.status_code == 429
    assert (await prefs_of(client, token))["emails"][0]["verified"] is False


# -- the feedback loop ----------------------------------------------------------------------


async def test_provider_feedback_and_one_click_unsubscribe_change_preferences(
    api: tuple[httpx.AsyncClient, Resources],
    fakes: DeliveryFakes,
    keys: Keys,
    sns: FakeSns,
    sendgrid_key: ec.EllipticCurvePrivateKey,
) -> None:
    client, res = api
    service = keys.token("svc-feedback", roles=["service"])

    async def delivered(email: str, subject: str) -> dict[str, Any]:
        found = await until(
            lambda: asyncio.to_thread(
                lambda: [m for m in mail_to(fakes, email) if m["subject"] == subject]
            ),
            f"{subject!r} mailed",
        )
        return found[-1]  # type: ignore[no-any-return]

    async def sendgrid(events: list[dict[str, Any]]) -> httpx.Response:
        body = json.dumps(events).encode()
        ts = str(int(time.time()))
        return await client.post(
            "/v1/webhooks/sendgrid/events",
            content=body,
            headers={
                "content-type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": sign_sendgrid(sendgrid_key, ts, body),
                "X-Twilio-Email-Event-Webhook-Timestamp": ts,
            },
        )

    # 1. SendGrid: delivered, opened, clicked (distinct stages), then a hard bounce.
    ann_mail = f"{uid('ann')}@example.com"
    ann, ann_token, _ = await verified_user(
        client, fakes, keys, email=ann_mail, consents=("marketing",)
    )
    await notify(
        client,
        service,
        ann,
        category="marketing",
        template="message",
        data={"title": "Spring offer", "body": "Ten percent off"},
    )
    offer = await delivered(ann_mail, "Spring offer")
    mid = offer["message_id"]
    for kind in ("delivered", "open", "click"):
        r = await sendgrid([{"event": kind, "sg_event_id": uid(kind), "message_id": mid}])
        assert r.json() == {"accepted": 1, "ignored": 0}, r.text

    async def stages() -> dict[str, Any] | None:
        row = await res.pg.fetchrow("SELECT * FROM notification_funnel WHERE item_key = $1", mid)
        return dict(row) if row and row["clicked_at"] and row["template"] else None

    row = await until(stages, "the funnel row of the offer")
    assert row["delivered_at"] is not None
    assert row["opened_at"] is not None
    assert row["clicked_at"] is not None
    assert (row["channel"], row["provider"], row["template"], row["category"]) == (
        "email",
        "sendgrid",
        "message",
        "marketing",
    )

    # 2. One-click unsubscribe (RFC 8058) from the mail's own header, without a login.
    assert offer["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = re.search(
        r"<(https://[^>]+/v1/unsubscribe/[^>]+)>", offer["headers"]["List-Unsubscribe"]
    )
    assert link, offer["headers"]
    path = urlsplit(link.group(1)).path
    page = await client.get(path)
    assert page.status_code == 200
    assert "Stop marketing emails" in page.text
    assert (await prefs_of(client, ann_token))["categories"] == {}, "GET changes nothing"
    one_click = await client.post(
        path,
        content="List-Unsubscribe=One-Click",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert one_click.json() == {"category": "marketing", "scope": "category", "changed": True}
    assert (await prefs_of(client, ann_token))["categories"]["marketing"]["enabled"] is False
    repeat = await client.post(path, content="List-Unsubscribe=One-Click")
    assert repeat.json()["changed"] is False
    everything_ = await client.post(path, content="scope=marketing")
    assert everything_.json() == {"category": "marketing", "scope": "marketing", "changed": True}
    consents = (await prefs_of(client, ann_token))["consents"]
    assert consents[-1]["purpose"] == "marketing"
    assert consents[-1]["granted"] is False
    assert (await client.post(path[:-4] + "AAAA", content="")).status_code == 404

    # The hard bounce suppresses the address.
    r = await sendgrid([{"event": "bounce", "sg_event_id": uid("b"), "message_id": mid}])
    assert r.json() == {"accepted": 1, "ignored": 0}

    async def bounced() -> bool:
        return bool((await prefs_of(client, ann_token))["emails"][0]["bounced"])

    await until(bounced, "the address marked bounced")

    # 3. SES through SNS: a signed complaint suppresses the address.
    bea_mail = f"{uid('bea')}@example.com"
    bea, bea_token, _ = await verified_user(client, fakes, keys, email=bea_mail)
    await notify(client, service, bea, data={"title": "Statement ready", "body": "See it"})
    bea_mid = (await delivered(bea_mail, "Statement ready"))["message_id"]

    async def post_sns(doc: dict[str, Any]) -> httpx.Response:
        return await client.post(
            "/v1/webhooks/ses/sns",
            content=json.dumps(doc),
            headers={"content-type": "text/plain", "x-amz-sns-message-type": doc["Type"]},
        )

    confirm = await post_sns(sns.subscription())
    assert confirm.status_code == 200, confirm.text
    assert len(sns.confirmed) == 1
    complaint = sns.notification(ses_event("Complaint", bea_mid, bea_mail))
    forged = {**complaint, "Message": complaint["Message"].replace("abuse", "other")}
    assert (await post_sns(forged)).status_code == 403
    assert (
        await post_sns({**complaint, "TopicArn": "arn:aws:sns:us-east-1:1:x"})
    ).status_code == 403
    accepted = await post_sns(complaint)
    assert accepted.json() == {"accepted": 1, "ignored": 0}, accepted.text

    async def complained() -> bool:
        return bool((await prefs_of(client, bea_token))["emails"][0]["complained"])

    await until(complained, "the address marked complained")

    # A SendGrid unsubscribe event opts the user out of the message's category.
    r = await sendgrid([{"event": "unsubscribe", "sg_event_id": uid("u"), "message_id": bea_mid}])
    assert r.json() == {"accepted": 1, "ignored": 0}, r.text

    async def unsubscribed() -> bool:
        account = (await prefs_of(client, bea_token))["categories"].get("account") or {}
        return account.get("enabled") is False

    await until(unsubscribed, "the category opted out after SendGrid's unsubscribe")

    # 4. Twilio: a carrier STOP (21610) marks the number opted out.
    cy_number = phone()
    cy, cy_token, _ = await verified_user(
        client,
        fakes,
        keys,
        email=f"{uid('cy')}@example.com",
        number=cy_number,
        consents=("sms",),
    )
    await notify(
        client,
        service,
        cy,
        category="security",
        channels=["SMS"],
        data={"title": "T", "body": "Code 1"},
    )
    sms = await until(
        lambda: asyncio.to_thread(
            lambda: [m for m in sms_to(fakes, cy_number) if "Code 1" in m["body"]]
        ),
        "the SMS",
    )
    ids = {"message_id": sms[-1]["message_id"]}
    form = {
        "MessageSid": sms[-1]["sid"],
        "MessageStatus": "undelivered",
        "ErrorCode": "21610",
        "AccountSid": fakes.twilio.account_sid,
    }
    cb_path = "/v1/webhooks/twilio/status?" + urlencode(ids)
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(PUBLIC_URL + cb_path, form)
    stopped = await client.post(
        cb_path,
        content=urlencode(form),
        headers={
            "content-type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature,
        },
    )
    assert stopped.json() == {"accepted": 1, "ignored": 0}, stopped.text

    async def opted_out() -> bool:
        return bool((await prefs_of(client, cy_token))["phones"][0]["opted_out"])

    await until(opted_out, "the number marked opted out")

    # Every change is audited, old -> new, contacts masked.
    for user, action in (
        (ann, "feedback_email_bounced"),
        (ann, "unsubscribed"),
        (bea, "feedback_email_complained"),
        (bea, "feedback_unsubscribed"),
        (cy, "feedback_phone_opted_out"),
        (ann, "message_opened"),
        (ann, "message_clicked"),
    ):
        await until(
            lambda user=user, action=action: _has(audit_actions(res, user), action),
            f"{action} audited for {user}",
        )
    row = await res.pg.fetchrow(
        "SELECT details FROM audit_events WHERE user_id = $1 AND action = 'feedback_email_bounced'",
        ann,
    )
    details = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
    assert "(verified)" in details["emails.old"]
    assert "bounced" in details["emails.new"]
    assert ann_mail not in json.dumps(details)

    # The funnel, from PostgreSQL, for operators only.
    operator = keys.token("ops-1", roles=["operator"])
    start = (utcnow() - timedelta(hours=1)).isoformat()

    async def funnel(group_by: str) -> dict[str, Any]:
        r = await client.get(
            "/v1/analytics/deliveries",
            params={"from": start, "group_by": group_by},
            headers=auth(operator),
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def counted() -> dict[str, Any] | None:
        body = await funnel("template")
        groups = {g["template"]: g for g in body["groups"]}
        message = groups.get("message")
        return body if message and message["clicked"] >= 1 and message["bounced"] >= 1 else None

    body = await until(counted, "the funnel")
    message = {g["template"]: g for g in body["groups"]}["message"]
    for stage in ("requested", "sent", "delivered", "opened", "clicked", "bounced"):
        assert message[stage] >= 1, (stage, message)
    assert message["complained"] >= 1
    assert body["total"]["requests"] >= 3
    by_channel = {g["channel"]: g for g in (await funnel("channel"))["groups"]}
    assert by_channel["email"]["sent"] >= 3
    assert by_channel["sms"]["sent"] >= 1
    by_provider = {g["provider"]: g for g in (await funnel("provider"))["groups"]}
    assert by_provider["sendgrid"]["delivered"] >= 1
    assert {g["category"] for g in (await funnel("category"))["groups"]} >= {"marketing", "account"}
    user_view = await client.get("/v1/analytics/deliveries", headers=auth(ann_token))
    assert user_view.status_code == 403


def _tombstoned(env: TestEnv, user: str) -> bool:
    """The router's preferences changelog ends with a tombstone for the user."""
    records = [
        m
        for m in env.consume_all("finstream-router-prefs-changelog", 5.0)
        if m.key() == user.encode()
    ]
    return bool(records) and records[-1].value() is None


async def _has(actions: Awaitable[list[str]], action: str) -> bool:
    return action in await actions


# -- erasure --------------------------------------------------------------------------------


async def test_after_erasure_nothing_of_the_user_is_anywhere_in_clear_and_nothing_opens(
    api: tuple[httpx.AsyncClient, Resources],
    fakes: DeliveryFakes,
    keys: Keys,
    env: TestEnv,
    settings: Settings,
) -> None:
    client, res = api
    email, number = f"{uid('erin')}@example.com", phone()
    phrase = f"secret-phrase-{uuid.uuid4().hex[:10]}"
    user, token, _ = await verified_user(
        client,
        fakes,
        keys,
        email=email,
        number=number,
        consents=("sms", "marketing"),
        extra={"categories": {"product": {"digest": True}}},
    )
    service = keys.token("svc-erasure", roles=["service"])
    rule = await client.post(
        "/v1/users/me/rules",
        json={
            "symbol": "AAPL",
            "condition": "GREATER_THAN",
            "value": "9999",
            "frequency": "ONLY_ONCE",
        },
        headers=auth(token),
    )
    assert rule.status_code == 201, rule.text
    # A notification on every channel that mentions the address, one held for an hour, one
    # folded into a digest, and one the router dead-letters (a variable missing).
    await notify(
        client,
        service,
        user,
        category="security",
        data={"title": f"Login {phrase}", "body": f"A login for {email} with {phrase}"},
    )
    await notify(
        client,
        service,
        user,
        deliver_at=(utcnow() + timedelta(hours=1)).isoformat(),
        data={"title": "Later", "body": f"Held for {email}"},
    )
    await notify(
        client,
        service,
        user,
        category="product",
        priority="LOW",
        data={"title": "Digest me", "body": f"Folded {phrase}"},
    )
    async with Sealer.open(settings) as sealer:
        broken = await sealer.request(
            {
                "request_id": uid("broken"),
                "user_id": user,
                "category": "account",
                "priority": "NORMAL",
                "template": "message",
                "data": {"body": f"{phrase} but no title"},
                "channels": [],
                "deliver_at": None,
                "expires_at": None,
                "collapse_key": None,
                "created_at": utcnow(),
                "source": "test",
                "correlation_id": None,
            }
        )
    env.produce_records("notify.requests", "NotificationRequest", [(user, broken)])

    await until(
        lambda: asyncio.to_thread(
            lambda: (
                [m for m in mail_to(fakes, email) if phrase in m["subject"]]
                and [m for m in sms_to(fakes, number) if phrase in m["body"]]
            )
        ),
        "the notification by email and SMS",
    )

    async def inbox() -> list[Any]:
        r = await client.get("/v1/users/me/inbox", headers=auth(token))
        return [m for m in r.json()["items"] if phrase in (m.get("body") or "")]

    await until(inbox, "the in-app message")

    async def settled() -> bool:
        delivered = await res.pg.fetchval(
            "SELECT count(*) FROM deliveries WHERE user_id = $1 AND state IN ('sent', 'delivered')",
            user,
        )
        letters = await asyncio.to_thread(env.consume_all, "dlq", 5.0)
        broken_letter = any(m.key() == user.encode() for m in letters)
        audited = "routed" in await audit_actions(res, user)
        return delivered >= 3 and broken_letter and audited

    await until(settled, "deliveries, the dead letter and the audit trail")

    # The export holds everything, in clear.
    exported = await client.get("/v1/users/me/export", headers=auth(token))
    assert exported.status_code == 200, exported.text
    bundle = exported.json()
    assert bundle["preferences"]["emails"][0]["address"] == email
    assert bundle["preferences"]["phones"][0]["number"] == number
    assert {c["purpose"] for c in bundle["consents"]} == {"sms", "marketing"}
    assert len(bundle["rules"]) == 1
    assert any(phrase in (m.get("body") or "") for m in bundle["inbox"])
    contents = [d["content"] for d in bundle["deliveries"] if d["content"]]
    assert any(c["recipient"] == email and phrase in c["body_text"] for c in contents)
    assert any(c["recipient"] == number for c in contents)
    assert {"routed", "contact_verified", "rule_created"} <= {a["action"] for a in bundle["audit"]}
    assert len(bundle["contact_verifications"]) == 2
    await until(lambda: _has(audit_actions(res, user), "user_exported"), "the export audited")

    # Before: the user's records on the topics are sealed and open.
    needles = [email, number, number.removeprefix("+"), phrase]
    before = await asyncio.to_thread(tokens_of, env, user)
    kinds = {topic.removeprefix(env.namespace) for topic, _ in before}
    assert {
        "notify.preferences",
        "notify.requests",
        "notify.outbound.email",
        "notify.outbound.sms",
        "notify.outbound.inapp",
        "finstream-router-prefs-changelog",
        "finstream-router-holds-changelog",
        "dlq",
    } <= kinds, kinds
    fresh = KeyRing(res.pg, master_keys(settings))
    ring = await fresh.get(user)
    opened = [ring.open_text(t) for _, t in before]
    assert any(phrase in o for o in opened)
    assert any(email in o for o in opened)

    # Erase: complete when the answer comes (keys destroyed, rows and read models deleted),
    # and a repeat changes nothing.
    erased = await client.delete("/v1/users/me", headers=auth(token))
    assert erased.status_code == 200, erased.text
    assert erased.json()["already_erased"] is False
    assert erased.json()["removed"]["deliveries"] >= 3
    assert erased.json()["removed"]["rule_tombstones"] == 1
    assert await res.pg.fetchval("SELECT count(*) FROM user_keys WHERE user_id = $1", user) == 0
    again = await client.delete("/v1/users/me", headers=auth(token))
    assert again.json()["already_erased"] is True
    gone = await client.get("/v1/users/me/preferences", headers=auth(token))
    assert gone.status_code == 404
    refused = await client.put(
        "/v1/users/me/preferences", json={"emails": [email]}, headers=auth(token)
    )
    assert refused.status_code == 410

    # The second sweep, due once every worker's key cache has lapsed (the API's own loop
    # runs it; driving it here too only makes the wait shorter).
    s = services(res)

    async def swept() -> bool:
        await erasure.run_due_sweeps(s)
        return bool(
            await res.pg.fetchval(
                "SELECT swept_at IS NOT NULL FROM erased_users WHERE user_id = $1", user
            )
        )

    await until(swept, "the second sweep")
    # The router has applied the tombstones (its state for the user is gone), so nothing
    # of the user is still on its way to a store.
    await until(lambda: asyncio.to_thread(_tombstoned, env, user), "the router's state tombstoned")

    # After: nothing of the user in clear in any table, key or topic ...
    found = await everything(env)
    assert len(found) > 100, "the scan read the stores"
    hits = containing(found, needles)
    assert hits == [], f"plaintext of an erased user found: {hits}"
    # ... the rows and keys that could be deleted are gone ...
    for table in (
        "deliveries",
        "delivery_results",
        "notification_funnel",
        "contact_verifications",
        "user_keys",
    ):
        assert (
            await res.pg.fetchval(f"SELECT count(*) FROM {table} WHERE user_id = $1", user) == 0
        ), table
    leftovers = [k async for k in res.redis.scan_iter(match=f"{env.namespace}*{{{user}}}*")]
    assert leftovers == []
    # ... and the sealed records still on the topics no longer open for anyone.
    after = await asyncio.to_thread(tokens_of, env, user)
    assert len(after) >= len(before) - 5, "the records are still in Kafka's retention"
    ring = await KeyRing(res.pg, master_keys(settings)).get(user)
    assert ring.erased
    for _, t in after:
        with pytest.raises(KeyUnavailable):
            ring.open_text(t)
    # The erasure itself is on the audit trail (without the user's data).
    await until(lambda: _has(audit_actions(res, user), "user_erased"), "the erasure audited")

    # Nothing is routed for the erased user again: the API refuses, and the router drops
    # (audited) what an upstream producer still writes for them.
    late = await client.post(
        "/v1/notifications",
        json={
            "user_id": user,
            "category": "account",
            "template": "message",
            "data": {"title": "t", "body": "b"},
        },
        headers={**auth(service), "Idempotency-Key": uuid.uuid4().hex},
    )
    assert late.status_code == 410, late.text
    env.produce_records(
        "notify.requests",
        "NotificationRequest",
        [(user, {**broken, "request_id": uid("late"), "data": {"body": "x", "title": "y"}})],
    )
    await until(lambda: _has(audit_actions(res, user), "dropped"), "the late request dropped")


async def test_operators_export_and_erase_anyone_users_only_themselves(
    api: tuple[httpx.AsyncClient, Resources], keys: Keys
) -> None:
    client, res = api
    user, other = uid("olga"), uid("otto")
    email = f"{user}@example.com"
    await put_prefs(client, keys.token(user), {"emails": [email]})
    operator = keys.token(uid("ops"), roles=["operator"])
    service = keys.token("svc-privacy", roles=["service"])

    # A user reaches only themselves (anyone else answers 404, like a missing user); a
    # service neither; an operator anyone.
    assert (
        await client.get(f"/v1/users/{user}/export", headers=auth(keys.token(other)))
    ).status_code == 404
    assert (
        await client.delete(f"/v1/users/{user}", headers=auth(keys.token(other)))
    ).status_code == 404
    assert (await client.get(f"/v1/users/{user}/export", headers=auth(service))).status_code == 403
    exported = await client.get(f"/v1/users/{user}/export", headers=auth(operator))
    assert exported.status_code == 200, exported.text
    assert exported.json()["preferences"]["emails"][0]["address"] == email

    erased = await client.delete(f"/v1/users/{user}", headers=auth(operator))
    assert erased.status_code == 200, erased.text
    assert erased.json()["already_erased"] is False
    again = await client.delete(f"/v1/users/{user}", headers=auth(operator))
    assert again.json()["already_erased"] is True
    after = await client.get(f"/v1/users/{user}/export", headers=auth(operator))
    assert after.json()["preferences"] is None
    for action in ("user_exported", "user_erased", "user_erasure_repeated"):
        await until(lambda action=action: _has(audit_actions(res, user), action), action)
    row = await res.pg.fetchrow(
        "SELECT reason FROM audit_events WHERE user_id = $1 AND action = 'user_erased'", user
    )
    assert "operator:" in row["reason"]


def test_users_forget_from_the_command_line_is_idempotent(env: TestEnv) -> None:
    user = uid("cli-user")
    run = [sys.executable, "-m", "finstream.cli", "users", "forget", "--yes", user]
    first = subprocess.run(
        run, env=env.env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["already_erased"] is False
    second = subprocess.run(
        run, env=env.env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert json.loads(second.stdout)["already_erased"] is True
    export = subprocess.run(
        [sys.executable, "-m", "finstream.cli", "users", "export", user],
        check=False,
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0, export.stderr
    assert json.loads(export.stdout)["preferences"] is None
