"""PostgreSQL side of delivery: the ``deliveries`` state machine and the outbox.

See migrations/0030_deliveries.sql for the states. Every transition is a
conditional UPDATE on (message_id, claim_token, expected state), so a worker
that lost its claim (its lease ran out and another worker took the row)
cannot move the row any more; in particular only one worker can move a row
to 'sending', which is the claim that guards every provider call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from finstream.domain.delivery.lifecycle import FINAL_STATES, Transition
from finstream.sinks.delivery.records import (
    Job,
    LostClaim,
    NewDelivery,
    OutboxRecord,
    Publish,
    ResultRow,
)

Conn = asyncpg.Connection | PoolConnectionProxy  # what pool.acquire() hands out


_COLUMNS = """message_id, claim_token, state, channel, user_id, request_id, attempts, rounds,
    provider, sending_at, deadline, correlation_id, source_topic, source_partition,
    source_offset, message, last_error_class, last_error"""


_TRANSITION = """
WITH moved AS (
    UPDATE deliveries SET
        state = $3,
        provider_message_id = coalesce($4, provider_message_id),
        last_error_class = $5, last_error = $6,
        next_attempt_at = coalesce($7, next_attempt_at),
        claim_token = CASE WHEN $8 THEN claim_token ELSE NULL END,
        lease_until = CASE WHEN $8 THEN lease_until ELSE NULL END,
        rounds = rounds + CASE WHEN $9 THEN 1 ELSE 0 END,
        finished_at = CASE WHEN $10 THEN now() ELSE NULL END,
        updated_at = now()
    WHERE message_id = $1 AND claim_token = $2 AND state = $11
    RETURNING message_id),
result AS (
    INSERT INTO delivery_results (result_id, message_id, request_id, user_id, channel,
        provider, status, attempt, provider_message_id, error_class, error, latency_ms, at)
    SELECT $12, moved.message_id, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23
    FROM moved WHERE $12::text IS NOT NULL
    ON CONFLICT (result_id, at) DO NOTHING),
box AS (
    INSERT INTO delivery_outbox (topic, key, value, headers)
    SELECT o.topic, o.key, o.value, o.headers
    FROM moved, unnest($24::text[], $25::bytea[], $26::bytea[], $27::jsonb[])
         WITH ORDINALITY AS o(topic, key, value, headers, n)
    ORDER BY o.n)
