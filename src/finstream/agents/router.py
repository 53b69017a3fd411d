"""Router role: notify.requests + notify.preferences -> notify.outbound.<channel> and audit.events.

Runs on the stream engine, exactly once. Both inputs are keyed by user id and
co-partitioned (range assignment gives partition p of both topics to one
replica). Per user it keeps three stores, restored from their changelogs
before a partition is routed:

* ``prefs``  the latest UserPreferences (its Avro bytes, decoded on first use);
* ``state``  dedupe ids, collapse windows, the send log for caps (JSON);
* ``holds``  held requests and open digests, released by time (JSON).

A third input, ``notify.scheduled.commands``, cancels or reschedules held
items, and every change of what is held goes to ``notify.scheduled.items``:
see :mod:`finstream.agents.scheduled`.

Each request goes through :func:`finstream.domain.notify.routing.decide`; the
decision is rendered (:mod:`finstream.domain.notify.templates`), published as one
OutboundMessage per channel and contact, and audited on ``audit.events``.
Outputs, dead letters, the stores' changelogs and the input offsets commit in
one Kafka transaction, so a replica killed anywhere comes back with the state
of its last commit and routes what followed again; what it had published
since was aborted and is never seen by read_committed consumers. The release
of held requests and digests (every ``router_tick_seconds``) runs between
batches, in the same transactions.

Consuming a preferences record also updates the Redis read model
(:class:`~finstream.stores.read_models.PreferencesStore`), before the commit.

Co-partitioning: state lives in the partition that Kafka's default (murmur2)
partitioner gives the user id. A record that arrives on another partition
(its producer used another partitioner, e.g. librdkafka's default crc32) is
forwarded once, in the transaction, to its home partition and handled there.

Nothing escapes a batch: undecodable or invalid input (the engine's
contracts), a template that cannot render (a missing variable) and any
unexpected error become dead letters with the reason (and, for requests, a
``dropped`` audit event).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from finstream.agents.router_privacy import RouterPrivacy, SealedDataUnreadable
from finstream.agents.scheduled import ScheduleControl
from finstream.codec import DecodeError, EncodeError
from finstream.domain.notify import digest as digest_
from finstream.domain.notify.audit import audit_event
from finstream.domain.notify.due import DueIndex
from finstream.domain.notify.outbound import Composed, compose
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.request import InvalidRequest, Request
from finstream.domain.notify.routing import (
    Action,
    Decision,
    Outcome,
    Policy,
    decide,
    remember,
    select_channels,
)
from finstream.domain.notify.routing_state import Hold, Holds, UserState
from finstream.domain.notify.templates import ChannelNotAvailable, TemplateError
from finstream.domain.partitioning import key_partition
from finstream.domain.resilience import Backoff
from finstream.domain.time import from_micros, to_micros, utcnow
from finstream.runtime.engine import Event, Output, Processor, StreamEngine
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import correlation, correlation_from_headers, get_logger
from finstream.runtime.state import Store
from finstream.runtime.worker import ServiceContext
from finstream.settings import Settings
from finstream.stores.templates import load_templates
from finstream.topics import Contract, contract

log = get_logger(__name__)

# Users' keys are loaded this many events at a time, one chunk ahead of routing.
KEY_CHUNK = 100

DECISIONS = Counter("finstream_router_decisions_total", "Routing decisions by action", ["action"])
MESSAGES = Counter("finstream_router_messages_total", "Outbound messages routed", ["channel"])
FORWARDED = Counter(
    "finstream_router_forwarded_total",
    "Records moved to the partition their key hashes to (producer used another partitioner)",
    ["topic"],
)
# Children per label value, looked up once: Counter.labels costs more than the increment.
_DECISION_COUNTERS: dict[str, Any] = {}
_MESSAGE_COUNTERS: dict[str, Any] = {}


def _count(counter: Counter, children: dict[str, Any], label: str) -> None:
    child = children.get(label)
    if child is None:
        child = children[label] = counter.labels(label)
    child.inc()


HELD_USERS = Gauge("finstream_router_held_users", "Users with held requests or open digests")
RELEASE_DELAY = Histogram(
    "finstream_router_release_delay_seconds",
    "How late a hold or digest was released after its due time",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
READ_MODEL_ERRORS = Counter(
    "finstream_router_read_model_errors_total",
    "Preferences the Redis read model could not take (dead-lettered for redrive)",
)


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
class _Out:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None


@dataclass
class _Letter:
    source_topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: BaseException | str
    headers: list[tuple[str, bytes]]
    error_class: str | None = None


@dataclass
class _Work:
    """One request being decided: its context, passed along the steps."""

    request: Request
    prefs: Preferences
    state: UserState
    batch: _Batch
    now: datetime
    letter: _Letter
    phase: str
    bypass_caps: bool = False


@dataclass
class _Batch:
    """Everything one batch (or one release tick) changes, applied in order at the end.

    States and holds here are copies of the stored ones: a user whose release
    fails is dropped from the batch and the stores keep what was committed.
    """

    outputs: list[_Out] = field(default_factory=list)
    letters: list[_Letter] = field(default_factory=list)
    states: dict[str, UserState] = field(default_factory=dict)
    holds: dict[str, Holds] = field(default_factory=dict)
    prefs: dict[str, StoredPrefs | None] = field(default_factory=dict)  # None: forgotten
    forgotten: set[str] = field(default_factory=set)
    redis_ops: list[tuple[str, bytes | None, _Letter]] = field(default_factory=list)
    # user -> item id -> command id: holds that commands cancelled or rescheduled
    cancelled: dict[str, dict[str, str]] = field(default_factory=dict)
    rescheduled: dict[str, dict[str, str]] = field(default_factory=dict)


class Router(Processor):
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.settings = settings
        self.codec = ctx.codec
        self.policy = policy_from_settings(settings)
        self.templates = load_templates(settings)
        ns = settings.namespace
        requests = contract("notify.requests", ns, ctx.codec)
        prefs = contract("notify.preferences", ns, ctx.codec)
        self.requests = requests
        self.prefs_contract = prefs
        self.requests_topic = requests.name
        self.prefs_topic = prefs.name
        self.audit = contract("audit.events", ns, ctx.codec)
        self.audit_topic = self.audit.name
        self.outbound = {c: contract(f"notify.outbound.{c}", ns, ctx.codec) for c in CHANNELS}
        self.partitions = requests.partitions
        if prefs.partitions != self.partitions:
            raise ValueError("notify.requests and notify.preferences must have equal partitions")
        self.prefs_store: Store[StoredPrefs] = Store(
            "prefs", lambda p: p.raw, lambda raw: StoredPrefs(raw, prefs)
        )
        self.state_store: Store[UserState] = Store(
            "state", UserState.to_bytes, UserState.from_bytes
        )
        self.holds_store: Store[Holds] = Store("holds", Holds.to_bytes, Holds.from_bytes)
        self.stores: list[Store[Any]] = [self.prefs_store, self.state_store, self.holds_store]
        self.index = DueIndex()
        self.owned: frozenset[int] = frozenset()
        self._read_model: Any = None
        self._backoff = Backoff(base=0.2, cap=5.0)
        self.scheduled = ScheduleControl(self)
        self.privacy = RouterPrivacy(settings)  # issue 14: what is sealed and opened

    def _partition(self, user: str) -> int:
        return key_partition(user.encode(), self.partitions)

    # -- partitions ------------------------------------------------------------------------------

    async def assigned(self, partitions: frozenset[int]) -> None:
        self.owned = partitions
        self._rebuild_index()
        self.scheduled.assigned(partitions)
        log.info("routing partitions", partitions=sorted(partitions), held_users=len(self.index))

    async def revoked(self, partitions: frozenset[int]) -> None:
        self.owned = frozenset()

    # -- batches ------------------------------------------------------------------------------

    async def process(self, events: list[Event], out: Output) -> None:
        batch = _Batch()
        # privacy: the keys of the users whose requests each chunk routes, loaded
        # one chunk ahead (the query overlaps routing the chunk before it)
        chunks = [
            (
                chunk,
                [ev.item.user_id for ev in chunk if ev.topic == self.requests_topic and ev.item],
            )
            for chunk in (events[i : i + KEY_CHUNK] for i in range(0, len(events), KEY_CHUNK))
        ]
        async with contextlib.aclosing(self.privacy.prepared(chunks)) as ready:
            async for chunk in ready:
                for ev in chunk:
                    self._event(ev, batch)
        await self._apply(batch, out)

    def _event(self, ev: Event, batch: _Batch) -> None:
        headers = [(k, bytes(v or b"")) for k, v in (ev.headers or ())]
        try:
            if self._forward(ev, headers, batch):
                return
            if ev.topic == self.prefs_topic:
                self._preferences(ev, headers, batch)
            elif ev.topic == self.scheduled.commands_topic:
                self.scheduled.command(ev, headers, batch)
            else:
                self._request(ev, headers, batch)
        except Exception as exc:  # a bug must not stall the partition
            log.exception("routing failed", topic=ev.topic, offset=ev.offset)
            batch.letters.append(
                _Letter(ev.topic, ev.partition, ev.offset, ev.key, ev.value, exc, headers)
            )

    def _forward(self, ev: Event, headers: list[tuple[str, bytes]], batch: _Batch) -> bool:
        if ev.key is None:
            return False
        home = key_partition(ev.key, self.partitions)
        if home == ev.partition:
            return False
        batch.outputs.append(_Out(ev.topic, ev.key, ev.value, headers, home))
        FORWARDED.labels(ev.topic).inc()
        return True

    async def _apply(self, batch: _Batch, out: Output) -> None:
        """Outputs and state changes into the open transaction; the read model to Redis."""
        for o in batch.outputs:
            out.produce(o.topic, o.key, o.value, o.headers, o.partition)
        for letter in batch.letters:
            self._dead_letter(letter, out)
        self.scheduled.publish(batch, out)  # before the stores change: it compares with them
        self._write_state(batch)
        if batch.redis_ops:
            await self._update_read_model(batch.redis_ops, out)

    def _write_state(self, batch: _Batch) -> None:
        def put(store: Store[Any], user: str, value: Any) -> None:
            p = self._partition(user)
            if value is None:
                store.delete(p, user.encode())
            else:
                store.put(p, user.encode(), value)

        for user, prefs in batch.prefs.items():
            put(self.prefs_store, user, prefs)
        for user, state in batch.states.items():
            if user not in batch.forgotten:
                put(self.state_store, user, state)
        for user, holds in batch.holds.items():
            if holds.empty() or user in batch.forgotten:
                put(self.holds_store, user, None)
                self.index.set(user, None)
            else:
                put(self.holds_store, user, holds)
                self.index.set(user, holds.next_due())
        for user in batch.forgotten:
            put(self.state_store, user, None)
            put(self.holds_store, user, None)
            self.index.set(user, None)
        HELD_USERS.set(len(self.index))

    def _dead_letter(self, letter: _Letter, out: Output) -> None:
        out.dead_letter_record(
            source_topic=letter.source_topic,
            partition=letter.partition,
            offset=letter.offset,
            key=letter.key,
            value=letter.value,
            error=letter.error,
            error_class=letter.error_class,
            headers=letter.headers,
        )

    # -- the Redis read model of preferences (contract with the API and delivery) ----------

    async def _update_read_model(
        self, ops: list[tuple[str, bytes | None, _Letter]], out: Output
    ) -> None:
        from finstream.stores.read_models import PreferencesStore
        from finstream.stores.redis import connect

        if self._read_model is None:
            self._read_model = PreferencesStore(connect(self.settings), self.settings, self.codec)
        failed: list[_Letter] = []

        async def apply(user: str, raw: bytes | None, letter: _Letter) -> None:
            for attempt in range(1, 4):
                try:
                    if raw is None:
                        await self._read_model.delete(user)
                    else:
                        await self._read_model.put(user, raw)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if attempt == 3:
                        # Redriving the dead letter re-applies it; both writers are monotonic.
                        letter.error = f"preferences read model (Redis) not updated: {exc}"
                        letter.error_class = "ReadModelError"
                        failed.append(letter)
                    else:
                        await asyncio.sleep(self._backoff.delay(attempt))

        # Several users at once; one user's versions stay in order (one op each per batch).
        latest = {user: (user, raw, letter) for user, raw, letter in ops}
        pending = list(latest.values())
        for i in range(0, len(pending), 64):
            await asyncio.gather(*(apply(*op) for op in pending[i : i + 64]))
        for letter in failed:
            READ_MODEL_ERRORS.inc()
            self._dead_letter(letter, out)

    # -- preferences ----------------------------------------------------------------------------

    def _preferences(self, ev: Event, headers: list[tuple[str, bytes]], batch: _Batch) -> None:
        letter = _Letter(ev.topic, ev.partition, ev.offset, ev.key, ev.value, "", headers)
        if ev.key is None:
            letter.error = "preferences record without a key (the key is the user id)"
            letter.error_class = "InvalidKey"
            batch.letters.append(letter)
            return
        user = ev.key.decode("utf-8", "replace")
        if ev.value is None:
            # A tombstone forgets the user: preferences, routing state, holds.
            batch.prefs[user] = None
            batch.forgotten.add(user)
            batch.states.pop(user, None)
            batch.holds.pop(user, None)
            batch.redis_ops.append((user, None, letter))
            log.info("preferences forgotten", user_id=user)
            return
        prefs: Preferences = ev.item
        if prefs.user_id != user:
            letter.error = f"key {user!r} does not match user_id {prefs.user_id!r}"
            letter.error_class = "InvalidKey"
            batch.letters.append(letter)
            return
        current = self._stored_prefs(user, batch)
        if current is not None:
            try:
                newer = current.prefs.updated_at
            except DecodeError:
                newer = None
            if newer is not None and prefs.updated_at is not None and newer > prefs.updated_at:
                log.info("older preferences ignored", user_id=user)
                return
        batch.prefs[user] = StoredPrefs(ev.value, self.prefs_contract, prefs)
        batch.forgotten.discard(user)
        batch.redis_ops.append((user, ev.value, letter))

    def _stored_prefs(self, user: str, batch: _Batch) -> StoredPrefs | None:
        if user in batch.prefs:
            return batch.prefs[user]
        return self.prefs_store.get(self._partition(user), user.encode())

    def _prefs(self, user: str, batch: _Batch) -> Preferences:
        stored = self._stored_prefs(user, batch)
        if stored is None:
            return Preferences.default(user)
        try:
            return stored.prefs
        except DecodeError:
            log.error("stored preferences do not decode; using defaults", user_id=user)
            return Preferences.default(user)

    def _state(self, user: str, batch: _Batch) -> UserState:
        state = batch.states.get(user)
        if state is None:
            stored = self.state_store.get(self._partition(user), user.encode())
            state = stored.copy() if stored is not None else UserState()
            batch.states[user] = state
        return state

    def _holds(self, user: str, batch: _Batch) -> Holds:
        holds = batch.holds.get(user)
        if holds is None:
            stored = self.holds_store.get(self._partition(user), user.encode())
            holds = stored.copy() if stored is not None else Holds()
            batch.holds[user] = holds
        return holds

    # -- requests -------------------------------------------------------------------------------

    def _request(self, ev: Event, headers: list[tuple[str, bytes]], batch: _Batch) -> None:
        letter = _Letter(ev.topic, ev.partition, ev.offset, ev.key, ev.value, "", headers)
        request: Request = ev.item
        if ev.key is not None and ev.key != request.user_id.encode():
            letter.error = f"key does not match user_id {request.user_id!r}"
            letter.error_class = "InvalidKey"
            batch.letters.append(letter)
            return
        cid = request.correlation_id or correlation_from_headers(headers)
        with correlation(cid) as cid:
            if request.correlation_id is None:
                # The request was validated at the edge: only the id changes.
                request = replace(
                    request, record={**request.record, "correlation_id": cid}, correlation_id=cid
                )
            now = utcnow()
            # privacy: nothing of an erased user is routed again; sealed data opens to render
            if self.privacy.erased(request.user_id):
                reason = "user erased: their data keys are destroyed"
                self._audit(request, Decision(Action.DROPPED, reason), now, batch, phase="intake")
                return
            request = self.privacy.open_request(request)
            prefs = self._prefs(request.user_id, batch)
            state = self._state(request.user_id, batch)
            state.prune(now.timestamp(), prefs, self.policy.max_seen)
            outcome = decide(request, prefs, state, now, self.policy)
            self._execute(_Work(request, prefs, state, batch, now, letter, "intake"), outcome)

    def _execute(self, work: _Work, outcome: Outcome, extra: dict[str, str] | None = None) -> None:
        request, prefs, state, batch, now = (
            work.request,
            work.prefs,
            work.state,
            work.batch,
            work.now,
        )
        phase = work.phase
        user = request.user_id
        skipped = dict(outcome.skipped)
        messages: list[Composed] = []
        try:
            if outcome.digest:
                self._fold(work, outcome, skipped)
                return
            if outcome.send:
                messages, missing = compose(
                    request,
                    self.privacy.open_prefs(prefs),  # privacy: contacts opened in memory only
                    outcome.send,
                    templates=self.templates,
                    policy=self.policy,
                    now=now,
                )
                skipped.update(missing)
            self._preflight(request, prefs, outcome)
        except TemplateError as exc:
            self._drop(work, exc)
            return
        decisions = list(outcome.decisions)
        if outcome.send and not messages:
            decisions = [
                Decision(Action.SUPPRESSED, "template has no version for the chosen channels")
                if d.action is Action.ROUTED
                else d
                for d in decisions
            ]
        if outcome.hold_all or outcome.hold:
            assert outcome.release_at is not None
            held = request.record if outcome.hold_all else request.with_channels(outcome.hold)
            self._holds(user, batch).requests[request.request_id] = Hold(
                request.request_id,
                to_micros(outcome.release_at),
                outcome.hold_reason or "scheduled",
                self.requests.encode(self.privacy.seal_request(held)),
                work.bypass_caps,
            )
        sent = [c for c in CHANNELS if any(m.channel == c for m in messages)]
        remember(outcome, request, state, now, self.policy, sent=sent)
        key = user.encode()
        cid_header = correlation_header(request.correlation_id)
        for m in messages:
            batch.outputs.append(
                _Out(
                    self.outbound[m.channel].name,
                    key,
                    self.outbound[m.channel].encode(self.privacy.seal_message(m.message)),
                    cid_header,
                )
            )
            _count(MESSAGES, _MESSAGE_COUNTERS, m.channel)
        for d in decisions:
            self._audit(
                request,
                d,
                now,
                batch,
                phase=phase,
                messages=messages if d.action is Action.ROUTED else (),
                skipped=skipped,
                extra=extra,
            )
        log.debug(
            "request routed" if messages else "request decided",
            request_id=request.request_id,
            user_id=user,
            actions=",".join(d.action for d in decisions),
            channels=",".join(sent),
            phase=phase,
        )

    def _preflight(self, request: Request, prefs: Preferences, outcome: Outcome) -> None:
        """Render what is held now, so a missing variable fails at once, not at release."""
        if outcome.hold:
            channels: Sequence[str] = outcome.hold
        elif outcome.hold_all:
            channels = select_channels(request, prefs, self.policy)[0]
        else:
            return
        for channel in channels:
            try:
                self.templates.render(request.template, channel, prefs.locale, request.data)
            except ChannelNotAvailable:
                continue

    def _fold(self, work: _Work, outcome: Outcome, skipped: dict[str, str]) -> None:
        request, prefs, state, batch, now = (
            work.request,
            work.prefs,
            work.state,
            work.batch,
            work.now,
        )
        subject, text = self._digest_item(request, prefs)
        holds = self._holds(request.user_id, batch)
        buffer = holds.digests.get(request.category)
        if buffer is not None and request.request_id in buffer.request_ids:
            return  # folded already (a redelivered release)
        holds.digests[request.category] = digest_.fold(
            buffer,
            category=request.category,
            request_id=request.request_id,
            subject=subject,
            text=text,
            at=request.record.get("created_at") or now,
            now=now,
            window_seconds=self.policy.digest_seconds,
            max_items=self.policy.digest_max_items,
        )
        self.privacy.seal_digest_item(request.user_id, holds.digests[request.category])
        remember(outcome, request, state, now, self.policy, sent=())
        due = holds.digests[request.category].due
        self._audit(
            request,
            outcome.decisions[-1],
            now,
            batch,
            phase=work.phase,
            skipped=skipped,
            extra={"digest_due": from_micros(due).isoformat()},
        )

    def _digest_item(self, request: Request, prefs: Preferences) -> tuple[str | None, str]:
        for channel in ("inapp", "push", "email", "sms"):
            try:
                r = self.templates.render(request.template, channel, prefs.locale, request.data)
            except ChannelNotAvailable:
                continue
            return r.subject, r.text
        raise TemplateError(f"template {request.template!r} has no version for any channel")

    def _drop(self, work: _Work, exc: TemplateError) -> None:
        request = work.request
        # Not remembered as seen: a copy redriven from the dlq (after the
        # template or the data is fixed) is routed, not taken for a duplicate.
        work.state.seen.pop(request.request_id, None)
        work.letter.error = exc
        work.batch.letters.append(work.letter)
        self._audit(
            request,
            Decision(Action.DROPPED, str(exc)[:500]),
            work.now,
            work.batch,
            phase=work.phase,
        )
        log.warning("request dropped", request_id=request.request_id, reason=str(exc)[:300])

    def _audit(
        self,
        request: Request,
        decision: Decision,
        now: datetime,
        batch: _Batch,
        *,
        phase: str,
        messages: Sequence[Composed] = (),
        skipped: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        event = audit_event(
            request, decision, now, phase=phase, messages=messages, skipped=skipped, extra=extra
        )
        batch.outputs.append(
            _Out(
                self.audit_topic,
                request.user_id.encode(),
                self.audit.encode(event),
                correlation_header(request.correlation_id),
            )
        )
        _count(DECISIONS, _DECISION_COUNTERS, str(decision.action))

    # -- the scheduler: releasing holds and digests ---------------------------------------------

    def _rebuild_index(self) -> None:
        self.index.clear()
        for _p, key, holds in self.holds_store.items():
            self.index.set(key.decode(), holds.next_due())
        HELD_USERS.set(len(self.index))

    async def punctuate(self, out: Output) -> None:
        """Release every hold and digest that is due on the partitions this replica owns."""
        self.scheduled.announce(out)
        due = self.index.next_due()
        if due is None or due > to_micros(utcnow()):
            return
        now = utcnow()
        now_us = to_micros(now)
        owned = self.owned
        users = self.index.pop_due(now_us, lambda u: self._partition(u) in owned)
        if not users:
            return
        await self.privacy.prepare(users)
        batch = _Batch()
        for user in users:
            try:
                self._release_user(user, batch, now)
            except Exception as exc:  # never let the timer die
                log.exception("releasing holds failed", user_id=user)
                self._dead_letter_due(user, batch, now_us, exc)
            # Whatever stays held (not yet due, or held again) is indexed on commit.
            self._holds(user, batch)
        await self._apply(batch, out)

    def _dead_letter_due(self, user: str, batch: _Batch, now_us: int, exc: Exception) -> None:
        """A bug while releasing: the user's due holds go to the dlq, not round the timer again.

        The user's half-done changes are discarded; each due request becomes a
        dead letter (redriving it routes it afresh: it is no longer "seen").
        """
        key = user.encode()
        partition = key_partition(key, self.partitions)
        batch.holds.pop(user, None)
        batch.states.pop(user, None)
        holds = self._holds(user, batch)
        state = self._state(user, batch)
        for hold in [h for h in holds.requests.values() if h.due <= now_us]:
            del holds.requests[hold.request_id]
            state.seen.pop(hold.request_id, None)
            batch.letters.append(
                _Letter(self.requests_topic, partition, -1, key, hold.request, exc, [])
            )
        for category in [c for c, d in holds.digests.items() if d.due <= now_us]:
            buffer = self.privacy.open_digest(user, holds.digests.pop(category))
            record = digest_.digest_request(user, buffer, from_micros(now_us))
            value = self.requests.encode(self.privacy.seal_request(record))
            batch.letters.append(_Letter(self.requests_topic, partition, -1, key, value, exc, []))

    def _release_user(self, user: str, batch: _Batch, now: datetime) -> None:
        now_us = to_micros(now)
        holds = self._holds(user, batch)
        prefs = self._prefs(user, batch)
        state = self._state(user, batch)
        state.prune(now.timestamp(), prefs, self.policy.max_seen)
        partition = key_partition(user.encode(), self.partitions)
        for hold in sorted(holds.requests.values(), key=lambda h: h.due):
            if hold.due > now_us:
                continue
            del holds.requests[hold.request_id]
            RELEASE_DELAY.observe((now_us - hold.due) / 1e6)
            letter = _Letter(
                self.requests_topic, partition, -1, user.encode(), hold.request, "", []
            )
            try:
                request = self.privacy.open_request(
                    Request.from_record(self.requests.decode_record(hold.request))
                )
            except (DecodeError, InvalidRequest, SealedDataUnreadable) as exc:
                letter.error = f"held request does not decode: {exc}"
                batch.letters.append(letter)
                continue
            with correlation(request.correlation_id):
                outcome = decide(
                    request,
                    prefs,
                    state,
                    now,
                    self.policy,
                    release=True,
                    bypass_caps=hold.bypass_caps,
                )
                work = _Work(
                    request,
                    prefs,
                    state,
                    batch,
                    now,
                    letter,
                    f"release.{hold.reason}",
                    hold.bypass_caps,
                )
                self._execute(work, outcome)
        for category, buffer in sorted(holds.digests.items()):
            if buffer.due > now_us:
                continue
            del holds.digests[category]
            RELEASE_DELAY.observe((now_us - buffer.due) / 1e6)
            record = digest_.digest_request(user, self.privacy.open_digest(user, buffer), now)
            try:
                encoded = self.requests.encode(self.privacy.seal_request(record))
            except EncodeError as exc:
                batch.letters.append(
                    _Letter(self.requests_topic, partition, -1, user.encode(), None, exc, [])
                )
                continue
            letter = _Letter(self.requests_topic, partition, -1, user.encode(), encoded, "", [])
            with correlation(None) as cid:
                record["correlation_id"] = cid
                request = Request.from_record(record)
                outcome = decide(
                    request, prefs, state, now, self.policy, release=True, bypass_caps=True
                )
                work = _Work(request, prefs, state, batch, now, letter, "digest", True)
                self._execute(work, outcome, extra={"digest_items": str(buffer.total)})


async def run(ctx: ServiceContext) -> None:
    router = Router(ctx)
    engine = StreamEngine(
        ctx.settings,
        ctx.role,
        ["notify.requests", "notify.preferences", "notify.scheduled.commands"],
        router,
        ctx.health,
        guarantee="exactly_once",
        stores=router.stores,
        batch_size=ctx.settings.router_batch_size,
        batch_wait=ctx.settings.router_batch_ms / 1000,
        punctuate_every=ctx.settings.router_tick_seconds,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await router.privacy.close()
