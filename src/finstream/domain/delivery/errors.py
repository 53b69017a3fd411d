"""What a provider's answer means: the vocabulary every provider's ``classify()`` shares.

:class:`DeliveryError` (a :class:`~finstream.domain.resilience.ProviderError`
that also says whether the outcome is *ambiguous* and what :class:`Feedback`
the answer carries for the user's preferences), and the helpers the
classifications build on: :func:`by_status` (the class an HTTP status
implies), :func:`throttle_delay` (``Retry-After`` and rate-limit resets),
:func:`json_body` and :func:`snippet`. Each provider's classification of its
documented answers lives beside it, in its module of
:mod:`finstream.sinks.delivery`.

An *ambiguous* error is one after which the provider may or may not have
accepted the message (a read timeout, a dropped connection after the request
was written, a 2xx answer without the documented shape). Retrying it blindly
could send twice, so the engine reconciles it instead (see
:mod:`finstream.domain.delivery.lifecycle`).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from finstream.domain.resilience import ErrorClass, ProviderError, parse_retry_after


class Feedback(enum.StrEnum):
    """What a provider's answer says about the recipient, for the user's preferences."""

    TOKEN_INVALID = "push_token_invalidated"  # noqa: S105 (not a secret) FCM UNREGISTERED, APNs 410 Unregistered
    PHONE_OPTED_OUT = "phone_opted_out"  # Twilio 21610: the recipient replied STOP

    @property
    def error_class(self) -> str:
        """The DeliveryResult's ``error_class`` that carries this to the feedback role.

        The feedback role (:func:`finstream.domain.feedback.change_for`) makes the
        preference change; "opted_out" is also what a Twilio status callback says.
        """
        return _FEEDBACK_CLASSES[self]


_FEEDBACK_CLASSES = {Feedback.TOKEN_INVALID: "token_invalid", Feedback.PHONE_OPTED_OUT: "opted_out"}


class DeliveryError(ProviderError):
    """A classified delivery failure.

    ``ambiguous``: the provider may have accepted the message (do not resend
    blindly). ``feedback``: what to record in the user's preferences.
    """

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        provider: str = "",
        retry_after: float | None = None,
        status: int | None = None,
        code: str | None = None,
        ambiguous: bool = False,
        feedback: Feedback | None = None,
    ) -> None:
        super().__init__(
            error_class,
            message,
            provider=provider,
            retry_after=retry_after,
            status=status,
            code=code,
        )
        self.ambiguous = ambiguous
        self.feedback = feedback

    @property
    def message_level(self) -> bool:
        """The message itself is undeliverable: no other provider would take it either."""
        return self.error_class in (ErrorClass.INVALID_RECIPIENT, ErrorClass.PERMANENT)

    def detail(self) -> str:
        """The message with its status and code, without provider and class (shown beside)."""
        text = str(self.args[0])
        if self.status is not None:
            text += f" (status {self.status})"
        if self.code:
            text += f" [{self.code}]"
        if self.ambiguous:
            text += " (outcome unknown)"
        return text

    def __str__(self) -> str:
        where = f"{self.provider}: " if self.provider else ""
        return f"{where}{self.error_class.value}: {self.detail()}"


MAX_WAIT_SECONDS = 24 * 3600.0


def throttle_delay(headers: Mapping[str, str], now: datetime) -> float | None:
    """Seconds to wait from ``Retry-After`` or an ``X-RateLimit-Reset`` epoch (the later).

    ``headers`` must have lower-case names.
    """
    waits: list[float] = []
    after = parse_retry_after(headers.get("retry-after"), now)
    if after is not None:
        waits.append(after)
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            epoch = float(reset.strip())
        except ValueError:
            epoch = math.nan
        if math.isfinite(epoch):
            waits.append(min(max(epoch - now.timestamp(), 0.0), MAX_WAIT_SECONDS))
    return max(waits) if waits else None


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def by_status(
    provider: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    retry_after: float | None = None,
) -> DeliveryError:
    """The class an HTTP status implies when the body says nothing more precise."""
    if status == 429:
        cls = ErrorClass.THROTTLED
    elif status in (401, 403):
        cls = ErrorClass.AUTH
    elif status >= 500 or status in (408, 425):
        cls = ErrorClass.TRANSIENT
    else:
        cls = ErrorClass.PERMANENT
    return DeliveryError(
        cls,
        message,
        provider=provider,
        status=status,
        code=code,
        retry_after=retry_after if cls.retryable else None,
    )
