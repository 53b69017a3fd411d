"""The small contract every delivery provider implements, and its registry.

A provider is one module with a ``create(settings) -> Provider | None``
factory (None: not configured, so left out of its chain). Adding a provider
is that module plus one line in :data:`REGISTRY`.

A provider only talks to its service: it builds the request, sends it and
classifies the answer with its own ``classify()`` (the shared vocabulary,
:class:`~finstream.domain.delivery.errors.DeliveryError`, is in the domain). Retries,
failover, circuit breaking, rate limits and idempotency are the engine's
(:mod:`finstream.sinks.delivery.engine`), the same for every provider.

``reconcile`` says how the engine settles a send whose outcome is unknown (a
timeout after the request went out, or a worker killed between the provider's
answer and the record):

* ``LOOKUP``: the provider can be asked whether it took the message
  (:meth:`Provider.lookup`); found means sent, not found means send again;
* ``IDEMPOTENT``: sending again cannot show the user a second copy (the
  in-app inbox ignores a known message id; APNs and FCM replace a
  notification that carries the same collapse id);
* ``NONE``: nothing to ask and a resend is a visible duplicate (SES, SMTP):
  the setting ``delivery_unknown_outcome`` decides (dead-letter by default).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import httpx

from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.domain.time import utcnow
from finstream.settings import Settings

Message = Mapping[str, Any]  # a decoded OutboundMessage


@dataclass(frozen=True)
class Sent:
    """The provider took the message."""

    provider_message_id: str | None
    status: str = "SENT"  # DeliveryStatus: SENT, or DELIVERED when it is final (in-app)
    detail: str | None = None


class Provider(Protocol):
    name: str
    channel: str  # EMAIL, PUSH, SMS or INAPP
    reconcile: Reconcile
    rate: float  # requests per second this worker may make

    def supports(self, message: Message) -> bool:
        """Whether this provider can take the message at all (push: its platform)."""

    async def send(self, message: Message) -> Sent:
        """Send once. Raises DeliveryError, classified; never retries by itself."""

    async def lookup(self, message: Message, since: datetime) -> Sent | None:
        """Reconcile: the send if the provider has it, None if it provably has not.

        Raises DeliveryError when the provider cannot tell now. Only called
        when ``reconcile`` is LOOKUP.
        """

    async def close(self) -> None: ...


class HttpProvider:
    """Shared plumbing of the HTTP providers: one client, transport errors classified."""

    name = "http"
    channel = ""
    reconcile = Reconcile.NONE
    rate = 10.0

    def __init__(self, settings: Settings, *, http2: bool = False, verify: Any = True) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.delivery_timeout),
            http2=http2,
            verify=verify,
            limits=httpx.Limits(
                max_connections=max(settings.delivery_concurrency, 4),
                max_keepalive_connections=max(settings.delivery_concurrency, 4),
            ),
            follow_redirects=False,
            headers={"user-agent": "finstream-delivery/0.1"},
        )

    def supports(self, message: Message) -> bool:
        return True

    async def lookup(self, message: Message, since: datetime) -> Sent | None:
        raise DeliveryError(
            ErrorClass.PERMANENT, "this provider cannot look messages up", provider=self.name
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange; transport failures become DeliveryErrors.

        A failure before the request left (no connection) is plainly transient.
        After it left (read timeout, connection dropped), the provider may have
        acted on it: the error is ambiguous and the engine reconciles instead
        of resending.
        """
        try:
            return await self.client.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise DeliveryError(
                ErrorClass.TRANSIENT, f"cannot connect: {_describe(exc)}", provider=self.name
            ) from None
        except httpx.TimeoutException as exc:
            raise DeliveryError(
                ErrorClass.TRANSIENT,
                f"no answer in time: {_describe(exc)}",
                provider=self.name,
                ambiguous=True,
            ) from None
        except httpx.HTTPError as exc:
            raise DeliveryError(
                ErrorClass.TRANSIENT,
                f"connection failed mid-request: {_describe(exc)}",
                provider=self.name,
                ambiguous=True,
            ) from None

    @staticmethod
    def lower_headers(response: httpx.Response) -> dict[str, str]:
        return {k.lower(): v for k, v in response.headers.items()}

    @staticmethod
    def now() -> datetime:
        return utcnow()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# name -> "module:factory"; the factory returns None when the provider is not configured.
REGISTRY: dict[str, str] = {
    "sendgrid": "finstream.sinks.delivery.sendgrid:create",
    "ses": "finstream.sinks.delivery.ses:create",
    "smtp": "finstream.sinks.delivery.smtp:create",
    "fcm": "finstream.sinks.delivery.fcm:create",
    "apns": "finstream.sinks.delivery.apns:create",
    "twilio": "finstream.sinks.delivery.twilio_sms:create",
    "inbox": "finstream.sinks.delivery.inapp:create",
}

CHANNEL_TOPICS = {
    "EMAIL": "notify.outbound.email",
    "PUSH": "notify.outbound.push",
    "SMS": "notify.outbound.sms",
    "INAPP": "notify.outbound.inapp",
}


class ConfigurationError(RuntimeError):
    pass


def chain_names(settings: Settings, channel: str) -> list[str]:
    raw = {
        "EMAIL": settings.delivery_email_providers,
        "PUSH": settings.delivery_push_providers,
        "SMS": settings.delivery_sms_providers,
        "INAPP": "inbox",
    }[channel]
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigurationError(
            f"unknown {channel.lower()} provider(s) {unknown}; known: {sorted(REGISTRY)}"
        )
    return names


def build_chain(
    settings: Settings, channel: str, log: Callable[[str], None] | None = None
) -> list[Provider]:
    """The configured providers of a channel, in failover order."""
    chain: list[Provider] = []
    for name in chain_names(settings, channel):
        module, _, attr = REGISTRY[name].partition(":")
        factory: Callable[[Settings], Provider | None] = getattr(
            importlib.import_module(module), attr
        )
        provider = factory(settings)
        if provider is None:
            if log:
                log(f"{name}: not configured, left out of the {channel.lower()} chain")
            continue
        if provider.channel != channel:
            raise ConfigurationError(f"{name} delivers {provider.channel}, not {channel}")
        chain.append(provider)
    if not chain:
        raise ConfigurationError(
            f"no {channel.lower()} provider is configured (chain: {chain_names(settings, channel)}); "
            "see the delivery_* settings"
        )
    return chain
