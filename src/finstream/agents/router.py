"""Router: notify.requests + notify.preferences -> notify.outbound.<channel> and audit.events.

One consumer (group ``<namespace>finstream-router``) reads both topics, keyed
by user id and co-partitioned (range assignment: partition p of both topics
goes to the same replica), in batches. Per user it keeps, in changelog-backed
stores (:mod:`finstream.agents.router_state`):

* ``prefs``  the latest UserPreferences (Avro bytes);
* ``state``  dedupe ids, collapse windows, the send log for caps (JSON);
* ``holds``  held requests and open digests, released by time (JSON).

Each request goes through :func:`finstream.domain.routing.decide`; the
decision is rendered (:mod:`finstream.domain.templates`), published as one
OutboundMessage per channel and contact, and audited on ``audit.events``.
Consuming a preferences record also updates the Redis read model
(:class:`~finstream.sinks.state_store.PreferencesStore`).

Exactly once, as far as the user can tell. A batch goes: publish its outputs
(messages, audit events, dead letters) and wait for the broker; then write
its state changes to the changelogs and wait; then commit the input offsets.
A crash before the outputs land re-routes the batch; a crash after them but
before the state re-publishes messages with the same ``message_id``
(request, channel, contact), which the delivery workers send once; a crash
after the state only finds duplicates. The release timer (holds and digests)
runs under the same lock, in the same order.

Co-partitioning: state lives in the changelog partition that Kafka's
default (murmur2) partitioner gives the user id. A record that arrives on
another partition (its producer used another partitioner, e.g. librdkafka's
default crc32) is forwarded once to its home partition and handled there.

Why not a faust agent and faust tables (the foundation's router was one):
in the SIGKILL-and-restart test, faust-streaming 0.15.3's consumer, right
after table recovery, handed the agent offset 193 after offset 127 on every
partition at once (same generation), and its gap tracking then committed
past the records it never delivered: requests were lost (faust-streaming
issues #216 "Recovery ... resumes from kafka before seeking to committed
offsets" and #606 "Wrong offset commit in case of gaps" describe the same
class of bug). A plain aiokafka consumer that commits after the batch is
done has no such path. The role still detects skipped offsets
(``finstream_router_skipped_offsets_total``), which must stay 0.

Nothing escapes a batch: undecodable or invalid input, a template that
cannot render (a missing variable) and any unexpected error become dead
letters with the reason (and, for requests, a ``dropped`` audit event).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, RebalanceInProgressError
from prometheus_client import Counter, Gauge, Histogram

from finstream.agents.router_state import ChangelogStore, ensure_changelogs, key_partition, restore
from finstream.agents.scheduler import DueIndex
from finstream.codec import DecodeError, EncodeError
from finstream.domain import digest as digest_
from finstream.domain.preferences import CHANNELS, Preferences
from finstream.domain.resilience import Backoff
from finstream.domain.routing import (
    Action,
    Composed,
    Decision,
    Hold,
    Holds,
    InvalidRequest,
    Outcome,
    Policy,
    Request,
    UserState,
    audit_event,
    compose,
    decide,
    remember,
    select_channels,
)
from finstream.domain.templates import ChannelNotAvailable, TemplateError
from finstream.domain.time import from_micros, to_micros, utcnow
from finstream.runtime.consumer import consumer_config
from finstream.runtime.kafka import AiokafkaPublisher, DeadLetters, correlation_header
from finstream.runtime.logging import correlation, correlation_from_headers, get_logger
from finstream.runtime.metrics import CONSUMER_LAG, EVENTS_IN, PROCESSING_SECONDS
from finstream.runtime.worker import ServiceContext
from finstream.settings import Settings
from finstream.templating import load_templates
from finstream.topics import load_catalogue

log = get_logger(__name__)

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
PUBLISH_RETRIES = Counter(
    "finstream_router_publish_retries_total", "Batches whose outputs had to be published again"
)

SKIPPED_OFFSETS = Counter(
    "finstream_router_skipped_offsets_total",
    "Offsets of notify.requests the consumer jumped over (should stay 0; see Router._track)",
    ["partition"],
)
STATE_ERRORS = Counter(
    "finstream_router_state_errors_total", "Batches whose routing state could not be written"
)

PREFS_CACHE_SIZE = 20_000


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
    """Everything one batch (or one release tick) changes, applied in order at the end."""

    outputs: list[_Out] = field(default_factory=list)
    letters: list[_Letter] = field(default_factory=list)
    states: dict[str, UserState] = field(default_factory=dict)
    holds: dict[str, Holds] = field(default_factory=dict)
    prefs: dict[str, bytes | None] = field(default_factory=dict)  # None: forgotten
    forgotten: set[str] = field(default_factory=set)
    redis_ops: list[tuple[str, bytes | None, _Letter]] = field(default_factory=list)


class Router:
    def __init__(self, ctx: ServiceContext, publisher: AiokafkaPublisher) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.settings = settings
        self.codec = ctx.codec
        self.policy = policy_from_settings(settings)
        self.templates = load_templates(settings)
        catalogue = load_catalogue()
        self.requests_topic = settings.topic("notify.requests")
        self.prefs_topic = settings.topic("notify.preferences")
        self.audit_topic = settings.topic("audit.events")
        self.partitions = catalogue.get("notify.requests").partitions
        if catalogue.get("notify.preferences").partitions != self.partitions:
            raise ValueError("notify.requests and notify.preferences must have equal partitions")
        self._topic_partitions = {
            self.requests_topic: self.partitions,
            self.prefs_topic: self.partitions,
        }
        group = settings.group(ctx.role)
        self.prefs_store = ChangelogStore("prefs", f"{group}-prefs-changelog", self.partitions)
        self.state_store = ChangelogStore("state", f"{group}-state-changelog", self.partitions)
        self.holds_store = ChangelogStore("holds", f"{group}-holds-changelog", self.partitions)
        self.stores = (self.prefs_store, self.state_store, self.holds_store)
        self.publisher = publisher
        self.dead_letters = DeadLetters(publisher, settings, ctx.role)
        self.lock = asyncio.Lock()
        self.index = DueIndex()
        self.owned: set[int] = set()
        self._prefs_cache: dict[str, tuple[bytes, Preferences]] = {}
        self._store: Any = None
        self._backoff = Backoff(base=0.2, cap=5.0)
        self._positions: dict[int, int] = {}

    # -- partitions: restore on assignment, drop on revocation --------------------------------

    async def assigned(self, partitions: set[int]) -> None:
        async with self.lock:
            started = time.perf_counter()
            for store in self.stores:
                store.drop(store.loaded - partitions)
            new = partitions - self.prefs_store.loaded
            read = await restore(self.settings, self.stores, new)
            self.owned = set(partitions)
            self._positions = {p: o for p, o in self._positions.items() if p in partitions}
            self._prefs_cache.clear()
            self._rebuild_index()
            log.info(
                "partitions assigned",
                partitions=sorted(partitions),
                restored=sorted(new),
                records=read,
                seconds=round(time.perf_counter() - started, 3),
                held_users=len(self.index),
            )

    async def revoked(self) -> None:
        async with self.lock:
            # Kept until the next assignment says which partitions stay ours.
            self.owned = set()

    # -- batches ------------------------------------------------------------------------------

    async def handle(self, records: Sequence[Any]) -> None:
        """Route one batch of records; never raises (except on cancellation)."""
        started = time.perf_counter()
        async with self.lock:
            batch = _Batch()
            for msg in records:
                EVENTS_IN.labels(self.ctx.role, msg.topic).inc()
                self._track(msg)
                headers = [(k, bytes(v or b"")) for k, v in (msg.headers or ())]
                try:
                    if self._forward(msg, headers, batch):
                        continue
                    if msg.topic == self.prefs_topic:
                        self._preferences(msg, headers, batch)
                    else:
                        self._request(msg, headers, batch)
                except Exception as exc:  # a bug must not stall the partition
                    log.exception("routing failed", topic=msg.topic, offset=msg.offset)
                    batch.letters.append(
                        _Letter(
                            msg.topic, msg.partition, msg.offset, msg.key, msg.value, exc, headers
                        )
                    )
            await self._commit(batch)
        PROCESSING_SECONDS.labels(self.ctx.role, "batch").observe(time.perf_counter() - started)

    def _track(self, msg: Any) -> None:
        """Notice when the consumer hands us a requests offset past one it never gave us.

        notify.requests is neither compacted nor transactional, so its offsets
        have no holes: a jump means records were skipped (faust's consumer did
        so; see the module notes). Positions are forgotten on reassignment.
        """
        if msg.topic != self.requests_topic:
            return
        last = self._positions.get(msg.partition)
        if last is not None and msg.offset > last + 1:
            SKIPPED_OFFSETS.labels(str(msg.partition)).inc(msg.offset - last - 1)
            log.error(
                "consumer skipped offsets", partition=msg.partition, after=last, offset=msg.offset
            )
        elif last is not None and msg.offset <= last:
            log.info("consumer went back", partition=msg.partition, after=last, offset=msg.offset)
        self._positions[msg.partition] = msg.offset

    def _forward(self, msg: Any, headers: list[tuple[str, bytes]], batch: _Batch) -> bool:
        if msg.key is None:
            return False
        partitions = self._topic_partitions.get(msg.topic, self.partitions)
        home = key_partition(msg.key, partitions)
        if home == msg.partition:
            return False
        batch.outputs.append(_Out(msg.topic, msg.key, msg.value, headers, home))
        FORWARDED.labels(msg.topic).inc()
        return True

    async def _commit(self, batch: _Batch) -> None:
        """Publish, wait for the broker, then write state and wait: never the other way round."""
        await self._publish(batch)
        try:
            writes = self._write_state(batch)
        except Exception:
            # The outputs are out; without the state a replay re-sends them
            # with the same ids (harmless downstream).
            STATE_ERRORS.inc()
            log.exception("writing routing state failed")
            writes = []
        if writes:
            await self._publish(_Batch(outputs=writes))
        if batch.redis_ops:
            await self._update_read_model(batch.redis_ops)

    async def _publish(self, batch: _Batch) -> None:
        attempt = 0
        while True:
            try:
                for out in batch.outputs:
                    await self.publisher.send(
                        out.topic, out.key, out.value, out.headers, out.partition
                    )
                for letter in batch.letters:
                    await self._dead_letter(letter)
                await self.publisher.flush()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Everything is re-sent: message and event ids make that harmless.
                attempt += 1
                PUBLISH_RETRIES.inc()
                log.warning("publishing a batch failed; retrying", attempt=attempt, error=str(exc))
                await asyncio.sleep(self._backoff.delay(attempt))

    def _write_state(self, batch: _Batch) -> list[_Out]:
        """Apply the batch's state changes in memory; return their changelog records."""
        writes: list[_Out] = []

        def put(store: ChangelogStore, user: str, value: bytes | None) -> None:
            key = user.encode()
            if value is None and store.get(key) is None:
                return
            partition = store.put(key, value)
            writes.append(_Out(store.topic, key, value, [], partition))

        for user, raw in batch.prefs.items():
            put(self.prefs_store, user, raw)
        for user, state in batch.states.items():
            if user not in batch.forgotten:
                put(self.state_store, user, state.to_bytes())
        for user, holds in batch.holds.items():
            if holds.empty() or user in batch.forgotten:
                put(self.holds_store, user, None)
                self.index.set(user, None)
            else:
                put(self.holds_store, user, holds.to_bytes())
                self.index.set(user, holds.next_due())
        for user in batch.forgotten:
            put(self.state_store, user, None)
            put(self.holds_store, user, None)
            self.index.set(user, None)
        HELD_USERS.set(len(self.index))
        return writes

    async def _dead_letter(self, letter: _Letter) -> None:
        await self.dead_letters.send(
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

    async def _update_read_model(self, ops: list[tuple[str, bytes | None, _Letter]]) -> None:
        from finstream.sinks.redis_client import connect
        from finstream.sinks.state_store import PreferencesStore

        if self._store is None:
            self._store = PreferencesStore(connect(self.settings), self.settings, self.codec)
        failed: list[_Letter] = []

        async def apply(user: str, raw: bytes | None, letter: _Letter) -> None:
            for attempt in range(1, 4):
                try:
                    if raw is None:
                        await self._store.delete(user)
                    else:
                        await self._store.put(user, raw)
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
        if failed:
            await self._publish(_Batch(letters=failed))

    # -- preferences ----------------------------------------------------------------------------

    def _preferences(self, msg: Any, headers: list[tuple[str, bytes]], batch: _Batch) -> None:
        letter = _Letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, "", headers)
        if msg.key is None:
            letter.error = "preferences record without a key (the key is the user id)"
            letter.error_class = "InvalidKey"
            batch.letters.append(letter)
            return
        user = msg.key.decode("utf-8", "replace")
        if msg.value is None:
            # A tombstone forgets the user: preferences, routing state, holds.
            batch.prefs[user] = None
            batch.forgotten.add(user)
            batch.states.pop(user, None)
            batch.holds.pop(user, None)
            self._prefs_cache.pop(user, None)
            batch.redis_ops.append((user, None, letter))
            log.info("preferences forgotten", user_id=user)
            return
        try:
            record = self.codec.decode(msg.value, "UserPreferences")
        except DecodeError as exc:
            letter.error = exc
            batch.letters.append(letter)
            return
        if record["user_id"] != user:
            letter.error = f"key {user!r} does not match user_id {record['user_id']!r}"
            letter.error_class = "InvalidKey"
            batch.letters.append(letter)
            return
        current = self._prefs_bytes(user, batch)
        if current is not None:
            try:
                newer = self.codec.decode(current, "UserPreferences")["updated_at"]
            except DecodeError:
                newer = None
            if newer is not None and newer > record["updated_at"]:
                log.info("older preferences ignored", user_id=user)
                return
        batch.prefs[user] = msg.value
        batch.forgotten.discard(user)
        self._prefs_cache[user] = (msg.value, Preferences.from_record(record))
        batch.redis_ops.append((user, msg.value, letter))

    def _prefs_bytes(self, user: str, batch: _Batch) -> bytes | None:
        if user in batch.prefs:
            return batch.prefs[user]
        return self.prefs_store.get(user.encode())

    def _prefs(self, user: str, batch: _Batch) -> Preferences:
        raw = self._prefs_bytes(user, batch)
        if raw is None:
            return Preferences.default(user)
        cached = self._prefs_cache.get(user)
        if cached is not None and cached[0] == raw:
            return cached[1]
        try:
            prefs = Preferences.from_record(self.codec.decode(raw, "UserPreferences"))
        except DecodeError:
            log.error("stored preferences do not decode; using defaults", user_id=user)
            return Preferences.default(user)
        if len(self._prefs_cache) >= PREFS_CACHE_SIZE:
            self._prefs_cache.pop(next(iter(self._prefs_cache)))
        self._prefs_cache[user] = (raw, prefs)
        return prefs

    def _state(self, user: str, batch: _Batch) -> UserState:
        state = batch.states.get(user)
        if state is None:
            state = UserState.from_bytes(self.state_store.get(user.encode()))
            batch.states[user] = state
        return state

    def _holds(self, user: str, batch: _Batch) -> Holds:
        holds = batch.holds.get(user)
        if holds is None:
            holds = Holds.from_bytes(self.holds_store.get(user.encode()))
            batch.holds[user] = holds
        return holds

    # -- requests -------------------------------------------------------------------------------

    def _request(self, msg: Any, headers: list[tuple[str, bytes]], batch: _Batch) -> None:
        letter = _Letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, "", headers)
        try:
            record = self.codec.decode(msg.value, "NotificationRequest")
            request = Request.from_record(record)
        except (DecodeError, InvalidRequest) as exc:
            letter.error = exc
            batch.letters.append(letter)
            return
        if msg.key is not None and msg.key != request.user_id.encode():
            letter.error = f"key does not match user_id {request.user_id!r}"
            letter.error_class = "InvalidKey"
            batch.letters.append(letter)
            return
        cid = request.correlation_id or correlation_from_headers(headers)
        with correlation(cid) as cid:
            if request.correlation_id is None:
                record["correlation_id"] = cid
                request = Request.from_record(record)
            now = utcnow()
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
                    prefs,
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
                self.codec.encode("NotificationRequest", held),
                work.bypass_caps,
            )
        sent = [c for c in CHANNELS if any(m.channel == c for m in messages)]
        remember(outcome, request, state, now, self.policy, sent=sent)
        key = user.encode()
        cid_header = correlation_header(request.correlation_id)
        for m in messages:
            batch.outputs.append(
                _Out(
                    self.settings.topic(f"notify.outbound.{m.channel}"),
                    key,
                    self.codec.encode("OutboundMessage", m.message),
                    cid_header,
                )
            )
            MESSAGES.labels(m.channel).inc()
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
                self.codec.encode("AuditEvent", event),
                correlation_header(request.correlation_id),
            )
        )
        DECISIONS.labels(str(decision.action)).inc()

    # -- the scheduler: releasing holds and digests ---------------------------------------------

    def _rebuild_index(self) -> None:
        self.index.clear()
        for key, raw in self.holds_store.items():
            try:
                holds = Holds.from_bytes(raw)
            except (ValueError, KeyError, TypeError):
                log.error("held state does not decode", user_id=key.decode("utf-8", "replace"))
                continue
            self.index.set(key.decode(), holds.next_due())
        HELD_USERS.set(len(self.index))

    async def release_due(self) -> None:
        """Release every hold and digest that is due on the partitions this replica owns."""
        due = self.index.next_due()
        if due is None or due > to_micros(utcnow()):
            return
        async with self.lock:
            now = utcnow()
            now_us = to_micros(now)
            owned = self.owned
            users = self.index.pop_due(
                now_us, lambda u: key_partition(u.encode(), self.partitions) in owned
            )
            if not users:
                return
            batch = _Batch()
            for user in users:
                try:
                    self._release_user(user, batch, now)
                except Exception as exc:  # never let the timer die
                    log.exception("releasing holds failed", user_id=user)
                    self._dead_letter_due(user, batch, now_us, exc)
                # Whatever stays held (not yet due, or held again) is indexed on commit.
                self._holds(user, batch)
            await self._commit(batch)

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
            buffer = holds.digests.pop(category)
            value = self.codec.encode(
                "NotificationRequest", digest_.digest_request(user, buffer, from_micros(now_us))
            )
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
                request = Request.from_record(
                    self.codec.decode(hold.request, "NotificationRequest")
                )
            except (DecodeError, InvalidRequest) as exc:
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
            record = digest_.digest_request(user, buffer, now)
            try:
                encoded = self.codec.encode("NotificationRequest", record)
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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self._router = router

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._router.ctx.health.set_ready(False, "rebalancing")
        await self._router.revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        router = self._router
        await router.assigned(
            {tp.partition for tp in assigned if tp.topic == router.requests_topic}
        )
        router.ctx.health.set_ready(True, "")


