"""What the delivery engine reports to the life cycle, and what the life cycle asks back.

The vocabulary of :func:`finstream.domain.delivery.lifecycle.settle`: the
outcomes of a provider call or a reconciliation, the records a step writes,
and the row's :class:`Transition`. Pure data; the decisions are in
:mod:`finstream.domain.delivery.lifecycle`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from finstream.domain.delivery.errors import DeliveryError


class Reconcile(enum.StrEnum):
    """How a provider's send of unknown outcome is settled (see sinks/delivery/base.py)."""

    LOOKUP = "lookup"
    IDEMPOTENT = "idempotent"
    NONE = "none"


@dataclass(frozen=True)
class Transition:
    """How a row leaves the state the worker holds it in."""

    state: str
    provider_message_id: str | None = None
    error_class: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    keep_claim: bool = False  # stay 'queued' with our claim (fail over at once)
    add_round: bool = False


# -- what happened --------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The row is ours and about to be tried; ``last`` failed earlier in this round."""

    last: DeliveryError | None = None


@dataclass(frozen=True)
class NoProvider:
    """No provider of the chain takes this message at all."""

    reason: str


@dataclass(frozen=True)
class Unreadable:
    """The stored message does not decode or open."""

    reason: str


@dataclass(frozen=True)
class Unavailable:
    """No provider may take a call now (open circuits, rate limits) for ``wait`` seconds."""

    wait: float
    last: DeliveryError | None = None


@dataclass(frozen=True)
class Accepted:
    """The provider has the message (its answer, or a lookup found it)."""

    provider: str
    status: str  # DeliveryStatus: SENT or DELIVERED
    provider_message_id: str | None
    note: str | None = None  # the provider's detail, or how it was found
    how: str = ""  # set when found by reconciliation


@dataclass(frozen=True)
class Failed:
    """The call failed. ``others_left``: an untried provider of the chain remains."""

    provider: str
    error: DeliveryError
    reconcile: Reconcile
    others_left: bool
    wait_floor: float = 0.0  # seconds until any provider takes calls again


@dataclass(frozen=True)
class LookupFailed:
    """The provider could not say whether it has the message."""

    error: DeliveryError


@dataclass(frozen=True)
class NotFound:
    """The provider provably does not have the message."""


@dataclass(frozen=True)
class NotAsked:
    """An unknown outcome that will not be looked up (``reconcile`` says why)."""

    reconcile: Reconcile


Outcome = (
    Ready
    | NoProvider
    | Unreadable
    | Unavailable
    | Accepted
    | Failed
    | LookupFailed
    | NotFound
    | NotAsked
)

# -- what to record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Attempted:
    """A RETRYING result for the call just made."""

    provider: str
    error: DeliveryError
    note: str | None = None


@dataclass(frozen=True)
class Delivered:
    """A SENT/DELIVERED result and its audit event."""

    provider: str
    status: str
    provider_message_id: str | None
    note: str | None
    how: str


@dataclass(frozen=True)
class Undeliverable:
    """A final failure: result, dead letter with the whole story, audit.

    ``error_class`` names what the refusal says about the recipient when it says
    something (``token_invalid``, ``opted_out``): the feedback role acts on it.
    """

    status: str  # REJECTED, FAILED or EXPIRED
    provider: str
    error: DeliveryError
    verdict: str
    error_class: str  # may differ from the error's class (expired, unknown_outcome)


Record = Attempted | Delivered | Undeliverable


class Then(enum.StrEnum):
    """What the engine does once the step is recorded."""

    STOP = "stop"  # nothing more for this job now
    SEND = "send"  # call the next provider (no transition to record)
    REQUEUE = "requeue"  # unknown -> queued, then attempt at once
