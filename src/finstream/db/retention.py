"""Partition maintenance and retention: one pass, as `finstream db retention` and the
`retention` role run it.

A pass, under an advisory lock (one at a time per database), as
``finstream_owner``:

1. creates the current and ``db_partitions_ahead`` next partitions of every
   time-partitioned table (finstream.db.partitions);
2. drops (or detaches, ``db_retention_action``) every partition whose whole
   range is past its table's policy, and deletes expired rows that landed in
   a DEFAULT partition;
3. for ``audit_events``, removes only whole partitions at the start of the
   chain, and moves the chain's anchor (``audit_chain_head.base_seq`` and
   ``base_hash``) past them in the same transaction, so `finstream audit
   verify` still proves the rest; rows are never deleted from its middle;
4. purges final ``deliveries`` rows (they hold message bodies) past the
   deliveries policy and past the retention of ``dlq`` and every outbound
   topic (topics.yaml), so a message that can still be redriven, re-read or
   reconciled keeps its row (finstream.domain.retention.delivery_cutoff).

Everything removed becomes an AuditEvent on ``audit.events`` (actor
``retention``), and the pass is recorded in ``db_maintenance_runs``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client import Counter

from finstream.db.partitions import (
    BY_NAME,
    MAINTENANCE_LOCK,
    TABLES,
    TimeTable,
    ensure_partitions,
    is_partitioned,
    list_partitions,
    quote_ident,
    use_owner_role,
)
from finstream.domain.delivery.lifecycle import FINAL_STATES
from finstream.domain.retention import Policy, Range, delivery_cutoff, expired
from finstream.settings import Settings
from finstream.topics import contract, load_catalogue

RETENTION_RUNS = Counter(
    "finstream_db_retention_runs_total", "Retention passes by outcome", ["outcome"]
)
RETENTION_REMOVED = Counter(
    "finstream_db_retention_removed_total",
    "Partitions and rows retention removed",
    ["table", "what"],
)

Publish = Callable[[list[dict[str, Any]]], Awaitable[None]]


class RetentionBusy(RuntimeError):
    """Another pass holds the maintenance lock."""


@dataclass
class Report:
    started: datetime
    created: list[tuple[str, str, int]] = field(default_factory=list)
    removed: list[dict[str, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"created {table}.{name}"
            + (f" (moved {moved} rows from the default partition)" if moved else "")
            for table, name, moved in self.created
        ]
        out += [f"{r['action']} {r['table']}: {r['what']}" for r in self.removed]
        out += self.notes
        return out


def policies(settings: Settings) -> dict[str, Policy]:
    return {
        "ticks": Policy.parse(settings.db_retention_ticks),
        "bars": Policy.parse(settings.db_retention_bars),
        "delivery_results": Policy.parse(settings.db_retention_deliveries),
        "audit_events": Policy.parse(settings.db_retention_audit),
    }


def delivery_topic_retentions() -> list[int]:
    """Retention (ms) of the topics a delivery row's message can come back from."""
    catalogue = load_catalogue()
    return [
        t.retention_ms
        for t in catalogue.topics
        if t.name == "dlq" or t.name.startswith("notify.outbound.")
    ]


def _event(
    action: str, table: str, key: str, now: datetime, details: dict[str, Any]
) -> dict[str, Any]:
    digest = hashlib.sha256(f"{action}|{table}|{key}".encode()).hexdigest()[:32]
    return {
        "event_id": f"retention-{digest}",
        "at": now,
        "actor": "retention",
        "action": action,
        "subject_type": "table",
        "subject_id": table,
        "user_id": None,
        "reason": f"past the {details.get('policy', '')} retention policy".strip(),
        "details": {k: str(v) for k, v in details.items()},
        "correlation_id": None,
    }


async def _remove_partition(
    conn: asyncpg.Connection, table: TimeTable, part: Range, action: str
) -> None:
    parent, name = quote_ident(table.name), quote_ident(part.name)
    if action == "detach":
        await conn.execute(f"ALTER TABLE {parent} DETACH PARTITION {name}")
    else:
        await conn.execute(f"DROP TABLE {name}")


