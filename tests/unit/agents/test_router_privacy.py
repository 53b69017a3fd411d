"""The router's key loading one chunk ahead, with a key ring stand-in that records its loads."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable

import pytest

from finstream.agents.router_privacy import RouterPrivacy
from finstream.domain.envelope import UserKeys
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


async def test_each_event_comes_in_order_and_the_next_chunks_load_finishes_meanwhile() -> None:
    ring = SteppedRing()
    p = privacy(ring)
    events = [f"u{n}" for n in range(250)]
    # What had finished loading when the last event of the first chunk came out.
    finished_at_99: list[set[str]] = []
    out = []
    async with contextlib.aclosing(p.each(events, lambda e: e)) as ready:
        async for ev in ready:
            out.append(ev)
            assert p.keys(ev).user_id == ev
            if ev == "u99":
                finished_at_99 = list(ring.finished)
    assert out == events
    assert ring.started == [set(events[:100]), set(events[100:200]), set(events[200:])]
    # The second chunk's load ran to its end while the first chunk was routed.
    assert finished_at_99 == [set(events[:100]), set(events[100:200])]
