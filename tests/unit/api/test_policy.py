"""Who may touch whose data, what a user may set, merge patches, problem documents."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finstream.api.auth import Principal
from finstream.api.hub import GAP_FRAME, frame_for
from finstream.api.idempotency import fingerprint, parse_key
from finstream.api.limits import RateDecision
from finstream.api.policy import merge_patch, next_version, protect_preferences, resolve_user
from finstream.api.problems import Problem, json_pointer, validation_problem
from finstream.domain import strict_json


def who(sub: str, *roles: str) -> Principal:
    return Principal(sub, frozenset(roles), "h", 0.0)


def outcome(principal: Principal, path_user: str, write: bool) -> Any:
    try:
        return resolve_user(principal, path_user, write=write)
    except Problem as p:
        return p.status, json.dumps(p.body())


NOT_FOUND = (404, json.dumps(Problem(404, "The resource does not exist.").body()))


@pytest.mark.parametrize("write", [False, True])
def test_users_reach_only_their_own(write: bool) -> None:
    alice = who("alice", "user")
    assert outcome(alice, "alice", write) == "alice"
    assert outcome(alice, "me", write) == "alice"
    # Another user's resources are "not found", with the same body as anything missing.
    assert outcome(alice, "bob", write) == NOT_FOUND


def test_operators_read_everyone_and_write_no_one_else() -> None:
    op = who("ops-1", "operator")
    assert outcome(op, "bob", False) == "bob"
    assert outcome(op, "bob", True)[0] == 403
    both = who("carol", "operator", "user")
    assert outcome(both, "me", True) == "carol"
    assert outcome(both, "bob", False) == "bob"
    assert outcome(both, "bob", True)[0] == 403


def test_services_have_no_business_in_user_resources() -> None:
    svc = who("billing", "service")
    for path_user, write in (("alice", False), ("alice", True), ("me", False)):
        assert outcome(svc, path_user, write)[0] == 403


def test_next_version_is_monotonic() -> None:
    t = datetime(2025, 1, 1, tzinfo=UTC)
    assert next_version(t, None) == t
    assert next_version(t, t - timedelta(seconds=1)) == t
    assert next_version(t, t) == t + timedelta(microseconds=1)
    assert next_version(t, t + timedelta(hours=1)) == t + timedelta(hours=1, microseconds=1)


# RFC 7396 appendix A: every example.
RFC7396 = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7396)
def test_merge_patch_rfc7396_examples(target: Any, patch: Any, expected: Any) -> None:
    assert merge_patch(target, patch) == expected


NOW = datetime(2025, 6, 1, 12, tzinfo=UTC)


def _prefs(**fields: Any) -> dict[str, Any]:
    return {
        "user_id": "alice",
        "emails": [],
        "phones": [],
        "push_tokens": [],
        "consents": [],
        "updated_at": NOW,
        **fields,
    }


def test_protected_fields_keep_what_the_platform_recorded() -> None:
    stored = _prefs(
        emails=[{"address": "a@x.io", "verified": True, "bounced": True}],
        phones=[{"number": "+14155552671", "verified": True, "opted_out": True}],
        push_tokens=[{"platform": "FCM", "token": "t1", "app": None, "invalid": True}],
        consents=[{"purpose": "marketing", "granted": True, "at": NOW, "source": "signup"}],
    )
    submitted = _prefs(
        emails=[
            {"address": "A@x.io", "verified": False, "bounced": False},
            {"address": "new@x.io", "verified": True, "bounced": False},
        ],
        phones=[{"number": "+14155552671", "verified": False, "opted_out": False}],
        push_tokens=[{"platform": "FCM", "token": "t1", "app": None, "invalid": False}],
        consents=[
            {"purpose": "marketing", "granted": True, "at": NOW, "source": "signup"},
            {"purpose": "sms", "granted": True, "at": NOW - timedelta(days=900), "source": "x"},
        ],
    )
    later = NOW + timedelta(hours=1)
    out = protect_preferences(submitted, stored, later)
    assert out["emails"][0]["verified"]
    assert out["emails"][0]["bounced"]
    new_id = out["emails"][1].pop("id")
    assert new_id.startswith("c-"), "a new contact gets a server-chosen id"
    assert out["emails"][1] == {
        "address": "new@x.io",
        "verified": False,
        "bounced": False,
        "complained": False,
    }
    assert out["phones"][0]["opted_out"], "a STOP cannot be undone through the API"
    assert out["phones"][0]["verified"]
    assert out["push_tokens"][0]["invalid"]
    assert out["consents"][0] == stored["consents"][0]
    assert out["consents"][1]["at"] == later, "a new consent cannot be backdated"
    assert out["consents"][1]["source"] == "api"
    assert submitted["emails"][1]["verified"], "the input is not modified"


@settings(max_examples=200, deadline=None)
@given(
    flags=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=5),
    known=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_new_contacts_are_never_verified(flags: list[tuple[bool, bool]], known: list[bool]) -> None:
    submitted = _prefs(
        phones=[
            {"number": f"+1415555{i:04d}", "verified": v, "opted_out": o}
            for i, (v, o) in enumerate(flags)
        ]
    )
    stored = _prefs(
        phones=[
            {"number": f"+1415555{i:04d}", "verified": True, "opted_out": False}
            for i in range(len(flags))
            if known[i]
        ]
    )
    out = protect_preferences(submitted, stored, NOW)
    for i, phone in enumerate(out["phones"]):
        assert phone["verified"] == known[i]
        assert phone["opted_out"] is False


def test_validation_problem_names_each_field() -> None:
    p = validation_problem(
        [
            {"loc": ("body", "phones", 0, "number"), "msg": "too long"},
            {"loc": ("query", "limit"), "msg": "too big"},
        ]
    )
    body = p.body()
    assert body["status"] == 422
    assert body["errors"][0] == {"in": "body", "pointer": "/phones/0/number", "detail": "too long"}
    assert body["errors"][1]["pointer"] == "/limit"
    assert body["detail"].startswith("/phones/0/number: too long")


def test_json_pointer_of_domain_paths() -> None:
    assert json_pointer("phones[0].number") == "/phones/0/number"
    assert json_pointer("categories.price_alert.channels[1]") == (
        "/categories/price_alert/channels/1"
    )
    assert json_pointer("a/b~c") == "/a~1b~0c"


def test_idempotency_keys() -> None:
    assert parse_key('"8e03978e-40d5"') == "8e03978e-40d5"
    assert parse_key("plain-key") == "plain-key"
    for bad in (None, "", '""', "x" * 256, "tab\tkey", "ключ"):
        with pytest.raises(Problem) as info:
            parse_key(bad)
        assert info.value.status == 400
    a = fingerprint("POST", "/p", {"x": 1, "y": [1, 2]})
    assert a == fingerprint("POST", "/p", {"y": [1, 2], "x": 1}), "key order does not matter"
    assert a != fingerprint("POST", "/p", {"x": 2, "y": [1, 2]})
    assert a != fingerprint("POST", "/q", {"x": 1, "y": [1, 2]})


def test_rate_limit_headers() -> None:
    ok = RateDecision(True, 100, 99, 59.2).headers()
    assert ok == {"RateLimit-Limit": "100", "RateLimit-Remaining": "99", "RateLimit-Reset": "60"}
    refused = RateDecision(False, 100, 0, 0.1).headers()
    assert refused["Retry-After"] == "1"


def strict_loads(text: str) -> Any:
    """JSON.parse's rules: NaN, Infinity and -Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@given(st.text(max_size=200) | st.sampled_from(["NaN", "-Infinity", '{"p": NaN}', "[1e999]"]))
def test_frames_are_always_json(payload: str) -> None:
    frame = strict_loads(frame_for("quote", {"symbol": "AAPL"})(payload))
    assert frame["type"] == "quote"
    assert frame["symbol"] == "AAPL"
    try:
        expected, pointers = strict_json.parse(payload)
    except ValueError:
        expected, pointers = payload, []
    assert frame["data"] == expected
    assert frame.get("nonfinite", []) == pointers
    assert strict_loads(GAP_FRAME)["type"] == "gap"


async def test_rate_limiter_lets_requests_through_when_redis_is_down() -> None:
    import redis.asyncio as aioredis

    from finstream.api.limits import RateLimiter
    from finstream.api.metrics import RATE_LIMITER_ERRORS
    from finstream.settings import Settings
    from tests.support.services import free_port

    before = RATE_LIMITER_ERRORS._value.get()
    down = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        decision = await RateLimiter(down, Settings(api_rate_limit=5)).hit("token-hash")
    finally:
        await down.aclose()
    assert decision.allowed
    assert decision.limit == 5
    assert RATE_LIMITER_ERRORS._value.get() == before + 1, "and it is counted"
