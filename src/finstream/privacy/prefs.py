"""Writing a user's preferences the privacy way: sealed, serialized, audited.

Every writer of ``notify.preferences`` goes through :class:`PreferencesWriter`
(the API's routes, contact verification, one-click unsubscribe, the feedback
role, ``finstream prefs set``; a tombstone from ``finstream prefs forget`` or
erasure excepted): it

* holds the per-user write lock the API uses (``api:lock:prefs:{user}`` in
  Redis), so the topic's order follows the versions;
* reads the current version from the read model and opens its contacts
  (:meth:`PreferencesWriter.settled`: once the user's last published version
  is applied, so that no change is built on an older one);
* seals the new version's contacts under the user's key (an unchanged one
  keeps its token), publishes it and waits for Kafka, notes the version it
  published (``prefs:{user}:published``) and waits up to
  ``prefs_apply_wait`` for the statestore role, the read model's only writer,
  to apply it (:attr:`Written.applied`);
* publishes an AuditEvent of the change, old -> new with contacts masked.

An erased user's preferences are never written again (UserErased).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain.envelope import open_contacts, seal_contacts
from finstream.domain.privacy_audit import audit_event_id, preference_changes
from finstream.domain.time import to_micros, utcnow
from finstream.privacy.keys import KeyRing
from finstream.runtime.kafka import KafkaPublisher, correlation_header
from finstream.settings import Settings
from finstream.stores.locks import RedisLocks
from finstream.stores.read_models import PreferencesStore

PUBLISHED_TTL_MS = 7 * 24 * 3600 * 1000


class Busy(RuntimeError):
    """Another change to the user's preferences is in progress, or not applied yet."""


def audit_record(
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: str,
    user_id: str | None,
    reason: str | None = None,
    details: Mapping[str, str] | None = None,
    correlation_id: str | None = None,
    event_id: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """An AuditEvent record (schemas/AuditEvent.avsc)."""
    return {
        "event_id": event_id or uuid.uuid4().hex,
        "at": at or utcnow(),
        "actor": actor,
        "action": action,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "user_id": user_id,
        "reason": reason,
        "details": dict(details or {}),
        "correlation_id": correlation_id,
    }


async def publish_audit(
    publisher: KafkaPublisher, settings: Settings, codec: Codec, event: Mapping[str, Any]
) -> None:
    await publisher.send_and_wait(
        settings.topic("audit.events"),
        str(event["subject_id"]).encode(),
        codec.encode("AuditEvent", event),
        correlation_header(event.get("correlation_id")),
    )


def next_version(now: datetime, previous: datetime | None) -> datetime:
    if previous is None or now > previous:
        return now
    return previous + timedelta(microseconds=1)


@dataclass(frozen=True)
class Written:
    record: dict[str, Any]  # as published: contacts sealed
    opened: dict[str, Any]  # the same, contacts in clear (for the answer, never stored)
    previous: dict[str, Any] | None  # the version it replaced, opened
    applied: bool = True  # the read model holds it (the statestore applied it in time)


class PreferencesWriter:
    def __init__(
        self,
        *,
        settings: Settings,
        codec: Codec,
        redis: aioredis.Redis,
        publisher: KafkaPublisher,
        keys: KeyRing,
        actor: str,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.redis = redis
        self.publisher = publisher
        self.keys = keys
        self.actor = actor
        self.store = PreferencesStore(redis, settings, codec)
        self._locks = RedisLocks(redis, settings)

    def lock(self, user: str, wait: float = 3.0) -> contextlib.AbstractAsyncContextManager[None]:
        """The user's preferences lock, the one the API's routes hold (``prefs:{user}``)."""
        return self._locks.hold(
            f"prefs:{user}",
            wait,
            busy=lambda: Busy(f"preferences of {user!r} are being changed; retry"),
        )

    async def read(self, user: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the stored version, the same opened); (None, None) when the user has none."""
        current = await self.store.get(user)
        if current is None:
            return None, None
        keys = await self.keys.get(user)
        return current, open_contacts(current, keys)

    async def settled(self, user: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """:meth:`read` once the user's last published version is in the read model.

        What a change builds on (call under :meth:`lock`): a version published
        but not yet applied would otherwise be overwritten by a change made from
        the one before it. Raises :class:`Busy` when it is not applied within
        ``prefs_apply_wait`` (the statestore is behind or down).
        """
        published = await self.redis.get(self.store.published_key(user))
        if published is not None and not await self._applied(user, int(published)):
            raise Busy(
                f"the last change to the preferences of {user!r} is not applied yet "
                "(the statestore role is behind); retry"
            )
        return await self.read(user)

    async def _applied(self, user: str, version: int) -> bool:
        """Whether the read model reaches ``version`` within ``prefs_apply_wait``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.prefs_apply_wait
        delay = 0.002
        while True:
            held = await self.store.version(user)
            if held is not None and held >= version:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def write(
        self,
        user: str,
        opened: Mapping[str, Any],
        current: Mapping[str, Any] | None,
        previous_opened: Mapping[str, Any] | None,
        *,
        action: str = "preferences_changed",
        reason: str | None = None,
        correlation_id: str | None = None,
        details: Mapping[str, str] | None = None,
        now: datetime | None = None,
    ) -> Written:
        """Publish ``opened`` as the user's new version (call under :meth:`lock`)."""
        now = now or utcnow()
        keys = await self.keys.seal_keys(user)  # UserErased for an erased user
        record = seal_contacts(opened, keys, previous=current)
        record["updated_at"] = next_version(
            max(now, opened.get("updated_at") or now),
            current["updated_at"] if current else None,
        )
        value = self.codec.encode("UserPreferences", record)
        await self.publisher.send_and_wait(
            self.settings.topic("notify.preferences"),
            user.encode(),
            value,
            correlation_header(correlation_id),
        )
        version = to_micros(record["updated_at"])
        await self.redis.set(self.store.published_key(user), version, px=PUBLISHED_TTL_MS)
        applied = await self._applied(user, version)
        new_opened = {**dict(opened), "updated_at": record["updated_at"]}
        audit = {**preference_changes(previous_opened, new_opened), **(details or {})}
        event = audit_record(
            actor=self.actor,
            action=action,
            subject_type="preferences",
            subject_id=user,
            user_id=user,
            reason=reason,
            details=audit,
            correlation_id=correlation_id,
            event_id=audit_event_id(user, action, str(to_micros(record["updated_at"]))),
        )
        await publish_audit(self.publisher, self.settings, self.codec, event)
        return Written(
            record, new_opened, dict(previous_opened) if previous_opened else None, applied
        )

    async def update(
        self,
        user: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        **kwargs: Any,
    ) -> Written | None:
        """Apply ``change`` to the user's current (opened) preferences; None when the
        user has none or nothing changes."""
        async with self.lock(user):
            current, opened = await self.settled(user)
            if current is None or opened is None:
                return None
            updated = change(opened)
            if updated is None:
                return None
            return await self.write(user, updated, current, opened, **kwargs)
