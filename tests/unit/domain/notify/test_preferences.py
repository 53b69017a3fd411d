"""Preference validation: every field checked, errors name the field, output fits the schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.codec import Codec
from finstream.domain.notify.preferences import PreferencesValidationError, parse_preferences
from finstream.domain.notify.preferences_view import Preferences

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
CODEC = Codec()


def full() -> dict[str, Any]:
    return {
        "user_id": "u-1",
        "locale": "de_at",
        "timezone": "Europe/Berlin",
        "emails": [{"address": "Ann.Lee@Example.COM", "verified": True}, "second@example.org"],
        "phones": [{"number": "+1 415 555 2671", "verified": True}],
        "push_tokens": [{"platform": "fcm", "token": "tok-abc", "app": "ios-main"}],
        "channels": {"SMS": False, "push": True},
        "categories": {
            "price_alert": {"channels": ["INAPP", "email"], "digest": False},
            "marketing": {"enabled": False},
        },
        "global_opt_out": False,
        "consents": [
            {
                "purpose": "marketing",
                "granted": True,
                "at": "2025-02-01T10:00:00Z",
                "source": "web",
            },
            {"purpose": "sms", "granted": False},
        ],
        "quiet_hours": [{"days": [5, 1, 2], "start": "22:00", "end": "07:00"}],
        "caps": [{"channel": "push", "category": None, "limit": 5, "window_seconds": 3600}],
    }


def test_full_record_is_normalized_and_encodes() -> None:
    record = parse_preferences(full(), now=NOW)
    assert record["locale"] == "de-AT"
    assert record["emails"][0] == {
        "address": "Ann.Lee@example.com",
        "verified": True,
        "bounced": False,
        "id": None,
        "complained": False,
    }
    assert record["phones"][0]["number"] == "+14155552671"
    assert record["push_tokens"][0]["platform"] == "FCM"
    assert record["channels"] == {"sms": False, "push": True}
    assert record["categories"]["price_alert"]["channels"] == ["email", "inapp"]
    assert record["consents"][1]["at"] == NOW
    assert record["consents"][1]["source"] == "api"
    assert record["quiet_hours"][0]["days"] == [1, 2, 5]
    assert record["updated_at"] == NOW
    decoded = CODEC.decode(CODEC.encode("UserPreferences", record), "UserPreferences")
    assert decoded["consents"][0]["at"] == datetime(2025, 2, 1, 10, tzinfo=UTC)


def test_parse_accepts_its_own_output() -> None:
    """A PATCH merges onto the stored record and parses the result again."""
    once = parse_preferences(full(), now=NOW)
    later = NOW + timedelta(hours=1)
    twice = parse_preferences(once, now=later)
    assert {**once, "updated_at": later} == twice


def test_minimal_record_gets_defaults() -> None:
    record = parse_preferences({"user_id": "u-2"}, now=NOW)
    assert record["locale"] == "en"
    assert record["timezone"] == "UTC"
    assert record["emails"] == []
    assert record["caps"] == []
    CODEC.encode("UserPreferences", record)


@pytest.mark.parametrize(
    ("patch", "field", "words"),
    [
        ({"phones": [{"number": "4155552671"}]}, "phones[0].number", "E.164"),
        ({"phones": [{"number": "+1 000 000 0000"}]}, "phones[0].number", "valid"),
        ({"phones": ["+14155552671", "+1 415 555 2671"]}, "phones[1].number", "duplicate"),
        ({"emails": [{"address": "no-at-sign"}]}, "emails[0].address", "email"),
        ({"emails": ["a@b"]}, "emails[0].address", "domain"),
        ({"emails": ["a..b@example.com"]}, "emails[0].address", "email"),
        ({"emails": ["a@example.c0m"]}, "emails[0].address", "top-level"),
        ({"timezone": "Mars/Olympus"}, "timezone", "time zone"),
        ({"timezone": "EST5EDT "}, "timezone", "time zone"),
        ({"locale": "xx"}, "locale", "locale"),
        ({"locale": "english"}, "locale", "locale"),
        ({"quiet_hours": [{"start": "25:00", "end": "07:00"}]}, "quiet_hours[0].start", "HH:MM"),
        ({"quiet_hours": [{"start": "7:00", "end": "08:00"}]}, "quiet_hours[0].start", "HH:MM"),
        ({"quiet_hours": [{"start": "22:00", "end": "22:00"}]}, "quiet_hours[0].end", "differ"),
        (
            {"quiet_hours": [{"days": [0], "start": "22:00", "end": "07:00"}]},
            "quiet_hours[0].days[0]",
            "between 1 and 7",
        ),
        (
            {"quiet_hours": [{"days": [8], "start": "22:00", "end": "07:00"}]},
            "quiet_hours[0].days[0]",
            "between 1 and 7",
        ),
        (
            {"quiet_hours": [{"days": [1, 1], "start": "22:00", "end": "07:00"}]},
            "quiet_hours[0].days",
            "duplicate",
        ),
        (
            {"quiet_hours": [{"days": [], "start": "22:00", "end": "07:00"}]},
            "quiet_hours[0].days",
            "at least one",
        ),
        (
            {"quiet_hours": [{"days": [True], "start": "22:00", "end": "07:00"}]},
            "quiet_hours[0].days[0]",
            "integer",
        ),
        ({"caps": [{"limit": 0, "window_seconds": 60}]}, "caps[0].limit", "between 1"),
        ({"caps": [{"limit": 3, "window_seconds": -1}]}, "caps[0].window_seconds", "between 1"),
        ({"caps": [{"limit": 3}]}, "caps[0].window_seconds", "required"),
        (
            {"caps": [{"limit": 3, "window_seconds": 60, "channel": "fax"}]},
            "caps[0].channel",
            "channel",
        ),
        ({"channels": {"fax": True}}, "channels.fax", "unknown channel"),
        ({"channels": {"email": "yes"}}, "channels.email", "true or false"),
        (
            {"categories": {"price_alert": {"channels": ["pigeon"]}}},
            "categories.price_alert.channels[0]",
            "channel",
        ),
        ({"categories": {"Bad Name": {}}}, "categories.Bad Name", "category name"),
        ({"categories": {"x": {"colour": "red"}}}, "categories.x.colour", "unknown field"),
        (
            {"push_tokens": [{"platform": "WNS", "token": "t"}]},
            "push_tokens[0].platform",
            "FCM or APNS",
        ),
        (
            {"push_tokens": [{"platform": "FCM", "token": "a b"}]},
            "push_tokens[0].token",
            "whitespace",
        ),
        ({"consents": [{"purpose": "marketing"}]}, "consents[0].granted", "required"),
        (
            {"consents": [{"purpose": "marketing", "granted": True, "at": "2099-01-01T00:00:00Z"}]},
            "consents[0].at",
            "future",
        ),
        (
            {"consents": [{"purpose": "marketing", "granted": True, "at": "2025-01-01T00:00:00"}]},
            "consents[0].at",
            "time zone",
        ),
        (
            {"consents": [{"purpose": "marketing", "granted": True, "at": "yesterday"}]},
            "consents[0].at",
            "ISO-8601",
        ),
        ({"global_opt_out": 1}, "global_opt_out", "true or false"),
        ({"nickname": "x"}, "nickname", "unknown field"),
        ({"user_id": ""}, "user_id", "non-empty"),
        ({"user_id": " u-1"}, "user_id", "spaces"),
        ({"emails": "a@example.com"}, "emails", "list"),
        ({"emails": ["a@example.com"] * 11}, "emails", "at most"),
    ],
)
def test_invalid_input_names_the_field(patch: dict[str, Any], field: str, words: str) -> None:
    data = {**full(), **patch}
    with pytest.raises(PreferencesValidationError) as info:
        parse_preferences(data, now=NOW)
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ")
    assert words in info.value.message
    assert isinstance(info.value, ValueError)


def test_whole_day_window_uses_24_00() -> None:
    record = parse_preferences(
        {"user_id": "u", "quiet_hours": [{"days": [6, 7], "start": "00:00", "end": "24:00"}]},
        now=NOW,
    )
    prefs = Preferences.from_record(record)
    assert prefs.quiet_hours[0].end is None


def test_view_takes_the_latest_consent_per_purpose() -> None:
    record = parse_preferences(
        {
            "user_id": "u",
            "consents": [
                {"purpose": "marketing", "granted": True, "at": "2025-01-02T00:00:00Z"},
                {"purpose": "marketing", "granted": False, "at": "2025-01-03T00:00:00Z"},
                {"purpose": "marketing", "granted": True, "at": "2025-01-01T00:00:00Z"},
            ],
        },
        now=NOW,
    )
    prefs = Preferences.from_record(record)
    assert prefs.consent("marketing") is False
    assert prefs.consent("sms") is None


def test_view_contacts_skip_unusable_ones() -> None:
    record = parse_preferences(
        {
            "user_id": "u",
            "emails": [
                {"address": "a@example.com", "verified": True, "bounced": True},
                {"address": "b@example.com", "verified": False},
                {"address": "c@example.com", "verified": True},
            ],
            "phones": [{"number": "+14155552671", "verified": True, "opted_out": True}],
            "push_tokens": [
                {"platform": "APNS", "token": "t1", "invalid": True},
                {"platform": "APNS", "token": "t2"},
            ],
        },
        now=NOW,
    )
    prefs = Preferences.from_record(record)
    emails, _ = prefs.contacts("email")
    assert [c.recipient for c in emails] == ["c@example.com"]
    phones, why = prefs.contacts("sms")
    assert phones == []
    assert why is not None
    assert "opted out" in why
    push, _ = prefs.contacts("push")
    assert [(c.recipient, c.platform) for c in push] == [("t2", "APNS")]
    inapp, _ = prefs.contacts("inapp")
    assert [c.recipient for c in inapp] == ["u"]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(full())),
        _json,
        max_size=6,
    )
)
def test_arbitrary_input_either_validates_to_an_encodable_record_or_names_a_field(
    patch: dict[str, Any],
) -> None:
    data = {**full(), **patch}
    try:
        record = parse_preferences(data, now=NOW)
    except PreferencesValidationError as exc:
        error: PreferencesValidationError | None = exc
    else:
        error = None
        CODEC.encode("UserPreferences", record)
    if error is not None:
        assert error.field
        assert error.message.startswith(f"{error.field}: ")


def test_contact_ids_are_validated_and_unique() -> None:
    data = full()
    data["emails"] = [{"address": "a@example.com", "id": "c-1a2b3c"}]
    data["phones"] = [{"number": "+14155552671", "id": "c-1a2b3c"}]
    with pytest.raises(PreferencesValidationError, match=r"phones\[0\]\.id: duplicate"):
        parse_preferences(data, now=NOW)
    data["phones"][0]["id"] = "Bad Id"
    with pytest.raises(PreferencesValidationError, match=r"phones\[0\]\.id"):
        parse_preferences(data, now=NOW)


def test_a_targeted_contact_is_usable_unverified_but_never_after_a_bounce_or_complaint() -> None:
    record = parse_preferences(
        {
            "user_id": "u-1",
            "emails": [
                {"address": "new@example.com", "id": "c-new"},
                {"address": "ok@example.com", "verified": True, "id": "c-ok"},
                {"address": "spam@example.com", "verified": True, "id": "c-spam"},
            ],
            "phones": [{"number": "+14155552671", "id": "c-phone", "opted_out": True}],
        },
        now=NOW,
    )
    record["emails"][2]["complained"] = True
    prefs = Preferences.from_record(record)
    usable, _ = prefs.contacts("email")
    assert [c.recipient for c in usable] == ["ok@example.com"]
    only, _ = prefs.contacts("email", only="c-new")
    assert [(c.recipient, c.contact_id) for c in only] == [("new@example.com", "c-new")]
    assert prefs.contacts("email", only="c-spam") == ([], "contact c-spam bounced or complained")
    assert prefs.contacts("sms", only="c-phone") == ([], "contact c-phone opted out")
    assert prefs.contacts("sms", only="c-nope")[0] == []
    assert prefs.contact_channel("c-phone") == "sms"
    assert prefs.contact_channel("c-new") == "email"
    assert prefs.contact_channel("c-nope") is None


def test_the_reason_an_email_channel_is_skipped_names_what_the_provider_reported() -> None:
    def reason(*emails: dict[str, object]) -> str | None:
        record = parse_preferences({"user_id": "u", "emails": list(emails)}, now=NOW)
        return Preferences.from_record(record).contacts("email")[1]

    unverified = {"address": "a@example.com", "verified": False, "bounced": True}
    bounced = {"address": "b@example.com", "verified": True, "bounced": True}
    complained = {"address": "c@example.com", "verified": True, "complained": True}
    assert reason() == "no verified email address"
    assert reason(unverified) == "no verified email address"
    assert reason(unverified, bounced) == "every verified email address bounced"
    assert reason(complained) == "every verified email address complained"
    assert reason(bounced, complained) == "every verified email address bounced or complained"
    assert reason(bounced, {"address": "d@example.com", "verified": True}) is None
