"""Reconciliation: settle a send of unknown outcome, never by resending blindly.

A job is processed here: an 'unknown' row is reconciled (looked up at its
provider, resent where a resend cannot show twice, or dead-lettered), any
other is attempted by :class:`~finstream.sinks.delivery.dispatch.Dispatch`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from finstream.codec import DecodeError
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import (
    Accepted,
    LookupFailed,
    NotAsked,
    NotFound,
    Reconcile,
    State,
    Unreadable,
)
from finstream.domain.envelope import EnvelopeError
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.runtime.logging import correlation, get_logger
from finstream.sinks.delivery.dispatch import Dispatch
from finstream.sinks.delivery.records import Job, LostClaim

log = get_logger(__name__)


class Reconciler(Dispatch):
    async def process(self, job: Job) -> None:
        with correlation(job.correlation_id):
            if not job.message:
                try:
                    job.message = await self.privacy.open_stored(
                        self.outbound.decode_record(job.raw)
                    )
                except (DecodeError, EnvelopeError) as exc:
                    await self._apply(job, self._settle(job, Unreadable(str(exc))))
                    return
            try:
                if job.state == State.UNKNOWN:
                    await self.reconcile(job)
                else:
                    await self.attempt(job)
            except LostClaim as exc:
                log.warning("claim lost; another worker has the message", reason=str(exc))

    async def reconcile(self, job: Job) -> None:
        """Settle a send of unknown outcome, never by resending blindly."""
        slot = self.by_name.get(job.provider or "")
        mode = slot.provider.reconcile if slot else Reconcile.NONE
        if mode is not Reconcile.LOOKUP or slot is None:
            await self._apply(job, self._settle(job, NotAsked(mode)), slot=slot)
            return
        since = job.sending_at or (utcnow() - timedelta(hours=1))
        try:
            found = await asyncio.wait_for(
                slot.provider.lookup(job.message, since), timeout=self.call_timeout
            )
        except (DeliveryError, TimeoutError) as exc:
            err = (
                exc
                if isinstance(exc, DeliveryError)
                else DeliveryError(ErrorClass.TRANSIENT, "lookup timed out")
            )
            await self._apply(job, self._settle(job, LookupFailed(err)), slot=slot)
            return
        if (
            found is not None
            and found.provider_message_id
            and await self.store.provider_id_taken(
                slot.name, found.provider_message_id, job.message_id
            )
        ):
            found = None  # that one belongs to another message
        if found is None:
            await self._apply(job, self._settle(job, NotFound()), slot=slot)
            return
        accepted = Accepted(
            slot.name,
            found.status,
            found.provider_message_id,
            found.detail,
            how="reconciled: found",
        )
        await self._apply(job, self._settle(job, accepted), slot=slot)
