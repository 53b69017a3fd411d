"""Delivery policy: throttling headers, retry schedule, SMS, E.164, validation, and the
feedback a refusal carries to the feedback role."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finstream.codec import Codec, SchemaCatalog
from finstream.domain import feedback as fb
from finstream.domain.delivery import (
    AttemptSummary,
    RetryAction,
    RetryPolicy,
    dead_letter_reason,
    defer_delay,
)
from finstream.domain.delivery.channels import (
    RecipientError,
    apns_id,
    email_parts,
    normalize_e164,
    same_phone,
    sms_segments,
    unsubscribe_headers,
    validate_email_address,
    validate_outbound,
)
from finstream.domain.delivery.errors import DeliveryError, Feedback, throttle_delay
from finstream.domain.resilience import Backoff, ErrorClass
from tests.support.avro_strategies import strategy

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


# -- throttling headers ----------------------------------------------------------


def test_throttle_delay_reads_retry_after_and_rate_limit_reset() -> None:
    assert throttle_delay({"retry-after": "7"}, NOW) == 7
    date = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert throttle_delay({"retry-after": date}, NOW) == 30
    reset = str(int(NOW.timestamp()) + 12)
    assert throttle_delay({"x-ratelimit-reset": reset}, NOW) == 12
    # Both: the later one wins.
    assert throttle_delay({"retry-after": "3", "x-ratelimit-reset": reset}, NOW) == 12
    assert throttle_delay({"x-ratelimit-reset": "yesterday"}, NOW) is None
    assert throttle_delay({"x-ratelimit-reset": str(int(NOW.timestamp()) - 60)}, NOW) == 0
    assert throttle_delay({}, NOW) is None


# -- retry schedule --------------------------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=5, backoff=Backoff(base=1.0, cap=60.0), max_age=3600)


@settings(max_examples=300)
@given(
    attempts=st.integers(0, 10),
    rounds=st.integers(0, 10),
    retry_after=st.none() | st.floats(0, 500),
    floor=st.none() | st.floats(0, 500),
    cls=st.sampled_from(list(ErrorClass)),
    left=st.floats(0, 4000),
    seed=st.integers(),
)
def test_retry_decisions_are_bounded(
    attempts: int,
    rounds: int,
    retry_after: float | None,
    floor: float | None,
    cls: ErrorClass,
    left: float,
    seed: int,
) -> None:
    err = DeliveryError(cls, "x", retry_after=retry_after)
    deadline = NOW + timedelta(seconds=left)
    d = POLICY.decide(
        attempts=attempts,
        rounds=rounds,
        error=err,
        wait_floor=floor,
        now=NOW,
        deadline=deadline,
        rng=random.Random(seed),
    )
    if (not cls.retryable and cls is not ErrorClass.AUTH) or attempts >= POLICY.max_attempts:
        assert d.action is RetryAction.FAIL
    elif d.action is RetryAction.RETRY:
        assert d.at is not None
        wait = (d.at - NOW).total_seconds()
        # Never before the provider's instruction, never past the deadline.
        assert wait >= max(retry_after or 0, floor or 0) - 1e-6
        assert d.at <= deadline
    else:
        assert d.action is RetryAction.EXPIRE


def test_retry_backoff_grows_and_the_deadline_comes_from_expiry() -> None:
    err = DeliveryError(ErrorClass.TRANSIENT, "x")
    far = NOW + timedelta(hours=1)
    rng = random.Random(3)
    waits = {
        n: max(
            (
                POLICY.decide(
                    attempts=1, rounds=n, error=err, wait_floor=None, now=NOW, deadline=far, rng=rng
                ).at
                - NOW
            ).total_seconds()  # type: ignore[operator]
            for _ in range(200)
        )
        for n in (1, 2, 3, 4)
    }
    assert waits[1] <= 1 < waits[2] <= 2 < waits[3] <= 4 < waits[4] <= 8
    created = NOW
    assert POLICY.deadline(created, None) == created + timedelta(seconds=3600)
    assert POLICY.deadline(created, created + timedelta(minutes=5)) == created + timedelta(
        minutes=5
    )


@given(wait=st.floats(0, 10_000))
def test_defer_delay_is_at_least_the_wait(wait: float) -> None:
    d = defer_delay(wait, random.Random(1))
    assert d >= min(max(wait, 0.05), 86400)
    assert d <= max(wait, 0.05) + 1.0


# -- SMS --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters cost two septets
        ("€" * 81, "GSM-7", 2),
        # 306 septets would fit two segments, but the escape pair is not split
        # across the first boundary (152 + 2 > 153), so it takes three.
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 3),
        ("ü" * 70, "GSM-7", 1),  # in the basic table
        ("ć" * 70, "UCS-2", 1),
        ("ć" * 71, "UCS-2", 2),
        ("ć" * 134, "UCS-2", 2),
        ("ć" * 135, "UCS-2", 3),
        ("😀" * 35, "UCS-2", 1),  # surrogate pairs: two units each
        ("😀" * 36, "UCS-2", 2),
        ("", "GSM-7", 1),
    ],
)
def test_sms_segment_vectors(text: str, encoding: str, segments: int) -> None:
    got = sms_segments(text)
    assert (got.encoding, got.segments) == (encoding, segments)


@given(st.text(max_size=800))
def test_sms_segments_are_bounded_by_the_unit_count(text: str) -> None:
    got = sms_segments(text)
    single, multi = (160, 153) if got.encoding == "GSM-7" else (70, 67)
    if got.units <= single:
        assert got.segments == 1
    else:
        # A segment holds `multi` units, one less when a pair would straddle it.
        assert math.ceil(got.units / multi) <= got.segments <= math.ceil(got.units / (multi - 1))


def test_e164() -> None:
    assert normalize_e164("+14155552671") == "+14155552671"
    assert normalize_e164(" +44 20 7946 0958 ") == "+442079460958"
    for bad in ("14155552671", "+1415", "+999999999999", "call me", ""):
        with pytest.raises(RecipientError):
            normalize_e164(bad)
    assert same_phone("+44 20 7946 0958", "+442079460958")
    assert not same_phone("+14155552671", "+14155552672")


def test_email_addresses() -> None:
    assert validate_email_address("a.b+c@example.co.uk")
    for bad in ("nobody", "a@b", "a@@b.com", "a b@c.com", "a@b.com\r\nBcc: x@y.z", "a..b@c.com"):
        with pytest.raises(RecipientError):
            validate_email_address(bad)


# -- validation before sending --------------------------------------------------------------------


def outbound(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "message_id": "m-1",
        "channel": "EMAIL",
        "recipient": "a@example.com",
        "subject": "Hi",
        "body_text": "hello",
        "platform": None,
    }
    base.update(over)
    return base


def test_validate_outbound() -> None:
    validate_outbound(outbound(), "EMAIL")
    validate_outbound(outbound(channel="SMS", recipient="+14155552671"), "SMS")
    validate_outbound(outbound(channel="PUSH", recipient="ab" * 32, platform="APNS"), "PUSH")
    cases = [
        (outbound(channel="SMS"), "EMAIL", ErrorClass.PERMANENT),
        (outbound(recipient="nope"), "EMAIL", ErrorClass.INVALID_RECIPIENT),
        (outbound(subject="a\r\nBcc: x@y.z"), "EMAIL", ErrorClass.PERMANENT),
        (outbound(channel="SMS", recipient="555"), "SMS", ErrorClass.INVALID_RECIPIENT),
        (
            outbound(channel="SMS", recipient="+14155552671", body_text="x" * 1601),
            "SMS",
            ErrorClass.PERMANENT,
        ),
        (outbound(channel="PUSH", recipient="t", platform=None), "PUSH", ErrorClass.PERMANENT),
        (
            outbound(channel="PUSH", recipient="has space", platform="FCM"),
            "PUSH",
            ErrorClass.INVALID_RECIPIENT,
        ),
        (outbound(message_id=""), "EMAIL", ErrorClass.PERMANENT),
    ]
    for message, channel, cls in cases:
        with pytest.raises(DeliveryError) as caught:
            validate_outbound(message, channel)
        assert caught.value.error_class is cls, message


def test_email_parts_add_list_unsubscribe_only_when_not_transactional() -> None:
    msg = {**outbound(), "transactional": True}
    assert (
        "List-Unsubscribe"
        not in email_parts(msg, "x <a@b.io>", "https://u/{message_id}", None).headers
    )
    parts = email_parts(
        {**msg, "transactional": False}, "x <a@b.io>", "https://u/{message_id}", "u@b.io"
    )
    assert (
        parts.headers["List-Unsubscribe"]
        == "<https://u/m-1>, <mailto:u@b.io?subject=unsubscribe%20m-1>"
    )
    assert parts.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parts.headers["X-Entity-Ref-ID"] == "m-1"
    assert (parts.from_name, parts.from_address, parts.domain) == ("x", "a@b.io", "b.io")
    assert unsubscribe_headers("m", None, None) == {}


# -- feedback -------------------------------------------------------------------------------------

CODEC = Codec()
PREFS_SCHEMA = SchemaCatalog().get("UserPreferences").raw


def refused(channel: str, feedback: Feedback) -> dict[str, object]:
    """The DeliveryResult a delivery worker publishes for a send refused with ``feedback``."""
    return {"channel": channel, "status": "REJECTED", "error_class": feedback.error_class}


def test_a_refusal_with_feedback_names_the_preference_change_for_the_feedback_role() -> None:
    assert fb.change_for(refused("PUSH", Feedback.TOKEN_INVALID)) is fb.Change.TOKEN_INVALID
    assert fb.change_for(refused("SMS", Feedback.PHONE_OPTED_OUT)) is fb.Change.OPTED_OUT
    # The same class on another channel asks for nothing.
    assert fb.change_for(refused("EMAIL", Feedback.TOKEN_INVALID)) is None
    assert fb.change_for({**refused("PUSH", Feedback.TOKEN_INVALID), "status": "SENT"}) is None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefs=strategy(PREFS_SCHEMA), data=st.data())
def test_an_invalid_token_is_marked_and_updated_at_moves_forward(
    prefs: dict[str, object], data: st.DataObject
) -> None:
    tokens = [t["token"] for t in prefs["push_tokens"]]  # type: ignore[attr-defined]
    recipient = data.draw(st.sampled_from(tokens)) if tokens else "no-such-token"
    now = data.draw(st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC)))
    updated = fb.apply_change(
        prefs, fb.Change.TOKEN_INVALID, recipient=recipient, category=None, now=now
    )
    already = all(
        t["invalid"]
        for t in prefs["push_tokens"]
        if t["token"] == recipient  # type: ignore[attr-defined]
    )
    if not recipient or already:  # an empty recipient names no token
        assert updated is None
        return
    assert updated is not None
    assert updated["updated_at"] > prefs["updated_at"]  # type: ignore[operator]
    assert updated["updated_at"] >= now
    assert all(t["invalid"] for t in updated["push_tokens"] if t["token"] == recipient)
    others = [t for t in updated["push_tokens"] if t["token"] != recipient]
    assert others == [t for t in prefs["push_tokens"] if t["token"] != recipient]  # type: ignore[attr-defined]
    assert CODEC.decode(CODEC.encode("UserPreferences", updated), "UserPreferences") == updated


def test_opt_out_matches_numbers_in_any_format() -> None:
    prefs = {
        "user_id": "u",
        "phones": [{"number": "+44 20 7946 0958", "verified": True, "opted_out": False}],
        "push_tokens": [],
        "updated_at": NOW,
    }

    def stop(record: dict[str, object], now: datetime) -> dict[str, object] | None:
        return fb.apply_change(
            record,
            fb.Change.OPTED_OUT,
            recipient="+442079460958",
            category=None,
            now=now,
            same_phone=same_phone,
        )

    updated = stop(prefs, NOW - timedelta(days=1))
    assert updated is not None
    assert updated["phones"][0]["opted_out"] is True  # type: ignore[index]
    assert updated["updated_at"] == NOW + timedelta(microseconds=1)  # the clock was behind
    assert stop(updated, NOW) is None
    assert prefs["phones"][0]["opted_out"] is False  # type: ignore[index]  # input untouched


def test_dead_letter_reason_and_apns_id() -> None:
    reason = dead_letter_reason(
        "failed: gave up",
        [
            AttemptSummary(1, "sendgrid", "RETRYING", "transient", "503"),
            AttemptSummary(2, "ses", "FAILED", "throttled", "429"),
        ],
    )
    assert (
        reason
        == "failed: gave up | #1 sendgrid RETRYING transient: 503 | #2 ses FAILED throttled: 429"
    )
    assert apns_id("m-1") == apns_id("m-1") != apns_id("m-2")
    assert len(apns_id("m-1")) == 36


def test_contacts_are_scrubbed_from_error_texts() -> None:
    from finstream.domain.delivery.channels import scrub_contacts

    text = "identities failed the check: ann.smith@example.co.uk; To +1 415 555 2671 is opted out"
    out = scrub_contacts(text)
    assert "ann.smith" not in out
    assert "555 2671" not in out
    assert out.endswith("2671 is opted out")
    assert "co.uk" in out  # the tail is kept, enough to tell recipients apart
    assert scrub_contacts("status 503 (retry in 2.5s)") == "status 503 (retry in 2.5s)"
