"""The routing policy: channels, consent, quiet hours, caps, digests, dedupe, collapse."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.codec import Codec
from finstream.domain.notify.audit import audit_event
from finstream.domain.notify.digest import DigestBuffer
from finstream.domain.notify.ids import outbound_message_id
from finstream.domain.notify.outbound import compose
from finstream.domain.notify.preferences import CHANNELS, parse_preferences
from finstream.domain.notify.preferences_view import CHANNEL_CONTACTS, Preferences
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing import Action, Policy, contact_channels, decide, remember
from finstream.domain.notify.routing_state import Hold, Holds, UserState
from finstream.domain.notify.templates import Templates
from finstream.resources import resource

NOW = datetime(2025, 6, 11, 12, 0, tzinfo=UTC)  # a Wednesday
POLICY = Policy(collapse_seconds=60, dedupe_seconds=3600)
TEMPLATES = Templates(resource("templates"))
CODEC = Codec()

CONTACTS: dict[str, Any] = {
    "emails": [{"address": "ann@example.com", "verified": True}],
    "phones": [{"number": "+14155552671", "verified": True}],
    "push_tokens": [
        {"platform": "FCM", "token": "fcm-token-1"},
        {"platform": "APNS", "token": "apns-token-1"},
    ],
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
        "correlation_id": None,
    }
    record.update(fields)
    return Request.from_record(record)


def routed(outcome: Any) -> tuple[str, ...]:
    return outcome.send


# -- channels ---------------------------------------------------------------------------


def test_category_defaults_apply_without_preferences() -> None:
    out = decide(request(), Preferences.default("u1"), UserState(), NOW, POLICY)
    assert out.final is Action.ROUTED
    assert out.send == ("inapp",)  # account: email + inapp, but no email address known
    assert "email" in out.skipped


def test_users_category_channels_replace_the_defaults() -> None:
    p = prefs(categories={"price_alert": {"channels": ["email", "inapp"]}})
    out = decide(request(category="price_alert"), p, UserState(), NOW, POLICY)
    assert out.send == ("email", "inapp")
    out = decide(request(category="price_alert"), prefs(), UserState(), NOW, POLICY)
    assert out.send == ("push", "inapp")


def test_request_override_is_narrowed_by_the_users_choice() -> None:
    p = prefs(categories={"security": {"channels": ["email"]}})
    out = decide(
        request(category="security", channels=["EMAIL", "SMS"]), p, UserState(), NOW, POLICY
    )
    assert out.send == ("email",)
    assert "sms" in out.skipped


def test_sms_needs_consent_and_channel_opt_out_wins() -> None:
    sec = request(category="security")
    out = decide(sec, prefs(), UserState(), NOW, POLICY)
    assert "sms" not in out.send
    assert out.skipped["sms"] == "no consent for sms"
    granted = prefs(consents=[{"purpose": "sms", "granted": True}])
    assert "sms" in decide(sec, granted, UserState(), NOW, POLICY).send
    opted_out = prefs(consents=[{"purpose": "sms", "granted": True}], channels={"sms": False})
    out = decide(sec, opted_out, UserState(), NOW, POLICY)
    assert "sms" not in out.send
    assert out.skipped["sms"] == "user opted out of sms"


def test_marketing_needs_consent_even_when_critical() -> None:
    ad = request(category="marketing", priority="CRITICAL")
    out = decide(ad, prefs(), UserState(), NOW, POLICY)
    assert out.final is Action.SUPPRESSED
    assert out.decisions[0].reason == "consent for marketing not given"
    withdrawn = prefs(
        consents=[
            {"purpose": "marketing", "granted": True, "at": "2025-01-01T00:00:00Z"},
            {"purpose": "marketing", "granted": False, "at": "2025-02-01T00:00:00Z"},
        ]
    )
    assert decide(ad, withdrawn, UserState(), NOW, POLICY).decisions[0].reason == (
        "consent for marketing withdrawn"
    )
    given_ = prefs(consents=[{"purpose": "marketing", "granted": True}])
    assert decide(ad, given_, UserState(), NOW, POLICY).send == ("email", "push", "inapp")


def test_global_and_category_opt_out_beat_critical() -> None:
    crit = request(category="security", priority="CRITICAL")
    out = decide(crit, prefs(global_opt_out=True), UserState(), NOW, POLICY)
    assert out.final is Action.SUPPRESSED
    assert "all notifications" in (out.decisions[0].reason or "")
    out = decide(crit, prefs(categories={"security": {"enabled": False}}), UserState(), NOW, POLICY)
    assert out.final is Action.SUPPRESSED


def test_unusable_contacts_leave_the_channel_out() -> None:
    p = prefs(emails=[{"address": "a@example.com", "verified": False}])
    out = decide(request(), p, UserState(), NOW, POLICY)
    assert out.send == ("inapp",)
    assert out.skipped["email"].startswith("no verified")


def test_no_channel_left_is_suppressed_with_reasons() -> None:
    p = prefs(channels={"inapp": False}, emails=[])
    out = decide(request(), p, UserState(), NOW, POLICY)
    assert out.final is Action.SUPPRESSED
    assert set(out.skipped) == {"email", "inapp"}


# -- once ----------------------------------------------------------------------------------


def test_duplicate_request_id_is_recognised_within_the_window() -> None:
    state = UserState()
    first = decide(request(), prefs(), state, NOW, POLICY)
    remember(first, request(), state, NOW, POLICY, sent=first.send)
    again = decide(request(), prefs(), state, NOW + timedelta(seconds=10), POLICY)
    assert again.final is Action.DUPLICATE
    later = NOW + timedelta(seconds=POLICY.dedupe_seconds + 1)
    state.prune(later.timestamp(), prefs(), POLICY.max_seen)
    assert decide(request(), prefs(), state, later, POLICY).final is Action.ROUTED


def test_same_collapse_key_in_its_window_goes_once() -> None:
    state = UserState()
    a = request(request_id="a", collapse_key="price_alert:rule-1")
    out = decide(a, prefs(), state, NOW, POLICY)
    remember(out, a, state, NOW, POLICY, sent=out.send)
    b = request(request_id="b", collapse_key="price_alert:rule-1")
    assert decide(b, prefs(), state, NOW + timedelta(seconds=30), POLICY).final is Action.COLLAPSED
    c = request(request_id="c", collapse_key="price_alert:rule-2")
    assert decide(c, prefs(), state, NOW + timedelta(seconds=30), POLICY).final is Action.ROUTED
    late = NOW + timedelta(seconds=61)
    assert decide(b, prefs(), state, late, POLICY).final is Action.ROUTED


def test_expired_requests_are_dropped_also_on_release() -> None:
    r = request(expires_at=NOW - timedelta(seconds=1))
    assert decide(r, prefs(), UserState(), NOW, POLICY).final is Action.EXPIRED
    held = request(expires_at=NOW + timedelta(minutes=5))
    later = NOW + timedelta(minutes=6)
    assert decide(held, prefs(), UserState(), later, POLICY, release=True).final is Action.EXPIRED


# -- time ----------------------------------------------------------------------------------


def test_deliver_at_holds_the_whole_request() -> None:
    at = NOW + timedelta(minutes=10)
    out = decide(request(deliver_at=at), prefs(), UserState(), NOW, POLICY)
    assert out.final is Action.SCHEDULED
    assert out.hold_all
    assert out.release_at == at
    assert out.send == ()
    released = decide(request(deliver_at=at), prefs(), UserState(), at, POLICY, release=True)
    assert released.send == ("email", "inapp")


def test_quiet_hours_hold_interrupting_channels_until_the_next_allowed_moment() -> None:
    # 12:00 UTC is 08:00 in New York, inside 22:00-09:00.
    p = prefs(timezone="America/New_York", quiet_hours=[{"start": "22:00", "end": "09:00"}])
    out = decide(request(), p, UserState(), NOW, POLICY)
    assert out.send == ("inapp",)
    assert out.hold == ("email",)
    assert out.release_at == datetime(2025, 6, 11, 13, 0, tzinfo=UTC)
    assert [d.action for d in out.decisions] == [Action.ROUTED, Action.SCHEDULED]
    # The same instant is outside quiet hours in Berlin (14:00).
    berlin = prefs(timezone="Europe/Berlin", quiet_hours=[{"start": "22:00", "end": "09:00"}])
    assert decide(request(), berlin, UserState(), NOW, POLICY).send == ("email", "inapp")


def test_critical_breaks_quiet_hours() -> None:
    p = prefs(timezone="America/New_York", quiet_hours=[{"start": "22:00", "end": "09:00"}])
    out = decide(request(priority="CRITICAL"), p, UserState(), NOW, POLICY)
    assert out.send == ("email", "inapp")
    assert out.hold == ()


def test_quiet_hours_covering_the_week_suppress_rather_than_hold_forever() -> None:
    p = prefs(quiet_hours=[{"start": "00:00", "end": "24:00"}])
    out = decide(request(), p, UserState(), NOW, POLICY)
    assert out.send == ("inapp",)
    assert out.skipped["email"] == "quiet hours cover the whole week"


# -- caps and digests ------------------------------------------------------------------------


def test_low_priority_in_a_digested_category_is_folded() -> None:
    p = prefs(categories={"price_alert": {"digest": True}})
    low = request(category="price_alert", priority="LOW")
    assert decide(low, p, UserState(), NOW, POLICY).final is Action.DIGESTED
    normal = request(category="price_alert")
    assert decide(normal, p, UserState(), NOW, POLICY).final is Action.ROUTED


def test_cap_overflow_is_suppressed_per_channel_or_digested() -> None:
    caps = [{"channel": "email", "limit": 2, "window_seconds": 3600}]
    p = prefs(caps=caps)
    state = UserState()
    sent = []
    for i in range(4):
        r = request(request_id=f"r{i}")
        at = NOW + timedelta(minutes=i)
        out = decide(r, p, state, at, POLICY)
        remember(out, r, state, at, POLICY, sent=out.send)
        sent.append(out.send)
    assert sent == [("email", "inapp"), ("email", "inapp"), ("inapp",), ("inapp",)]
    digesting = prefs(caps=caps, categories={"account": {"digest": True}})
    out = decide(request(request_id="r9"), digesting, state, NOW + timedelta(minutes=5), POLICY)
    assert out.final is Action.DIGESTED
    assert "frequency cap" in (out.decisions[0].reason or "")
    # The window rolls: an hour after the first two, email is allowed again.
    later = NOW + timedelta(hours=1, minutes=2)
    assert decide(request(request_id="r10"), p, state, later, POLICY).send == ("email", "inapp")


def test_critical_is_not_capped_but_counts() -> None:
    p = prefs(caps=[{"limit": 1, "window_seconds": 600}])
    state = UserState()
    crit = request(request_id="c", priority="CRITICAL")
    out = decide(crit, p, state, NOW, POLICY)
    remember(out, crit, state, NOW, POLICY, sent=out.send)
    assert out.send == ("email", "inapp")
    out = decide(request(request_id="n"), p, state, NOW, POLICY)
    assert out.final is Action.SUPPRESSED


# -- properties -------------------------------------------------------------------------------

_consents = st.lists(
    st.fixed_dictionaries(
        {
            "purpose": st.sampled_from(["marketing", "sms"]),
            "granted": st.booleans(),
            "at": st.sampled_from(["2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"]),
        }
    ),
    max_size=4,
)
_prefs = st.fixed_dictionaries(
    {
        "global_opt_out": st.booleans(),
        "channels": st.dictionaries(st.sampled_from(CHANNELS), st.booleans()),
        "categories": st.dictionaries(
            st.sampled_from(["security", "marketing", "price_alert", "account"]),
            st.fixed_dictionaries(
                {
                    "enabled": st.booleans(),
                    "channels": st.none() | st.lists(st.sampled_from(CHANNELS), unique=True),
                    "digest": st.booleans(),
                }
            ),
        ),
        "consents": _consents,
        "quiet_hours": st.lists(
            st.fixed_dictionaries(
                {
                    "start": st.sampled_from(["00:00", "08:00", "22:00"]),
                    "end": st.sampled_from(["06:00", "09:00", "24:00"]),
                }
            ).filter(lambda w: w["start"] != w["end"]),
            max_size=2,
        ),
        "caps": st.lists(
            st.fixed_dictionaries(
                {
                    "channel": st.none() | st.sampled_from(CHANNELS),
                    "limit": st.integers(1, 3),
                    "window_seconds": st.sampled_from([60, 600]),
                }
            ),
            max_size=2,
        ),
    }
)
_requests = st.fixed_dictionaries(
    {
        "category": st.sampled_from(["security", "marketing", "price_alert", "account", "other"]),
        "priority": st.sampled_from(["CRITICAL", "HIGH", "NORMAL", "LOW"]),
        "channels": st.lists(st.sampled_from(["EMAIL", "PUSH", "SMS", "INAPP"]), unique=True),
    }
)


@settings(max_examples=300, deadline=None)
@given(_prefs, _requests, st.sampled_from([None, "c-email", "c-phone", "c-gone"]), st.booleans())
def test_deciding_and_composing_read_no_contacts_outside_contact_channels(
    fields: dict[str, Any], req: dict[str, Any], contact_id: str | None, release: bool
) -> None:
    p = prefs(
        **fields,
        emails=[{"id": "c-email", "address": "ann@example.com", "verified": True}],
        phones=[{"id": "c-phone", "number": "+14155552671", "verified": True}],
    )
    r = request(**req, contact_id=contact_id)
    considered = contact_channels(r, p, POLICY)
    # The contacts of every other channel gone: nothing decided or composed may change.
    blanked = p.with_contacts({f: () for c, f in CHANNEL_CONTACTS.items() if c not in considered})
    out = decide(r, p, UserState(), NOW, POLICY, release=release)
    assert decide(r, blanked, UserState(), NOW, POLICY, release=release) == out
    assert set(out.send) | set(out.hold) <= set(considered)
    composed = compose(r, p, out.send, templates=TEMPLATES, policy=POLICY, now=NOW)
    assert compose(r, blanked, out.send, templates=TEMPLATES, policy=POLICY, now=NOW) == composed


@settings(max_examples=400, deadline=None)
@given(_prefs, _requests, st.integers(0, 7 * 24 * 60), st.booleans())
def test_consent_and_opt_outs_always_win(
    fields: dict[str, Any], req: dict[str, Any], minute: int, release: bool
) -> None:
    p = prefs(**fields)
    r = request(**req)
    at = NOW + timedelta(minutes=minute)
    out = decide(r, p, UserState(), at, POLICY, release=release)
    reached = set(out.send) | set(out.hold)
    if out.hold_all:  # deliver_at is not set here, so never
        reached |= set(CHANNELS)
    if p.global_opt_out:
        assert not reached
    user_cat = p.categories.get(r.category)
    if user_cat is not None and not user_cat.enabled:
        assert not reached
    if r.category == "marketing" and p.consent("marketing") is not True:
        assert not reached
    if p.consent("sms") is not True:
        assert "sms" not in reached
    for channel, on in p.channels.items():
        if not on:
            assert channel not in reached
    if r.channels:
        assert reached <= set(r.channels)
    if not r.critical and reached and out.send and p.quiet_hours:
        from finstream.domain.notify.quiet_hours import is_quiet

        interrupting = set(out.send) & POLICY.quiet_channels
        assert not (interrupting and is_quiet(p.quiet_hours, p.timezone, at))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "channel": st.none() | st.sampled_from(["email", "inapp"]),
                "category": st.none() | st.sampled_from(["account", "security"]),
                "limit": st.integers(1, 4),
                "window_seconds": st.sampled_from([30, 120, 600]),
            }
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(
        st.tuples(
            st.integers(0, 90),  # seconds since the previous request
            st.sampled_from(["account", "security"]),
            st.sampled_from(["NORMAL", "HIGH", "CRITICAL"]),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_no_window_ever_holds_more_capped_sends_than_the_limit(
    caps: list[dict[str, Any]], timeline: list[tuple[int, str, str]]
) -> None:
    p = prefs(caps=caps, phones=[], push_tokens=[])
    state = UserState()
    at = NOW
    log: list[tuple[datetime, set[str], str, bool]] = []
    for i, (gap, category, priority) in enumerate(timeline):
        at += timedelta(seconds=gap)
        r = request(request_id=f"r{i}", category=category, priority=priority)
        out = decide(r, p, state, at, POLICY)
        remember(out, r, state, at, POLICY, sent=out.send)
        state.prune(at.timestamp(), p, POLICY.max_seen)
        if out.send:
            log.append((at, set(out.send), category, r.critical))
    for cap in p.caps:
        for end, *_ in log:
            # Critical sends are never held back (they count, though): the
            # non-critical ones a cap covers never exceed its limit in any window.
            covered = [
                e
                for e in log
                if end - timedelta(seconds=cap.window_seconds) < e[0] <= end
                and not e[3]
                and (cap.category is None or cap.category == e[2])
                and (cap.channel is None or cap.channel in e[1])
            ]
            assert len(covered) <= cap.limit


# -- state, composing, audit --------------------------------------------------------------------


def test_state_and_holds_round_trip() -> None:
    state = UserState()
    out = decide(
        request(collapse_key="k"),
        prefs(caps=[{"limit": 5, "window_seconds": 60}]),
        state,
        NOW,
        POLICY,
    )
    remember(out, request(collapse_key="k"), state, NOW, POLICY, sent=out.send)
    again = UserState.from_bytes(state.to_bytes())
    assert again.seen.keys() == state.seen.keys()
    assert again.collapse.keys() == {"k"}
    assert again.sends.entries == [(NOW.timestamp(), "email,inapp", "account")]
    holds = Holds(
        requests={"r1": Hold("r1", 123, "quiet_hours", b"\x00\x01bytes", True)},
        digests={
            "account": DigestBuffer(
                "account", 1, 2, [{"subject": "s", "text": "t", "at": "x"}], 1, ["r"]
            )
        },
    )
    back = Holds.from_bytes(holds.to_bytes())
    assert back.requests["r1"].request == b"\x00\x01bytes"
    assert back.requests["r1"].bypass_caps
    assert back.next_due() == 2
    assert UserState.from_bytes(None).seen == {}


def test_compose_one_message_per_channel_and_contact() -> None:
    p = prefs(categories={"account": {"channels": ["email", "push", "inapp"]}})
    r = request()
    messages, skipped = compose(
        r, p, ("email", "push", "inapp"), templates=TEMPLATES, policy=POLICY, now=NOW
    )
    assert skipped == {}
    assert [(m.channel, m.message["recipient"], m.message["platform"]) for m in messages] == [
        ("email", "ann@example.com", None),
        ("push", "fcm-token-1", "FCM"),
        ("push", "apns-token-1", "APNS"),
        ("inapp", "u1", None),
    ]
    for m in messages:
        assert m.message["message_id"] == outbound_message_id(
            "r1", m.channel, m.message["recipient"]
        )
        CODEC.encode("OutboundMessage", m.message)
    email = messages[0].message
    assert email["subject"] == "Hi"
    assert email["body_html"] is not None
    assert email["transactional"] is True
    event = audit_event(
        r,
        decide(r, p, UserState(), NOW, POLICY).decisions[0],
        NOW,
        phase="intake",
        messages=messages,
    )
    blob = json.dumps(event, default=str)
    for secret in ("ann@example.com", "fcm-token-1", "apns-token-1"):
        assert secret not in blob
    assert event["details"]["contacts"].count("push:") == 2
    CODEC.encode("AuditEvent", event)


def test_marketing_messages_are_not_transactional() -> None:
    p = prefs(consents=[{"purpose": "marketing", "granted": True}])
    r = request(category="marketing", template="message")
    messages, _ = compose(r, p, ("email",), templates=TEMPLATES, policy=POLICY, now=NOW)
    assert messages[0].message["transactional"] is False


def test_audit_event_ids_are_stable_per_decision() -> None:
    r = request()
    d = decide(r, prefs(), UserState(), NOW, POLICY).decisions[0]
    a = audit_event(r, d, NOW, phase="intake")
    b = audit_event(r, d, NOW + timedelta(seconds=5), phase="intake")
    c = audit_event(r, d, NOW, phase="release")
    assert a["event_id"] == b["event_id"]
    assert a["event_id"] != c["event_id"]


@given(_requests, st.dictionaries(st.sampled_from(["a", "b", "symbol"]), st.text(max_size=5)))
def test_with_correlation_equals_the_request_decoded_with_that_id(
    req: dict[str, Any], data: dict[str, str]
) -> None:
    record = {
        "request_id": "r1",
        "user_id": "u1",
        "template": "t",
        "data": data,
        "correlation_id": None,
        **req,
    }
    request = Request.from_record(record)
    copy = request.with_correlation("cid-1")
    assert copy == Request.from_record({**record, "correlation_id": "cid-1"})
    assert copy.record["correlation_id"] == "cid-1"
    assert request.correlation_id is None
    assert record["correlation_id"] is None  # the original record is not changed
