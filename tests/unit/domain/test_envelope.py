"""Crypto-shredding envelopes: tokens, wrapped keys, sealed records."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.domain import envelope as env
from finstream.domain.envelope import EnvelopeError, KeyUnavailable, UserErased, UserKeys


def keys(user: str = "u1", versions: tuple[int, ...] = (1,)) -> UserKeys:
    return UserKeys.from_raw(user, {v: os.urandom(32) for v in versions})


@given(st.binary(max_size=2000), st.text(min_size=1, max_size=50))
def test_a_token_opens_to_what_was_sealed_and_hides_it(data: bytes, user: str) -> None:
    k = keys(user)
    token = k.seal(data)
    assert env.is_sealed(token)
    assert env.token_version(token) == 1
    assert k.open(token) == data
    if len(data) >= 4:
        assert data.hex() not in token
        assert base64.b64encode(data).decode() not in token


@given(st.text(max_size=300))
def test_text_and_json_round_trip(text: str) -> None:
    k = keys()
    assert k.open_text(k.seal_text(text)) == text
    assert k.open_json(k.seal_json({"t": text, "n": [1, None]})) == {"t": text, "n": [1, None]}


@given(st.binary(max_size=600))
def test_token_bodies_are_the_standard_librarys_unpadded_base64url(data: bytes) -> None:
    # Tokens already stored were written with base64.urlsafe_b64encode: both ways agree.
    text = env._b64(data)
    assert text == base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    assert env._unb64(text) == data
    assert env._unb64(base64.urlsafe_b64encode(data).decode()) == data  # padded too


def test_a_token_body_outside_ascii_is_malformed() -> None:
    k = keys()
    with pytest.raises(EnvelopeError, match="base64"):
        k.open("fse1:1:AAAAé")


def test_sealing_twice_gives_different_tokens() -> None:
    k = keys()
    assert k.seal(b"same") != k.seal(b"same")


def test_another_users_key_or_token_does_not_open() -> None:
    raw = {1: os.urandom(32)}
    alice, bob = UserKeys.from_raw("alice", raw), UserKeys.from_raw("bob", raw)
    # Same key bytes, other user: the associated data differs.
    with pytest.raises(EnvelopeError, match="another user"):
        bob.open(alice.seal(b"x"))


def test_a_tampered_token_does_not_open() -> None:
    k = keys()
    token = k.seal(b"ann@example.com")
    body = bytearray(env._unb64(token.split(":", 2)[2]))
    body[-1] ^= 1
    tampered = f"fse1:1:{env._b64(bytes(body))}"
    with pytest.raises(EnvelopeError):
        k.open(tampered)
    for broken in ("fse1:", "fse1:x:abc", "fse1:1:@@@", "fse1:1:AAAA", "plain"):
        with pytest.raises(EnvelopeError):
            k.open(broken)


def test_the_newest_version_seals_and_every_held_version_opens() -> None:
    k = keys(versions=(1, 2))
    old = UserKeys(k.user_id, {1: k.keys[1]}).seal(b"old")
    new = k.seal(b"new")
    assert env.token_version(new) == 2
    assert k.open(old) == b"old"
    assert k.open(new) == b"new"
    # A version dropped from the ring (destroyed) no longer opens.
    with pytest.raises(KeyUnavailable):
        UserKeys(k.user_id, {2: k.keys[2]}).open(old)


def test_an_erased_user_neither_seals_nor_opens() -> None:
    k = keys()
    token = k.seal(b"x")
    gone = UserKeys(k.user_id, {}, erased=True)
    with pytest.raises(UserErased):
        gone.seal(b"y")
    with pytest.raises(KeyUnavailable):
        gone.open(token)
    with pytest.raises(KeyUnavailable):
        UserKeys(k.user_id, k.keys, erased=True).open(token)


def test_wrapped_keys_open_only_under_their_master_and_context() -> None:
    master, dek = os.urandom(32), env.new_data_key()
    ctx = env.wrap_context("u1", 3)
    wrapped = env.wrap_key(master, dek, ctx)
    assert dek not in wrapped
    assert env.unwrap_key(master, wrapped, ctx) == dek
    with pytest.raises(EnvelopeError):
        env.unwrap_key(os.urandom(32), wrapped, ctx)
    with pytest.raises(EnvelopeError):
        env.unwrap_key(master, wrapped, env.wrap_context("u2", 3))
    with pytest.raises(EnvelopeError):
        env.unwrap_key(master, wrapped[:10], ctx)


PREFS = {
    "user_id": "u1",
    "emails": [{"address": "ann@example.com", "verified": True, "bounced": False}],
    "phones": [{"number": "+14155552671", "verified": False, "opted_out": False}],
    "push_tokens": [{"platform": "FCM", "token": "tok-1", "app": None, "invalid": False}],
}


def test_contacts_are_sealed_one_by_one_flags_stay_readable() -> None:
    k = keys()
    sealed = env.seal_contacts(PREFS, k)
    values = [(f, item[name]) for f, name in env.CONTACT_FIELDS for item in sealed[f]]
    assert len(values) == 3
    assert all(env.is_sealed(v) for _, v in values)
    assert sealed["emails"][0]["verified"] is True
    text = repr(sealed)
    for secret in ("ann@example.com", "+14155552671", "tok-1"):
        assert secret not in text
    assert env.open_contacts(sealed, k) == PREFS
    # Opening plaintext is a no-op; sealing sealed values leaves them.
    assert env.open_contacts(PREFS, k) == PREFS
    assert env.seal_contacts(sealed, k) == sealed


def test_an_unchanged_contact_keeps_its_token() -> None:
    k = keys()
    before = env.seal_contacts(PREFS, k)
    changed = {**PREFS, "emails": [*PREFS["emails"], {"address": "new@example.com"}]}
    after = env.seal_contacts(changed, k, previous=before)
    assert after["emails"][0]["address"] == before["emails"][0]["address"]
    assert after["phones"][0]["number"] == before["phones"][0]["number"]
    assert env.is_sealed(after["emails"][1]["address"])


def test_request_data_values_are_sealed_names_stay() -> None:
    k = keys()
    data = {"name": "Ann", "email": "ann@example.com"}
    sealed = env.seal_data(data, k)
    assert set(sealed) == set(data)
    assert env.data_is_sealed(sealed)
    assert not env.data_is_sealed(data)
    assert env.open_data(sealed, k) == data
    assert env.seal_data(sealed, k) == sealed


OUTBOUND = {
    "message_id": "m-1",
    "user_id": "u1",
    "channel": "EMAIL",
    "recipient": "ann@example.com",
    "subject": "Hello Ann",
    "body_text": "Your address ann@example.com",
    "body_html": "<p>ann@example.com</p>",
    "data": {"k": "v"},
    "sealed": None,
}


def test_an_outbound_message_is_sealed_whole_and_opens_back() -> None:
    k = keys()
    sealed = env.seal_outbound(OUTBOUND, k)
    assert "ann@example.com" not in repr(sealed)
    assert sealed["recipient"] == "a***@***.com"
    assert sealed["body_text"] == ""
    assert sealed["data"] == {}
    assert sealed["subject"] is None
    opened = env.open_outbound(sealed, k)
    assert {n: opened[n] for n in OUTBOUND if n != "sealed"} == {
        n: OUTBOUND[n] for n in OUTBOUND if n != "sealed"
    }
    assert env.seal_outbound(sealed, k) == sealed
    assert env.open_outbound(OUTBOUND, k) == OUTBOUND
    assert tuple(k.open_json(sealed["sealed"])) == env.OUTBOUND_SEALED


@given(st.text(max_size=60))
def test_a_masked_recipient_never_holds_more_than_two_characters_of_it(value: str) -> None:
    masked = env.mask_recipient(value)
    if value and "@" not in value:
        assert sum(1 for c in masked if c != "*") <= 2
