"""`finstream status [--watch]`: every role and service of `finstream run` in one table."""

from __future__ import annotations

import time

import click

from finstream.settings import get_settings


@click.command("status")
@click.option("--watch", is_flag=True, help="Refresh the table until Ctrl-C.")
@click.option(
    "--interval", type=float, default=5.0, show_default=True, help="Seconds, with --watch."
)
def status(watch: bool, interval: float) -> None:
    """Up/ready, consumer lag, events per second over the last minute, dead letters and the
    last error of every role, and whether each service answers."""
    from finstream.stack import status as s

    settings = get_settings()
    try:
        while True:
            table = s.render(s.collect(settings), s.services(settings))
            if watch:
                click.clear()
                click.echo(f"finstream status  {time.strftime('%H:%M:%S')}  (Ctrl-C stops)\n")
            click.echo(table)
            if not watch:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