async def _expire_table(
    conn: asyncpg.Connection,
    table: TimeTable,
    *,
    policy: Policy,
    now: datetime,
    action: str,
    report: Report,
) -> None:
    cutoff = policy.cutoff(now)
    for part in expired(await list_partitions(conn, table.name), cutoff):
        estimate = await conn.fetchval(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass($1)",
            part.name,
        )
        async with conn.transaction():
            await _remove_partition(conn, table, part, action)
        details = {
            "partition": part.name,
            "from": part.start.isoformat() if part.start else "MINVALUE",
            "to": part.end.isoformat() if part.end else "MAXVALUE",
            "rows_estimate": estimate,
            "cutoff": cutoff.isoformat(),
            "policy": str(policy),
        }
        verb = "partition_dropped" if action == "drop" else "partition_detached"
        report.removed.append({"action": verb, "table": table.name, "what": part.name})
        report.events.append(_event(verb, table.name, part.name, now, details))
        RETENTION_REMOVED.labels(table.name, "partitions").inc()
    key = quote_ident(table.key)
    status = await conn.execute(
        f"DELETE FROM {quote_ident(table.default)} WHERE {key} < $1", cutoff
    )
    rows = int(status.split()[-1])
    if rows:
        details = {
            "partition": table.default,
            "rows": rows,
            "cutoff": cutoff.isoformat(),
            "policy": str(policy),
        }
        report.removed.append(
            {
                "action": "rows_purged",
                "table": table.name,
                "what": f"{rows} rows of {table.default}",
            }
        )
        report.events.append(
            _event("rows_purged", table.name, f"{table.default}|{cutoff.isoformat()}", now, details)
        )
        RETENTION_REMOVED.labels(table.name, "rows").inc(rows)


async def _expire_audit(
    conn: asyncpg.Connection, policy: Policy, now: datetime, action: str, report: Report
) -> None:
    table = BY_NAME["audit_events"]
    cutoff = policy.cutoff(now)
    for part in expired(await list_partitions(conn, table.name), cutoff):
        name = quote_ident(part.name)
        async with conn.transaction():
            head = await conn.fetchrow(
                "SELECT seq, base_seq FROM audit_chain_head WHERE id = 1 FOR UPDATE"
            )
            last = await conn.fetchrow(f"SELECT seq, hash FROM {name} ORDER BY seq DESC LIMIT 1")
            first = await conn.fetchval(f"SELECT min(seq) FROM {name}")
            if last is not None:
                # Only the very start of the chain may go: no row of another
                # partition may sit at or before this partition's last seq.
                interleaved = await conn.fetchval(
                    f"SELECT 1 FROM {quote_ident(table.name)} WHERE seq <= $1 "
                    "AND tableoid <> to_regclass($2) LIMIT 1",
                    last["seq"],
                    part.name,
                )
                base = int(head["base_seq"]) if head is not None else 0
                if interleaved or first != base + 1:
                    report.notes.append(
                        f"kept audit_events.{part.name}: its rows are not the start of the chain"
                    )
                    break
            await _remove_partition(conn, table, part, action)
            details: dict[str, Any] = {
                "partition": part.name,
                "from": part.start.isoformat() if part.start else "MINVALUE",
                "to": part.end.isoformat() if part.end else "MAXVALUE",
                "cutoff": cutoff.isoformat(),
                "policy": str(policy),
            }
            if last is not None:
                await conn.execute(
                    "UPDATE audit_chain_head SET base_seq = $1, base_hash = $2 WHERE id = 1",
                    last["seq"],
                    last["hash"],
                )
                details.update(
                    rows=int(last["seq"]) - int(first) + 1,
                    first_seq=first,
                    anchor_seq=last["seq"],
                    anchor_hash=last["hash"],
                )
        verb = "partition_dropped" if action == "drop" else "partition_detached"
        report.removed.append({"action": verb, "table": table.name, "what": part.name})
        report.events.append(_event(verb, table.name, part.name, now, details))
        RETENTION_REMOVED.labels(table.name, "partitions").inc()


