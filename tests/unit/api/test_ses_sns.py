"""SNS signature verification and SES event mapping (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from finstream.api import ses_sns
from finstream.api.webhooks import ProviderEvent, Unattributable
from finstream.codec import Codec
from finstream.settings import Settings
from tests.fakes.delivery.sns import FakeSns, ses_event

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PATTERN = Settings().api_sns_cert_url_pattern


@pytest.fixture(scope="module")
def sns() -> FakeSns:
    fake = FakeSns()
    fake.url = "https://sns.us-east-1.amazonaws.com"
    return fake


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_genuine_notification_verifies_and_any_change_does_not(
    sns: FakeSns, version: str
) -> None:
    doc = sns.notification(ses_event("Delivery", "m-1", "ann@example.com"), version=version)
    parsed = ses_sns.parse(json.dumps(doc).encode())
    ses_sns.check_origin(parsed, PATTERN, {sns.topic})
    ses_sns.verify(parsed, sns.pem)
    for name, value in [("Message", "{}"), ("TopicArn", "arn:x"), ("Timestamp", "2020")]:
        with pytest.raises(ses_sns.SnsError, match="does not match"):
            ses_sns.verify({**parsed, name: value}, sns.pem)
    other = FakeSns()
    with pytest.raises(ses_sns.SnsError, match="does not match"):
        ses_sns.verify(parsed, other.pem)
    with pytest.raises(ses_sns.SnsError, match="SignatureVersion"):
        ses_sns.verify({**parsed, "SignatureVersion": "3"}, sns.pem)


def test_subscription_confirmations_sign_their_own_fields(sns: FakeSns) -> None:
    doc = sns.subscription()
    ses_sns.verify(doc, sns.pem)
    assert ses_sns.same_origin(doc["SubscribeURL"], doc["SigningCertURL"])
    assert not ses_sns.same_origin("https://evil.example/confirm", doc["SigningCertURL"])


def test_certificates_and_topics_are_checked_before_anything_is_fetched(sns: FakeSns) -> None:
    doc = sns.notification({"eventType": "Send"})
    for url in (
        "http://sns.us-east-1.amazonaws.com/x.pem",
        "https://sns.us-east-1.amazonaws.com.evil.io/x.pem",
        "https://evil.io/sns.us-east-1.amazonaws.com/x.pem",
    ):
        with pytest.raises(ses_sns.SnsError, match="SigningCertURL"):
            ses_sns.check_origin({**doc, "SigningCertURL": url}, PATTERN, {sns.topic})
    with pytest.raises(ses_sns.SnsError, match="not configured"):
        ses_sns.check_origin(doc, PATTERN, {"arn:aws:sns:us-east-1:1:other"})
    for body in (b"not json", b"[]", b'{"Type": "Mystery"}', b'{"Type": "Notification"}'):
        with pytest.raises(ses_sns.SnsError):
            ses_sns.parse(body)


def test_ses_events_map_to_distinct_results_and_hide_addresses() -> None:
    codec = Codec()
    expected = {
        "Send": ("SENT", None),
        "Delivery": ("DELIVERED", None),
        "Open": ("OPENED", None),
        "Click": ("CLICKED", None),
        "Bounce": ("BOUNCED", "invalid_recipient"),
        "Complaint": ("COMPLAINED", "complaint"),
        "Reject": ("REJECTED", "permanent"),
        "Subscription": ("UNSUBSCRIBED", None),
    }
    for kind, (status, error_class) in expected.items():
        message = ses_event(kind, "m-7", "ann@example.com")
        event = ses_sns.ses_event(message, "sns-1", NOW)
        assert isinstance(event, ProviderEvent), kind
        assert (event.status, event.error_class, event.provider) == (status, error_class, "ses")
        result = event.result({"message_id": "m-7", "request_id": "r", "user_id": "u"})
        codec.encode("DeliveryResult", result)
        assert "ann@example.com" not in json.dumps(result, default=str)
        assert ses_sns.attached_ids(message) == {"message_id": "m-7"}
    soft = ses_sns.ses_event(ses_event("Bounce", "m", "a@b.io", bounce_type="Transient"), "s", NOW)
    assert isinstance(soft, ProviderEvent)
    assert (soft.status, soft.error_class) == ("FAILED", "transient")
    assert ses_sns.ses_event(ses_event("DeliveryDelay", "m", "a@b.io"), "s", NOW) is None
    assert isinstance(ses_sns.ses_event({"eventType": "Martian"}, "s", NOW), Unattributable)
    assert isinstance(ses_sns.ses_event("nope", "s", NOW), Unattributable)
