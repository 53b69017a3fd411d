"""What every `finstream` command shares: one way to fail, one way to read a time."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from typing import NoReturn

import click


def fail(message: str) -> NoReturn:
    """Exit with one clear line on stderr."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def when(value: str | None) -> datetime | None:
    """ISO 8601 (a zone is required) or relative to now: -15m, -2h, -7d."""
    if value is None:
        return None
    from finstream.domain.time import utcnow

    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:1] in "+-" and text[-1:] in units and text[1:-1].isdigit():
        sign = -1 if text[0] == "-" else 1
        return utcnow() + timedelta(seconds=sign * int(text[1:-1]) * units[text[-1]])
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither ISO 8601 nor relative like -15m") from None
    if parsed.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no time zone (add Z or +00:00)")
    return parsed
