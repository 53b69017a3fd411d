"""`finstream journey`: one notification's path, or a user's notifications in a time range."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import asyncpg
import click

from finstream.settings import get_settings


def _render(j: dict[str, Any]) -> str:
    lines = [
        f"request {j['request_id']}  user {j['user_id']}  {j['category']}/{j['template']}  "
        f"priority {j['priority']}",
        f"state: {j['state']}  (received {j['received_at']}, last step after {j['took_ms']:.0f} ms)",
        "",
    ]
    for s in j["steps"]:
        lines.append(f"  +{s['elapsed_ms']:>9.1f} ms  {s['kind']:<9} {s['summary']}")
    lines.append("")
    for channel, c in j["channels"].items():
        extra = f" ({c['reason']})" if c.get("reason") else ""
        held = f", held until {c['held_until']}" if c.get("held_until") else ""
        lines.append(f"  {channel:<6} {c['decision']}{extra}{held}")
        for m in c["messages"]:
            tries = ", ".join(
                f"{a['provider']} {a['status'].lower()}"
                + (f" {a['latency_ms']:.0f} ms" if a["latency_ms"] is not None else "")
                for a in m["attempts"]
            )
            lines.append(
                f"         {m['recipient'] or '?'} [{m['locale']}] {m['state']}: {tries or '-'}"
            )
    return "\n".join(lines)


@click.command("journey")
@click.argument("request_id", required=False)
@click.option("--user", "user_id", help="List this user's notifications instead.")
@click.option("--from", "start", default="-1h", show_default=True, help="ISO 8601 or -15m.")
@click.option("--to", "end", default=None, help="ISO 8601 or relative; default: now.")
@click.option("--json", "as_json", is_flag=True, help="Print the journey as JSON.")
def journey(
    request_id: str | None, user_id: str | None, start: str, end: str | None, as_json: bool
) -> None:
    """The journey of REQUEST_ID (decisions, holds, rendering, provider attempts, timings),
    or with --user the user's notifications between --from and --to."""
    from finstream.cli.common import fail
    from finstream.cli.common import when as _when
    from finstream.codec import default_codec
    from finstream.domain.time import utcnow
    from finstream.stores import journeys
    from finstream.stores.postgres import connect

    if (request_id is None) == (user_id is None):
        fail("give a REQUEST_ID or --user USER")
    settings = get_settings()

    async def go() -> Any:
        conn = await connect(settings)
        try:
            if request_id is not None:
                subject_of, pool = await _subjects(settings)
                try:
                    return await journeys.journey(
                        conn, default_codec(), request_id, subject_of=subject_of
                    )
                finally:
                    await pool.close()
            t2 = _when(end) or utcnow()
            t1 = _when(start) or t2 - timedelta(hours=1)
            assert user_id is not None
            return await journeys.search(conn, user_id, t1, t2, 500)
        finally:
            await conn.close()

    try:
        found = asyncio.run(go())
    except OSError as exc:
        fail(f"cannot reach PostgreSQL: {exc} (is `finstream stack up` done?)")
    except asyncpg.PostgresError as exc:
        fail(f"PostgreSQL: {exc} (is `finstream db migrate` done?)")
    if request_id is not None:
        if found is None:
            fail(f"no journey for request {request_id!r} (nothing audited or delivered yet)")
        click.echo(json.dumps(found, indent=2) if as_json else _render(found))
        return
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no notifications for {user_id} in that range")
    for item in found:
        click.echo(
            f"{item['first_at'][:19]}  {item['request_id']:<44} {item['category'] or '-':<12} "
            f"{item['last_action']}"
        )


async def _subjects(settings: Any) -> tuple[Any, Any]:
    """Opens a message's sealed subject with its user's key (issue 14)."""
    from finstream.domain.envelope import EnvelopeError
    from finstream.privacy.keys import KeyRing
    from finstream.privacy.kms import master_keys

    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(), min_size=0, max_size=1
    )
    ring = KeyRing(pool, master_keys(settings))

    async def subject_of(user: str, content: str) -> str | None:
        try:
            opened = (await ring.get(user)).open_json(content)
        except EnvelopeError:
            return None
        return str(opened.get("subject") or "") or None

    return subject_of, pool
