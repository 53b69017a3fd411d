"""Pure privacy logic: verification codes, unsubscribe tokens, feedback, the funnel, audit diffs."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.domain import feedback as fb
from finstream.domain import unsubscribe as unsub
from finstream.domain import verification as ver
from finstream.domain.notify.preferences import parse_preferences
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing import Policy, select_channels
from finstream.domain.privacy_audit import preference_changes, rule_changes

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECRET = b"s" * 32
OTHER = b"o" * 32


# -- verification codes -------------------------------------------------------------------


def test_codes_are_six_digits_and_only_their_digest_is_kept() -> None:
    codes = {ver.new_code() for _ in range(200)}
    assert all(len(c) == 6 and c.isdigit() for c in codes)
    assert len(codes) > 150
    digest = ver.code_digest(SECRET, "u1", "c-1", "123456")
    assert "123456" not in digest
    assert ver.code_matches([SECRET], digest, "u1", "c-1", "123456")
    assert ver.code_matches([SECRET], digest, "u1", "c-1", " 123456 ")
    assert not ver.code_matches([SECRET], digest, "u1", "c-1", "123457")
    # Bound to the user and the contact; verified under any configured secret.
    assert not ver.code_matches([SECRET], digest, "u2", "c-1", "123456")
    assert not ver.code_matches([SECRET], digest, "u1", "c-2", "123456")
    assert ver.code_matches([OTHER, SECRET], digest, "u1", "c-1", "123456")
    assert not ver.code_matches([OTHER], digest, "u1", "c-1", "123456")
    for junk in ("", "12345", "1234567", "abcdef"):
        assert not ver.code_matches([SECRET], digest, "u1", "c-1", junk)


def pending(**kw: Any) -> ver.Pending:
    base = {
        "code_digest": "x",
        "expires_at": NOW + timedelta(minutes=15),
        "attempts": 0,
        "sends": 1,
        "window_start": NOW,
        "sent_at": NOW,
    }
    base.update(kw)
    return ver.Pending(**base)


def test_a_guess_is_verified_wrong_expired_or_exhausted() -> None:
    out = ver.Outcome
    assert ver.check(None, True, NOW, 5) is out.NO_CODE
    assert ver.check(pending(), True, NOW, 5) is out.VERIFIED
    assert ver.check(pending(), False, NOW, 5) is out.WRONG
    assert ver.check(pending(attempts=5), True, NOW, 5) is out.EXHAUSTED
    assert ver.check(pending(), True, NOW + timedelta(minutes=15), 5) is out.EXPIRED
    assert ver.check(pending(verified_at=NOW), True, NOW, 5) is out.ALREADY


def test_codes_per_contact_are_limited_per_hour() -> None:
    assert ver.may_send(None, NOW, 3) == ver.SendDecision(True, 1, NOW)
    assert ver.may_send(pending(sends=2), NOW + timedelta(minutes=5), 3).sends == 3
    refused = ver.may_send(pending(sends=3), NOW + timedelta(minutes=20), 3)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(40 * 60)
    renewed = ver.may_send(pending(sends=3), NOW + timedelta(minutes=61), 3)
    assert renewed.allowed
    assert renewed.sends == 1


def test_a_verification_request_goes_to_its_unverified_contact_only() -> None:
    record = parse_preferences(
        {
            "user_id": "u1",
            "emails": [
                {"address": "new@example.com", "id": "c-new"},
                {"address": "old@example.com", "verified": True, "id": "c-old"},
            ],
            "phones": [{"number": "+14155552671", "id": "c-ph"}],
        },
        now=NOW,
    )
    prefs = Preferences.from_record(record)

    def request(contact: str | None) -> Request:
        return Request.from_record(
            {
                "request_id": "r1",
                "user_id": "u1",
                "category": "verification",
                "priority": "CRITICAL",
                "template": "contact_verification",
                "data": {"code": "123456", "minutes": "15"},
                "channels": [],
                "contact_id": contact,
            }
        )

    assert select_channels(request("c-new"), prefs, Policy())[0] == ("email",)
    # SMS still needs the user's consent to texts.
    channels, skipped, _ = select_channels(request("c-ph"), prefs, Policy())
    assert channels == ()
    assert skipped == {"sms": "no consent for sms"}
    assert select_channels(request("c-gone"), prefs, Policy())[2] == "no contact c-gone"


# -- unsubscribe tokens ------------------------------------------------------------------


@given(st.text(min_size=8, max_size=80), st.sampled_from(["marketing", "product", "x.y-z"]))
def test_an_unsubscribe_token_round_trips_and_hides_the_user(user: str, category: str) -> None:
    token = unsub.issue(SECRET, user, category, "m-1", NOW + timedelta(days=60))
    assert user not in token
    assert base64.urlsafe_b64encode(user.encode()).decode().rstrip("=") not in token
    found = unsub.read([SECRET], token, NOW)
    assert (found.user_id, found.category, found.message_id) == (user, category, "m-1")


def test_unsubscribe_tokens_expire_and_cannot_be_forged_or_altered() -> None:
    token = unsub.issue(SECRET, "u1", "marketing", "m-1", NOW + timedelta(days=1))
    with pytest.raises(unsub.ExpiredToken):
        unsub.read([SECRET], token, NOW + timedelta(days=1))
    with pytest.raises(unsub.InvalidToken):
        unsub.read([OTHER], token, NOW)
    assert unsub.read([OTHER, SECRET], token, NOW).user_id == "u1"  # rotated secrets
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[20] ^= 1
    altered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad in (altered, "", "!!!", "A" * 700, "AAAA"):
        with pytest.raises(unsub.InvalidToken):
            unsub.read([SECRET], bad, NOW)


# -- feedback ------------------------------------------------------------------------------


def result(status: str, **kw: Any) -> dict[str, Any]:
    base = {
        "result_id": "r",
        "message_id": "m-1",
        "request_id": "q-1",
        "user_id": "u1",
        "channel": "EMAIL",
        "provider": "sendgrid",
        "status": status,
        "error_class": None,
        "at": NOW,
    }
    base.update(kw)
    return base


def test_outcomes_map_to_distinct_stages_and_preference_changes() -> None:
    stages = {s: fb.result_stage(s) for s in ("DELIVERED", "OPENED", "CLICKED", "READ")}
    assert stages == {
        "DELIVERED": fb.Stage.DELIVERED,
        "OPENED": fb.Stage.OPENED,
        "CLICKED": fb.Stage.CLICKED,
        "READ": fb.Stage.OPENED,
    }
    assert fb.result_stage("RETRYING") is None
    assert fb.change_for(result("BOUNCED")) is fb.Change.BOUNCED
    assert fb.change_for(result("FAILED", error_class="invalid_recipient")) is fb.Change.BOUNCED
    assert fb.change_for(result("FAILED", error_class="transient")) is None
    assert fb.change_for(result("COMPLAINED")) is fb.Change.COMPLAINED
    assert fb.change_for(result("UNSUBSCRIBED")) is fb.Change.UNSUBSCRIBED
    sms = result("FAILED", channel="SMS", error_class="opted_out")
    assert fb.change_for(sms) is fb.Change.OPTED_OUT
    assert fb.change_for(result("DELIVERED")) is None
    (row,) = fb.rows_from_result(result("CLICKED"))
    assert (row.item_key, row.stage, row.channel, row.provider) == (
        "m-1",
        fb.Stage.CLICKED,
        "email",
        "sendgrid",
    )
    assert fb.rows_from_result(result("DUPLICATE")) == []


def audit(action: str, details: dict[str, str], actor: str = "router") -> dict[str, Any]:
    return {
        "event_id": "e",
        "at": NOW,
        "actor": actor,
        "action": action,
        "subject_type": "request",
        "subject_id": "q-1",
        "user_id": "u1",
        "details": {"category": "marketing", "template": "promo", **details},
    }


def test_router_decisions_become_requested_and_suppressed_rows() -> None:
    routed = audit(
        "routed",
        {
            "message_ids": "m-1,m-2",
            "contacts": "email:abc,inapp:def",
            "skipped.sms": "no consent for sms",
            "requested_at": (NOW - timedelta(seconds=3)).isoformat(),
        },
    )
    rows = fb.rows_from_audit(routed)
    assert [(r.item_key, r.channel, r.stage) for r in rows] == [
        ("m-1", "email", fb.Stage.REQUESTED),
        ("m-2", "inapp", fb.Stage.REQUESTED),
        ("q-1|sms", "sms", fb.Stage.SUPPRESSED),
    ]
    assert rows[0].at == NOW - timedelta(seconds=3)
    assert rows[0].template == "promo"
    (whole,) = fb.rows_from_audit(audit("suppressed", {}))
    assert (whole.item_key, whole.channel) == ("q-1|none", "none")
    assert fb.rows_from_audit(audit("scheduled", {})) == []
    assert fb.rows_from_audit(audit("routed", {}, actor="delivery.email")) == []


PREFS = {
    "user_id": "u1",
    "emails": [{"address": "Ann@example.com", "verified": True, "bounced": False}],
    "phones": [{"number": "+14155552671", "verified": True, "opted_out": False}],
    "categories": {},
    "consents": [{"purpose": "marketing", "granted": True, "at": NOW, "source": "web"}],
    "updated_at": NOW,
}


def test_bounces_complaints_stops_and_unsubscribes_change_preferences_once() -> None:
    later = NOW + timedelta(seconds=1)
    bounced = fb.apply_change(
        PREFS, fb.Change.BOUNCED, recipient="ann@example.com", category=None, now=later
    )
    assert bounced is not None
    assert bounced["emails"][0]["bounced"] is True
    assert bounced["updated_at"] == later
    assert (
        fb.apply_change(
            bounced, fb.Change.BOUNCED, recipient="ann@example.com", category=None, now=later
        )
        is None
    )
    complained = fb.apply_change(
        PREFS, fb.Change.COMPLAINED, recipient="ann@example.com", category=None, now=NOW
    )
    assert complained is not None
    assert complained["emails"][0]["complained"] is True
    assert complained["updated_at"] > NOW  # never behind the version it replaces
    stopped = fb.apply_change(
        PREFS, fb.Change.OPTED_OUT, recipient="+14155552671", category=None, now=later
    )
    assert stopped is not None
    assert stopped["phones"][0]["opted_out"] is True
    out = fb.apply_change(
        PREFS, fb.Change.UNSUBSCRIBED, recipient=None, category="product", now=later
    )
    assert out is not None
    assert out["categories"]["product"]["enabled"] is False
    assert (
        fb.apply_change(out, fb.Change.UNSUBSCRIBED, recipient=None, category="product", now=later)
        is None
    )
    assert (
        fb.apply_change(PREFS, fb.Change.BOUNCED, recipient="other@x.io", category=None, now=later)
        is None
    )
    withdrawn = fb.withdraw_consent(PREFS, "marketing", later, "unsubscribe")
    assert withdrawn is not None
    assert withdrawn["consents"][-1] == {
        "purpose": "marketing",
        "granted": False,
        "at": later,
        "source": "unsubscribe",
    }
    assert fb.withdraw_consent(withdrawn, "marketing", later, "unsubscribe") is None


# -- audit diffs ---------------------------------------------------------------------------


def test_preference_audits_say_old_and_new_with_contacts_masked() -> None:
    new = {
        **PREFS,
        "emails": [{"address": "ann@example.com", "verified": True, "bounced": True, "id": "c-1"}],
        "consents": [
            *PREFS["consents"],
            {"purpose": "marketing", "granted": False, "at": NOW, "source": "api"},
        ],
    }
    details = preference_changes(PREFS, new)
    assert details["changed"] == "consents,emails"
    assert details["emails.old"] == "A***@***.com(verified)"
    assert details["emails.new"] == "c-1=a***@***.com(verified,bounced)"
    assert "withdrawn" in details["consents.new"]
    assert "granted" in details["consents.old"]
    text = repr(details)
    assert "example" not in text
    assert "ann@" not in text.lower()
    created = preference_changes(None, PREFS)
    assert "+1415" not in repr(created)
    assert preference_changes(PREFS, PREFS) == {"changed": ""}
    assert rule_changes(None, {"rule_id": "r", "value": "190"})["value.new"] == '"190"'


# -- start-up checks ----------------------------------------------------------------------


def test_production_mail_refuses_the_placeholder_unsubscribe_link() -> None:
    from finstream.privacy.kms import PrivacyConfigError, check_unsubscribe_url
    from finstream.settings import Settings

    check_unsubscribe_url(Settings(env="test"))  # dev and test keep the placeholder
    with pytest.raises(PrivacyConfigError, match="placeholder"):
        check_unsubscribe_url(Settings(env="prod"))
    check_unsubscribe_url(
        Settings(
            env="prod",
            delivery_email_unsubscribe_url="https://api.example.com/v1/unsubscribe/{token}",
        )
    )