SELECT count(*) FROM moved
"""


def _job(row: asyncpg.Record) -> Job:
    return Job(
        message_id=row["message_id"],
        token=row["claim_token"],
        state=row["state"],
        channel=row["channel"],
        user_id=row["user_id"],
        request_id=row["request_id"],
        attempts=row["attempts"],
        rounds=row["rounds"],
        provider=row["provider"],
        sending_at=row["sending_at"],
        deadline=row["deadline"],
        correlation_id=row["correlation_id"],
        source_topic=row["source_topic"],
        source_partition=row["source_partition"],
        source_offset=row["source_offset"],
        raw=bytes(row["message"]),
        last_error_class=row["last_error_class"],
        last_error=row["last_error"],
    )


class DeliveryStore:
    def __init__(self, pool: asyncpg.Pool, lease_seconds: float) -> None:
        self.pool = pool
        self.lease = lease_seconds

    # -- intake ------------------------------------------------------------------
    async def claim_new(
        self, rows: Sequence[NewDelivery], token: uuid.UUID
    ) -> tuple[list[str], dict[str, str]]:
        """Insert rows not seen before, claimed; return (new ids, {existing id: state})."""
        if not rows:
            return [], {}
        async with self.pool.acquire() as conn:
            inserted = await conn.fetch(
                """
                INSERT INTO deliveries (message_id, channel, user_id, request_id, state,
                    claim_token, lease_until, next_attempt_at, deadline, correlation_id,
                    source_topic, source_partition, source_offset, message,
                    locale, subject, recipient_masked, content)
                SELECT m, c, u, r, 'queued', $10, now() + make_interval(secs => $11), now(),
                       d, cid, t, p, o, b, lo, su, rm, ct
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[],
                            $6::text[], $7::text[], $8::int[], $9::bigint[], $12::bytea[],
                            $13::text[], $14::text[], $15::text[], $16::text[])
                     AS x(m, c, u, r, d, cid, t, p, o, b, lo, su, rm, ct)
                ON CONFLICT (message_id) DO NOTHING
                RETURNING message_id
                """,
                [r.message_id for r in rows],
                [r.channel for r in rows],
                [r.user_id for r in rows],
                [r.request_id for r in rows],
                [r.deadline for r in rows],
                [r.correlation_id for r in rows],
                [r.source_topic for r in rows],
                [r.source_partition for r in rows],
                [r.source_offset for r in rows],
                token,
                self.lease,
                [r.raw for r in rows],
                [r.locale for r in rows],
                [r.subject for r in rows],
                [r.recipient_masked for r in rows],
                [r.content for r in rows],
            )
            new = [r["message_id"] for r in inserted]
            rest = [r.message_id for r in rows if r.message_id not in set(new)]
            existing: dict[str, str] = {}
            if rest:
                for r in await conn.fetch(
                    "SELECT message_id, state FROM deliveries WHERE message_id = ANY($1::text[])",
                    rest,
                ):
                    existing[r["message_id"]] = r["state"]
        return new, existing

    async def reopen_redriven(self, row: NewDelivery, token: uuid.UUID) -> Job | None:
        """Claim a row `finstream dlq redrive` reopened: a fresh start, attempts reset."""
        async with self.pool.acquire() as conn:
            found = await conn.fetchrow(
                f"""
                UPDATE deliveries SET state = 'queued', claim_token = $2,
                    lease_until = now() + make_interval(secs => $3), next_attempt_at = now(),
                    attempts = 0, rounds = 0, provider = NULL, provider_message_id = NULL,
                    sending_at = NULL, deadline = $4, message = $5, source_topic = $6,
                    source_partition = $7, source_offset = $8, last_error_class = NULL,
                    last_error = NULL, finished_at = NULL, updated_at = now()
                WHERE message_id = $1 AND state = 'redrive'
                RETURNING {_COLUMNS}
                """,
                row.message_id,
                token,
                self.lease,
                row.deadline,
                row.raw,
                row.source_topic,
                row.source_partition,
                row.source_offset,
            )
        return _job(found) if found else None

    async def jobs(self, ids: Sequence[str]) -> list[Job]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM deliveries WHERE message_id = ANY($1::text[])", list(ids)
            )
        by_id = {r["message_id"]: _job(r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    async def attempts_of(self, message_id: str) -> int:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(
                "SELECT attempts FROM deliveries WHERE message_id = $1", message_id
            )
        return int(value or 0)

    # -- scheduling ------------------------------------------------------------------
    async def sweep_lapsed(self, channel: str, reconcile_delay: float) -> int:
        """'sending' rows whose worker died mid-call become 'unknown', to be reconciled."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                """
                UPDATE deliveries SET state = 'unknown', claim_token = NULL, lease_until = NULL,
                    next_attempt_at = greatest(now(), sending_at + make_interval(secs => $2)),
                    last_error_class = 'unknown_outcome',
                    last_error = 'worker stopped between the provider call and its record',
                    updated_at = now()
                WHERE channel = $1 AND state = 'sending' AND lease_until < now()
                """,
                channel,
                reconcile_delay,
            )
        return int(status.split()[-1])

    async def claim_due(self, channel: str, limit: int, token: uuid.UUID) -> list[Job]:
        """Due retries and reconciliations, and queued rows whose claim lapsed."""
        if limit <= 0:
            return []
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"""
                WITH due AS (
                    SELECT message_id FROM deliveries
                    WHERE channel = $1 AND (
                        (state IN ('retry', 'unknown') AND next_attempt_at <= now()
                         AND (lease_until IS NULL OR lease_until < now()))
                        OR (state = 'queued' AND lease_until < now()))
                    ORDER BY next_attempt_at
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                UPDATE deliveries d SET
                    state = CASE WHEN d.state = 'unknown' THEN 'unknown' ELSE 'queued' END,
                    claim_token = $3, lease_until = now() + make_interval(secs => $4),
                    updated_at = now()
                FROM due WHERE d.message_id = due.message_id
                RETURNING {", ".join("d." + c.strip() for c in _COLUMNS.split(","))}
                """,
                channel,
                limit,
                token,
                self.lease,
            )
        return [_job(r) for r in rows]

    async def backlog(self, channel: str) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT state, count(*) AS n FROM deliveries
                   WHERE channel = $1 AND state IN ('queued', 'sending', 'retry', 'unknown')
                   GROUP BY state""",
                channel,
            )
        counts = dict.fromkeys(("queued", "sending", "retry", "unknown"), 0)
        counts.update({r["state"]: int(r["n"]) for r in rows})
        return counts

    async def release(self, tokens: Sequence[uuid.UUID]) -> None:
        """On shutdown: our queued rows may be taken at once by another worker."""
        if not tokens:
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE deliveries SET lease_until = now() - interval '1 second'
                   WHERE claim_token = ANY($1::uuid[]) AND state IN ('queued', 'unknown')""",
                list(tokens),
            )

    # -- the claim before a provider call ------------------------------------------------
    async def start_sending(self, job: Job, provider: str, hold_seconds: float) -> bool:
        """Move our queued row to 'sending' (attempts + 1). False: not ours any more."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                UPDATE deliveries SET state = 'sending', provider = $3, attempts = attempts + 1,
                    sending_at = now(), lease_until = now() + make_interval(secs => $4),
                    updated_at = now()
                WHERE message_id = $1 AND claim_token = $2 AND state = 'queued'
                RETURNING attempts, sending_at
                """,
                job.message_id,
                job.token,
                provider,
                hold_seconds,
            )
        if row is None:
            return False
        job.state = "sending"
        job.provider = provider
        job.attempts = row["attempts"]
        job.sending_at = row["sending_at"]
        return True

    async def requeue(self, job: Job) -> bool:
        """An 'unknown' row we hold goes back to 'queued' for a normal attempt."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                """UPDATE deliveries SET state = 'queued', updated_at = now()
                   WHERE message_id = $1 AND claim_token = $2 AND state = 'unknown'""",
                job.message_id,
                job.token,
            )
        if status.endswith(" 1"):
            job.state = "queued"
            return True
        return False

    async def provider_id_taken(
        self, provider: str, provider_message_id: str, message_id: str
    ) -> bool:
        async with self.pool.acquire() as conn:
            return bool(
                await conn.fetchval(
                    """SELECT 1 FROM deliveries WHERE provider = $1 AND provider_message_id = $2
                       AND message_id <> $3 LIMIT 1""",
                    provider,
                    provider_message_id,
                    message_id,
                )
            )

    # -- recording -------------------------------------------------------------------
    async def transition(
        self,
        job: Job,
        change: Transition,
        result: ResultRow | None,
        outbox: Sequence[OutboxRecord],
    ) -> None:
        """Move the row we hold, add the attempt's result and the outbox records, atomically.

        One statement (data-modifying CTEs) rather than a transaction of
        several: one round trip per outcome, and nothing is inserted unless
        the conditional UPDATE matched. Raises LostClaim when the row is not
        ours any more.
        """
        final = change.state in FINAL_STATES
        r = result
        async with self.pool.acquire() as conn:
            moved = await conn.fetchval(
                _TRANSITION,
                job.message_id,
                job.token,
                str(change.state),
                change.provider_message_id,
                change.error_class,
                (change.error or "")[:4000] or None,
                change.next_attempt_at,
                change.keep_claim,
                change.add_round,
                final,
                str(job.state),
                r.result_id if r else None,
                r.request_id if r else None,
                r.user_id if r else None,
                r.channel if r else None,
                r.provider if r else None,
                r.status if r else None,
                r.attempt if r else None,
                r.provider_message_id if r else None,
                r.error_class if r else None,
                r.error if r else None,
                r.latency_ms if r else None,
                r.at if r else None,
                [o.topic for o in outbox],
                [o.key for o in outbox],
                [o.value for o in outbox],
                [o.headers_json() for o in outbox],
            )
        if not moved:
            raise LostClaim(f"{job.message_id}: no longer held in state {job.state}")
        job.state = change.state
        if change.add_round:
            job.rounds += 1
        if change.error_class:
            job.last_error_class, job.last_error = change.error_class, change.error

    async def results_of(self, message_id: str) -> list[ResultRow]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT result_id, message_id, request_id, user_id, channel, provider,
                          status, attempt, provider_message_id, error_class, error,
                          latency_ms, at
                   FROM delivery_results WHERE message_id = $1 ORDER BY at, attempt""",
                message_id,
            )
        return [ResultRow(**dict(r)) for r in rows]

    async def record_rejection(
        self, row: NewDelivery, state: str, result: ResultRow, outbox: Sequence[OutboxRecord]
    ) -> bool:
        """A message refused before any call (invalid): its row is created final."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                """
                INSERT INTO deliveries (message_id, channel, user_id, request_id, state, deadline,
                    correlation_id, source_topic, source_partition, source_offset, message,
                    last_error_class, last_error, finished_at, content)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now(), $14)
                ON CONFLICT (message_id) DO NOTHING
                """,
                row.message_id,
                row.channel,
                row.user_id,
                row.request_id,
                state,
                row.deadline,
                row.correlation_id,
                row.source_topic,
                row.source_partition,
                row.source_offset,
                row.raw,
                result.error_class,
                result.error,
                row.content,
            )
            if not status.endswith(" 1"):
                return False
            await insert_result(conn, result)
            await insert_outbox(conn, outbox)
        return True

    async def record_duplicates(
        self, results: Sequence[ResultRow], outbox: Sequence[OutboxRecord]
    ) -> None:
        if not results and not outbox:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            for r in results:
                await insert_result(conn, r, only_if_known=True)
            await insert_outbox(conn, outbox)

    # -- outbox relay --------------------------------------------------------------------
    async def relay(self, limit: int, publish: Publish) -> int:
        """Publish pending outbox records, then delete them: in one transaction.

        The rows stay locked (SKIP LOCKED for other relays) until ``publish``
        returns, so a record is deleted only after Kafka acknowledged it.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await self.outbox_batch(conn, limit)
            if not rows:
                return 0
            await publish(
                [
                    OutboxRecord(
                        row["topic"],
                        bytes(row["key"]) if row["key"] is not None else None,
                        bytes(row["value"]) if row["value"] is not None else None,
                        outbox_headers(row["headers"]),
                    )
                    for row in rows
                ]
            )
            await conn.execute(
                "DELETE FROM delivery_outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        return len(rows)

    async def outbox_batch(self, conn: Conn, limit: int) -> list[asyncpg.Record]:
        return list(
            await conn.fetch(
                """SELECT id, topic, key, value, headers FROM delivery_outbox
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                limit,
            )
        )


async def insert_result(conn: Conn, r: ResultRow, *, only_if_known: bool = False) -> None:
    # only_if_known: a duplicate recognized by Redis alone may (in theory) have
    # no row here; its result still goes to Kafka, just not to this table.
    await conn.execute(
        """
        INSERT INTO delivery_results (result_id, message_id, request_id, user_id, channel,
            provider, status, attempt, provider_message_id, error_class, error, latency_ms, at)
        SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13
        WHERE NOT $14 OR EXISTS (SELECT 1 FROM deliveries WHERE message_id = $2)
        ON CONFLICT (result_id, at) DO NOTHING
        """,
        r.result_id,
        r.message_id,
        r.request_id,
        r.user_id,
        r.channel,
        r.provider,
        r.status,
        r.attempt,
        r.provider_message_id,
        r.error_class,
        r.error,
        r.latency_ms,
        r.at,
        only_if_known,
    )


async def insert_outbox(conn: Conn, records: Sequence[OutboxRecord]) -> None:
    if not records:
        return
    await conn.executemany(
        "INSERT INTO delivery_outbox (topic, key, value, headers) VALUES ($1, $2, $3, $4::jsonb)",
        [(o.topic, o.key, o.value, o.headers_json()) for o in records],
    )


def outbox_headers(raw: Any) -> list[tuple[str, bytes]]:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [(str(k), bytes.fromhex(v)) for k, v in items or []]
