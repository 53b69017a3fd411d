"""The router's decisions as data: :func:`plan` and the release path, no Kafka, no Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.domain.notify.digest import DIGEST_TEMPLATE, digest_request
from finstream.domain.notify.plan import (
    ERASED_REASON,
    NO_TEMPLATE_VERSION,
    Effects,
    due_digests,
    due_requests,
    plan,
)
from finstream.domain.notify.preferences import parse_preferences
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing import Action, Policy
from finstream.domain.notify.routing_state import HELD, Hold, Holds, UserState
from finstream.domain.notify.templates import MissingVariable, Templates
from finstream.domain.time import from_micros, to_micros
from finstream.resources import resource

NOW = datetime(2025, 6, 11, 12, 0, tzinfo=UTC)  # 08:00 in New York, 14:00 in Berlin
POLICY = Policy(collapse_seconds=60, dedupe_seconds=3600, digest_seconds=600)
TEMPLATES = Templates(resource("templates"))
NEW_YORK_NIGHTS = {
    "timezone": "America/New_York",
    "quiet_hours": [{"start": "22:00", "end": "09:00"}],
}

CONTACTS: dict[str, Any] = {
    "emails": [{"address": "ann@example.com", "verified": True}],
    "phones": [{"number": "+14155552671", "verified": True}],
    "push_tokens": [{"platform": "FCM", "token": "fcm-token-1"}],
}


def prefs(**fields: Any) -> Preferences:
    data = {"user_id": "u1", **CONTACTS, **fields}
    return Preferences.from_record(parse_preferences(data, now=NOW))


def request(**fields: Any) -> Request:
    record: dict[str, Any] = {
        "request_id": "r1",
        "user_id": "u1",
        "category": "account",
        "priority": "NORMAL",
        "template": "welcome",
        "data": {"title": "Hi", "body": "Hello there"},
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": NOW,
        "source": "test",
        "correlation_id": "c-1",
    }
    record.update(fields)
    return Request.from_record(record)


class Router:
    """The role's bookkeeping without Kafka: state and holds carried from plan to plan.

    Held requests are kept as their records (the role seals and encodes them).
    """

    def __init__(self, preferences: Preferences, policy: Policy = POLICY) -> None:
        self.prefs = preferences
        self.policy = policy
        self.state = UserState()
        self.holds = Holds()
        self.held: dict[str, dict[str, Any]] = {}

    def route(self, req: Request, at: datetime, **kw: Any) -> Effects:
        fx = plan(
            req,
            self.prefs,
            self.state,
            self.holds,
            now=at,
            policy=self.policy,
            templates=TEMPLATES,
            **kw,
        )
        self.state = fx.state
        for h in fx.holds:
            self.held[h.request_id] = h.record
            self.holds.requests[h.request_id] = Hold(
                h.request_id, h.due, h.reason, h.request_id.encode(), h.bypass_caps
            )
        self.holds.digests.update(fx.folds)
        return fx

    def release(self, at: datetime) -> list[Effects]:
        now_us = to_micros(at)
        released, self.holds = due_requests(self.holds, now_us)
        out = []
        for hold in released:
            req = Request.from_record(self.held.pop(hold.request_id))
            out.append(
                self.route(
                    req,
                    at,
                    phase=f"release.{hold.reason}",
                    release=True,
                    bypass_caps=hold.bypass_caps,
                )
            )
        digests, self.holds = due_digests(self.holds, now_us)
        for buffer in digests:
            req = Request.from_record(digest_request("u1", buffer, at, "c-digest"))
            extra = {"digest_items": str(buffer.total)}
            out.append(
                self.route(req, at, phase="digest", release=True, bypass_caps=True, extra=extra)
            )
        return out


def actions(fx: Effects) -> list[Action]:
    return [a.decision.action for a in fx.audits]


def channels(fx: Effects) -> list[str]:
    return [m.channel for m in fx.messages]


# -- routed --------------------------------------------------------------------------------


def test_routed_to_each_of_the_users_channels_one_message_per_contact_and_audited() -> None:
    p = prefs(
        categories={"price_alert": {"channels": ["email", "push", "inapp"]}},
        push_tokens=[{"platform": "FCM", "token": "t-1"}, {"platform": "APNS", "token": "t-2"}],
    )
    fx = Router(p).route(request(category="price_alert"), NOW)
    assert channels(fx) == ["email", "push", "push", "inapp"]
    assert sorted(m.message["recipient"] for m in fx.messages if m.channel == "push") == [
        "t-1",
        "t-2",
    ]
    assert {m.message["request_id"] for m in fx.messages} == {"r1"}
    assert actions(fx) == [Action.ROUTED]
    event = fx.audits[0].event
    assert event["details"]["message_ids"].split(",") == [
        m.message["message_id"] for m in fx.messages
    ]
    assert fx.holds == []
    assert fx.folds == {}
    assert fx.dead_letter is None
    assert fx.state.seen["r1"][0] == "done"
    assert fx.state.sends.entries == [(NOW.timestamp(), "email,push,inapp", "price_alert")]


def test_plan_changes_none_of_its_inputs() -> None:
    state, holds = UserState(), Holds()
    fx = plan(request(), prefs(), state, holds, now=NOW, policy=POLICY, templates=TEMPLATES)
    assert channels(fx) == ["email", "inapp"]
    assert state == UserState()
    assert holds == Holds()
    assert fx.state is not state


# -- suppressed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "category", "reason"),
    [
        ({}, "marketing", "consent for marketing not given"),
        (
            {"consents": [{"purpose": "marketing", "granted": False}]},
            "marketing",
            "consent for marketing withdrawn",
        ),
        (
            {"categories": {"account": {"enabled": False}}},
            "account",
            "user opted out of category account",
        ),
        ({"global_opt_out": True}, "account", "user opted out of all notifications"),
    ],
)
def test_suppressed_without_consent_or_with_the_category_off_sends_and_holds_nothing(
    fields: dict[str, Any], category: str, reason: str
) -> None:
    fx = Router(prefs(**fields)).route(request(category=category, priority="CRITICAL"), NOW)
    assert fx.messages == []
    assert fx.holds == []
    assert fx.folds == {}
    assert actions(fx) == [Action.SUPPRESSED]
    assert fx.audits[0].event["reason"] == reason


def test_a_channel_the_user_opted_out_of_is_left_out_with_its_reason() -> None:
    fx = Router(prefs(channels={"email": False})).route(request(), NOW)
    assert channels(fx) == ["inapp"]
    assert fx.audits[0].event["details"]["skipped.email"] == "user opted out of email"


def test_a_template_without_a_version_for_the_chosen_channels_is_suppressed_not_routed() -> None:
    req = request(template="contact_verification", channels=["INAPP"], data={})
    fx = Router(prefs()).route(req, NOW)
    assert fx.messages == []
    assert [(a.decision.action, a.decision.reason) for a in fx.audits] == [
        (Action.SUPPRESSED, NO_TEMPLATE_VERSION)
    ]
    assert "skipped.inapp" in fx.audits[0].event["details"]
    assert fx.state.sends.entries == []


def test_an_erased_users_request_is_dropped_audited_and_changes_no_state() -> None:
    state = UserState()
    fx = plan(
        request(),
        prefs(),
        state,
        Holds(),
        now=NOW,
        policy=POLICY,
        templates=TEMPLATES,
        erased=True,
    )
    assert fx.messages == []
    assert fx.holds == []
    assert fx.dead_letter is None
    assert [(a.decision.action, a.decision.reason) for a in fx.audits] == [
        (Action.DROPPED, ERASED_REASON)
    ]
    assert fx.state is state
    assert state.seen == {}


# -- once ----------------------------------------------------------------------------------


def test_a_request_id_seen_before_is_a_duplicate_and_sends_nothing() -> None:
    router = Router(prefs())
    assert channels(router.route(request(), NOW)) == ["email", "inapp"]
    again = router.route(
        request(data={"title": "Other", "body": "text"}), NOW + timedelta(minutes=5)
    )
    assert again.messages == []
    assert actions(again) == [Action.DUPLICATE]


def test_the_same_collapse_key_within_its_window_is_collapsed() -> None:
    router = Router(prefs())
    router.route(request(collapse_key="k"), NOW)
    fx = router.route(request(request_id="r2", collapse_key="k"), NOW + timedelta(seconds=30))
    assert fx.messages == []
    assert actions(fx) == [Action.COLLAPSED]


def test_an_expired_request_is_audited_expired_and_not_sent() -> None:
    fx = Router(prefs()).route(request(expires_at=NOW - timedelta(seconds=1)), NOW)
    assert fx.messages == []
    assert actions(fx) == [Action.EXPIRED]
    assert "r1" not in fx.state.seen


# -- held and released ---------------------------------------------------------------------


def test_quiet_hours_hold_interrupting_channels_and_release_them_at_the_windows_end() -> None:
    router = Router(prefs(**NEW_YORK_NIGHTS))
    fx = router.route(request(), NOW)
    window_end = datetime(2025, 6, 11, 13, 0, tzinfo=UTC)  # 09:00 in New York
    assert channels(fx) == ["inapp"]
    assert actions(fx) == [Action.ROUTED, Action.SCHEDULED]
    [hold] = fx.holds
    assert (hold.request_id, hold.due, hold.reason) == ("r1", to_micros(window_end), "quiet_hours")
    assert hold.record["channels"] == ["EMAIL"]
    assert fx.state.seen["r1"][0] == HELD
    assert router.release(window_end - timedelta(seconds=1)) == []
    [released] = router.release(window_end)
    assert channels(released) == ["email"]
    assert [(a.decision.action, a.decision.reason) for a in released.audits] == [
        (Action.ROUTED, "released")
    ]
    assert released.audits[0].event["details"]["phase"] == "release.quiet_hours"
    assert router.holds.empty()


def test_deliver_at_holds_the_whole_request_until_then() -> None:
    router = Router(prefs())
    at = NOW + timedelta(minutes=10)
    fx = router.route(request(deliver_at=at), NOW)
    assert fx.messages == []
    assert actions(fx) == [Action.SCHEDULED]
    assert [(h.due, h.reason) for h in fx.holds] == [(to_micros(at), "deliver_at")]
    [released] = router.release(at)
    assert channels(released) == ["email", "inapp"]


def test_a_missing_variable_of_a_held_channel_fails_at_intake_not_at_release() -> None:
    fx = Router(prefs(**NEW_YORK_NIGHTS)).route(
        request(channels=["EMAIL"], data={"title": "x"}), NOW
    )
    assert isinstance(fx.dead_letter, MissingVariable)
    assert fx.holds == []


# -- caps and digests ----------------------------------------------------------------------


def test_a_capped_channel_is_left_out_and_the_others_routed() -> None:
    router = Router(prefs(caps=[{"channel": "email", "limit": 1, "window_seconds": 3600}]))
    assert channels(router.route(request(), NOW)) == ["email", "inapp"]
    fx = router.route(request(request_id="r2"), NOW + timedelta(minutes=1))
    assert channels(fx) == ["inapp"]
    assert fx.audits[0].event["details"]["skipped.email"] == "frequency cap 1 per 3600s"


def test_low_priority_folds_into_a_digest_that_is_composed_and_sent_when_due() -> None:
    router = Router(prefs(categories={"price_alert": {"digest": True}}))
    low = {"category": "price_alert", "priority": "LOW"}
    first = router.route(request(**low), NOW)
    assert first.messages == []
    assert actions(first) == [Action.DIGESTED]
    buffer = first.folds["price_alert"]
    due = from_micros(buffer.due)
    assert due == NOW + timedelta(seconds=POLICY.digest_seconds)
    assert first.audits[0].event["details"]["digest_due"] == due.isoformat()
    second = router.route(request(request_id="r2", data={"title": "T2", "body": "B2"}, **low), NOW)
    assert second.folds["price_alert"].total == 2
    assert buffer.total == 1  # the first fold's buffer is not changed by the second
    assert router.release(due - timedelta(seconds=1)) == []
    [digest] = router.release(due)
    assert {m.message["template"] for m in digest.messages} == {DIGEST_TEMPLATE}
    assert channels(digest) == ["push", "inapp"]
    assert digest.messages[-1].message["body_text"] == "Hi\nT2"  # one line per item
    assert digest.audits[0].event["details"]["digest_items"] == "2"
    assert router.holds.empty()


def test_a_request_folded_already_changes_nothing_the_second_time() -> None:
    router = Router(prefs(categories={"price_alert": {"digest": True}}))
    low = request(category="price_alert", priority="LOW")
    router.route(low, NOW)
    again = plan(
        low,
        router.prefs,
        UserState(),  # as if its seen mark were lost: the buffer still knows it
        router.holds,
        now=NOW,
        policy=POLICY,
        templates=TEMPLATES,
        release=True,
    )
    assert again.folds == {}
    assert again.audits == []
    assert again.messages == []


# -- dead letters --------------------------------------------------------------------------


def test_a_template_error_is_a_dead_letter_with_its_reason_audited_dropped_and_not_seen() -> None:
    fx = Router(prefs()).route(request(data={"title": "no body"}), NOW)
    assert isinstance(fx.dead_letter, MissingVariable)
    assert "body" in str(fx.dead_letter)
    assert fx.messages == []
    assert [a.decision.action for a in fx.audits] == [Action.DROPPED]
    assert fx.audits[0].event["reason"] == str(fx.dead_letter)[:500]
    assert "r1" not in fx.state.seen  # a redriven copy is routed, not a duplicate


def test_an_unknown_template_is_a_dead_letter_also_when_it_would_be_digested() -> None:
    router = Router(prefs(categories={"price_alert": {"digest": True}}))
    fx = router.route(request(category="price_alert", priority="LOW", template="nope"), NOW)
    assert fx.dead_letter is not None
    assert fx.folds == {}
    assert actions(fx) == [Action.DROPPED]


# -- whatever comes ------------------------------------------------------------------------

_PREFS = st.sampled_from(
    [
        {},
        NEW_YORK_NIGHTS,
        {"caps": [{"limit": 2, "window_seconds": 600}]},
        {"categories": {"price_alert": {"digest": True}}},
        {**NEW_YORK_NIGHTS, "categories": {"account": {"digest": True}}},
    ]
)
_STEP = st.one_of(
    st.tuples(
        st.just("request"),
        st.integers(0, 5),  # request id: repeats are redeliveries
        st.sampled_from(["account", "price_alert", "marketing"]),
        st.sampled_from(["CRITICAL", "NORMAL", "LOW"]),
        st.sampled_from([None, 5, 90]),  # deliver_at, minutes ahead
    ),
    st.tuples(st.just("wait"), st.integers(1, 120)),  # minutes, then release what is due
)


# Request ids are remembered for longer than any run here lasts.
LONG_MEMORY = Policy(collapse_seconds=60, dedupe_seconds=30 * 86_400, digest_seconds=600)


@settings(max_examples=60, deadline=None)
@given(fields=_PREFS, steps=st.lists(_STEP, max_size=25))
def test_any_sequence_of_requests_never_yields_two_messages_for_one_request_and_channel(
    fields: dict[str, Any], steps: list[tuple[Any, ...]]
) -> None:
    router = Router(prefs(**fields), LONG_MEMORY)
    at = NOW
    sent: list[tuple[str, str]] = []
    for step in steps:
        if step[0] == "wait":
            at += timedelta(minutes=step[1])
            effects = router.release(at)
        else:
            _, n, category, priority, ahead = step
            deliver_at = at + timedelta(minutes=ahead) if ahead is not None else None
            req = request(
                request_id=f"r{n}", category=category, priority=priority, deliver_at=deliver_at
            )
            effects = [router.route(req, at)]
        for fx in effects:
            sent += [(m.message["request_id"], m.channel) for m in fx.messages]
    assert len(sent) == len(set(sent)), sent
