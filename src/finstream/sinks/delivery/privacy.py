"""What the delivery workers seal and open: crypto-shredding on the delivery path.

The delivery engine (``engine.py``) calls these hooks:

* intake: the router's messages arrive sealed (``OutboundMessage.sealed``)
  and are opened in memory to send; a message that arrives in clear (a
  producer that does not seal) is sealed before it is stored, so
  ``deliveries.message``, ``deliveries.content`` and every dead letter of
  the worker hold it sealed;
* ``deliveries.content`` is the message's sealed part, which the API may
  read (and open with the user's key) without ever reading a body in clear;
* marketing email gets its one-click unsubscribe token
  (:mod:`finstream.domain.unsubscribe`);
* a message of an erased user is not sent (its key is gone, it cannot be
  opened): it is audited and dropped, nothing is stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from finstream.codec import Codec
from finstream.domain import unsubscribe
from finstream.domain.envelope import UserKeys, open_outbound, seal_outbound
from finstream.domain.time import utcnow
from finstream.privacy.keys import KeyRing
from finstream.privacy.kms import token_secrets
from finstream.settings import Settings


@dataclass(frozen=True)
class Opened:
    message: dict[str, Any]  # in clear, to send (``sealed`` kept, for the inbox)
    raw: bytes  # the OutboundMessage as stored and dead-lettered: sealed
    content: str  # the sealed token alone (deliveries.content)
    was_plaintext: bool


class DeliveryPrivacy:
    def __init__(self, settings: Settings, codec: Codec, pool: asyncpg.Pool, channel: str) -> None:
        self.settings = settings
        self.codec = codec
        self.ring = KeyRing.from_settings(settings, pool)
        # Only email carries unsubscribe links (and needs the secret that signs them).
        self.secrets = token_secrets(settings) if channel == "EMAIL" else []
        self._batch: dict[str, UserKeys] = {}

    async def close(self) -> None:
        await self.ring.close()

    async def prepare(self, users: Iterable[str]) -> None:
        """The keys of a batch's users, in one load (created for users who have none:
        a message in clear is sealed under them)."""
        wanted = set(users)
        self._batch = await self.ring.load(wanted, create=True) if wanted else {}

    async def keys(self, user: str) -> UserKeys:
        found = self._batch.get(user)
        return found if found is not None else await self.ring.get(user, create=True)

    async def open_intake(self, message: dict[str, Any], raw: bytes) -> Opened:
        """A consumed message opened to send; sealed first when it came in clear.

        Raises UserErased (the user's keys are destroyed) or EnvelopeError (it
        does not open).
        """
        keys = await self.keys(str(message["user_id"]))
        if keys.erased:
            from finstream.domain.envelope import UserErased

            raise UserErased(keys.user_id)
        if message.get("sealed"):
            opened = open_outbound(message, keys)
            return Opened(self._with_links(opened), raw, str(message["sealed"]), False)
        sealed = seal_outbound(message, keys)
        opened = {**message, "sealed": sealed["sealed"]}
        encoded = self.codec.encode("OutboundMessage", sealed)
        return Opened(self._with_links(opened), encoded, str(sealed["sealed"]), True)

    async def open_stored(self, message: dict[str, Any]) -> dict[str, Any]:
        """A message read back from ``deliveries.message`` (a retry), opened to send."""
        keys = await self.keys(str(message["user_id"]))
        return self._with_links(open_outbound(message, keys))

    def _with_links(self, message: dict[str, Any]) -> dict[str, Any]:
        """Marketing email carries a signed, expiring one-click unsubscribe token."""
        if (
            self.secrets
            and message.get("channel") == "EMAIL"
            and not message.get("transactional", True)
        ):
            expires = utcnow() + timedelta(days=self.settings.privacy_unsubscribe_ttl_days)
            message["unsubscribe_token"] = unsubscribe.issue(
                self.secrets[0],
                str(message["user_id"]),
                str(message.get("category") or "marketing"),
                str(message["message_id"]),
                expires,
            )
        return message
