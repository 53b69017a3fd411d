"""The ``feedback`` role: delivery outcomes back into the funnel and users' preferences.

Consumes ``notify.delivery`` (every DeliveryResult: the delivery workers'
attempts, and the providers' webhooks the API relays: SendGrid events,
Twilio status callbacks, SES notifications through SNS) and ``audit.events``
(the router's decisions), on the stream engine, at least once: a batch is
written to PostgreSQL (idempotent upserts) and its preference changes and
audit events are acknowledged by Kafka before the offsets are committed.

* the funnel (``notification_funnel``, :mod:`finstream.sinks.funnel`):
  requested, suppressed, sent, delivered, opened, clicked, bounced,
  complained, unsubscribed, failed, each the first time it happens;
  ``finstream_funnel_events_total{stage,channel}`` counts the same;
* a hard bounce marks the address ``bounced``, a spam complaint
  ``complained`` (the router never uses either again), a provider's
  unsubscribe withdraws the user's marketing consent and opts them out of the
  message's category, a carrier STOP (a status callback, or the SMS worker's
  send refused with 21610) marks the number ``opted_out``, a push token the
  provider no longer knows (the push worker's send refused,
  ``token_invalid``) is marked ``invalid``: through
  :class:`~finstream.privacy.prefs.PreferencesWriter`, sealed and audited
  (old -> new, contacts masked). The address a bounce is about comes from
  the message's sealed content (``deliveries.content``), opened with the
  user's key: nothing in clear travels on ``notify.delivery``;
* what providers report about a message (delivered, opened, clicked,
  bounced, complained, unsubscribed) is audited once per message and stage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import asyncpg
from prometheus_client import Counter

from finstream.domain import feedback as fb
from finstream.domain.delivery.channels import same_phone
from finstream.domain.envelope import EnvelopeError, UserErased
from finstream.domain.privacy_audit import audit_event_id
from finstream.domain.retention import Policy
from finstream.domain.time import utcnow
from finstream.privacy.keys import KeyRing
from finstream.privacy.prefs import Busy, PreferencesWriter, audit_record
from finstream.runtime.engine import StreamEngine
from finstream.runtime.kafka import KafkaPublisher
from finstream.runtime.logging import get_logger
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.settings import Settings
from finstream.sinks import funnel
from finstream.stores.postgres import create_pool
from finstream.stores.redis import connect

log = get_logger(__name__)

FUNNEL_EVENTS = Counter(
    "finstream_funnel_events_total",
    "Messages reaching a funnel stage for the first time (requested, suppressed, sent, "
    "delivered, opened, clicked, bounced, complained, unsubscribed, failed)",
    ["stage", "channel"],
)
CHANGES = Counter(
    "finstream_feedback_changes_total",
    "Preference changes made from delivery feedback (bounce, complaint, unsubscribe, STOP, "
    "invalid push token)",
    ["change"],
)
SKIPPED = Counter(
    "finstream_feedback_skipped_total",
    "Feedback that could not change preferences (message or user gone, no such contact)",
    ["reason"],
)
AUDITED_STAGES = (
    fb.Stage.DELIVERED,
    fb.Stage.OPENED,
    fb.Stage.CLICKED,
    fb.Stage.BOUNCED,
    fb.Stage.COMPLAINED,
    fb.Stage.UNSUBSCRIBED,
)
RETENTION_EVERY = 3600.0


class FeedbackProcessor(Processor):
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        writer: PreferencesWriter,
        keys: KeyRing,
        publisher: KafkaPublisher,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.writer = writer
        self.keys = keys
        self.publisher = publisher
        self.codec = writer.codec
        self.delivery_topic = settings.topic("notify.delivery")
        self.audit_topic = settings.topic("audit.events")
        self.retention = Policy.parse(settings.db_retention_deliveries)
        self._pruned = 0.0

    async def process(self, events: list[Event], out: Output) -> None:
        rows: list[fb.FunnelRow] = []
        changes: list[tuple[Mapping[str, Any], fb.Change]] = []
        results: dict[str, Mapping[str, Any]] = {}
        for ev in events:
            item: Mapping[str, Any] = ev.item
            if ev.topic == self.delivery_topic:
                found = fb.rows_from_result(item)
                rows.extend(found)
                for row in found:
                    results[f"{row.item_key}|{row.stage}"] = item
                change = fb.change_for(item)
                if change is not None:
                    changes.append((item, change))
            else:
                rows.extend(fb.rows_from_audit(item))
        if rows:
            async with self.pool.acquire() as conn:
                reached = await funnel.record(conn, rows)
            for stage, channel in reached:
                FUNNEL_EVENTS.labels(stage.value, channel).inc()
            await self._audit_stages(rows, results)
        for result, change in changes:
            await self._change(result, change)
        await self.publisher.flush()

    async def _audit_stages(
        self, rows: list[fb.FunnelRow], results: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """What a provider said about a message, audited once per message and stage
        (the event id is derived from both: a repeat is stored once)."""
        for row in rows:
            if row.stage not in AUDITED_STAGES or row.channel == "inapp":
                continue
            result = results.get(f"{row.item_key}|{row.stage}")
            if result is None:
                continue
            event = audit_record(
                actor="feedback",
                action=f"message_{row.stage.value}",
                subject_type="message",
                subject_id=row.item_key,
                user_id=row.user_id,
                reason=result.get("error"),
                details={
                    "channel": row.channel,
                    "provider": row.provider or "",
                    "request_id": row.request_id,
                },
                correlation_id=None,
                event_id=audit_event_id(row.item_key, "feedback", row.stage.value),
                at=row.at,
            )
            await self.publisher.send(
                self.audit_topic,
                row.item_key.encode(),
                self.codec.encode("AuditEvent", event),
            )

    async def _message(self, message_id: str) -> tuple[str | None, str | None]:
        """(the recipient, the category) of one of our messages, opened; Nones when gone."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT user_id, content FROM deliveries WHERE message_id = $1", message_id
            )
            category = await conn.fetchval(
                "SELECT category FROM notification_funnel WHERE item_key = $1", message_id
            )
        if row is None or not row["content"]:
            return None, category
        try:
            keys = await self.keys.get(row["user_id"])
            content = keys.open_json(row["content"])
        except EnvelopeError:
            return None, category
        return str(content.get("recipient") or "") or None, category

    async def _change(self, result: Mapping[str, Any], change: fb.Change) -> None:
        user = str(result.get("user_id") or "")
        message_id = str(result.get("message_id") or "")
        recipient, category = await self._message(message_id)
        if change is not fb.Change.UNSUBSCRIBED and recipient is None:
            SKIPPED.labels("message_gone").inc()
            log.info("feedback about a message no longer held", message_id=message_id)
            return
        now = utcnow()
        provider = str(result.get("provider") or "provider")
        reason = f"{change.value} reported by {provider} for message {message_id}"

        def apply(opened: dict[str, Any]) -> dict[str, Any] | None:
            if change is fb.Change.UNSUBSCRIBED:
                updated = fb.withdraw_consent(opened, "marketing", now, f"unsubscribe:{provider}")
                base = updated or opened
                if category:
                    updated = (
                        fb.apply_change(
                            base,
                            change,
                            recipient=None,
                            category=category,
                            now=now,
                        )
                        or updated
                    )
                return updated
            return fb.apply_change(
                opened,
                change,
                recipient=recipient,
                category=category,
                now=now,
                same_phone=same_phone,
            )

        try:
            written = await self.writer.update(
                user,
                apply,
                action=f"feedback_{change.value}",
                reason=reason,
                correlation_id=None,
                details={"message_id": message_id, "provider": provider},
            )
        except UserErased:
            SKIPPED.labels("user_erased").inc()
            return
        except Busy:
            raise  # retried with the batch: the engine rewinds and redelivers
        if written is None:
            SKIPPED.labels("no_change").inc()
            return
        CHANGES.labels(change.value).inc()
        log.info("preferences changed by feedback", user_id=user, change=change.value)

    async def punctuate(self, out: Output) -> None:
        if time.monotonic() - self._pruned < RETENTION_EVERY:
            return
        self._pruned = time.monotonic()
        cutoff = self.retention.cutoff(utcnow())
        async with self.pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM notification_funnel WHERE first_at < $1", cutoff
            )
        log.info("funnel rows past retention removed", count=int(status.split()[-1]))


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    pool = await create_pool(settings)
    redis = connect(settings)
    publisher = await ctx.publisher()
    keys = KeyRing.from_settings(settings, pool)
    writer = PreferencesWriter(
        settings=settings,
        codec=ctx.codec,
        redis=redis,
        publisher=publisher,
        keys=keys,
        actor="feedback",
    )
    processor = FeedbackProcessor(settings, pool, writer, keys, publisher)
    engine = StreamEngine(
        settings,
        ctx.role,
        ["notify.delivery", "audit.events"],
        processor,
        ctx.health,
        guarantee="at_least_once",
        batch_size=settings.audit_batch_size,
        batch_wait=settings.audit_batch_ms / 1000,
        punctuate_every=60.0,
    )
    try:
        await engine.run(ctx.stop)
    finally:
        await keys.close()
        await redis.aclose()
        await pool.close()
