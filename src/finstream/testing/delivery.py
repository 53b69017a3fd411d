"""The ``deliveries`` state in memory: the twin of the delivery store, for unit tests.

:class:`MemoryStore` keeps the PostgreSQL store's contract
(:class:`~finstream.sinks.delivery.records.DeliveryStorePort`, implemented by
:class:`~finstream.sinks.delivery.store.DeliveryStore`) with the same
conditions: a row moves only for the worker that holds its claim in the state
it expects, or :class:`~finstream.sinks.delivery.records.LostClaim` is raised.
Hand it to :class:`~finstream.sinks.delivery.engine.DeliveryEngine` as
``store=`` to run the engine's real intake, dispatch and reconciliation with
fake providers and without PostgreSQL; the integration tests keep the SQL
honest. Each row keeps the ``history`` of its states, for assertions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from finstream.domain.delivery.lifecycle import (
    ACTIVE_STATES,
    FINAL_STATES,
    REOPENABLE_STATES,
    State,
    Transition,
)
from finstream.domain.time import utcnow
from finstream.sinks.delivery.records import (
    Job,
    LostClaim,
    NewDelivery,
    OutboxRecord,
    Publish,
    ResultRow,
)
from finstream.sinks.delivery.redrive import REOPENED, refusal


@dataclass
class Row:
    """One ``deliveries`` row, with the columns the engine reads or the store sets."""

    new: NewDelivery
    state: str
    next_attempt_at: datetime
    claim_token: uuid.UUID | None = None
    lease_until: datetime | None = None
    attempts: int = 0
    rounds: int = 0
    provider: str | None = None
    provider_message_id: str | None = None
    sending_at: datetime | None = None
    last_error_class: str | None = None
    last_error: str | None = None
    finished_at: datetime | None = None
    history: list[str] = field(default_factory=list)  # every state it was in, in order


class MemoryStore:
    """A :class:`~finstream.sinks.delivery.records.DeliveryStorePort` in memory."""

    def __init__(self, lease_seconds: float = 30.0, clock: Callable[[], datetime] = utcnow):
        self.lease = lease_seconds
        self.clock = clock
        self.rows: dict[str, Row] = {}
        self.results: list[ResultRow] = []
        self.outbox: list[OutboxRecord] = []

    # -- helpers for tests -----------------------------------------------------------
    def state(self, message_id: str) -> str | None:
        row = self.rows.get(message_id)
        return row.state if row else None

    def _move(self, row: Row, state: str) -> None:
        row.state = str(state)
        row.history.append(row.state)

    def _job(self, row: Row) -> Job:
        new = row.new
        assert row.claim_token is not None
        return Job(
            message_id=new.message_id,
            token=row.claim_token,
            state=row.state,
            channel=new.channel,
            user_id=new.user_id,
            request_id=new.request_id,
            attempts=row.attempts,
            rounds=row.rounds,
            provider=row.provider,
            sending_at=row.sending_at,
            deadline=new.deadline,
            correlation_id=new.correlation_id,
            source_topic=new.source_topic,
            source_partition=new.source_partition,
            source_offset=new.source_offset,
            raw=new.raw,
            last_error_class=row.last_error_class,
            last_error=row.last_error,
        )

    def _held(self, job: Job, state: str) -> Row | None:
        row = self.rows.get(job.message_id)
        if row is None or row.claim_token != job.token or row.state != state:
            return None
        return row

    # -- intake ----------------------------------------------------------------------
    async def claim_new(
        self, rows: Sequence[NewDelivery], token: uuid.UUID
    ) -> tuple[list[str], dict[str, str]]:
        now = self.clock()
        new: list[str] = []
        existing: dict[str, str] = {}
        for r in rows:
            if r.message_id in self.rows:
                existing[r.message_id] = self.rows[r.message_id].state
                continue
            row = Row(r, State.QUEUED, now, token, now + timedelta(seconds=self.lease))
            row.history.append(row.state)
            self.rows[r.message_id] = row
            new.append(r.message_id)
        return new, existing

    async def reopen_redriven(self, row: NewDelivery, token: uuid.UUID) -> Job | None:
        found = self.rows.get(row.message_id)
        if found is None or found.state != State.REDRIVE:
            return None
        now = self.clock()
        reopened = Row(row, State.QUEUED, now, token, now + timedelta(seconds=self.lease))
        reopened.history = [*found.history, State.QUEUED]
        self.rows[row.message_id] = reopened
        return self._job(reopened)

    # -- scheduling ------------------------------------------------------------------
    async def sweep_lapsed(self, channel: str, reconcile_delay: float) -> int:
        now, swept = self.clock(), 0
        for row in self.rows.values():
            lapsed = row.lease_until is not None and row.lease_until < now
            if row.new.channel == channel and row.state == State.SENDING and lapsed:
                self._move(row, State.UNKNOWN)
                row.claim_token = row.lease_until = None
                sent_at = row.sending_at or now
                row.next_attempt_at = max(now, sent_at + timedelta(seconds=reconcile_delay))
                row.last_error_class = "unknown_outcome"
                row.last_error = "worker stopped between the provider call and its record"
                swept += 1
        return swept

    async def claim_due(self, channel: str, limit: int, token: uuid.UUID) -> list[Job]:
        if limit <= 0:
            return []
        now = self.clock()

        def due(row: Row) -> bool:
            free = row.lease_until is None or row.lease_until < now
            if row.new.channel != channel:
                return False
            if row.state in (State.RETRY, State.UNKNOWN):
                return row.next_attempt_at <= now and free
            return row.state == State.QUEUED and row.lease_until is not None and free

        jobs = []
        for row in sorted(filter(due, self.rows.values()), key=lambda r: r.next_attempt_at)[:limit]:
            if row.state != State.UNKNOWN:
                self._move(row, State.QUEUED)
            row.claim_token = token
            row.lease_until = now + timedelta(seconds=self.lease)
            jobs.append(self._job(row))
        return jobs

    async def backlog(self, channel: str) -> dict[str, int]:
        counts = {str(s): 0 for s in ACTIVE_STATES}
        for row in self.rows.values():
            if row.new.channel == channel and row.state in counts:
                counts[row.state] += 1
        return counts

    async def release(self, tokens: Sequence[uuid.UUID]) -> None:
        past = self.clock() - timedelta(seconds=1)
        for row in self.rows.values():
            if row.claim_token in tokens and row.state in (State.QUEUED, State.UNKNOWN):
                row.lease_until = past

    # -- the claim before a provider call ----------------------------------------------
    async def start_sending(self, job: Job, provider: str, hold_seconds: float) -> bool:
        row = self._held(job, State.QUEUED)
        if row is None:
            return False
        now = self.clock()
        self._move(row, State.SENDING)
        row.provider, row.attempts, row.sending_at = provider, row.attempts + 1, now
        row.lease_until = now + timedelta(seconds=hold_seconds)
        job.state, job.provider, job.attempts, job.sending_at = (
            row.state,
            provider,
            row.attempts,
            now,
        )
        return True

    async def requeue(self, job: Job) -> bool:
        row = self._held(job, State.UNKNOWN)
        if row is None:
            return False
        self._move(row, State.QUEUED)
        job.state = row.state
        return True

    async def provider_id_taken(
        self, provider: str, provider_message_id: str, message_id: str
    ) -> bool:
        return any(
            r.provider == provider
            and r.provider_message_id == provider_message_id
            and r.new.message_id != message_id
            for r in self.rows.values()
        )

    # -- recording -------------------------------------------------------------------
    async def transition(
        self,
        job: Job,
        change: Transition,
        result: ResultRow | None,
        outbox: Sequence[OutboxRecord],
    ) -> None:
        row = self._held(job, job.state)
        if row is None:
            raise LostClaim(f"{job.message_id}: no longer held in state {job.state}")
        self._move(row, change.state)
        row.provider_message_id = change.provider_message_id or row.provider_message_id
        row.last_error_class, row.last_error = change.error_class, (change.error or "")[:4000]
        row.last_error = row.last_error or None
        row.next_attempt_at = change.next_attempt_at or row.next_attempt_at
        if not change.keep_claim:
            row.claim_token = row.lease_until = None
        row.rounds += 1 if change.add_round else 0
        row.finished_at = self.clock() if change.state in FINAL_STATES else None
        if result is not None:
            self.results.append(result)
        self.outbox.extend(outbox)
        job.state = change.state
        if change.add_round:
            job.rounds += 1
        if change.error_class:
            job.last_error_class, job.last_error = change.error_class, change.error

    async def results_of(self, message_id: str) -> list[ResultRow]:
        mine = [r for r in self.results if r.message_id == message_id]
        return sorted(mine, key=lambda r: (r.at, r.attempt))

    async def record_rejection(
        self, row: NewDelivery, state: str, result: ResultRow, outbox: Sequence[OutboxRecord]
    ) -> bool:
        if row.message_id in self.rows:
            return False
        now = self.clock()
        stored = Row(row, state, now, last_error_class=result.error_class, finished_at=now)
        stored.last_error = result.error
        stored.history.append(state)
        self.rows[row.message_id] = stored
        self.results.append(result)
        self.outbox.extend(outbox)
        return True

    async def record_duplicates(
        self, results: Sequence[ResultRow], outbox: Sequence[OutboxRecord]
    ) -> None:
        self.results.extend(r for r in results if r.message_id in self.rows)
        self.outbox.extend(outbox)

    # -- the operator -----------------------------------------------------------------
    async def redrive(self, message_id: str) -> str:
        """What `finstream dlq redrive` does to the row: its final state becomes 'redrive'.

        The twin of :func:`~finstream.sinks.delivery.redrive.reopen`'s UPDATE (without
        the Redis marker); returns :data:`~finstream.sinks.delivery.redrive.REOPENED`
        or why the row was left alone.
        """
        row = self.rows.get(message_id)
        if row is None:
            return REOPENED  # never recorded: intake will take it as new
        if row.state not in REOPENABLE_STATES:
            return refusal(row.state)
        self._move(row, State.REDRIVE)
        return REOPENED

    # -- outbox relay ----------------------------------------------------------------
    async def relay(self, limit: int, publish: Publish) -> int:
        batch = self.outbox[:limit]
        if not batch:
            return 0
        await publish(batch)
        del self.outbox[: len(batch)]
        return len(batch)
