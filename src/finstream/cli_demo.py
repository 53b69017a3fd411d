"""`finstream demo seed`: the demo personas, their alert rules and a service's notifications."""

from __future__ import annotations

import click

from finstream.settings import get_settings


@click.group()
def demo() -> None:
    """Demo data for make run: personas, alert rules, a notifying service."""


@demo.command("seed")
@click.option(
    "--quote-wait",
    type=float,
    default=20.0,
    show_default=True,
    help="Seconds to wait for quotes (crossing levels are placed around them).",
)
def seed_command(quote_wait: float) -> None:
    """Publish the demo personas' preferences, alert rules and a few notifications (idempotent)."""
    from collections import Counter

    from finstream import demo as demo_
    from finstream.cli import fail

    try:
        items = demo_.seed(get_settings(), quote_wait=quote_wait)
    except Exception as exc:  # one clear line: Kafka or Redis unreachable, a bad record
        fail(f"demo seed: {exc}")
        return
    counts = Counter(topic for topic, *_ in items)
    click.echo(
        f"demo: {counts['notify.preferences']} personas, {counts['alerts.rules']} alert rules, "
        f"{counts['notify.requests']} service notifications"
    )
    for p in demo_.PERSONAS:
        click.echo(f"  {p.user_id:<15} {p.role:<28} {p.locale:<5} {p.timezone:<14} {p.channels}")
