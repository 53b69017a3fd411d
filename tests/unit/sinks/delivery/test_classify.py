"""Each provider's classify(): its documented answers into DeliveryError classes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from finstream.domain.delivery.errors import Feedback
from finstream.domain.resilience import ErrorClass
from finstream.sinks.delivery.apns import classify as classify_apns
from finstream.sinks.delivery.fcm import classify as classify_fcm
from finstream.sinks.delivery.sendgrid import classify as classify_sendgrid
from finstream.sinks.delivery.ses import classify as classify_ses
from finstream.sinks.delivery.smtp import SmtpStage
from finstream.sinks.delivery.smtp import classify as classify_smtp
from finstream.sinks.delivery.twilio_sms import classify as classify_twilio

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


def j(value: object) -> bytes:
    return json.dumps(value).encode()


# -- SendGrid ------------------------------------------------------------------------


def test_sendgrid_classification() -> None:
    assert classify_sendgrid(202, {"x-message-id": "abc"}, b"", NOW) is None
    no_id = classify_sendgrid(202, {}, b"", NOW)
    assert no_id is not None
    assert no_id.ambiguous
    assert no_id.error_class is ErrorClass.MALFORMED
    bad_to = classify_sendgrid(
        400,
        {},
        j({"errors": [{"field": "personalizations.0.to.0.email", "message": "invalid"}]}),
        NOW,
    )
    assert bad_to is not None
    assert bad_to.error_class is ErrorClass.INVALID_RECIPIENT
    bad_from = classify_sendgrid(
        400, {}, j({"errors": [{"field": "from.email", "message": "no"}]}), NOW
    )
    assert bad_from is not None
    assert bad_from.error_class is ErrorClass.PERMANENT
    reset = str(int(NOW.timestamp()) + 40)
    throttled = classify_sendgrid(
        429, {"x-ratelimit-reset": reset}, j({"errors": [{"message": "slow"}]}), NOW
    )
    assert throttled is not None
    assert throttled.error_class is ErrorClass.THROTTLED
    assert throttled.retry_after == 40
    for status, cls in (
        (401, ErrorClass.AUTH),
        (403, ErrorClass.AUTH),
        (413, ErrorClass.PERMANENT),
        (500, ErrorClass.TRANSIENT),
        (503, ErrorClass.TRANSIENT),
    ):
        err = classify_sendgrid(status, {}, b"<html>oops</html>", NOW)
        assert err is not None
        assert err.error_class is cls, status
        assert not err.ambiguous


# -- SES -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (429, "TooManyRequestsException", ErrorClass.THROTTLED),
        (400, "MessageRejected", ErrorClass.PERMANENT),
        (400, "AccountSuspendedException", ErrorClass.AUTH),
        (400, "SendingPausedException", ErrorClass.AUTH),
        (400, "MailFromDomainNotVerifiedException", ErrorClass.AUTH),
        (400, "LimitExceededException", ErrorClass.THROTTLED),
        (403, "SignatureDoesNotMatch", ErrorClass.AUTH),
        (503, "ServiceUnavailable", ErrorClass.TRANSIENT),
        (500, None, ErrorClass.TRANSIENT),
    ],
)
def test_ses_classification(status: int, code: str | None, cls: ErrorClass) -> None:
    headers = {"x-amzn-errortype": f"{code}:http://internal.amazon.com/coral/"} if code else {}
    err = classify_ses(status, headers, j({"message": "m"}), NOW)
    assert err is not None
    assert err.error_class is cls
    assert err.code == code


def test_ses_error_type_from_the_body_and_success_shape() -> None:
    err = classify_ses(400, {}, j({"__type": "com.amazon#MessageRejected", "message": "x"}), NOW)
    assert err is not None
    assert err.code == "MessageRejected"
    assert classify_ses(200, {}, j({"MessageId": "0100-abc"}), NOW) is None
    weird = classify_ses(200, {}, b"<html>captive portal</html>", NOW)
    assert weird is not None
    assert weird.ambiguous


# -- FCM -----------------------------------------------------------------------------------


def fcm_error(status: int, canonical: str, code: str | None) -> bytes:
    err: dict[str, object] = {"code": status, "message": "m", "status": canonical}
    if code:
        err["details"] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]
    return j({"error": err})


def test_fcm_classification() -> None:
    assert classify_fcm(200, {}, j({"name": "projects/p/messages/1"}), NOW) is None
    gone = classify_fcm(404, {}, fcm_error(404, "NOT_FOUND", "UNREGISTERED"), NOW)
    assert gone is not None
    assert gone.error_class is ErrorClass.INVALID_RECIPIENT
    assert gone.feedback is Feedback.TOKEN_INVALID
    quota = classify_fcm(
        429, {"retry-after": "9"}, fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), NOW
    )
    assert quota is not None
    assert (quota.error_class, quota.retry_after) == (ErrorClass.THROTTLED, 9)
    for body, cls in (
        (fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"), ErrorClass.TRANSIENT),
        (fcm_error(500, "INTERNAL", "INTERNAL"), ErrorClass.TRANSIENT),
        (fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"), ErrorClass.PERMANENT),
        (fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"), ErrorClass.AUTH),
        (fcm_error(401, "UNAUTHENTICATED", None), ErrorClass.AUTH),
    ):
        err = classify_fcm(json.loads(body)["error"]["code"], {}, body, NOW)
        assert err is not None
        assert err.error_class is cls
        assert err.feedback is None
    blank = classify_fcm(200, {}, b"{}", NOW)
    assert blank is not None
    assert blank.ambiguous


# -- APNs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "cls", "feedback"),
    [
        (410, "Unregistered", ErrorClass.INVALID_RECIPIENT, Feedback.TOKEN_INVALID),
        (400, "BadDeviceToken", ErrorClass.INVALID_RECIPIENT, None),
        (400, "DeviceTokenNotForTopic", ErrorClass.INVALID_RECIPIENT, None),
        (400, "PayloadEmpty", ErrorClass.PERMANENT, None),
        (413, "PayloadTooLarge", ErrorClass.PERMANENT, None),
        (403, "ExpiredProviderToken", ErrorClass.AUTH, None),
        (403, "InvalidProviderToken", ErrorClass.AUTH, None),
        (429, "TooManyRequests", ErrorClass.THROTTLED, None),
        (500, "InternalServerError", ErrorClass.TRANSIENT, None),
        (503, "ServiceUnavailable", ErrorClass.TRANSIENT, None),
    ],
)
def test_apns_classification(
    status: int, reason: str, cls: ErrorClass, feedback: Feedback | None
) -> None:
    err = classify_apns(status, {}, j({"reason": reason}), NOW)
    assert err is not None
    assert (err.error_class, err.feedback, err.code) == (cls, feedback, reason)
    assert classify_apns(200, {"apns-id": "x"}, b"", NOW) is None


# -- Twilio --------------------------------------------------------------------------------------


def twilio_error(code: int, status: int) -> bytes:
    return j({"code": code, "message": "m", "more_info": "https://...", "status": status})


def test_twilio_classification() -> None:
    assert classify_twilio(201, {}, j({"sid": "SM1", "status": "queued"}), NOW) is None
    stop = classify_twilio(400, {}, twilio_error(21610, 400), NOW)
    assert stop is not None
    assert (stop.error_class, stop.feedback) == (
        ErrorClass.INVALID_RECIPIENT,
        Feedback.PHONE_OPTED_OUT,
    )
    bad_to = classify_twilio(400, {}, twilio_error(21211, 400), NOW)
    assert bad_to is not None
    assert (bad_to.error_class, bad_to.feedback) == (ErrorClass.INVALID_RECIPIENT, None)
    slow = classify_twilio(429, {"retry-after": "2"}, twilio_error(20429, 429), NOW)
    assert slow is not None
    assert (slow.error_class, slow.retry_after) == (ErrorClass.THROTTLED, 2)
    auth = classify_twilio(401, {}, twilio_error(20003, 401), NOW)
    assert auth is not None
    assert auth.error_class is ErrorClass.AUTH
    unknown = classify_twilio(500, {}, b"gateway", NOW)
    assert unknown is not None
    assert unknown.error_class is ErrorClass.TRANSIENT
    no_sid = classify_twilio(201, {}, b"{}", NOW)
    assert no_sid is not None
    assert no_sid.ambiguous


# -- SMTP ----------------------------------------------------------------------------------------


def test_smtp_classification_depends_on_the_stage() -> None:
    assert (
        classify_smtp(550, "user unknown", SmtpStage.ENVELOPE).error_class
        is ErrorClass.INVALID_RECIPIENT
    )
    assert classify_smtp(451, "later", SmtpStage.DATA).error_class is ErrorClass.TRANSIENT
    assert classify_smtp(554, "spam", SmtpStage.DATA).error_class is ErrorClass.PERMANENT
    assert classify_smtp(535, "bad creds", SmtpStage.CONNECT).error_class is ErrorClass.AUTH
    before = classify_smtp(None, "reset", SmtpStage.ENVELOPE)
    after = classify_smtp(None, "reset", SmtpStage.DATA)
    assert (before.ambiguous, after.ambiguous) == (False, True)
