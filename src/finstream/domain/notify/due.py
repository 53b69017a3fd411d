"""The router's scheduler: which users have holds or digests due, and when.

Held requests (``deliver_at``, quiet hours) and open digests live in the
router's ``holds`` store, keyed by user id; its compacted changelog makes them
durable across restarts and rebalances (:mod:`finstream.agents.router_state`).
This index is the in-memory view the release timer scans: user -> earliest
due time, in a heap. It is rebuilt from the store after every assignment,
and a user whose partition this replica no longer owns is skipped and
forgotten, so two replicas never release the same hold.

Why not ``notify.scheduled``: releasing a hold needs the user's routing state
(dedupe, caps, digests), which lives with the router, and the holds store
already keeps the held requests durably, so a separate topic would be a
second copy to keep in step. The router releases holds itself, within
``router_tick_seconds`` of their time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class DueIndex:
    def __init__(self) -> None:
        self._due: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._due)

    def set(self, user: str, due: int | None) -> None:
        """Record a user's earliest due time (epoch micros); None: nothing held."""
        if due is None:
            self._due.pop(user, None)
            return
        if self._due.get(user) == due:
            return
        self._due[user] = due
        heapq.heappush(self._heap, (due, user))

    def next_due(self) -> int | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def _drop_stale(self) -> None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def pop_due(self, now: int, owned: Callable[[str], bool], limit: int = 10_000) -> list[str]:
        """Users due at ``now`` whose partition this replica owns (removed from the index)."""
        out: list[str] = []
        while self._heap and len(out) < limit:
            due, user = self._heap[0]
            if self._due.get(user) != due:
                heapq.heappop(self._heap)
                continue
            if due > now:
                break
            heapq.heappop(self._heap)
            del self._due[user]
            if owned(user):
                out.append(user)
        return out

    def clear(self) -> None:
        self._due.clear()
        self._heap.clear()
