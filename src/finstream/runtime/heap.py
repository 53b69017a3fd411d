"""Keeping CPython's cyclic garbage collector off the state a stream worker holds.

A stateful role holds hundreds of thousands of long-lived objects: its stores,
the router's preferences and key caches, the alert index. CPython (3.11) walks
all of them in every full collection, and runs one whenever a quarter more
objects have survived since the last. Measured on the router bench
(``bench/RESULTS.md``, 2026-12-06): three full collections over ~890,000
objects took 1.18 s of a 20 s drain, gen-0/1 collections another 0.57 s.
Most of what they walk is that state, which is alive and cannot be freed.

The policy is the one Ray Serve, sglang and Synapse apply to their long-lived
heaps: move what survives into the permanent generation (``gc.freeze``), which
collections never walk.

* ``settle()`` after start and after each restore: a full collection, then
  freeze the survivors (the restored state among them);
* ``tick()`` at a batch boundary folds, at most every ``fold_seconds``, what
  survived since (state that arrived live: preferences loaded from a topic,
  caches warming) into the frozen set: a collection of the objects not frozen
  (cheap: only they are walked), then a freeze;
* every ``reclaim_seconds`` a reclaim (unfreeze, full collection, freeze) frees
  cycles that were alive at a fold and died since. Frozen objects are still
  freed by reference counting; only cyclic garbage among them waits for the
  reclaim, which bounds it.

The young generation's threshold is raised (700 to ``GEN0_THRESHOLD``) so the
cheap collections run less often over the batch's short-lived objects.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

GEN0_THRESHOLD = 10_000


class Heap:
    def __init__(
        self,
        *,
        fold_seconds: float = 10.0,
        reclaim_seconds: float = 600.0,
        collector: Any = gc,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fold_seconds = fold_seconds
        self.reclaim_seconds = reclaim_seconds
        self.gc = collector
        self.clock = clock
        self._folded = self._reclaimed = clock()
        self.enabled = fold_seconds > 0
        if self.enabled:
            _, gen1, gen2 = self.gc.get_threshold()
            self.gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)

    def settle(self) -> None:
        """Freeze what survives a full collection (after start, after a restore)."""
        if self.enabled:
            self._fold()

    def tick(self) -> None:
        """At a batch boundary: fold or reclaim when due."""
        if not self.enabled:
            return
        now = self.clock()
        if self.reclaim_seconds > 0 and now - self._reclaimed >= self.reclaim_seconds:
            self._reclaimed = now
            self.gc.unfreeze()
            self._fold()
        elif now - self._folded >= self.fold_seconds:
            self._fold()

    def _fold(self) -> None:
        self.gc.collect()
        self.gc.freeze()
        self._folded = self.clock()
