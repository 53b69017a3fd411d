"""A real SMTP server (aiosmtpd) recording what it accepts.

STARTTLS or implicit TLS (with the test CA's certificate) and AUTH
(LOGIN/PLAIN, required after TLS) are switched on by the constructor. ``refused_recipients`` get
550 5.1.1 at RCPT; the fault switches act at DATA: ``throttle`` and ``error``
answer 451 4.3.0 (try again later), ``auth`` 535, ``timeout`` holds the reply
for ``hang`` seconds (not accepting), ``accept_hang`` records the message and
then holds the reply.
"""

from __future__ import annotations

import asyncio
import time
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from finstream.sandbox.base import Faults, Recorder
from finstream.sandbox.tls import Certs


class _Handler:
    def __init__(self, fake: FakeSmtp) -> None:
        self.fake = fake

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address in self.fake.refused_recipients:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        fake = self.fake
        fake.recorder.requests += 1
        kind = fake.faults.next()
        fake.recorder.faults_served[kind] += 1
        if kind in ("throttle", "error"):
            return "451 4.3.0 Temporary failure, try again later"
        if kind == "auth":
            return "535 5.7.8 Authentication credentials invalid"
        if kind == "timeout":
            await asyncio.sleep(fake.faults.hang)
            return "451 4.3.0 Temporary failure"
        mail = message_from_bytes(envelope.content, policy=default_policy)
        fake.recorder.take(
            mail.get("X-Entity-Ref-ID"),
            to=list(envelope.rcpt_tos),
            sender=envelope.mail_from,
            subject=str(mail.get("Subject")),
            message_id_header=str(mail.get("Message-ID")),
            list_unsubscribe=mail.get("List-Unsubscribe"),
            content_type=mail.get_content_type(),
            parts=[p.get_content_type() for p in mail.walk()],
            tls=session.ssl is not None,  # STARTTLS; an implicit-TLS server speaks nothing else
            authenticated=bool(session.authenticated),
            at=time.time(),
        )
        if kind == "accept_hang":
            await asyncio.sleep(fake.faults.hang)
        return "250 2.0.0 Ok: queued"


class FakeSmtp:
    def __init__(
        self,
        certs: Certs | None = None,
        users: dict[str, str] | None = None,
        *,
        implicit_tls: bool = False,
    ) -> None:
        self.recorder = Recorder()
        self.faults = Faults()
        self.refused_recipients: set[str] = set()
        self.certs = certs
        self.users = users or {}
        self.implicit_tls = implicit_tls
        self.port = 0
        self.url = ""
        self._controller: Controller | None = None

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def start(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        kwargs: dict[str, Any] = {}
        if self.certs is not None and self.implicit_tls:
            kwargs["ssl_context"] = self.certs.server_context()  # SMTPS: TLS from the first byte
        elif self.certs is not None:
            kwargs["tls_context"] = self.certs.server_context()
            kwargs["require_starttls"] = True
        if self.users:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            # aiosmtpd only counts STARTTLS as TLS (SMTP._tls_protocol): with
            # implicit TLS it would hide AUTH although every byte is encrypted.
            kwargs["auth_require_tls"] = self.certs is not None and not self.implicit_tls
        self._controller = Controller(
            _Handler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs
        )
        await asyncio.get_running_loop().run_in_executor(None, self._controller.start)
        self.url = f"smtp://127.0.0.1:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._controller is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._controller.stop)
