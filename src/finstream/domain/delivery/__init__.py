"""Delivery policy, pure: what a provider's answer means and what to do next.

Everything here is I/O free and clock-injected, so it is tested exhaustively.
The package holds:

* :mod:`.errors`: :class:`~.errors.DeliveryError` (ambiguous outcomes,
  preference feedback) and the helpers every provider's ``classify()``
  shares; each provider's classification lives beside it, in its module of
  :mod:`finstream.sinks.delivery`;
* :mod:`.channels`: SMS segments and E.164, email addresses and headers, push
  ids, recipients masked, and validation of an outbound message before any
  provider sees it;
* :mod:`.lifecycle` (with :mod:`.outcomes`): the states of a delivery and
  every move between them;
* this module: the retry schedule (:class:`RetryPolicy`): exponential backoff
  with full jitter, never earlier than the provider's ``Retry-After`` /
  rate-limit reset, never past the message's deadline; and the dead-letter
  reason. What a refusal says about the recipient (an unregistered push token,
  an opted-out number) travels in the result's ``error_class``
  (:attr:`.errors.Feedback.error_class`); the feedback role changes the
  preferences (:mod:`finstream.domain.feedback`).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from finstream.domain.delivery.errors import MAX_WAIT_SECONDS
from finstream.domain.resilience import Backoff, ErrorClass, ProviderError

# -- retry schedule -------------------------------------------------------------------


class RetryAction(enum.StrEnum):
    RETRY = "retry"
    FAIL = "fail"
    EXPIRE = "expire"


@dataclass(frozen=True)
class RetryDecision:
    action: RetryAction
    at: datetime | None = None  # when to retry
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed message is tried again, and when it is given up."""

    max_attempts: int = 6
    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=300.0))
    max_age: float = 86400.0  # seconds after created_at when no expires_at is given

    def deadline(self, created_at: datetime, expires_at: datetime | None) -> datetime:
        limit = created_at + timedelta(seconds=self.max_age)
        return min(limit, expires_at) if expires_at is not None else limit

    def decide(
        self,
        *,
        attempts: int,
        rounds: int,
        error: ProviderError | None,
        wait_floor: float | None,
        now: datetime,
        deadline: datetime,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """After ``attempts`` provider calls in ``rounds`` scheduled rounds, the last failing.

        ``wait_floor``: the earliest any provider will take a call again
        (Retry-After, a rate-limit reset, an open circuit's cool-down).
        """
        if error is not None and not error.error_class.retryable and not _provider_level(error):
            return RetryDecision(RetryAction.FAIL, reason=f"not retryable: {error}")
        if attempts >= self.max_attempts:
            return RetryDecision(
                RetryAction.FAIL, reason=f"gave up after {attempts} attempts (the maximum)"
            )
        floor = max(wait_floor or 0.0, (error.retry_after or 0.0) if error else 0.0)
        delay = self.backoff.delay(max(rounds, 1), rng, floor=floor)
        at = now + timedelta(seconds=delay)
        if now >= deadline or at > deadline:
            return RetryDecision(
                RetryAction.EXPIRE,
                reason=f"next try at {at.isoformat()} would be past the deadline {deadline.isoformat()}",
            )
        return RetryDecision(RetryAction.RETRY, at=at, reason=f"retry in {delay:.2f}s")


def _provider_level(error: ProviderError) -> bool:
    # AUTH is the provider's problem (credentials, suspended account): another
    # provider, or the same one once fixed, may still deliver the message.
    return error.error_class is ErrorClass.AUTH


def defer_delay(provider_wait: float, rng: random.Random | None = None) -> float:
    """Wait when every provider is closed or rate limited: its wait plus a little jitter."""
    wait = max(provider_wait, 0.05)
    return min(wait + (rng or random).uniform(0, min(1.0, wait * 0.1)), MAX_WAIT_SECONDS)


# -- dead-letter reason -----------------------------------------------------------------


@dataclass(frozen=True)
class AttemptSummary:
    attempt: int
    provider: str
    status: str
    error_class: str | None
    error: str | None


def dead_letter_reason(verdict: str, attempts: Sequence[AttemptSummary]) -> str:
    """The full story of an undeliverable message, for the dlq.error.message header."""
    lines = [verdict]
    for a in attempts:
        what = f"{a.error_class}: {a.error}" if a.error_class else (a.error or "")
        lines.append(f"#{a.attempt} {a.provider} {a.status} {what}".rstrip())
    return " | ".join(lines)
