"""The router's key loading one chunk ahead (with a key ring stand-in that records its
loads), and the contacts it opens to address messages."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from finstream.agents.router_privacy import _PLAINTEXT_CONTACTS, KEY_YIELD, RouterPrivacy
from finstream.domain.envelope import UserKeys
from finstream.domain.notify.preferences_view import Preferences
from finstream.settings import Settings


class Ring:
    """Stands in for KeyRing: each load is recorded when it starts; one that asks for a
    user in ``stuck`` never finishes (a query in flight)."""

    def __init__(self, stuck: frozenset[str] = frozenset()) -> None:
        self.started: list[set[str]] = []
        self.stuck = stuck
        self.cancelled = 0

    async def load(self, users: Iterable[str], *, create: bool = False) -> dict[str, UserKeys]:
        wanted = set(users)
        self.started.append(wanted)
        try:
            if wanted & self.stuck:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {u: UserKeys.from_raw(u, {1: os.urandom(32)}) for u in wanted}

    async def close(self) -> None:
        return None


def privacy(ring: Ring) -> RouterPrivacy:
    p = RouterPrivacy(Settings())
    p._ring = ring
    return p


async def test_the_next_chunks_keys_are_asked_for_before_a_chunk_is_routed() -> None:
    ring = Ring()
    p = privacy(ring)
    chunks = [("c0", ["a", "b"]), ("c1", ["c"]), ("c2", []), ("c3", ["a", "d"])]
    # What the ring was asked for when each chunk is handed out for routing.
    expected = {
        "c0": [{"a", "b"}, {"c"}],
        "c1": [{"a", "b"}, {"c"}],  # c2 routes no request: nothing to load
        "c2": [{"a", "b"}, {"c"}, {"a", "d"}],
        "c3": [{"a", "b"}, {"c"}, {"a", "d"}],
    }
    seen = []
    async with contextlib.aclosing(p.prepared(chunks)) as ready:
        async for chunk in ready:
            seen.append(chunk)
            assert ring.started == expected[chunk]
            for _, users in chunks[: int(chunk[1]) + 1]:
                assert all(p.keys(u).user_id == u for u in users)
    assert seen == ["c0", "c1", "c2", "c3"]


async def test_routing_that_fails_mid_batch_cancels_the_load_in_flight() -> None:
    ring = Ring(stuck=frozenset({"b"}))
    p = privacy(ring)
    chunks = [("c0", ["a"]), ("c1", ["b"])]

    async def route() -> None:
        async with contextlib.aclosing(p.prepared(chunks)) as ready:
            async for _chunk in ready:
                raise RuntimeError("routing bug")

    with pytest.raises(RuntimeError, match="routing bug"):
        await route()
    assert ring.started == [{"a"}, {"b"}]
    assert ring.cancelled == 1


async def test_a_user_whose_keys_were_not_loaded_is_refused_not_sealed_in_clear() -> None:
    ring = Ring()
    p = privacy(ring)
    async with contextlib.aclosing(p.prepared([("c0", ["a"])])) as ready:
        async for _chunk in ready:
            with pytest.raises(RuntimeError, match="were not loaded"):
                p.keys("b")


class SteppedRing(Ring):
    """A load in two steps (a query, then a first key's INSERT), as KeyRing's creation is."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[set[str]] = []

    async def load(self, users: Iterable[str], *, create: bool = False) -> dict[str, UserKeys]:
        wanted = set(users)
        self.started.append(wanted)
        await asyncio.sleep(0)  # the query's answer
        await asyncio.sleep(0)  # the INSERT's answer
        self.finished.append(wanted)
        return {u: UserKeys.from_raw(u, {1: os.urandom(32)}) for u in wanted}


async def test_every_event_comes_in_order_in_runs_and_the_next_chunks_load_finishes_meanwhile() -> (
    None
):
    ring = SteppedRing()
    p = privacy(ring)
    events = [f"u{n}" for n in range(250)]
    # What had finished loading when the last event of the first chunk came out.
    finished_at_99: list[set[str]] = []
    out = []
    async with contextlib.aclosing(p.runs(events, lambda e: e)) as ready:
        async for run in ready:
            assert 0 < len(run) <= KEY_YIELD
            for ev in run:
                out.append(ev)
                assert p.keys(ev).user_id == ev
                if ev == "u99":
                    finished_at_99 = list(ring.finished)
    assert out == events
    assert ring.started == [set(events[:100]), set(events[100:200]), set(events[200:])]
    # The second chunk's load ran to its end while the first chunk was routed.
    assert finished_at_99 == [set(events[:100]), set(events[100:200])]


# -- contacts opened to address messages ---------------------------------------------------

contact_values = st.text(alphabet="abc@.+0123456789", min_size=1, max_size=12)
contact_lists = st.lists(st.tuples(contact_values, st.booleans()), max_size=3)


def opened_prefs(user: str, keys: UserKeys) -> RouterPrivacy:
    p = privacy(Ring())
    p._batch = {user: keys}
    return p


@given(emails=contact_lists, phones=contact_lists, tokens=contact_lists)
def test_opened_preferences_hold_every_contact_in_clear_and_nothing_else_changes(
    emails: list[tuple[str, bool]],
    phones: list[tuple[str, bool]],
    tokens: list[tuple[str, bool]],
) -> None:
    keys = UserKeys.from_raw("u1", {1: os.urandom(32)})

    def items(name: str, values: list[tuple[str, bool]]) -> tuple[dict[str, Any], ...]:
        return tuple(
            {name: keys.seal_text(v) if sealed else v, "verified": True} for v, sealed in values
        )

    stored = Preferences(
        "u1",
        locale="de",
        emails=items("address", emails),
        phones=items("number", phones),
        push_tokens=items("token", tokens),
        channels={"email": True},
    )
    before = _PLAINTEXT_CONTACTS._value.get()
    opened = opened_prefs("u1", keys).open_prefs(stored)
    assert opened == dataclasses.replace(
        stored,
        emails=tuple({"address": v, "verified": True} for v, _ in emails),
        phones=tuple({"number": v, "verified": True} for v, _ in phones),
        push_tokens=tuple({"token": v, "verified": True} for v, _ in tokens),
    )
    anything_sealed = any(s for v, s in emails + phones + tokens)
    assert (opened is stored) == (not anything_sealed)
    plaintext = any(not s for v, s in emails + phones + tokens)
    assert _PLAINTEXT_CONTACTS._value.get() - before == (1 if plaintext else 0)


def test_a_contact_that_does_not_open_is_left_out_and_the_others_are_opened() -> None:
    keys = UserKeys.from_raw("u1", {1: os.urandom(32)})
    other = UserKeys.from_raw("u2", {1: os.urandom(32)})
    stored = Preferences(
        "u1",
        emails=(
            {"address": other.seal_text("x@example.com")},  # another user's token
            {"address": keys.seal_text("me@example.com")},
        ),
    )
    p = opened_prefs("u1", keys)
    opened = p.open_prefs(stored)
    assert opened.emails == ({"address": "me@example.com"},)
    assert p.open_prefs(stored) is opened  # the same stored preferences: opened once


def test_preferences_with_contacts_replaces_only_contact_lists() -> None:
    prefs = Preferences("u1", locale="fr", emails=({"address": "a"},), channels={"sms": False})
    copy = prefs.with_contacts({"emails": ({"address": "b"},)})
    assert copy == dataclasses.replace(prefs, emails=({"address": "b"},))
    assert prefs.emails == ({"address": "a"},)
    with pytest.raises(ValueError, match="not contact lists"):
        prefs.with_contacts({"locale": "de"})  # type: ignore[dict-item]


def test_only_the_contacts_of_the_channels_asked_for_are_opened() -> None:
    keys = UserKeys.from_raw("u1", {1: os.urandom(32)})
    email = keys.seal_text("me@example.com")
    stored = Preferences(
        "u1",
        emails=({"address": email},),
        push_tokens=({"platform": "FCM", "token": keys.seal_text("tok-1")},),
    )
    p = opened_prefs("u1", keys)
    push = p.open_prefs(stored, ("push", "inapp"))
    assert push.push_tokens == ({"platform": "FCM", "token": "tok-1"},)
    assert push.emails == ({"address": email},)  # still sealed
    assert p.open_prefs(stored, ("push",)) is push  # opened before: the same copy
    both = p.open_prefs(stored, ("email",))  # widens what was opened for this user
    assert both.emails == ({"address": "me@example.com"},)
    assert both.push_tokens == push.push_tokens
    assert p.open_prefs(stored, ("inapp",)) is both
    assert p.open_prefs(stored) is both
