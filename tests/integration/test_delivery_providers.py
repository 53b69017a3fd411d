"""Each delivery provider against its local fake: wire format, auth, errors, timeouts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from finstream.domain.delivery.errors import DeliveryError, Feedback
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.settings import Settings
from finstream.sinks.delivery import apns, fcm, inapp, sendgrid, ses, smtp, twilio_sms
from finstream.sinks.delivery.base import Reconcile, build_chain
from tests.fakes.delivery.kit import DeliveryFakes

TOKEN_HEX = "a1" * 32


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryFakes]:
    with DeliveryFakes(tmp_path_factory.mktemp("delivery-fakes")) as f:
        yield f


@pytest.fixture
def cfg(fakes: DeliveryFakes, base_settings: Settings) -> Iterator[Settings]:
    fakes.reset()
    yield fakes.settings(base_settings)
    fakes.reset()


def message(channel: str = "EMAIL", **over: Any) -> dict[str, Any]:
    mid = f"m-{uuid.uuid4().hex[:16]}"
    base: dict[str, Any] = {
        "message_id": mid,
        "request_id": "r-1",
        "user_id": "u-1",
        "channel": channel,
        "category": "alerts",
        "priority": "NORMAL",
        "recipient": "ann@example.com",
        "platform": None,
        "locale": "en",
        "subject": "AAPL above 200",
        "body_text": f"AAPL crossed 200 ({mid})",
        "body_html": "<p>AAPL crossed <b>200</b></p>",
        "data": {"symbol": "AAPL"},
        "transactional": True,
        "created_at": utcnow(),
        "expires_at": None,
        "attempt": 0,
        "correlation_id": None,
    }
    base.update(over)
    return base


async def fails(coro: Any) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await coro
    return caught.value


# -- SendGrid -----------------------------------------------------------------------


async def test_sendgrid_send_errors_and_lookup(cfg: Settings, fakes: DeliveryFakes) -> None:
    provider = sendgrid.create(cfg)
    assert provider is not None
    assert provider.reconcile is Reconcile.LOOKUP
    try:
        # The delivery engine gives marketing mail its signed one-click token.
        msg = message(transactional=False, unsubscribe_token="tok-abc123")
        sent = await provider.send(msg)
        taken = fakes.sendgrid.recorder.accepted[-1]
        assert taken["message_id"] == msg["message_id"]
        assert sent.provider_message_id == taken["x_message_id"]
        assert [c["type"] for c in taken["content"]] == ["text/plain", "text/html"]
        assert taken["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "/v1/unsubscribe/tok-abc123>" in taken["headers"]["List-Unsubscribe"]

        fakes.sendgrid.faults.then("throttle", "error", "auth")
        err = await fails(provider.send(message()))
        assert err.error_class is ErrorClass.THROTTLED
        assert err.retry_after is not None
        assert 0 <= err.retry_after <= 2
        assert (await fails(provider.send(message()))).error_class is ErrorClass.TRANSIENT
        assert (await fails(provider.send(message()))).error_class is ErrorClass.AUTH
        fakes.sendgrid.bounce_addresses.add("gone@example.com")
        err = await fails(provider.send(message(recipient="gone@example.com")))
        assert err.error_class is ErrorClass.INVALID_RECIPIENT

        # A timeout after the request left is ambiguous, and the lookup settles it.
        fakes.sendgrid.faults.hang = 2.0
        hung = message()
        fakes.sendgrid.faults.then("accept_hang")
        err = await fails(provider.send(hung))
        assert err.ambiguous
        found = await provider.lookup(hung, utcnow() - timedelta(minutes=1))
        assert found is not None
        assert found.provider_message_id == fakes.sendgrid.recorder.accepted[-1]["x_message_id"]
        fakes.sendgrid.faults.then("timeout")
        lost = message()
        err = await fails(provider.send(lost))
        assert err.ambiguous
        assert await provider.lookup(lost, utcnow()) is None
    finally:
        await provider.close()


# -- SES ----------------------------------------------------------------------------------


async def test_ses_signs_requests_and_classifies_errors(
    cfg: Settings, fakes: DeliveryFakes
) -> None:
    provider = ses.create(cfg)
    assert provider is not None
    try:
        msg = message(transactional=False)
        sent = await provider.send(msg)
        taken = fakes.ses.recorder.accepted[-1]
        assert taken["message_id"] == msg["message_id"]
        assert sent.provider_message_id == taken["ses_message_id"]
        assert taken["headers"]["X-Entity-Ref-ID"] == msg["message_id"]
        assert "List-Unsubscribe" in taken["headers"]
        assert set(taken["body"]) == {"Text", "Html"}
        assert fakes.ses.bad_signatures == 0

        fakes.ses.faults.then("throttle")
        err = await fails(provider.send(message()))
        assert (err.error_class, err.code) == (ErrorClass.THROTTLED, "TooManyRequestsException")
        fakes.ses.rejected_addresses.add("nope@example.com")
        err = await fails(provider.send(message(recipient="nope@example.com")))
        assert (err.error_class, err.code) == (ErrorClass.PERMANENT, "MessageRejected")
        fakes.ses.paused = True
        err = await fails(provider.send(message()))
        assert (err.error_class, err.code) == (ErrorClass.AUTH, "SendingPausedException")
        fakes.ses.paused = False
    finally:
        await provider.close()
    wrong = ses.create(
        cfg.model_copy(
            update={
                "delivery_ses_secret_access_key": cfg.delivery_ses_secret_access_key.__class__(
                    "wrong"
                )
            }
        )
    )
    assert wrong is not None
    try:
        err = await fails(wrong.send(message()))
        assert (err.error_class, err.code) == (ErrorClass.AUTH, "SignatureDoesNotMatch")
    finally:
        await wrong.close()


# -- SMTP -----------------------------------------------------------------------------------


async def test_smtp_starttls_auth_and_stages(cfg: Settings, fakes: DeliveryFakes) -> None:
    provider = smtp.create(cfg)
    assert provider is not None
    try:
        msg = message(transactional=False)
        sent = await provider.send(msg)
        taken = fakes.smtp.recorder.accepted[-1]
        assert taken["message_id"] == msg["message_id"]
        assert taken["tls"]
        assert taken["authenticated"]
        assert taken["content_type"] == "multipart/alternative"
        assert taken["parts"][1:] == ["text/plain", "text/html"]
        assert (
            taken["message_id_header"]
            == sent.provider_message_id
            == f"<{msg['message_id']}@finstream.local>"
        )
        assert taken["list_unsubscribe"]

        fakes.smtp.refused_recipients.add("nobody@example.com")
        err = await fails(provider.send(message(recipient="nobody@example.com")))
        assert err.error_class is ErrorClass.INVALID_RECIPIENT
        fakes.smtp.faults.then("error")
        err = await fails(provider.send(message()))
        assert (err.error_class, err.ambiguous) == (ErrorClass.TRANSIENT, False)
        # The connection survives refusals (RSET) and keeps sending.
        await provider.send(message())
        fakes.smtp.faults.hang = 2.0
        fakes.smtp.faults.then("accept_hang")
        err = await fails(provider.send(message()))
        assert (err.error_class, err.ambiguous) == (ErrorClass.TRANSIENT, True)
    finally:
        await provider.close()

    bad = smtp.create(
        cfg.model_copy(
            update={"delivery_smtp_password": cfg.delivery_smtp_password.__class__("wrong")}
        )
    )  # type: ignore[union-attr]
    assert bad is not None
    err = await fails(bad.send(message()))
    assert err.error_class is ErrorClass.AUTH
    closed = smtp.create(cfg.model_copy(update={"delivery_smtp_port": _closed_port()}))
    assert closed is not None
    err = await fails(closed.send(message()))
    assert (err.error_class, err.ambiguous) == (ErrorClass.TRANSIENT, False)


# aiosmtpd warns because it only counts STARTTLS as TLS; this server is TLS from byte one.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_implicit_tls(cfg: Settings, fakes: DeliveryFakes) -> None:
    from finstream.sandbox.base import FakeThread
    from tests.fakes.delivery.kit import SMTP_PASSWORD, SMTP_USER
    from tests.fakes.delivery.smtp import FakeSmtp

    smtps = FakeSmtp(fakes.certs, {SMTP_USER: SMTP_PASSWORD}, implicit_tls=True)
    with FakeThread([smtps]):
        tls = cfg.model_copy(
            update={"delivery_smtp_port": smtps.port, "delivery_smtp_security": "tls"}
        )
        provider = smtp.create(tls)
        plain = smtp.create(tls.model_copy(update={"delivery_smtp_security": "none"}))
        assert provider is not None
        assert plain is not None
        try:
            msg = message()
            await provider.send(msg)
            # The server speaks only TLS: a plain-text client gets nowhere.
            err = await fails(plain.send(message()))
            assert err.error_class is ErrorClass.TRANSIENT
        finally:
            await provider.close()
            await plain.close()
    assert [e["message_id"] for e in smtps.recorder.accepted] == [msg["message_id"]]
    assert smtps.recorder.accepted[0]["authenticated"]


def _closed_port() -> int:
    from tests.support.services import free_port

    return free_port()


# -- FCM --------------------------------------------------------------------------------------


async def test_fcm_token_cache_refresh_and_errors(cfg: Settings, fakes: DeliveryFakes) -> None:
    provider = fcm.create(cfg)
    assert provider is not None
    before = fakes.fcm.token_requests
    try:
        first = message("PUSH", recipient="fcm-token-1", platform="FCM", priority="HIGH")
        sent = await provider.send(first)
        await provider.send(message("PUSH", recipient="fcm-token-1", platform="FCM"))
        assert fakes.fcm.token_requests == before + 1  # cached
        taken = fakes.fcm.recorder.accepted[-2]
        assert taken["message_id"] == first["message_id"]
        assert taken["collapse"] == first["message_id"]
        assert sent.provider_message_id == taken["name"]

        fakes.fcm.revoke_all()  # FCM answers 401: fetch a new token once, then send
        await provider.send(message("PUSH", recipient="fcm-token-1", platform="FCM"))
        assert fakes.fcm.token_requests == before + 2

        fakes.fcm.unregistered.add("dead-token")
        err = await fails(provider.send(message("PUSH", recipient="dead-token", platform="FCM")))
        assert (err.error_class, err.feedback, err.code) == (
            ErrorClass.INVALID_RECIPIENT,
            Feedback.TOKEN_INVALID,
            "UNREGISTERED",
        )
        fakes.fcm.faults.then("throttle", "error")
        err = await fails(provider.send(message("PUSH", recipient="x", platform="FCM")))
        assert (err.error_class, err.retry_after) == (ErrorClass.THROTTLED, 1)
        err = await fails(provider.send(message("PUSH", recipient="x", platform="FCM")))
        assert (err.error_class, err.code) == (ErrorClass.TRANSIENT, "UNAVAILABLE")
        err = await fails(
            provider.send(message("PUSH", recipient="x", platform="FCM", body_text="y" * 5000))
        )
        assert err.error_class is ErrorClass.PERMANENT
    finally:
        await provider.close()


async def test_fcm_renews_tokens_close_to_expiry(cfg: Settings, fakes: DeliveryFakes) -> None:
    fakes.fcm.token_lifetime = 200  # under the five-minute renewal margin
    provider = fcm.create(cfg)
    assert provider is not None
    try:
        before = fakes.fcm.token_requests
        for _ in range(2):
            await provider.send(message("PUSH", recipient="t", platform="FCM"))
        assert fakes.fcm.token_requests == before + 2
    finally:
        fakes.fcm.token_lifetime = 3600
        await provider.close()


# -- APNs ---------------------------------------------------------------------------------------


async def test_apns_over_http2_with_provider_tokens(cfg: Settings, fakes: DeliveryFakes) -> None:
    provider = apns.create(cfg)
    assert provider is not None
    try:
        msg = message("PUSH", recipient=TOKEN_HEX, platform="APNS", priority="HIGH")
        sent = await provider.send(msg)
        assert sent.detail == "HTTP/2"
        taken = fakes.apns.recorder.accepted[-1]
        assert taken["message_id"] == msg["message_id"]
        assert taken["apns_id"] == sent.provider_message_id
        assert taken["priority"] == "10"
        assert taken["payload"]["aps"]["alert"] == {
            "title": "AAPL above 200",
            "body": msg["body_text"],
        }
        await provider.send(message("PUSH", recipient=TOKEN_HEX, platform="APNS"))
        assert provider.token_renewals == 1  # the provider token is reused

        # Apple says the token expired: renew once and send.
        fakes.apns.not_before = int(provider._token_at) + 1  # iat is whole seconds
        await asyncio.sleep(max(fakes.apns.not_before - time.time(), 0) + 0.05)
        await provider.send(message("PUSH", recipient=TOKEN_HEX, platform="APNS"))
        assert provider.token_renewals == 2

        gone = "b2" * 32
        fakes.apns.unregistered.add(gone)
        err = await fails(provider.send(message("PUSH", recipient=gone, platform="APNS")))
        assert (err.error_class, err.feedback, err.status) == (
            ErrorClass.INVALID_RECIPIENT,
            Feedback.TOKEN_INVALID,
            410,
        )
        fakes.apns.faults.then("throttle")
        err = await fails(provider.send(message("PUSH", recipient=TOKEN_HEX, platform="APNS")))
        assert err.error_class is ErrorClass.THROTTLED
        err = await fails(provider.send(message("PUSH", recipient="not-hex", platform="APNS")))
        assert (err.error_class, err.code) == (ErrorClass.INVALID_RECIPIENT, "BadDeviceToken")
    finally:
        await provider.close()


async def test_the_apns_fake_only_speaks_http2(fakes: DeliveryFakes) -> None:
    refused = fakes.apns.refused_non_h2
    async with httpx.AsyncClient(verify=str(fakes.certs.ca_file), http2=False) as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(f"{fakes.apns.url}/3/device/{TOKEN_HEX}", content=b"{}")
    assert fakes.apns.refused_non_h2 == refused + 1


# -- Twilio ---------------------------------------------------------------------------------------


async def test_twilio_send_segments_opt_out_and_lookup(cfg: Settings, fakes: DeliveryFakes) -> None:
    provider = twilio_sms.create(cfg)
    assert provider is not None
    try:
        msg = message("SMS", recipient="+1 415 555 2671", body_text="Ünïcödé ✓ " * 10)
        sent = await provider.send(msg)
        taken = fakes.twilio.recorder.accepted[-1]
        assert taken["message_id"] == msg["message_id"]  # carried in StatusCallback
        assert taken["to"] == "+14155552671"
        assert sent.provider_message_id == taken["sid"]
        assert sent.detail == "2 segment(s), UCS-2"

        fakes.twilio.opted_out.add("+14155552672")
        err = await fails(provider.send(message("SMS", recipient="+14155552672")))
        assert (err.error_class, err.feedback, err.code) == (
            ErrorClass.INVALID_RECIPIENT,
            Feedback.PHONE_OPTED_OUT,
            "21610",
        )
        fakes.twilio.faults.then("throttle")
        err = await fails(provider.send(message("SMS", recipient="+14155552671")))
        assert (err.error_class, err.retry_after, err.code) == (ErrorClass.THROTTLED, 1, "20429")
        err = await fails(provider.send(message("SMS", recipient="not a number")))
        assert err.error_class is ErrorClass.INVALID_RECIPIENT

        fakes.twilio.faults.hang = 2.0
        hung = message("SMS", recipient="+14155552671", body_text=f"unique {uuid.uuid4()}")
        fakes.twilio.faults.then("accept_hang")
        started = utcnow()
        assert (await fails(provider.send(hung))).ambiguous
        found = await provider.lookup(hung, started)
        assert found is not None
        assert found.provider_message_id == fakes.twilio.recorder.accepted[-1]["sid"]
        other = message("SMS", recipient="+14155552671", body_text="never sent")
        assert await provider.lookup(other, started) is None
    finally:
        await provider.close()


# -- in-app and chains ---------------------------------------------------------------------------


async def test_inbox_provider_is_idempotent(stack: Settings) -> None:
    cfg = stack.model_copy(update={"namespace": f"dlvp{uuid.uuid4().hex[:6]}."})
    provider = inapp.create(cfg)
    try:
        msg = message("INAPP", recipient="u-1")
        first = await provider.send(msg)
        again = await provider.send(msg)
        assert (first.status, first.detail) == ("DELIVERED", None)
        assert again.detail == "already in the inbox"
        page = await provider.inbox.page("u-1")
        assert [m["message_id"] for m in page.messages] == [msg["message_id"]]
        assert page.unread == 1
    finally:
        keys = [k async for k in provider._redis.scan_iter(match=f"{cfg.namespace}*")]
        if keys:
            await provider._redis.delete(*keys)
        await provider.close()


async def test_inbox_provider_classifies_redis_outages_as_transient(
    base_settings: Settings,
) -> None:
    from pydantic import SecretStr

    down = base_settings.model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{_closed_port()}/0")}
    )
    provider = inapp.create(down)
    try:
        err = await fails(provider.send(message("INAPP", recipient="u-1")))
        assert err.error_class is ErrorClass.TRANSIENT
        assert provider.reconcile is Reconcile.IDEMPOTENT  # so a retry is always safe
    finally:
        await provider.close()


def test_chains_leave_out_unconfigured_providers(base_settings: Settings, cfg: Settings) -> None:
    notes: list[str] = []
    only_smtp = base_settings.model_copy(
        update={"delivery_smtp_host": "127.0.0.1", "delivery_sendgrid_api_key": None}
    )
    chain = build_chain(only_smtp, "EMAIL", log=notes.append)
    assert [p.name for p in chain] == ["smtp"]
    assert any("sendgrid" in n for n in notes)
    assert [p.name for p in build_chain(cfg, "EMAIL")] == ["sendgrid", "ses", "smtp"]
    assert [p.name for p in build_chain(cfg, "PUSH")] == ["fcm", "apns"]
    from finstream.sinks.delivery.base import ConfigurationError

    with pytest.raises(ConfigurationError, match="no sms provider"):
        build_chain(base_settings, "SMS")
    with pytest.raises(ConfigurationError, match="unknown"):
        build_chain(cfg.model_copy(update={"delivery_email_providers": "sendgrid,pigeon"}), "EMAIL")


def test_kit_files_exist(fakes: DeliveryFakes) -> None:
    assert Path(fakes.service_account).exists()
    assert fakes.apns_key_file.exists()
