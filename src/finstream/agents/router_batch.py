"""The router's wiring beside its shell (:mod:`finstream.agents.router`).

What one batch collects before it is applied (:class:`Batch`, with its
outputs and dead letters), the preferences as the ``prefs`` store keeps them
(:class:`StoredPrefs`), the routing policy read from the settings, how a
preferences record changes the batch (:func:`preferences_change`) and the
router's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from finstream.codec import DecodeError
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.routing import Policy
from finstream.domain.notify.routing_state import Holds, UserState
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output
from finstream.settings import Settings
from finstream.topics import Contract

log = get_logger("finstream.agents.router")

DECISIONS = Counter("finstream_router_decisions_total", "Routing decisions by action", ["action"])
MESSAGES = Counter("finstream_router_messages_total", "Outbound messages routed", ["channel"])
FORWARDED = Counter(
    "finstream_router_forwarded_total",
    "Records moved to the partition their key hashes to (producer used another partitioner)",
    ["topic"],
)
HELD_USERS = Gauge("finstream_router_held_users", "Users with held requests or open digests")
RELEASE_DELAY = Histogram(
    "finstream_router_release_delay_seconds",
    "How late a hold or digest was released after its due time",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
# Children per counter and label value, looked up once: Counter.labels costs more than .inc().
_CHILDREN: dict[tuple[int, str], Any] = {}


def count(counter: Counter, label: str) -> None:
    child = _CHILDREN.get((id(counter), label))
    if child is None:
        child = _CHILDREN[(id(counter), label)] = counter.labels(label)
    child.inc()


def policy_from_settings(settings: Settings) -> Policy:
    quiet = frozenset(
        c.strip().lower() for c in settings.router_quiet_channels.split(",") if c.strip()
    )
    unknown = quiet - set(CHANNELS)
    if unknown:
        raise ValueError(f"FINSTREAM_ROUTER_QUIET_CHANNELS: unknown channels {sorted(unknown)}")
    return Policy(
        quiet_channels=quiet,
        dedupe_seconds=settings.router_dedupe_seconds,
        collapse_seconds=settings.router_collapse_seconds,
        digest_seconds=settings.router_digest_seconds,
        digest_max_items=settings.router_digest_max_items,
    )


class StoredPrefs:
    """A user's preferences as stored: the notify.preferences value, decoded when first needed."""

    __slots__ = ("_prefs", "_topic", "raw")

    def __init__(self, raw: bytes, topic: Contract, prefs: Preferences | None = None) -> None:
        self.raw = raw
        self._topic = topic
        self._prefs = prefs

    @property
    def prefs(self) -> Preferences:
        if self._prefs is None:
            self._prefs = Preferences.from_record(self._topic.decode_record(self.raw))
        return self._prefs


@dataclass
class Out:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None


@dataclass
class Letter:
    source_topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: BaseException | str
    headers: list[tuple[str, bytes]]
    error_class: str | None = None

    def produce(self, out: Output) -> None:
        out.dead_letter_record(
            source_topic=self.source_topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            value=self.value,
            error=self.error,
            error_class=self.error_class,
            headers=self.headers,
        )


@dataclass
class Batch:
    """Everything one batch (or one release tick) changes, applied in order at the end.

    States and holds here are copies of the stored ones: a user whose release
    fails is dropped from the batch and the stores keep what was committed.
    """

    outputs: list[Out] = field(default_factory=list)
    letters: list[Letter] = field(default_factory=list)
    states: dict[str, UserState] = field(default_factory=dict)
    holds: dict[str, Holds] = field(default_factory=dict)
    prefs: dict[str, StoredPrefs | None] = field(default_factory=dict)  # None: forgotten
    forgotten: set[str] = field(default_factory=set)
    # user -> item id -> command id: holds that commands cancelled or rescheduled
    cancelled: dict[str, dict[str, str]] = field(default_factory=dict)
    rescheduled: dict[str, dict[str, str]] = field(default_factory=dict)


def preferences_change(
    ev: Event, letter: Letter, current: StoredPrefs | None, topic: Contract, batch: Batch
) -> None:
    """A notify.preferences record into the batch: the user's new preferences, or forgotten.

    A tombstone forgets the user (preferences, routing state, holds); a record
    older than the stored one (``updated_at``) is ignored; a key that is not
    the record's user is a dead letter.
    """
    if ev.key is None:
        letter.error = "preferences record without a key (the key is the user id)"
        letter.error_class = "InvalidKey"
        batch.letters.append(letter)
        return
    user = ev.key.decode("utf-8", "replace")
    if ev.value is None:
        batch.prefs[user] = None
        batch.forgotten.add(user)
        batch.states.pop(user, None)
        batch.holds.pop(user, None)
        log.info("preferences forgotten", user_id=user)
        return
    prefs: Preferences = ev.item
    if prefs.user_id != user:
        letter.error = f"key {user!r} does not match user_id {prefs.user_id!r}"
        letter.error_class = "InvalidKey"
        batch.letters.append(letter)
        return
    if current is not None:
        try:
            newer = current.prefs.updated_at
        except DecodeError:
            newer = None
        if newer is not None and prefs.updated_at is not None and newer > prefs.updated_at:
            log.info("older preferences ignored", user_id=user)
            return
    batch.prefs[user] = StoredPrefs(ev.value, topic, prefs)
    batch.forgotten.discard(user)
