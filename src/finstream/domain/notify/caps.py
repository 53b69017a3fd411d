"""Frequency caps over rolling windows.

A cap says "at most ``limit`` notifications on ``channel`` (on any channel,
when None) of ``category`` (any, when None) in any ``window_seconds``". The
router keeps, per user, when it sent which request on which channels
(:class:`SendLog`); a request is within a cap when fewer than ``limit``
earlier sends the cap covers fall in the window ending now. One request sent
on email and in-app counts once for an any-channel cap and once for each of
the two channels' caps. Rolling, not fixed buckets: no burst of twice the
limit across a bucket edge.

What exceeds a cap is the router's business (suppressed, or folded into the
category's digest); critical messages are not capped but still counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from finstream.domain.notify.preferences_view import Cap

# A user's log never grows past this many sends, whatever their caps: the
# oldest go first (they are the first to leave any window anyway).
MAX_LOG_ENTRIES = 2000


def _covers(cap: Cap, channels: str, category: str) -> bool:
    if cap.category is not None and cap.category != category:
        return False
    return cap.channel is None or cap.channel in channels.split(",")


@dataclass
class SendLog:
    """Sends as (epoch seconds, "email,inapp", category), oldest first."""

    entries: list[tuple[float, str, str]] = field(default_factory=list)

    def count(self, cap: Cap, now: float) -> int:
        since = now - cap.window_seconds
        return sum(
            1
            for at, channels, category in self.entries
            if at > since and _covers(cap, channels, category)
        )

    def record(self, now: float, channels: Iterable[str], category: str) -> None:
        sent = ",".join(channels)
        if not sent:
            return
        self.entries.append((now, sent, category))
        if len(self.entries) > MAX_LOG_ENTRIES:
            del self.entries[: len(self.entries) - MAX_LOG_ENTRIES]

    def prune(self, now: float, caps: Sequence[Cap]) -> None:
        """Forget sends that no cap's window can reach any more."""
        if not caps:
            self.entries.clear()
            return
        horizon = now - max(c.window_seconds for c in caps)
        self.entries = [e for e in self.entries if e[0] > horizon]


def exceeded(
    caps: Sequence[Cap], log: SendLog, now: float, channels: Iterable[str], category: str
) -> dict[str, Cap]:
    """The channels whose next message would break a cap, with the first cap it breaks."""
    out: dict[str, Cap] = {}
    for channel in channels:
        for cap in caps:
            if cap.applies(channel, category) and log.count(cap, now) >= cap.limit:
                out[channel] = cap
                break
    return out
