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

A shell: it decodes at the edge, asks :func:`finstream.domain.notify.plan.plan`
what a request does (messages, holds, digest folds, audit events: data) and
applies the effects, sealed (:mod:`~finstream.agents.router_privacy`) and encoded.
Outputs, dead letters, the stores' changelogs and the input offsets commit in
one Kafka transaction, so a replica killed anywhere comes back with the state
of its last commit and routes what followed again; what it had published
since was aborted and is never seen by read_committed consumers. The release
of held requests and digests (every ``router_tick_seconds``) runs between
batches, in the same transactions.

The router keeps preferences in its own store only: the Redis read model
(:class:`~finstream.stores.read_models.PreferencesStore`) is the statestore
role's (:mod:`finstream.agents.statestore`), from the same topic.

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

import contextlib
import logging
from datetime import datetime
from typing import Any

from finstream.agents.router_batch import (
    DECISIONS,
    FORWARDED,
    HELD_USERS,
    MESSAGES,
    RELEASE_DELAY,
    Batch,
    Letter,
    Out,
    StoredPrefs,
    count,
    policy_from_settings,
    preferences_change,
)
from finstream.agents.router_privacy import RouterPrivacy, SealedDataUnreadable
from finstream.agents.scheduled import ScheduleControl
from finstream.codec import DecodeError, EncodeError
from finstream.domain.notify import digest as digest_
from finstream.domain.notify.due import DueIndex
from finstream.domain.notify.plan import Effects, due_digests, due_requests, plan
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.preferences_view import Preferences
from finstream.domain.notify.request import InvalidRequest, Request
from finstream.domain.notify.routing import contact_channels
from finstream.domain.notify.routing_state import Hold, Holds, UserState
from finstream.domain.partitioning import key_partition
from finstream.domain.time import from_micros, to_micros, utcnow
from finstream.runtime.engine import StreamEngine
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import correlation, correlation_from_headers, get_logger
from finstream.runtime.state import Store
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.stores.templates import load_templates
from finstream.topics import contract

