"""`finstream prefs`: operators set, show and forget users' notification preferences.

Preferences live in the compacted ``notify.preferences`` topic; ``set``
validates (the same :func:`~finstream.domain.notify.preferences.parse_preferences`
as the API) and publishes a new version keyed by user id, ``forget`` publishes
a tombstone. ``show`` reads the Redis read model, which the statestore role
keeps; ``set`` waits for it to apply the new version, as the API does.

``set`` merges onto the current version unless ``--replace``: a JSON document
(``--json`` or ``--file``) replaces the fields it names, and the flags below
adjust single fields on top of it. Contact details are masked in what is
printed unless ``--reveal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from finstream.cli.common import fail
from finstream.settings import Settings, get_settings


def mask(value: str) -> str:
    """``ann@example.com`` -> ``a**@example.com``; ``+14155552671`` -> ``+1*******671``."""
    if "@" in value:
        local, _, domain = value.partition("@")
        return f"{local[:1]}{'*' * max(len(local) - 1, 2)}@{domain}"
    if len(value) <= 6:
        return "*" * len(value)
    return f"{value[:2]}{'*' * (len(value) - 5)}{value[-3:]}"


def printable(record: dict[str, Any], reveal: bool = False) -> dict[str, Any]:
    def conv(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, dict):
            return {k: conv(v) for k, v in value.items()}
        if isinstance(value, list):
            return [conv(v) for v in value]
        return value

    out: dict[str, Any] = conv(record)
    if not reveal:
        for e in out.get("emails", []):
            e["address"] = mask(e["address"])
        for p in out.get("phones", []):
            p["number"] = mask(p["number"])
        for t in out.get("push_tokens", []):
            t["token"] = mask(t["token"])
    return out


def _on_off(value: str, option: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("on", "yes", "true", "1", "in"):
        return True
    if lowered in ("off", "no", "false", "0", "out"):
        return False
    raise click.BadParameter(f"{value!r}: expected on or off", param_hint=option)


def apply_flags(data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The flags of `prefs set` applied to a preferences document."""
    for name in ("locale", "timezone"):
        if flags.get(name):
            data[name] = flags[name]
    if flags.get("email"):
        data["emails"] = [
            {"address": a, "verified": bool(flags.get("verified"))} for a in flags["email"]
        ]
    if flags.get("phone"):
        data["phones"] = [
            {"number": n, "verified": bool(flags.get("verified"))} for n in flags["phone"]
        ]
    if flags.get("push"):
        tokens = []
        for item in flags["push"]:
            platform, sep, token = item.partition(":")
            if not sep:
                raise click.BadParameter(f"{item!r}: expected PLATFORM:TOKEN", param_hint="--push")
            tokens.append({"platform": platform, "token": token})
        data["push_tokens"] = tokens
    for item in flags.get("channel") or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected CHANNEL=on|off", param_hint="--channel")
        data.setdefault("channels", {})[name] = _on_off(value, "--channel")
    for item in flags.get("category") or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(
                f"{item!r}: expected CATEGORY=off|on|CHANNEL,CHANNEL", param_hint="--category"
            )
        pref = dict(data.setdefault("categories", {}).get(name) or {})
        if value.lower() in ("on", "off"):
            pref["enabled"] = value.lower() == "on"
        else:
            pref["enabled"] = True
            pref["channels"] = [c for c in value.split(",") if c]
        data["categories"][name] = pref
    for name in flags.get("digest") or ():
        pref = dict(data.setdefault("categories", {}).get(name) or {})
        pref["digest"] = True
        data["categories"][name] = pref
    for item in flags.get("consent") or ():
        purpose, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected PURPOSE=yes|no", param_hint="--consent")
        data.setdefault("consents", []).append(
            {"purpose": purpose, "granted": _on_off(value, "--consent"), "source": "operator"}
        )
    if flags.get("quiet"):
        windows = []
        for item in flags["quiet"]:
            span, _, days = item.partition("@")
            start, sep, end = span.partition("-")
            if not sep:
                raise click.BadParameter(
                    f"{item!r}: expected HH:MM-HH:MM[@1,2,3]", param_hint="--quiet"
                )
            window: dict[str, Any] = {"start": start, "end": end}
            if days:
                try:
                    window["days"] = [int(d) for d in days.split(",")]
                except ValueError:
                    raise click.BadParameter(
                        f"{item!r}: days are 1-7", param_hint="--quiet"
                    ) from None
            windows.append(window)
        data["quiet_hours"] = windows
    if flags.get("no_quiet"):
        data["quiet_hours"] = []
    if flags.get("cap"):
        caps = []
        for item in flags["cap"]:
            # LIMIT/SECONDS[:channel][:category]
            head, *scope = item.split(":")
            limit, sep, seconds = head.partition("/")
            if not sep:
                raise click.BadParameter(
                    f"{item!r}: expected LIMIT/SECONDS[:CHANNEL][:CATEGORY]", param_hint="--cap"
                )
            try:
                cap: dict[str, Any] = {"limit": int(limit), "window_seconds": int(seconds)}
            except ValueError:
                raise click.BadParameter(
                    f"{item!r}: numbers expected", param_hint="--cap"
                ) from None
            cap["channel"] = scope[0] or None if scope else None
            cap["category"] = scope[1] or None if len(scope) > 1 else None
            caps.append(cap)
        data["caps"] = caps
    if flags.get("opt_out") is not None:
        data["global_opt_out"] = flags["opt_out"]
    return data


