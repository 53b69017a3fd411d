"""`finstream scheduled`: list, reschedule and cancel a user's held notifications.

``list`` reads the Redis read model of ``notify.scheduled.items`` (kept by the
statestore role). ``reschedule`` and ``cancel`` check the item is listed and
the new time (the same :func:`~finstream.domain.notify.scheduled.check_deliver_at`
as the API), then publish a command to ``notify.scheduled.commands`` keyed by
user id and print its id; the router applies it in order with the release
of the hold and audits the outcome (``finstream journey ITEM_ID`` shows it).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import uuid
from datetime import datetime
from typing import Any

import click

from finstream.cli.common import fail, when
from finstream.settings import Settings, get_settings


async def _items(settings: Settings, user: str, item_id: str | None = None) -> list[dict[str, Any]]:
    from finstream.codec import default_codec
    from finstream.stores.read_models import ScheduledStore
    from finstream.stores.redis import connect

    redis = connect(settings)
    try:
        store = ScheduledStore(redis, settings, default_codec())
        if item_id is None:
            return await store.list_for_user(user)
        found = await store.get(user, item_id)
        return [found] if found is not None else []
    finally:
        await redis.aclose()


def _read(settings: Settings, user: str, item_id: str | None = None) -> list[dict[str, Any]]:
    try:
        return asyncio.run(_items(settings, user, item_id))
    except OSError as exc:
        fail(f"cannot reach Redis: {exc} (is `finstream stack up` done?)")


def _send(settings: Settings, user: str, item_id: str, action: str, at: datetime | None) -> str:
    from finstream.codec import default_codec
    from finstream.domain.notify.scheduled import Command
    from finstream.domain.time import utcnow
    from finstream.runtime.kafka import KafkaPublisher
    from finstream.topics import contract

    if not _read(settings, user, item_id):
        fail(
            f"no scheduled notification {item_id!r} for {user} "
            f"(released, cancelled or never held; see `finstream scheduled list {user}`)"
        )
    command = Command(
        command_id=f"sc-{uuid.uuid4().hex}",
        user_id=user,
        item_id=item_id,
        action=action,
        deliver_at=at,
        requested_at=utcnow(),
        requested_by=f"cli:{getpass.getuser()}"[:200],
    )
    topic = contract("notify.scheduled.commands", settings.namespace, default_codec())

    async def go() -> None:
        pub = KafkaPublisher(settings, "cli")
        await pub.start()
        try:
            await pub.send_and_wait(topic.name, user.encode(), topic.encode(command.record()))
        finally:
            await pub.stop()

    try:
        asyncio.run(go())
    except Exception as exc:  # the broker's refusal or absence, in one line
        fail(f"cannot publish to {topic.name}: {exc}")
    return command.command_id


def _printable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in record.items()}


@click.group("scheduled")
def scheduled() -> None:
    """Held notifications (deliver_at, quiet hours, digests): list, reschedule, cancel."""


@scheduled.command("list")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="Print the items as JSON.")
def list_command(user: str, as_json: bool) -> None:
    """USER's held notifications, soonest first."""
    found = [_printable(r) for r in _read(get_settings(), user)]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"nothing held for {user}")
    for r in found:
        what = f"{r['category']}/{r['template']}" if r["template"] else r["category"]
        count = f" ({r['items']} items)" if r["kind"] == "DIGEST" else ""
        click.echo(
            f"{r['due'][:19]}  {r['item_id']:<44} {r['kind'].lower():<7} "
            f"{r['reason']:<11} {what}{count}"
        )


@scheduled.command("reschedule")
@click.argument("user")
@click.argument("item_id")
@click.option("--at", "at_text", required=True, help="ISO 8601 with a zone, or relative: +2h.")
def reschedule_command(user: str, item_id: str, at_text: str) -> None:
    """Move ITEM_ID of USER to a new release time."""
    from finstream.domain.notify.scheduled import InvalidCommand, check_deliver_at
    from finstream.domain.time import utcnow

    try:
        at = when(at_text)
        assert at is not None
        check_deliver_at(at, utcnow())
    except click.BadParameter as exc:
        fail(f"--at: {exc.message}")
    except InvalidCommand as exc:
        fail(str(exc))
    command_id = _send(get_settings(), user, item_id, "RESCHEDULE", at)
    click.echo(f"reschedule of {item_id} to {at.isoformat()} sent: command {command_id}")


@scheduled.command("cancel")
@click.argument("user")
@click.argument("item_id")
def cancel_command(user: str, item_id: str) -> None:
    """Cancel ITEM_ID of USER: it is never sent (unless its release came first)."""
    command_id = _send(get_settings(), user, item_id, "CANCEL", None)
    click.echo(f"cancel of {item_id} sent: command {command_id}")
