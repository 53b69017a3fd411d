"""A delivery's life cycle, pure: which state a message moves to after each event.

The ``deliveries`` table (migrations/0030_deliveries.sql) holds one row per
outbound message; this module is the only place that decides how a row moves.
The engine reports what happened (:class:`Outcome`), :func:`settle` answers
with a :class:`Step`: the row's :class:`Transition`, the records to write with
it, and what the engine does next. The engine and the store only carry it out.

::

    queued  -> sending -> sent | delivered                   (success)
                       -> queued (fail over to the next provider at once)
                       -> retry  (transient: next_attempt_at, backoff + jitter)
                       -> unknown (outcome ambiguous: reconcile at next_attempt_at)
                       -> rejected | failed | expired       (final failure, dead-lettered)
    retry   -> queued  (due; claimed by any worker of the channel)
    unknown -> sent (found at the provider) | queued (provably not sent) | failed
    rejected | failed | expired -> redrive (finstream dlq redrive) -> queued

Never twice: after an ambiguous answer the step never calls another provider
in the same round; the row waits as 'unknown' for a lookup, or (when a resend
cannot show twice, or the operator chose resending) goes through the normal
retry schedule, or is dead-lettered.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from finstream.domain.delivery import RetryAction, RetryPolicy, defer_delay
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.outcomes import (
    Accepted,
    Attempted,
    Delivered,
    Failed,
    LookupFailed,
    NoProvider,
    NotAsked,
    NotFound,
    Outcome,
    Ready,
    Reconcile,
    Record,
    Then,
    Transition,
    Unavailable,
    Undeliverable,
    Unreadable,
)
from finstream.domain.resilience import ErrorClass

# The outcome and record types are part of this module's interface.
__all__ = [
    "ACTIVE_STATES",
    "ALLOWED",
    "FINAL_STATES",
    "REOPENABLE_STATES",
    "SUCCESS_STATES",
    "Accepted",
    "Attempted",
    "Delivered",
    "Failed",
    "IllegalMove",
    "JobView",
    "LookupFailed",
    "NoProvider",
    "NotAsked",
    "NotFound",
    "Outcome",
    "Policy",
    "Ready",
    "Reconcile",
    "Record",
    "Redelivery",
    "State",
    "Step",
    "Then",
    "Transition",
    "Unavailable",
    "Undeliverable",
    "Unreadable",
    "on_redelivery",
    "redriven_deadline",
    "settle",
]


class State(enum.StrEnum):
    """The states of a ``deliveries`` row (the table's CHECK constraint)."""

    QUEUED = "queued"
    SENDING = "sending"
    RETRY = "retry"
    UNKNOWN = "unknown"
    REDRIVE = "redrive"
    SENT = "sent"
    DELIVERED = "delivered"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"


FINAL_STATES = frozenset({State.SENT, State.DELIVERED, State.REJECTED, State.FAILED, State.EXPIRED})
SUCCESS_STATES = frozenset({State.SENT, State.DELIVERED})
# Ended without delivery: an operator may send these again (finstream dlq redrive).
REOPENABLE_STATES = frozenset({State.REJECTED, State.FAILED, State.EXPIRED})
# Not final and not waiting for an operator: what the backlog gauge counts.
ACTIVE_STATES = (State.QUEUED, State.SENDING, State.RETRY, State.UNKNOWN)

# Every move a row can make; the store's conditional UPDATEs make no other.
ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset(
        {State.SENDING, State.RETRY, State.REJECTED, State.FAILED, State.EXPIRED}
    ),
    State.SENDING: frozenset(
        {
            State.SENT,
            State.DELIVERED,
            State.QUEUED,
            State.RETRY,
            State.UNKNOWN,
            State.REJECTED,
            State.FAILED,
            State.EXPIRED,
        }
    ),
    State.RETRY: frozenset({State.QUEUED}),
    State.UNKNOWN: frozenset(
        {State.SENT, State.DELIVERED, State.QUEUED, State.UNKNOWN, State.FAILED}
    ),
    State.REDRIVE: frozenset({State.QUEUED}),
    State.SENT: frozenset(),
    State.DELIVERED: frozenset(),
    State.REJECTED: frozenset({State.REDRIVE}),
    State.FAILED: frozenset({State.REDRIVE}),
    State.EXPIRED: frozenset({State.REDRIVE}),
}

