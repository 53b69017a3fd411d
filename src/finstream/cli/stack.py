"""`finstream stack`: the local Kafka, PostgreSQL and Redis."""

from __future__ import annotations

import sys
from typing import Any

import click

from finstream.cli.common import fail
from finstream.settings import get_settings


@click.group()
def stack() -> None:
    """Start, check and stop the local Kafka, PostgreSQL and Redis."""


@stack.command("up")
def stack_up() -> None:
    """Start what is not already running (a no-op when all is up)."""
    from finstream.stack import Stack, StackError

    try:
        Stack(get_settings()).up(log=click.echo)
    except StackError as exc:
        fail(str(exc))


@stack.command("down")
def stack_down() -> None:
    """Stop what `stack up` started; services found running elsewhere are left alone."""
    from finstream.stack import Stack

    Stack(get_settings()).down(log=click.echo)


@stack.command("status")
def stack_status() -> None:
    """Say what runs where."""
    from finstream.stack import Stack

    settings = get_settings()
    statuses = Stack(settings).status()
    for s in statuses:
        click.echo(s.render())
    # The sandboxes `finstream run` starts (issue 16): listed, not part of the exit status.
    for name, url, running in _sandboxes(settings):
        state = "running" if running else "stopped"
        click.echo(f"{name:<10} {state:<8} {url}".rstrip())
    if not all(s.running for s in statuses):
        sys.exit(3)


def _sandboxes(settings: Any) -> list[tuple[str, str, bool]]:
    """(name, URL, answering) of Mailpit and the push and SMS sandboxes."""
    import httpx

    def answers(url: str) -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code < 500
        except httpx.HTTPError:
            return False

    mail = answers(f"{settings.mailpit_url}/readyz")
    sandbox = answers(f"{settings.sandbox_url}/api/messages")
    smtp = f"smtp://{settings.sandbox_host}:{settings.mailpit_smtp_port}"
    return [
        ("mailpit", f"{settings.mailpit_url}  (web UI; SMTP {smtp})", mail),
        ("push", f"{settings.sandbox_url}/push  (FCM, APNs)", sandbox),
        ("sms", f"{settings.sandbox_url}/sms  (Twilio)", sandbox),
    ]