@contextlib.asynccontextmanager
async def _writer(settings: Settings) -> AsyncIterator[Any]:
    """Sealed, locked and audited writes, as the API makes them (issue 14)."""
    from finstream.codec import default_codec
    from finstream.privacy.keys import KeyRing
    from finstream.privacy.prefs import PreferencesWriter
    from finstream.runtime.kafka import KafkaPublisher
    from finstream.stores.postgres import create_pool
    from finstream.stores.redis import connect

    pool = await create_pool(settings, min_size=0, max_size=2)
    redis = connect(settings)
    publisher = KafkaPublisher(settings, "cli")
    await publisher.start()
    keys = KeyRing.from_settings(settings, pool)
    try:
        yield PreferencesWriter(
            settings=settings,
            codec=default_codec(),
            redis=redis,
            publisher=publisher,
            keys=keys,
            actor="cli",
        )
    finally:
        await keys.close()
        await publisher.stop()
        await redis.aclose()
        await pool.close()


async def _current(settings: Settings, user: str) -> dict[str, Any] | None:
    """The user's preferences from the read model, contacts opened."""
    async with _writer(settings) as writer:
        _record, opened = await writer.read(user)
        return opened  # type: ignore[no-any-return]


async def _publish(settings: Settings, user: str, value: bytes | None) -> None:
    from finstream.runtime.kafka import KafkaPublisher

    pub = KafkaPublisher(settings, "cli")
    await pub.start()
    try:
        # Kafka's default (murmur2) partitioner, like every finstream producer.
        await pub.send_and_wait(settings.topic("notify.preferences"), user.encode(), value)
    finally:
        await pub.stop()


@click.group()
def prefs() -> None:
    """Users' notification preferences (notify.preferences)."""


