"""`finstream prefs set` flags, masking, and the scheduler's due index."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
import pytest

from finstream.cli.prefs import apply_flags, mask, printable
from finstream.domain.notify.due import DueIndex
from finstream.domain.notify.preferences import parse_preferences

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def test_flags_build_a_valid_record() -> None:
    data = apply_flags(
        {"user_id": "u1"},
        {
            "locale": "de",
            "timezone": "Europe/Berlin",
            "email": ("ann@example.com",),
            "phone": ("+14155552671",),
            "verified": True,
            "push": ("apns:tok-1",),
            "channel": ("sms=off", "push=on"),
            "category": ("price_alert=email,inapp", "marketing=off"),
            "digest": ("price_alert",),
            "consent": ("marketing=yes",),
            "quiet": ("22:00-07:00@1,2,3,4,5",),
            "cap": ("5/3600:push", "20/86400::price_alert"),
            "opt_out": False,
        },
    )
    record = parse_preferences(data, now=NOW, consent_source="operator")
    assert record["emails"] == [
        {
            "address": "ann@example.com",
            "verified": True,
            "bounced": False,
            "id": None,
            "complained": False,
        }
    ]
    assert record["push_tokens"][0]["platform"] == "APNS"
    assert record["channels"] == {"sms": False, "push": True}
    assert record["categories"]["price_alert"] == {
        "enabled": True,
        "channels": ["email", "inapp"],
        "digest": True,
    }
    assert record["categories"]["marketing"]["enabled"] is False
    assert record["consents"][0]["source"] == "operator"
    assert record["quiet_hours"] == [{"days": [1, 2, 3, 4, 5], "start": "22:00", "end": "07:00"}]
    assert record["caps"] == [
        {"channel": "push", "category": None, "limit": 5, "window_seconds": 3600},
        {"channel": None, "category": "price_alert", "limit": 20, "window_seconds": 86400},
    ]


def test_flags_merge_onto_the_current_version() -> None:
    current: dict[str, Any] = {"user_id": "u1", "categories": {"price_alert": {"digest": True}}}
    data = apply_flags(current, {"category": ("price_alert=push",)})
    assert data["categories"]["price_alert"] == {
        "digest": True,
        "enabled": True,
        "channels": ["push"],
    }


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        ({"channel": ("sms",)}, "--channel"),
        ({"channel": ("sms=maybe",)}, "--channel"),
        ({"push": ("tok",)}, "--push"),
        ({"quiet": ("22:00",)}, "--quiet"),
        ({"quiet": ("22:00-07:00@mon",)}, "--quiet"),
        ({"cap": ("5",)}, "--cap"),
        ({"cap": ("five/60",)}, "--cap"),
        ({"consent": ("marketing",)}, "--consent"),
    ],
)
def test_bad_flags_are_refused_with_the_option(flags: dict[str, Any], hint: str) -> None:
    with pytest.raises(click.BadParameter) as info:
        apply_flags({"user_id": "u1"}, flags)
    assert info.value.param_hint == hint


def test_contacts_are_masked_unless_revealed() -> None:
    record = parse_preferences(
        {
            "user_id": "u1",
            "emails": ["ann@example.com"],
            "phones": ["+14155552671"],
            "push_tokens": [{"platform": "FCM", "token": "abcdefghijkl"}],
        },
        now=NOW,
    )
    shown = printable(record)
    text = str(shown)
    assert "ann@example.com" not in text
    assert "+14155552671" not in text
    assert "abcdefghijkl" not in text
    assert shown["emails"][0]["address"] == "a**@example.com"
    assert shown["updated_at"] == NOW.isoformat()
    assert printable(record, reveal=True)["phones"][0]["number"] == "+14155552671"
    assert mask("abc") == "***"


def test_due_index_releases_in_time_order_and_only_owned_users() -> None:
    index = DueIndex()
    index.set("a", 30)
    index.set("b", 10)
    index.set("c", 20)
    index.set("a", 5)  # moved earlier: the stale entry is skipped
    index.set("d", 15)
    index.set("d", None)  # nothing held any more
    assert index.next_due() == 5
    assert index.pop_due(12, owned=lambda u: u != "b") == ["a"]
    # b was due but is not ours (its partition moved): forgotten, not released.
    assert index.pop_due(100, owned=lambda u: True) == ["c"]
    assert len(index) == 0
    assert index.next_due() is None
