"""SMTP with aiosmtplib: implicit TLS, STARTTLS or plain; AUTH when configured.

Connections are kept open and reused (a small pool); the envelope is sent
step by step (MAIL, RCPT, DATA) so that a failure is classified by the stage
it happened in: a refused recipient is the recipient's problem, a dropped
connection before DATA is harmlessly transient, and one after the message
went on the wire leaves the outcome unknown.

The Message-ID is derived from the message id, the same on every try. SMTP
has no way to ask whether a server took a message: an ambiguous send is
settled by ``delivery_unknown_outcome``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from typing import Any

import aiosmtplib

from finstream.domain.delivery.channels import email_message_id, email_parts
from finstream.domain.delivery.errors import DeliveryError
from finstream.domain.delivery.lifecycle import Reconcile
from finstream.domain.resilience import ErrorClass
from finstream.settings import Settings
from finstream.sinks.delivery.base import Message, Sent

POOL_SIZE = 4


def build_email(message: Message, settings: Settings) -> tuple[EmailMessage, str, str]:
    """The MIME message (multipart/alternative when there is HTML), sender and recipient."""
    parts = email_parts(
        message,
        settings.delivery_email_from,
        settings.delivery_email_unsubscribe_url,
        settings.delivery_email_unsubscribe_mailto,
    )
    mail = EmailMessage()
    try:
        mail["From"] = formataddr((parts.from_name, parts.from_address))
        mail["To"] = parts.to
        mail["Subject"] = parts.subject
        mail["Date"] = formatdate(localtime=False, usegmt=True)
        mail["Message-ID"] = email_message_id(str(message["message_id"]), parts.domain)
        for name, value in parts.headers.items():
            mail[name] = value
    except ValueError as exc:  # a line break in a header: header injection
        raise DeliveryError(ErrorClass.PERMANENT, f"bad header: {exc}", provider="smtp") from None
    mail.set_content(parts.text)
    if parts.html:
        mail.add_alternative(parts.html, subtype="html")
    return mail, parts.from_address, parts.to


# -- classification of the answers --------------------------------------------------


class SmtpStage(enum.StrEnum):
    CONNECT = "connect"  # connect, EHLO, STARTTLS, AUTH: nothing sent yet
    ENVELOPE = "envelope"  # MAIL FROM / RCPT TO: the server has not got the message
    DATA = "data"  # the message is on the wire: a lost reply leaves the outcome unknown


def classify(code: int | None, message: str, stage: SmtpStage) -> DeliveryError:
    """An SMTP failure. ``code`` is the reply code, None when the connection failed."""
    text = message or "no reply"
    if code is None:
        # Connection refused, reset or timed out: harmless before DATA, ambiguous after.
        return DeliveryError(
            ErrorClass.TRANSIENT,
            f"{stage.value}: {text}",
            provider="smtp",
            ambiguous=stage is SmtpStage.DATA,
        )
    if code in (530, 534, 535, 538):
        cls = ErrorClass.AUTH
    elif 400 <= code < 500:
        cls = ErrorClass.TRANSIENT
    elif stage is SmtpStage.ENVELOPE and code in (550, 551, 553, 501):
        cls = ErrorClass.INVALID_RECIPIENT
    elif stage is SmtpStage.CONNECT:
        cls = ErrorClass.AUTH  # the server refuses us, not this message
    else:
        cls = ErrorClass.PERMANENT
    return DeliveryError(cls, f"{stage.value}: {code} {text}", provider="smtp", code=str(code))


class Smtp:
    name = "smtp"
    channel = "EMAIL"
    reconcile = Reconcile.NONE

    def __init__(self, settings: Settings, host: str) -> None:
        self.settings = settings
        self.rate = settings.delivery_smtp_rate
        self._host = host
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(min(POOL_SIZE, settings.delivery_concurrency))

    def supports(self, message: Message) -> bool:
        return True

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        kwargs: dict[str, Any] = {
            "hostname": self._host,
            "port": s.delivery_smtp_port,
            "timeout": s.delivery_timeout,
            "use_tls": s.delivery_smtp_security == "tls",
            "start_tls": s.delivery_smtp_security == "starttls",
            "validate_certs": s.delivery_smtp_validate_certs,
        }
        if s.delivery_smtp_ca_file is not None:
            kwargs["cert_bundle"] = str(s.delivery_smtp_ca_file)
        if s.delivery_smtp_username:
            kwargs["username"] = s.delivery_smtp_username
            kwargs["password"] = (
                s.delivery_smtp_password.get_secret_value() if s.delivery_smtp_password else ""
            )
        return aiosmtplib.SMTP(**kwargs)

    async def _connected(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        client = self._client()
        try:
            await client.connect()  # STARTTLS and AUTH happen here when configured
        except (aiosmtplib.SMTPException, OSError) as exc:
            with contextlib.suppress(Exception):
                client.close()
            raise _classify_exception(exc, SmtpStage.CONNECT) from None
        return client

    async def send(self, message: Message) -> Sent:
        mail, sender, recipient = build_email(message, self.settings)
        async with self._slots:
            client = await self._connected()
            stage = SmtpStage.ENVELOPE
            try:
                await client.mail(sender)
                await client.rcpt(recipient)
                stage = SmtpStage.DATA
                response = await client.data(mail.as_bytes())
            except (aiosmtplib.SMTPException, OSError) as exc:
                error = _classify_exception(exc, stage)
                await self._recycle(client, reusable=error.code is not None)
                raise error from None
            self._idle.append(client)
        return Sent(str(mail["Message-ID"]), detail=f"{response.code} {response.message}"[:200])

    async def _recycle(self, client: aiosmtplib.SMTP, *, reusable: bool) -> None:
        """After a refused envelope the connection is still good (RSET); else drop it."""
        if reusable and client.is_connected:
            try:
                await client.rset()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
                return
            self._idle.append(client)
        else:
            client.close()

    async def lookup(self, message: Message, since: Any) -> Sent | None:
        raise DeliveryError(ErrorClass.PERMANENT, "SMTP cannot look messages up", provider="smtp")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(Exception):
                await client.quit()


def _classify_exception(exc: BaseException, stage: SmtpStage) -> DeliveryError:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        error = classify(exc.code, exc.message, stage)
    elif isinstance(exc, aiosmtplib.SMTPNotSupported):
        # e.g. STARTTLS required by our settings but not offered: set-up, not the message.
        error = DeliveryError(ErrorClass.AUTH, f"{stage.value}: {exc}", provider="smtp")
    else:
        error = classify(None, f"{type(exc).__name__}: {exc}", stage)
    return error


def create(settings: Settings) -> Smtp | None:
    if not settings.delivery_smtp_host:
        return None
    return Smtp(settings, settings.delivery_smtp_host)