@prefs.command("set")
@click.argument("user")
@click.option("--json", "json_text", help="Preferences as a JSON object.")
@click.option("--file", "json_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--replace", is_flag=True, help="Start from nothing instead of the current version.")
@click.option("--locale")
@click.option("--timezone", help="IANA zone, e.g. Europe/Berlin.")
@click.option("--email", multiple=True, help="Email address (repeat; replaces the list).")
@click.option("--phone", multiple=True, help="E.164 number (repeat; replaces the list).")
@click.option("--push", multiple=True, help="PLATFORM:TOKEN, FCM or APNS (repeat).")
@click.option("--verified", is_flag=True, help="Mark the --email/--phone contacts verified.")
@click.option("--channel", multiple=True, help="CHANNEL=on|off, e.g. sms=off.")
@click.option("--category", multiple=True, help="CATEGORY=on|off|CHANNEL,CHANNEL.")
@click.option(
    "--digest", multiple=True, help="Fold low-priority messages of CATEGORY into a digest."
)
@click.option("--consent", multiple=True, help="PURPOSE=yes|no, e.g. marketing=yes.")
@click.option("--quiet", multiple=True, help="HH:MM-HH:MM[@DAYS], e.g. 22:00-07:00@1,2,3,4,5.")
@click.option("--no-quiet", is_flag=True, help="Remove all quiet hours.")
@click.option("--cap", multiple=True, help="LIMIT/SECONDS[:CHANNEL][:CATEGORY], e.g. 5/3600:push.")
@click.option("--opt-out/--opt-in", default=None, help="Global opt-out of every notification.")
@click.option("--reveal", is_flag=True, help="Print contact details unmasked.")
def prefs_set(
    user: str,
    json_text: str | None,
    json_file: Path | None,
    replace: bool,
    reveal: bool,
    **flags: Any,
) -> None:
    """Validate and publish a new version of USER's preferences (contacts sealed, audited)."""
    from finstream.domain.envelope import UserErased
    from finstream.domain.notify.preferences import PreferencesValidationError, parse_preferences
    from finstream.domain.time import utcnow
    from finstream.domain.verification import assign_contact_ids
    from finstream.privacy.prefs import Busy

    settings = get_settings()
    docs: list[dict[str, Any]] = []
    for text in (json_text, json_file.read_text() if json_file else None):
        if text is None:
            continue
        try:
            doc = json.loads(text)
        except ValueError as exc:
            fail(f"preferences JSON does not parse: {exc}")
        if not isinstance(doc, dict):
            fail("preferences JSON must be an object")
        docs.append(doc)

    async def go() -> tuple[dict[str, Any], bool]:
        async with _writer(settings) as writer, writer.lock(user):
            current, opened = await writer.settled(user)
            data: dict[str, Any] = dict(opened) if opened is not None and not replace else {}
            for doc in docs:
                data.update(doc)
            data["user_id"] = user
            data = apply_flags(data, flags)
            try:
                record = parse_preferences(data, now=utcnow(), consent_source="operator")
            except PreferencesValidationError as exc:
                fail(exc.message)
            written = await writer.write(
                user,
                assign_contact_ids(record),
                current,
                opened,
                reason="finstream prefs set",
            )
            return written.opened, written.applied

    try:
        record, applied = asyncio.run(go())
    except (UserErased, Busy) as exc:
        fail(str(exc))
    click.echo(json.dumps(printable(record, reveal), indent=2, ensure_ascii=False))
    click.echo(f"published to {settings.topic('notify.preferences')}", err=True)
    if not applied:
        click.echo(
            f"not applied to the read model within {settings.prefs_apply_wait:g}s: is the "
            "statestore role running? `prefs show` shows the version before it until it is",
            err=True,
        )


@prefs.command("show")
@click.argument("user")
@click.option("--reveal", is_flag=True, help="Print contact details unmasked.")
def prefs_show(user: str, reveal: bool) -> None:
    """Print USER's preferences (from the Redis read model)."""
    record = asyncio.run(_current(get_settings(), user))
    if record is None:
        fail(f"no preferences for {user!r} (defaults apply: in-app only)")
    assert record is not None
    click.echo(json.dumps(printable(record, reveal), indent=2, ensure_ascii=False))


@prefs.command("forget")
@click.argument("user")
@click.confirmation_option(prompt="Forget this user's preferences, contacts and held messages?")
def prefs_forget(user: str) -> None:
    """Publish a tombstone: the router forgets USER's preferences, state and held messages.

    Not an erasure: deliveries, the inbox, rules and sealed copies on topics stay
    (`finstream users forget USER` erases a user)."""
    settings = get_settings()
    asyncio.run(_publish(settings, user, None))
    click.echo(f"tombstone for {user} published to {settings.topic('notify.preferences')}")
    click.echo(
        "not an erasure: `finstream users forget USER` also destroys the user's keys and "
        "deletes their deliveries, inbox, rules and verifications",
        err=True,
    )
