"""The `finstream` command.

Core commands live here; each capability adds its command group in its own
module and one line in ``_LAZY`` (loaded only when used, so `finstream stack
status` does not pay for importing the stream roles).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from finstream.settings import get_settings

_LAZY: dict[str, tuple[str, str]] = {
    # name: (module:attribute, help)
    "run": (
        "finstream.runtime.supervisor:run_command",
        "Run the whole pipeline locally (make run).",
    ),
    "alerts": ("finstream.cli_alerts:alerts", "Alert rules: add, list, show, remove, back-test."),
    "dlq": ("finstream.cli_dlq:dlq", "Dead letters: list, show, redrive to their source topic."),
    "api": ("finstream.api.cli:api", "Serve the API; dev tokens, OpenAPI document, live stream."),
    "connect": (
        "finstream.cli_connectors:connect_command",
        "Run market-data connectors in the foreground.",
    ),
    "providers": (
        "finstream.cli_connectors:providers_group",
        "Market-data providers: list, check credentials and limits.",
    ),
    "prefs": ("finstream.cli_prefs:prefs", "Users' notification preferences: set, show, forget."),
    "audit": ("finstream.cli_audit:audit", "Audit trail: verify the hash chain, show events."),
    # issue 16: the newcomer's demo, journeys and the status table
    "demo": ("finstream.cli_demo:demo", "Demo data: personas, alert rules, a notifying service."),
    "journey": (
        "finstream.cli_journey:journey",
        "The journey of a notification (or a user's, by time range).",
    ),
    "status": ("finstream.cli_status:status", "Every role and service: ready, lag, throughput."),
    # issue 14: privacy
    "users": ("finstream.cli_users:users", "Erase or export a user (keys destroyed, audited)."),
    "keys": ("finstream.cli_users:keys", "Users' data keys: status, rotate, re-wrap."),
}


class _LazyGroup(click.Group):
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


def fail(message: str) -> None:
    """Exit with one clear line on stderr."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finstream")
def main() -> None:
    """finstream: market data, alerts and notifications on Apache Kafka."""


# -- stack ----------------------------------------------------------------------


@main.group()
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


# -- topics ---------------------------------------------------------------------


@main.group()
def topics() -> None:
    """The topic catalogue (topics.yaml)."""


@topics.command("apply")
@click.option("--dry-run", is_flag=True, help="Print the diff only.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Catalogue to apply (default: the project's topics.yaml).",
)
@click.option(
    "--replication-factor",
    type=int,
    default=None,
    help="Override every topic's replication factor (production clusters).",
)
def topics_apply(dry_run: bool, replication_factor: int | None, path: Path | None = None) -> None:
    """Create missing topics, raise partition counts and update configs; print the diff."""
    from finstream import topics as t

    settings = get_settings()
    try:
        catalogue = t.load_catalogue(path)
    except t.CatalogueError as exc:
        fail(str(exc))
        return
    names = [settings.topic(n) for n in catalogue.names]
    try:
        existing = t.describe(settings.kafka_bootstrap, names)
    except Exception as exc:
        fail(
            f"cannot read topics from Kafka at {settings.kafka_bootstrap}: {exc} (is `finstream stack up` done?)"
        )
        return
    changes = t.plan(catalogue, existing, settings.namespace, replication_factor)
    if not changes:
        click.echo(f"topics: {len(names)} up to date")
        return
    for change in changes:
        click.echo(change.render())
    refused = [c for c in changes if c.kind == "refuse"]
    if refused:
        fail(f"{len(refused)} change(s) refused; nothing applied")
    if dry_run:
        click.echo("(dry run: nothing applied)")
        return
    try:
        t.apply(settings.kafka_bootstrap, changes, replication_factor)
    except RuntimeError as exc:
        fail(str(exc))
    applied = sum(1 for c in changes if c.kind in ("create", "partitions", "config"))
    click.echo(f"topics: {applied} change(s) applied")


@topics.command("list")
def topics_list() -> None:
    """The catalogue with each topic's partitions, policy and schema."""
    from finstream import topics as t

    settings = get_settings()
    for spec in t.load_catalogue().topics:
        click.echo(
            f"{settings.topic(spec.name):<28} p={spec.partitions:<3} {spec.cleanup_policy:<14} "
            f"key={spec.key:<14} value={spec.value_schema}"
        )


