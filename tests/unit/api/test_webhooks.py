"""Provider webhooks: SendGrid's ECDSA signature and both providers' mapping to DeliveryResult."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from finstream.api.webhooks import (
    ProviderEvent,
    SignatureError,
    Unattributable,
    attempt_of,
    known_ids,
    load_sendgrid_key,
    sendgrid_event,
    sign_sendgrid,
    twilio_event,
    verify_sendgrid,
)
from finstream.codec import Codec

NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)
IDS = {"message_id": "m-1", "request_id": "r-1", "user_id": "alice"}


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def test_sendgrid_signature(key: ec.EllipticCurvePrivateKey) -> None:
    public = load_sendgrid_key(public_b64(key))
    body = json.dumps([{"event": "delivered", **IDS}]).encode()
    sig = sign_sendgrid(key, "1700000000", body)
    verify_sendgrid(public, sig, "1700000000", body)
    for bad_sig, ts, payload in (
        (sig, "1700000001", body),  # timestamp is signed
        (sig, "1700000000", body + b" "),  # body is signed, byte for byte
        (
            sign_sendgrid(ec.generate_private_key(ec.SECP256R1()), "1700000000", body),
            "1700000000",
            body,
        ),
        ("not base64!", "1700000000", body),
        (None, "1700000000", body),
        (sig, None, body),
    ):
        with pytest.raises(SignatureError):
            verify_sendgrid(public, bad_sig, ts, payload)


def test_sendgrid_key_formats(key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert load_sendgrid_key(pem.decode()).public_numbers() == key.public_key().public_numbers()
    with pytest.raises(ValueError, match="cannot be read"):
        load_sendgrid_key("bm90IGEga2V5")


def test_sendgrid_events_map_to_results() -> None:
    codec = Codec()
    cases = {
        "processed": ("SENT", None),
        "delivered": ("DELIVERED", None),
        "open": ("OPENED", None),
        "click": ("CLICKED", None),
        "deferred": ("RETRYING", "transient"),
        "bounce": ("BOUNCED", "invalid_recipient"),
        "dropped": ("REJECTED", "permanent"),
        "spamreport": ("COMPLAINED", "complaint"),
        "unsubscribe": ("UNSUBSCRIBED", None),
        "group_unsubscribe": ("UNSUBSCRIBED", "group"),
    }
    for kind, (status, error_class) in cases.items():
        raw = {"event": kind, "sg_event_id": f"ev-{kind}", "sg_message_id": "sg.1", **IDS}
        raw["timestamp"] = 1_700_000_000
        event = sendgrid_event(raw, NOW)
        assert isinstance(event, ProviderEvent)
        result = event.result(known_ids(raw))
        assert (result["status"], result["error_class"]) == (status, error_class)
        assert result["at"] == datetime.fromtimestamp(1_700_000_000, UTC)
        codec.encode("DeliveryResult", result)  # fits the public contract
        again = sendgrid_event(raw, NOW)
        assert isinstance(again, ProviderEvent)
        assert again.result(IDS) == result, "a retried event has the same result id"
    blocked = sendgrid_event({"event": "bounce", "type": "blocked", **IDS}, NOW)
    assert isinstance(blocked, ProviderEvent)
    assert blocked.error_class == "permanent"
    assert sendgrid_event({"event": "group_resubscribe", **IDS}, NOW) is None
    assert isinstance(sendgrid_event({"event": "martian", **IDS}, NOW), Unattributable)
    assert isinstance(sendgrid_event(["not", "an", "object"], NOW), Unattributable)


def test_attached_ids_are_checked() -> None:
    assert known_ids(IDS) == IDS
    assert known_ids({"message_id": "m", "user_id": 7, "request_id": "x" * 500}) == {
        "message_id": "m"
    }
    assert known_ids({"message_id": "bad\nid"}) == {}
    assert attempt_of("3") == 3
    assert attempt_of("zero") == attempt_of(0) == attempt_of(None) == 1


def test_twilio_statuses_map_to_results() -> None:
    codec = Codec()
    form = {"MessageSid": "SM1", "MessageStatus": "delivered"}
    event = twilio_event(form, NOW)
    assert isinstance(event, ProviderEvent)
    result = event.result(IDS, 2)
    assert (result["status"], result["provider"], result["channel"]) == (
        "DELIVERED",
        "twilio",
        "SMS",
    )
    assert (result["attempt"], result["provider_message_id"]) == (2, "SM1")
    codec.encode("DeliveryResult", result)
    failed = twilio_event({**form, "MessageStatus": "undelivered", "ErrorCode": "30006"}, NOW)
    assert isinstance(failed, ProviderEvent)
    assert (failed.status, failed.error_class) == ("FAILED", "invalid_recipient")
    assert "30006" in str(failed.error)
    assert failed.result(IDS)["result_id"] != result["result_id"]
    stop = twilio_event({**form, "MessageStatus": "failed", "ErrorCode": "21610"}, NOW)
    assert isinstance(stop, ProviderEvent)
    assert stop.error_class == "opted_out"
    assert twilio_event({**form, "MessageStatus": "sending"}, NOW) is None
    assert isinstance(twilio_event({"MessageStatus": "sent"}, NOW), Unattributable)
    assert isinstance(twilio_event({**form, "MessageStatus": "zzz"}, NOW), Unattributable)
