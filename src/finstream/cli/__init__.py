"""The `finstream` command: one module per command group.

The core groups (``stack``, ``topics``, ``db``, ``worker``/``roles``) load with
the command; every other group is one line in ``_LAZY``, imported only when
used, so `finstream stack status` does not pay for importing the stream
roles. Errors go through :func:`finstream.cli.common.fail`: one line on
stderr, exit status 1. ``python -m finstream.cli`` (``__main__``) is how
worker processes are started.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

_LAZY: dict[str, tuple[str, str]] = {
    # name: (module:attribute, help)
    "run": (
        "finstream.cli.run:run_command",
        "Run the whole pipeline locally (make run).",
    ),
    "alerts": ("finstream.cli.alerts:alerts", "Alert rules: add, list, show, remove, back-test."),
    "dlq": ("finstream.cli.dlq:dlq", "Dead letters: list, show, redrive to their source topic."),
    "api": ("finstream.cli.api:api", "Serve the API; dev tokens, OpenAPI document, live stream."),
    "connect": (
        "finstream.cli.connectors:connect_command",
        "Run market-data connectors in the foreground.",
    ),
    "providers": (
        "finstream.cli.connectors:providers_group",
        "Market-data providers: list, check credentials and limits.",
    ),
    "prefs": ("finstream.cli.prefs:prefs", "Users' notification preferences: set, show, forget."),
    "audit": ("finstream.cli.audit:audit", "Audit trail: verify the hash chain, show events."),
    # issue 16: the newcomer's demo, journeys and the status table
    "demo": ("finstream.cli.demo:demo", "Demo data: personas, alert rules, a notifying service."),
    "journey": (
        "finstream.cli.journey:journey",
        "The journey of a notification (or a user's, by time range).",
    ),
    "status": ("finstream.cli.status:status", "Every role and service: ready, lag, throughput."),
    "scheduled": (
        "finstream.cli.scheduled:scheduled",
        "Held notifications (deliver_at, quiet hours, digests): list, reschedule, cancel.",
    ),
    # issue 14: privacy
    "users": ("finstream.cli.users:users", "Erase or export a user (keys destroyed, audited)."),
    "keys": ("finstream.cli.users:keys", "Users' data keys: status, rotate, re-wrap."),
}


class _LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        from pydantic import ValidationError

        from finstream.cli.common import fail
        from finstream.settings import describe_invalid

        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            # Settings come from FINSTREAM_* variables: name them, in one line.
            if exc.title != "Settings":
                raise
            fail(describe_invalid(exc))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY:
            module, _, attr = _LAZY[cmd_name][0].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (name, self.commands[name].get_short_help_str(60))
            for name in super().list_commands(ctx)
        ]
        rows += [(name, help_) for name, (_, help_) in _LAZY.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finstream")
def main() -> None:
    """finstream: market data, alerts and notifications on Apache Kafka."""


def _add_core_commands() -> None:
    """The groups that every installation uses, loaded with the command itself."""
    from finstream.cli.db import db
    from finstream.cli.stack import stack
    from finstream.cli.topics import topics
    from finstream.cli.worker import roles, worker

    for command in (stack, topics, db, worker, roles):
        main.add_command(command)


_add_core_commands()
