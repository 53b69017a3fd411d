"""Erasing a user: destroy their keys, hard-delete what can be deleted, audit it.

In order, each step idempotent (running it again does nothing new):

1. **keys destroyed**: the user goes into ``erased_users`` and their data keys
   out of ``user_keys`` (:meth:`finstream.privacy.keys.KeyRing.erase`). From
   this commit on nothing sealed for them opens for a reader that loads keys,
   whatever still holds it: compacted topics before compaction, changelogs,
   the retention of ``notify.*`` and ``dlq``, backups. Running workers stop
   using the keys within ``privacy_key_cache_seconds`` (60 s).
2. **hard deletes** (:func:`sweep`): PostgreSQL rows (deliveries and their
   results, contact verifications, the funnel), Redis keys (the preferences
   and rules read models, the inbox), and tombstones for the user's
   preferences and each of their alert rules (the router then forgets their
   routing state and held messages, the alerts role their rules).
3. **audited**: an AuditEvent ``user_erased`` (who asked, what was removed).
   Audit rows themselves stay: they are the hash-chained record of what was
   done, hold no contact point (masked), and keep the user id only.
4. **swept again** ``privacy_erasure_sweep_seconds`` (90 s) later, by the API
   (:func:`run_due_sweeps`): whatever a worker with a still cached key wrote
   in between (a message in flight stored in an inbox, a late read-model
   write) is deleted too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain.privacy_audit import audit_event_id
from finstream.privacy.keys import KeyRing
from finstream.privacy.prefs import audit_record, publish_audit
from finstream.runtime.kafka import KafkaPublisher, correlation_header
from finstream.runtime.logging import get_logger
from finstream.settings import Settings

log = get_logger(__name__)

_DELETES = (
    ("delivery_results", "DELETE FROM delivery_results WHERE user_id = $1"),
    ("deliveries", "DELETE FROM deliveries WHERE user_id = $1"),
    ("contact_verifications", "DELETE FROM contact_verifications WHERE user_id = $1"),
    ("notification_funnel", "DELETE FROM notification_funnel WHERE user_id = $1"),
    ("user_keys", "DELETE FROM user_keys WHERE user_id = $1"),
)
INBOX_PARTS = ("msgs", "index", "unread", "archived", "seen")


@dataclass
class Erasure:
    user_id: str
    erased_at: datetime
    first: bool
    removed: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "erased_at": self.erased_at.isoformat(),
            "already_erased": not self.first,
            "removed": self.removed,
        }


@dataclass
class Services:
    settings: Settings
    codec: Codec
    pg: asyncpg.Pool
    redis: aioredis.Redis
    publisher: KafkaPublisher
    keys: KeyRing


async def erase(s: Services, user: str, *, by: str, correlation_id: str | None = None) -> Erasure:
    async with s.pg.acquire() as conn:
        first = await s.keys.erase(conn, user, by, s.settings.privacy_erasure_sweep_seconds)
        erased_at = await conn.fetchval(
            "SELECT erased_at FROM erased_users WHERE user_id = $1", user
        )
    removed = await sweep(s, user, correlation_id=correlation_id)
    event = audit_record(
        actor="privacy",
        action="user_erased" if first else "user_erasure_repeated",
        subject_type="user",
        subject_id=user,
        user_id=user,
        reason=f"erasure requested by {by}",
        details={f"removed.{k}": str(v) for k, v in sorted(removed.items())} | {"requested_by": by},
        correlation_id=correlation_id,
        event_id=audit_event_id(user, "erased", by, erased_at.isoformat()) if first else None,
    )
    await publish_audit(s.publisher, s.settings, s.codec, event)
    log.info("user erased", user_id=user, first=first, removed=removed)
    return Erasure(user, erased_at, bool(first), removed)


async def sweep(s: Services, user: str, *, correlation_id: str | None = None) -> dict[str, int]:
    """Hard-delete everything deletable about the user (the keys are already gone)."""
    removed: dict[str, int] = {}
    async with s.pg.acquire() as conn, conn.transaction():
        for name, statement in _DELETES:
            status = await conn.execute(statement, user)
            removed[name] = int(status.split()[-1])
    # Rules first: their ids come from the read model, deleted below.
    rules_key = s.settings.redis_key(f"rules:{{{user}}}")
    rule_ids = [
        r.decode() if isinstance(r, bytes) else str(r) for r in await s.redis.hkeys(rules_key)
    ]
    headers = correlation_header(correlation_id)
    for rule_id in rule_ids:
        await s.publisher.send(s.settings.topic("alerts.rules"), rule_id.encode(), None, headers)
    await s.publisher.send(s.settings.topic("notify.preferences"), user.encode(), None, headers)
    await s.publisher.flush()
    keys = [
        s.settings.redis_key(f"prefs:{{{user}}}"),
        s.settings.redis_key(f"prefs:{{{user}}}:version"),
        s.settings.redis_key(f"prefs:{{{user}}}:published"),
        rules_key,
        f"{rules_key}:version",
        s.settings.redis_key(f"verify:attempts:{{{user}}}"),
        *(s.settings.redis_key(f"inbox:{{{user}}}:{part}") for part in INBOX_PARTS),
    ]
    async with s.redis.pipeline(transaction=False) as pipe:
        if rule_ids:
            pipe.hdel(s.settings.redis_key("rules:index"), *rule_ids)
        pipe.delete(*keys)
        results = await pipe.execute()
    removed["redis_keys"] = int(results[-1])
    removed["rule_tombstones"] = len(rule_ids)
    return removed


async def run_due_sweeps(s: Services, limit: int = 50) -> int:
    """Sweep again the erasures whose time has come (run by the API every few seconds)."""
    done = 0
    async with s.pg.acquire() as conn:
        users = await conn.fetch(
            """SELECT user_id FROM erased_users
               WHERE swept_at IS NULL AND sweep_due <= now()
               ORDER BY sweep_due LIMIT $1""",
            limit,
        )
    for row in users:
        user = row["user_id"]
        async with s.pg.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                """UPDATE erased_users SET swept_at = now()
                   WHERE user_id = $1 AND swept_at IS NULL RETURNING user_id""",
                user,
            )
        if claimed is None:
            continue  # another API replica took it
        removed = await sweep(s, user)
        if any(removed.values()):
            log.info("erasure sweep removed late writes", user_id=user, removed=removed)
        done += 1
    return done


async def sweep_loop(s: Services, stop: Any, every: float = 5.0) -> None:
    import asyncio
    import contextlib

    while not stop.is_set():
        try:
            await run_due_sweeps(s)
        except Exception as exc:  # the loop must outlive a database hiccup
            log.warning("erasure sweep failed; will retry", error=str(exc)[:300])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