async def _ticker(router: Router, stop: asyncio.Event) -> None:
    interval = router.settings.router_tick_seconds
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        if stop.is_set():
            return
        try:
            await router.release_due()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("release tick failed")


async def _report_lag(consumer: AIOKafkaConsumer, role: str) -> None:
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        position = await consumer.position(tp)
        CONSUMER_LAG.labels(role, tp.topic, str(tp.partition)).set(max(highwater - position, 0))


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    publisher = await ctx.publisher()
    router = Router(ctx, publisher)
    await ensure_changelogs(settings, router.stores)
    consumer = AIOKafkaConsumer(
        **{
            **consumer_config(settings, settings.group(ctx.role)),
            # Range assignment gives partition p of both topics to one replica:
            # a user's requests and preferences meet where the user's state is.
            "partition_assignment_strategy": (RangePartitionAssignor,),
        }
    )
    consumer.subscribe([router.requests_topic, router.prefs_topic], listener=_Rebalance(router))
    await consumer.start()
    ticker = asyncio.create_task(_ticker(router, ctx.stop))
    last_lag = 0.0
    log.info("routing", topics=[router.requests_topic, router.prefs_topic])
    try:
        while not ctx.stop.is_set():
            batches = await consumer.getmany(
                timeout_ms=settings.router_batch_ms, max_records=settings.router_batch_size
            )
            records = [r for tp_records in batches.values() for r in tp_records]
            if records:
                await router.handle(records)
                offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items() if recs}
                try:
                    await consumer.commit(offsets)
                except (CommitFailedError, RebalanceInProgressError) as exc:
                    # The partitions moved on; their new owner reads the batch
                    # again, and finds the state that says what was done.
                    log.warning("commit failed after rebalance", error=str(exc))
            if time.monotonic() - last_lag > 5.0:
                last_lag = time.monotonic()
                await _report_lag(consumer, ctx.role)
    finally:
        ctx.health.set_ready(False, "stopping")
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await consumer.stop()