def _when(value: str | None) -> datetime | None:
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


@topics.command("tail")
@click.argument("topic")
@click.option("-n", "--lines", default=10, show_default=True, help="Last N messages per partition.")
def topics_tail(topic: str, lines: int) -> None:
    """The last messages of a catalogue topic, decoded, as JSON lines."""
    from finstream import replay
    from finstream.codec import default_codec

    settings = get_settings()
    name = settings.topic(topic)
    try:
        records = replay.read_range(settings, name, None, None, tail=lines)
        replay.write_jsonl(
            records, sys.stdout, default_codec(), replay.value_schema(settings, name)
        )
    except replay.ReplayError as exc:
        fail(str(exc))


@topics.command("replay")
@click.argument("topic")
@click.option("--from", "start", required=True, help="Start time: ISO 8601 with zone, or -2h.")
@click.option("--to", "end", default=None, help="End time (exclusive); default: now.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write decoded JSON lines to this file ('-' for stdout).",
)
@click.option("--to-topic", default=None, help="Copy the records into this sandbox topic instead.")
def topics_replay(
    topic: str, start: str, end: str | None, out: Path | None, to_topic: str | None
) -> None:
    """Replay a topic over a time range into a file or a sandbox topic."""
    from tqdm import tqdm

    from finstream import replay
    from finstream.codec import default_codec

    if (out is None) == (to_topic is None):
        fail("give exactly one of --out FILE or --to-topic NAME")
    settings = get_settings()
    name = settings.topic(topic)
    t1, t2 = _when(start), _when(end)
    if t1 is not None and t2 is not None and t2 <= t1:
        fail("--to must be after --from")
    bar = tqdm(unit="msg", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        records = replay.read_range(settings, name, t1, t2, on_progress=progress)
        if to_topic is not None:
            target = settings.topic(to_topic)
            replay.ensure_sandbox(settings, name, target)
            count = replay.copy_to_topic(settings, records, target)
            where = target
        elif str(out) == "-":
            count = replay.write_jsonl(
                records, sys.stdout, default_codec(), replay.value_schema(settings, name)
            )
            where = "stdout"
        else:
            assert out is not None
            with out.open("w") as fh:
                count = replay.write_jsonl(
                    records, fh, default_codec(), replay.value_schema(settings, name)
                )
            where = str(out)
    except replay.ReplayError as exc:
        bar.close()
        fail(str(exc))
        return
    bar.close()
    click.echo(f"replayed {count} message(s) of {name} into {where}", err=True)


# -- database -------------------------------------------------------------------


@main.group()
def db() -> None:
    """PostgreSQL: schema, backups and restore, retention, health."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply pending SQL migrations (idempotent)."""
    from finstream.sinks.postgres import MigrationError, connect, migrate

    async def go() -> list[Any]:
        conn = await connect(get_settings())
        try:
            return await migrate(conn)
        finally:
            await conn.close()

    try:
        applied = asyncio.run(go())
    except MigrationError as exc:
        fail(str(exc))
        return
    except OSError as exc:
        fail(f"cannot reach PostgreSQL: {exc} (is `finstream stack up` done?)")
        return
    for m in applied:
        click.echo(f"applied {m.version:04d}_{m.name}")
    click.echo(f"database: {len(applied)} migration(s) applied, schema up to date")


def _add_db_commands() -> None:
    """backup, backups, verify, restore, init, reset, retention, health, stats, slow-queries."""
    from finstream.cli_db import COMMANDS

    for command in COMMANDS:
        db.add_command(command)


_add_db_commands()


# -- workers --------------------------------------------------------------------


@main.command("worker")
@click.argument("role")
def worker(role: str) -> None:
    """Run one worker role in this process (see `finstream roles`)."""
    from finstream.privacy.kms import PrivacyConfigError
    from finstream.runtime.worker import run_role

    try:
        run_role(role)
    except PrivacyConfigError as exc:  # missing keys or a placeholder link: one line
        fail(str(exc))


@main.command("roles")
def roles() -> None:
    """The worker roles and what each consumes."""
    from finstream.roles import ROLES

    for spec in ROLES.values():
        inputs = ", ".join(spec.inputs) or "-"
        click.echo(f"{spec.name:<16} {spec.kind:<8} in: {inputs:<28} {spec.description}")


if __name__ == "__main__":  # pragma: no cover
    main()
