"""The stream worker's garbage-collection policy (finstream.runtime.heap)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from finstream.runtime.heap import GEN0_THRESHOLD, Heap


class Collector:
    """Records what the policy asks of the collector."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threshold = (700, 10, 10)

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, *t: int) -> None:
        self.threshold = (t[0], t[1], t[2])

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_settle_collects_then_freezes_and_the_young_threshold_is_raised() -> None:
    c = Collector()
    heap = Heap(collector=c, clock=Clock())
    assert c.threshold == (GEN0_THRESHOLD, 10, 10)
    heap.settle()
    assert c.calls == ["collect", "freeze"]


def test_ticks_fold_once_per_interval_and_reclaim_unfreezes_first() -> None:
    c, clock = Collector(), Clock()
    heap = Heap(fold_seconds=10, reclaim_seconds=60, collector=c, clock=clock)
    for _ in range(5):
        clock.now += 1
        heap.tick()
    assert c.calls == []
    clock.now += 5
    heap.tick()
    heap.tick()
    assert c.calls == ["collect", "freeze"]
    clock.now += 50  # 60 s since the start: a reclaim, not a fold
    heap.tick()
    assert c.calls[2:] == ["unfreeze", "collect", "freeze"]
    clock.now += 9
    heap.tick()  # the reclaim folded too: the next fold is 10 s after it
    assert len(c.calls) == 5


def test_zero_fold_seconds_leaves_the_collector_alone() -> None:
    c, clock = Collector(), Clock()
    heap = Heap(fold_seconds=0, collector=c, clock=clock)
    heap.settle()
    clock.now += 10_000
    heap.tick()
    assert c.calls == []
    assert c.threshold == (700, 10, 10)


class Node:
    def __init__(self) -> None:
        self.other: Any = None


@pytest.fixture
def real_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    gc.collect()


def test_a_cycle_frozen_alive_and_dropped_waits_for_the_reclaim(real_gc: None) -> None:
    clock = Clock()
    heap = Heap(fold_seconds=10, reclaim_seconds=600, collector=gc, clock=clock)
    a, b = Node(), Node()
    a.other, b.other = b, a
    alive = weakref.ref(a)
    heap.settle()
    assert gc.get_freeze_count() > 0
    del a, b
    gc.collect()  # frozen: a plain collection does not walk it
    assert alive() is not None
    clock.now += 10
    heap.tick()  # a fold neither
    assert alive() is not None
    clock.now += 600
    heap.tick()
    assert alive() is None