log = get_logger(__name__)
# Checked before a debug line's fields are built: building them and letting structlog
# drop the line cost 3-5 us a request at INFO, measured alone.
_DEBUG = logging.getLogger(__name__)


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
        batch = Batch()
        # privacy: users' keys load a chunk ahead, while the chunk before is routed
        async with contextlib.aclosing(self.privacy.runs(events, self._requester)) as ready:
            async for run in ready:
                for ev in run:
                    self._event(ev, batch)
        await self._apply(batch, out)

    def _requester(self, ev: Event) -> str | None:
        return ev.item.user_id if ev.topic == self.requests_topic and ev.item else None

    def _event(self, ev: Event, batch: Batch) -> None:
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
                Letter(ev.topic, ev.partition, ev.offset, ev.key, ev.value, exc, headers)
            )

    def _forward(self, ev: Event, headers: list[tuple[str, bytes]], batch: Batch) -> bool:
        if ev.key is None:
            return False
        home = key_partition(ev.key, self.partitions)
        if home == ev.partition:
            return False
        batch.outputs.append(Out(ev.topic, ev.key, ev.value, headers, home))
        FORWARDED.labels(ev.topic).inc()
        return True

    async def _apply(self, batch: Batch, out: Output) -> None:
        """Outputs and state changes into the open transaction."""
        for o in batch.outputs:
            out.produce(o.topic, o.key, o.value, o.headers, o.partition)
        for letter in batch.letters:
            letter.produce(out)
        self.scheduled.publish(batch, out)  # before the stores change: it compares with them
        self._write_state(batch)

    def _write_state(self, batch: Batch) -> None:
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

    # -- preferences ----------------------------------------------------------------------------

    def _preferences(self, ev: Event, headers: list[tuple[str, bytes]], batch: Batch) -> None:
        letter = Letter(ev.topic, ev.partition, ev.offset, ev.key, ev.value, "", headers)
        user = ev.key.decode("utf-8", "replace") if ev.key is not None else None
        current = self._stored_prefs(user, batch) if user is not None else None
        preferences_change(ev, letter, current, self.prefs_contract, batch)

    def _stored_prefs(self, user: str, batch: Batch) -> StoredPrefs | None:
        if user in batch.prefs:
            return batch.prefs[user]
        return self.prefs_store.get(self._partition(user), user.encode())

    def _prefs(self, user: str, batch: Batch) -> Preferences:
        stored = self._stored_prefs(user, batch)
        if stored is None:
            return Preferences.default(user)
        try:
            return stored.prefs
        except DecodeError:
            log.error("stored preferences do not decode; using defaults", user_id=user)
            return Preferences.default(user)

    def _state(self, user: str, batch: Batch) -> UserState:
        """The user's state in this batch, to change in place (a copy of the stored one)."""
        state = batch.states.get(user)
        if state is None:
            stored = self.state_store.get(self._partition(user), user.encode())
            state = stored.copy() if stored is not None else UserState()
            batch.states[user] = state
        return state

    def _state_view(self, user: str, batch: Batch) -> UserState:
        """The user's state to read (plan copies what it changes)."""
        state = batch.states.get(user)
        if state is None:
            state = self.state_store.get(self._partition(user), user.encode()) or UserState()
        return state

    def _holds(self, user: str, batch: Batch) -> Holds:
        holds = batch.holds.get(user)
        if holds is None:
            stored = self.holds_store.get(self._partition(user), user.encode())
            holds = stored.copy() if stored is not None else Holds()
            batch.holds[user] = holds
        return holds

    # -- requests -------------------------------------------------------------------------------

    def _request(self, ev: Event, headers: list[tuple[str, bytes]], batch: Batch) -> None:
        letter = Letter(ev.topic, ev.partition, ev.offset, ev.key, ev.value, "", headers)
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
                request = request.with_correlation(cid)
            # privacy: nothing of an erased user is routed again; sealed data opens to render
            erased = self.privacy.erased(request.user_id)
            if not erased:
                request = self.privacy.open_request(request)
            self._plan(request, batch, letter, now=utcnow(), erased=erased)

    def _plan(
        self,
        request: Request,
        batch: Batch,
        letter: Letter,
        *,
        now: datetime,
        phase: str = "intake",
        release: bool = False,
        bypass_caps: bool = False,
        erased: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        """Plan one request (see :func:`~finstream.domain.notify.plan.plan`) and apply it."""
        user = request.user_id
        state = self._state_view(user, batch)
        if erased:
            prefs = Preferences.default(user)  # never opened: the keys are gone
        else:
            # privacy: contacts opened in memory only, those of the channels it may use
            stored = self._prefs(user, batch)
            prefs = self.privacy.open_prefs(stored, contact_channels(request, stored, self.policy))
        fx = plan(
            request,
            prefs,
            state,
            self._holds_view(user, batch),
            now=now,
            policy=self.policy,
            templates=self.templates,
            phase=phase,
            release=release,
            bypass_caps=bypass_caps,
            erased=erased,
            extra=extra,
        )
        self._effects(fx, batch, letter)
        if fx.state is not state:  # after the effects: a bug applying them changes no state
            batch.states[user] = fx.state

    def _holds_view(self, user: str, batch: Batch) -> Holds:
        holds = batch.holds.get(user)
        if holds is None:
            holds = self.holds_store.get(self._partition(user), user.encode()) or Holds()
        return holds

    def _effects(self, fx: Effects, batch: Batch, letter: Letter) -> None:
        """Seal, encode and collect what a plan does; the batch applies it on commit."""
        request = fx.request
        user = request.user_id
        if fx.dead_letter is not None:
            letter.error = fx.dead_letter
            batch.letters.append(letter)
            log.warning(
                "request dropped", request_id=request.request_id, reason=str(fx.dead_letter)[:300]
            )
        if fx.holds or fx.folds:
            holds = self._holds(user, batch)
            for h in fx.holds:
                value = self.requests.encode(self.privacy.seal_request(h.record))
                holds.requests[h.request_id] = Hold(
                    h.request_id, h.due, h.reason, value, h.bypass_caps
                )
            for category, buffer in fx.folds.items():
                holds.digests[category] = buffer
                self.privacy.seal_digest_item(user, buffer)
        key = user.encode()
        cid_header = correlation_header(request.correlation_id)
        for m in fx.messages:
            outbound = self.outbound[m.channel]
            value = outbound.encode(self.privacy.seal_message(m.message))
            batch.outputs.append(Out(outbound.name, key, value, cid_header))
            count(MESSAGES, m.channel)
        for a in fx.audits:
            batch.outputs.append(Out(self.audit_topic, key, self.audit.encode(a.event), cid_header))
            count(DECISIONS, str(a.decision.action))
        if fx.dead_letter is None and not fx.folds and _DEBUG.isEnabledFor(logging.DEBUG):
            log.debug(
                "request routed" if fx.messages else "request decided",
                request_id=request.request_id,
                user_id=user,
                actions=",".join(fx.decisions),
                channels=",".join(fx.sent),
                phase=fx.phase,
            )

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
        batch = Batch()
        for user in users:
            try:
                self._release_user(user, batch, now)
            except Exception as exc:  # never let the timer die
                log.exception("releasing holds failed", user_id=user)
                self._dead_letter_due(user, batch, now_us, exc)
            # Whatever stays held (not yet due, or held again) is indexed on commit.
            self._holds(user, batch)
        await self._apply(batch, out)

    def _dead_letter_due(self, user: str, batch: Batch, now_us: int, exc: Exception) -> None:
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
                Letter(self.requests_topic, partition, -1, key, hold.request, exc, [])
            )
        for category in [c for c, d in holds.digests.items() if d.due <= now_us]:
            buffer = self.privacy.open_digest(user, holds.digests.pop(category))
            record = digest_.digest_request(user, buffer, from_micros(now_us))
            value = self.requests.encode(self.privacy.seal_request(record))
            batch.letters.append(Letter(self.requests_topic, partition, -1, key, value, exc, []))

    def _release_user(self, user: str, batch: Batch, now: datetime) -> None:
        now_us = to_micros(now)
        key = user.encode()
        partition = key_partition(key, self.partitions)
        released, batch.holds[user] = due_requests(self._holds(user, batch), now_us)
        for hold in released:
            RELEASE_DELAY.observe((now_us - hold.due) / 1e6)
            letter = Letter(self.requests_topic, partition, -1, key, hold.request, "", [])
            try:
                request = self.privacy.open_request(
                    Request.from_record(self.requests.decode_record(hold.request))
                )
            except (DecodeError, InvalidRequest, SealedDataUnreadable) as exc:
                letter.error = f"held request does not decode: {exc}"
                batch.letters.append(letter)
                continue
            with correlation(request.correlation_id):
                self._plan(
                    request,
                    batch,
                    letter,
                    now=now,
                    phase=f"release.{hold.reason}",
                    release=True,
                    bypass_caps=hold.bypass_caps,
                )
        # After the requests: one released into a due digest's category joins it.
        digests, batch.holds[user] = due_digests(self._holds(user, batch), now_us)
        for buffer in digests:
            RELEASE_DELAY.observe((now_us - buffer.due) / 1e6)
            record = digest_.digest_request(user, self.privacy.open_digest(user, buffer), now)
            try:
                encoded = self.requests.encode(self.privacy.seal_request(record))
            except EncodeError as exc:
                batch.letters.append(Letter(self.requests_topic, partition, -1, key, None, exc, []))
                continue
            letter = Letter(self.requests_topic, partition, -1, key, encoded, "", [])
            with correlation(None) as cid:
                record["correlation_id"] = cid
                self._plan(
                    Request.from_record(record),
                    batch,
                    letter,
                    now=now,
                    phase="digest",
                    release=True,
                    bypass_caps=True,
                    extra={"digest_items": str(buffer.total)},
                )


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