_FINAL_STATUS = {"REJECTED": State.REJECTED, "EXPIRED": State.EXPIRED}


class JobView(Protocol):
    """What settle reads of a claimed row (the store's Job has these fields)."""

    @property
    def state(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def rounds(self) -> int: ...
    @property
    def provider(self) -> str | None: ...
    @property
    def deadline(self) -> datetime: ...
    @property
    def last_error_class(self) -> str | None: ...
    @property
    def last_error(self) -> str | None: ...


@dataclass(frozen=True)
class Policy:
    retry: RetryPolicy
    reconcile_delay: float  # seconds after an unknown outcome before the lookup
    unknown_outcome: str = "deadletter"  # or "resend": settings.delivery_unknown_outcome

    def resends_unknown(self, mode: Reconcile) -> bool:
        return mode is Reconcile.IDEMPOTENT or self.unknown_outcome == "resend"


@dataclass(frozen=True)
class Step:
    transition: Transition | None
    records: tuple[Record, ...] = ()
    then: Then = Then.STOP
    reconciled: str | None = None  # how a reconciliation ended, for its metric
    deferred: bool = False  # parked without a failure of its own (every provider closed)

    @property
    def final(self) -> bool:
        return self.transition is not None and self.transition.state in FINAL_STATES


class IllegalMove(RuntimeError):
    """settle was asked about a row in a state it cannot leave that way."""


# -- deciding ------------------------------------------------------------------------------


def settle(
    job: JobView,
    outcome: Outcome,
    policy: Policy,
    *,
    now: datetime,
    rng: random.Random | None = None,
) -> Step:
    """The next step of ``job`` after ``outcome``; ``now`` and ``rng`` make it repeatable."""
    if job.state in FINAL_STATES:
        raise IllegalMove(f"a {job.state} delivery is final; only a redrive reopens it")
    step = _decide(job, outcome, policy, now, rng)
    if step.transition is not None:
        target = State(step.transition.state)
        if target not in ALLOWED[State(job.state)]:
            raise IllegalMove(f"{job.state} -> {target} is not a move of the life cycle")
    return step


def _decide(
    job: JobView, outcome: Outcome, policy: Policy, now: datetime, rng: random.Random | None
) -> Step:
    match outcome:
        case Ready(last=last):
            return _ready(job, last, policy, now)
        case NoProvider(reason=reason):
            return _undeliverable(
                job, "REJECTED", DeliveryError(ErrorClass.PERMANENT, reason), "no provider"
            )
        case Unreadable(reason=reason):
            return _undeliverable(
                job,
                "FAILED",
                DeliveryError(ErrorClass.PERMANENT, f"stored message unreadable: {reason}"),
                "undecodable",
            )
        case Unavailable(wait=wait, last=last):
            return _unavailable(job, wait, last, policy, now=now, rng=rng)
        case Accepted():
            return _accepted(outcome)
        case Failed():
            return _failed(job, outcome, policy, now, rng)
        case LookupFailed(error=error):
            return _lookup_failed(job, error, policy, now)
        case NotFound():
            return Step(None, then=Then.REQUEUE, reconciled="not_found")
        case NotAsked(reconcile=mode):
            return _not_asked(job, mode, policy)
    raise TypeError(f"not a delivery outcome: {outcome!r}")


def _error_class(value: str | None) -> ErrorClass:
    try:
        return ErrorClass(value or "")
    except ValueError:
        return ErrorClass.TRANSIENT


def _ready(job: JobView, last: DeliveryError | None, policy: Policy, now: datetime) -> Step:
    if now >= job.deadline:
        return _expired(job, last, "deadline passed before the next try")
    if job.attempts >= policy.retry.max_attempts:
        err = last or DeliveryError(
            _error_class(job.last_error_class), job.last_error or "no success"
        )
        return _undeliverable(job, "FAILED", err, f"gave up after {job.attempts} attempts")
    return Step(None, then=Then.SEND)


def _accepted(outcome: Accepted) -> Step:
    state = State.DELIVERED if outcome.status == "DELIVERED" else State.SENT
    return Step(
        Transition(state, provider_message_id=outcome.provider_message_id),
        (
            Delivered(
                outcome.provider,
                outcome.status,
                outcome.provider_message_id,
                outcome.how or outcome.note,
                outcome.how,
            ),
        ),
        reconciled="found" if outcome.how else None,
    )


def _failed(
    job: JobView, outcome: Failed, policy: Policy, now: datetime, rng: random.Random | None
) -> Step:
    error, provider = outcome.error, outcome.provider
    if error.ambiguous:
        return _ambiguous(job, outcome, policy, now, rng)
    if error.message_level:
        return _undeliverable(job, "REJECTED", error, "rejected", provider=provider)
    if outcome.others_left:
        # The provider's problem: the next provider may take it at once.
        return Step(
            Transition(
                State.QUEUED, error_class=error.error_class.value, error=str(error), keep_claim=True
            ),
            (Attempted(provider, error),),
            then=Then.SEND,
        )
    return _after_round(job, provider, error, outcome.wait_floor, policy, now=now, rng=rng)


def _ambiguous(
    job: JobView, outcome: Failed, policy: Policy, now: datetime, rng: random.Random | None
) -> Step:
    error, provider = outcome.error, outcome.provider
    if outcome.reconcile is Reconcile.LOOKUP:
        at = now + timedelta(seconds=policy.reconcile_delay)
        return Step(
            Transition(
                State.UNKNOWN, error_class="unknown_outcome", error=str(error), next_attempt_at=at
            ),
            (Attempted(provider, error, f"outcome unknown; looking it up at {at.isoformat()}"),),
        )
    if policy.resends_unknown(outcome.reconcile):
        # A resend cannot show twice (or the operator chose it): the normal
        # schedule, never the next provider at once.
        return _after_round(job, provider, error, 0.0, policy, now=now, rng=rng)
    return _undeliverable(
        job,
        "FAILED",
        DeliveryError(
            ErrorClass.TRANSIENT,
            f"{error}; {provider} cannot be asked whether it took the message and a "
            "resend could deliver it twice, so it was not resent "
            "(finstream dlq redrive sends it again)",
            provider=provider,
            code="unknown_outcome",
        ),
        "outcome unknown",
        provider=provider,
        error_class="unknown_outcome",
    )


def _after_round(
    job: JobView,
    provider: str | None,
    error: DeliveryError,
    wait_floor: float,
    policy: Policy,
    *,
    now: datetime,
    rng: random.Random | None,
) -> Step:
    """The last call of a round failed (transiently): retry later, or give up.

    ``provider`` is None when the round ended without a call of its own
    (every provider closed after an earlier failover).
    """
    decision = policy.retry.decide(
        attempts=job.attempts,
        rounds=job.rounds + 1,
        error=error,
        wait_floor=wait_floor,
        now=now,
        deadline=job.deadline,
        rng=rng,
    )
    if decision.action is RetryAction.RETRY:
        assert decision.at is not None
        records: tuple[Record, ...] = ()
        if provider is not None:
            records = (Attempted(provider, error, f"next try at {decision.at.isoformat()}"),)
        return Step(
            Transition(
                State.RETRY,
                error_class=error.error_class.value,
                error=str(error),
                next_attempt_at=decision.at,
                add_round=True,
            ),
            records,
        )
    if decision.action is RetryAction.EXPIRE:
        return _expired(job, error, decision.reason, provider=provider)
    return _undeliverable(job, "FAILED", error, decision.reason, provider=provider)


def _unavailable(
    job: JobView,
    wait: float,
    last: DeliveryError | None,
    policy: Policy,
    *,
    now: datetime,
    rng: random.Random | None,
) -> Step:
    if last is not None:
        # This round already failed over at least once: a normal retry.
        return _after_round(job, None, last, wait, policy, now=now, rng=rng)
    at = now + timedelta(seconds=defer_delay(wait, rng))
    if at > job.deadline:
        return _expired(job, None, "every provider unavailable until past the deadline")
    return Step(
        Transition(
            State.RETRY, next_attempt_at=at, error_class=job.last_error_class, error=job.last_error
        ),
        deferred=True,
    )


def _lookup_failed(job: JobView, error: DeliveryError, policy: Policy, now: datetime) -> Step:
    if error.error_class not in (ErrorClass.AUTH, ErrorClass.PERMANENT):
        at = now + timedelta(seconds=max(error.retry_after or 0.0, policy.reconcile_delay, 1.0))
        if at <= job.deadline:
            return Step(
                Transition(
                    State.UNKNOWN,
                    error_class="unknown_outcome",
                    error=f"lookup failed: {error}",
                    next_attempt_at=at,
                )
            )
    # Cannot ask after all (or not before the deadline).
    return _not_asked(job, Reconcile.NONE, policy)


def _not_asked(job: JobView, mode: Reconcile, policy: Policy) -> Step:
    provider = job.provider or "none"
    if policy.resends_unknown(mode):
        return Step(None, then=Then.REQUEUE, reconciled="resent")
    error = DeliveryError(
        ErrorClass.TRANSIENT,
        f"{provider} may have taken the message before the worker could record it; "
        f"it cannot be asked and a resend could deliver twice, so it was not resent "
        f"(finstream dlq redrive sends it again). Last: {job.last_error}",
        provider=provider,
        code="unknown_outcome",
    )
    step = _undeliverable(
        job, "FAILED", error, "outcome unknown", provider=provider, error_class="unknown_outcome"
    )
    return Step(step.transition, step.records, reconciled="unknown")


def _expired(
    job: JobView, error: DeliveryError | None, why: str, *, provider: str | None = None
) -> Step:
    err = DeliveryError(
        ErrorClass.PERMANENT,
        f"expired: {why}" + (f"; last error: {error}" if error else ""),
        provider=provider or "",
    )
    return _undeliverable(
        job, "EXPIRED", err, f"expired ({why})", provider=provider, error_class="expired"
    )


def _undeliverable(
    job: JobView,
    status: str,
    error: DeliveryError,
    verdict: str,
    *,
    provider: str | None = None,
    error_class: str | None = None,
) -> Step:
    # A refusal that says something about the recipient is named for it: the
    # feedback role reads the DeliveryResult's class to change the preferences.
    cls = error_class or (
        error.feedback.error_class if error.feedback is not None else error.error_class.value
    )
    state = _FINAL_STATUS.get(status, State.FAILED)
    return Step(
        Transition(state, error_class=cls, error=str(error)),
        (Undeliverable(status, provider or job.provider or "none", error, verdict, cls),),
    )


# -- a message seen again ------------------------------------------------------------------


class Redelivery(enum.StrEnum):
    DUPLICATE = "duplicate"  # finished: record a duplicate, never send
    REOPEN = "reopen"  # an operator redrove it: start afresh
    IN_PROGRESS = "in_progress"  # a worker (live or dead) has it; the schedule takes over


def on_redelivery(state: str) -> Redelivery:
    """What intake does with a message whose row already exists in ``state``."""
    if state in FINAL_STATES:
        return Redelivery.DUPLICATE
    if state == State.REDRIVE:
        return Redelivery.REOPEN
    return Redelivery.IN_PROGRESS


def redriven_deadline(deadline: datetime, now: datetime, policy: RetryPolicy) -> datetime:
    """An operator sent it back on purpose: a fresh deadline even if expires_at has passed."""
    return max(deadline, now + timedelta(seconds=policy.max_age))
