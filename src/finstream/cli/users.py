"""`finstream users forget|export|sweep` and `finstream keys status|rotate|rewrap`.

The operator's side of ``DELETE /v1/users/{id}`` and ``GET /v1/users/{id}/export``
(the same code: :mod:`finstream.privacy.erasure`, :mod:`finstream.privacy.export`),
and the key rotations of the README's Privacy section.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import click

from finstream.settings import Settings, get_settings


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@contextlib.asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[Any]:
    from finstream.codec import default_codec
    from finstream.privacy.erasure import Services
    from finstream.privacy.keys import KeyRing
    from finstream.runtime.kafka import KafkaPublisher
    from finstream.runtime.logging import configure_logging
    from finstream.stores.postgres import create_pool
    from finstream.stores.redis import connect

    # Logs go to stderr: stdout is the command's JSON.
    configure_logging(settings.log_level, "console", role="cli")
    pool = await create_pool(settings, min_size=0, max_size=2)
    redis = connect(settings)
    publisher = KafkaPublisher(settings, "cli")
    await publisher.start()
    keys = KeyRing.from_settings(settings, pool)
    try:
        yield Services(settings, default_codec(), pool, redis, publisher, keys)
    finally:
        await keys.close()
        await publisher.stop()
        await redis.aclose()
        await pool.close()


def _run(coro: Any) -> Any:
    from finstream.privacy.kms import PrivacyConfigError

    try:
        return asyncio.run(coro)
    except PrivacyConfigError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot reach the stack: {exc} (is `finstream stack up` done?)")
    return None


@click.group()
def users() -> None:
    """Erase or export a user (the operator's side of DELETE and GET /v1/users/{id})."""


@users.command("forget")
@click.argument("user")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--wait",
    is_flag=True,
    help="Also run the second sweep here, once every worker's key cache has lapsed.",
)
def users_forget(user: str, yes: bool, wait: bool) -> None:
    """Erase USER: destroy their keys, delete their rows, keys and records (audited)."""
    from finstream.privacy import erasure

    if not yes:
        click.confirm(
            f"Erase {user}? Their data keys are destroyed: this cannot be undone.", abort=True
        )
    settings = get_settings()

    async def go() -> Any:
        async with _services(settings) as s:
            done = await erasure.erase(s, user, by="operator:cli")
            if wait:
                await asyncio.sleep(settings.privacy_erasure_sweep_seconds)
                await erasure.run_due_sweeps(s)
            return done

    done = _run(go())
    click.echo(json.dumps(done.as_json(), indent=2))
    if not wait:
        click.echo(
            f"a second sweep follows in {settings.privacy_erasure_sweep_seconds:g} s "
            "(the API runs it; `finstream users sweep` does too)",
            err=True,
        )


@users.command("export")
@click.argument("user")
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False), help="A file.")
def users_export(user: str, out: Path | None) -> None:
    """Everything held about USER, as JSON (audited)."""
    from finstream.privacy import export
    from finstream.privacy.prefs import audit_record, publish_audit

    settings = get_settings()

    async def go() -> Any:
        async with _services(settings) as s:
            bundle = await export.export(
                export.Sources(s.settings, s.codec, s.pg, s.redis, s.keys), user
            )
            await publish_audit(
                s.publisher,
                settings,
                s.codec,
                audit_record(
                    actor="cli",
                    action="user_exported",
                    subject_type="user",
                    subject_id=user,
                    user_id=user,
                    reason="finstream users export",
                    details={"deliveries": str(len(bundle["deliveries"]))},
                ),
            )
            return bundle

    bundle = _run(go())
    text = json.dumps(bundle, indent=2, ensure_ascii=False)
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n")
        click.echo(f"wrote {out}", err=True)


@users.command("sweep")
def users_sweep() -> None:
    """Run the erasures' second sweeps that are due."""
    from finstream.privacy import erasure

    async def go() -> int:
        async with _services(get_settings()) as s:
            return await erasure.run_due_sweeps(s, limit=10_000)

    click.echo(f"{_run(go())} erasures swept")


# -- keys ---------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Users' data keys: status, rotation of a data key, re-wrapping under a new master key."""


@keys.command("status")
def keys_status() -> None:
    """How many keys each master key wraps, and how many users were erased."""

    async def go() -> Any:
        async with _services(get_settings()) as s:
            rows = await s.pg.fetch(
                "SELECT master_key_id, count(*) AS n, count(DISTINCT user_id) AS users "
                "FROM user_keys GROUP BY 1 ORDER BY 1"
            )
            erased = await s.pg.fetchval("SELECT count(*) FROM erased_users")
            return rows, erased, await s.keys.master.current()

    rows, erased, current = _run(go())
    for r in rows:
        mark = " (current)" if r["master_key_id"] == current else ""
        click.echo(f"master {r['master_key_id']}{mark}: {r['n']} keys of {r['users']} users")
    click.echo(f"erased users: {erased}")


@keys.command("rotate")
@click.argument("user_ids", nargs=-1)
@click.option("--all", "everyone", is_flag=True, help="Every user with a key.")
def keys_rotate(user_ids: tuple[str, ...], everyone: bool) -> None:
    """A new data key version for USER... (new data is sealed with it; old data still opens)."""
    if not user_ids and not everyone:
        _fail("name users or pass --all")

    async def go() -> int:
        async with _services(get_settings()) as s:
            targets = list(user_ids)
            if everyone:
                targets = [
                    r["user_id"] for r in await s.pg.fetch("SELECT DISTINCT user_id FROM user_keys")
                ]
            for user in targets:
                await s.keys.rotate(user)
            return len(targets)

    click.echo(f"{_run(go())} users have a new data key version")


@keys.command("rewrap")
def keys_rewrap() -> None:
    """Re-wrap every data key under the current master key (the first of
    FINSTREAM_PRIVACY_MASTER_KEYS, or the KMS key); afterwards the old one can be dropped."""

    async def go() -> tuple[int, str]:
        async with _services(get_settings()) as s:
            return await s.keys.rewrap(), await s.keys.master.current()

    moved, current = _run(go())
    click.echo(f"{moved} keys re-wrapped under master key {current}")