async def _purge_deliveries(
    conn: asyncpg.Connection, policy: Policy, now: datetime, report: Report, batch: int = 5000
) -> None:
    cutoff = delivery_cutoff(now, policy, delivery_topic_retentions())
    if cutoff is None:
        report.notes.append("deliveries kept: a dlq or outbound topic keeps records forever")
        return
    total = 0
    while True:
        status = await conn.execute(
            """DELETE FROM deliveries WHERE message_id IN (
                   SELECT message_id FROM deliveries
                   WHERE state = ANY($1::text[]) AND finished_at < $2 LIMIT $3)""",
            sorted(str(s) for s in FINAL_STATES),  # the life cycle's, in a fixed order
            cutoff,
            batch,
        )
        n = int(status.split()[-1])
        total += n
        if n < batch:
            break
    if total:
        details = {"rows": total, "cutoff": cutoff.isoformat(), "policy": str(policy)}
        report.removed.append(
            {"action": "rows_purged", "table": "deliveries", "what": f"{total} final rows"}
        )
        report.events.append(
            _event("rows_purged", "deliveries", f"{cutoff.isoformat()}|{total}", now, details)
        )
        RETENTION_REMOVED.labels("deliveries", "rows").inc(total)


async def run_pass(
    conn: asyncpg.Connection, settings: Settings, now: datetime, publish: Publish | None
) -> Report:
    """One maintenance and retention pass; raises RetentionBusy if another one runs."""
    report = Report(started=now)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
        raise RetentionBusy("another retention pass is running on this database")
    ok, error = False, ""
    try:
        await conn.execute("SET TIME ZONE 'UTC'")
        await use_owner_role(conn)
        ahead = {t.name: settings.db_partitions_ahead for t in TABLES}
        report.created = await ensure_partitions(conn, now, ahead)
        rules = policies(settings)
        for table in TABLES:
            if not await is_partitioned(conn, table.name):
                report.notes.append(f"{table.name} is not partitioned: run `finstream db migrate`")
                continue
            if table.name == "audit_events":
                await _expire_audit(
                    conn, rules[table.name], now, settings.db_retention_action, report
                )
            else:
                await _expire_table(
                    conn,
                    table,
                    policy=rules[table.name],
                    now=now,
                    action=settings.db_retention_action,
                    report=report,
                )
        await _purge_deliveries(conn, rules["delivery_results"], now, report)
        if publish is not None and report.events:
            await publish(report.events)
        ok = True
        return report
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        RETENTION_RUNS.labels("ok" if ok else "failed").inc()
        detail = {
            "created": [f"{t}.{n}" for t, n, _ in report.created],
            "removed": report.removed,
            "notes": report.notes,
            "error": error,
            # Kept here too: what was removed, should publishing the audit events fail.
            "events": [{**e, "at": e["at"].isoformat()} for e in report.events],
        }
        try:
            await conn.execute("RESET ROLE")
            await conn.execute(
                "INSERT INTO db_maintenance_runs (kind, started_at, ok, detail) "
                "VALUES ('retention', $1, $2, $3::jsonb)",
                now,
                ok,
                json.dumps(detail),
            )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)


async def publish_to_audit_topic(settings: Settings, events: list[dict[str, Any]]) -> None:
    """Send the pass's audit events to audit.events and wait for the broker."""
    from finstream.runtime.kafka import KafkaPublisher

    audit = contract("audit.events", settings.namespace)
    publisher = KafkaPublisher(settings, "retention")
    await publisher.start()
    try:
        for event in events:
            await publisher.send(audit.name, event["subject_id"].encode(), audit.encode(event))
        await publisher.flush()
    finally:
        await publisher.stop()
