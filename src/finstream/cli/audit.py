"""`finstream audit`: check the hash chain of the audit trail, and read it."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from finstream.settings import get_settings


@click.group()
def audit() -> None:
    """The hash-chained audit trail in PostgreSQL (audit.events)."""


@audit.command("verify")
def audit_verify() -> None:
    """Walk the chain; exit 1 and name the first row that was edited, inserted or removed."""
    from finstream.sinks.audit import verify
    from finstream.stores.postgres import connect

    async def go() -> str:
        conn = await connect(get_settings())
        try:
            result = await verify(conn)
        finally:
            await conn.close()
        click.echo(result.render())
        return "ok" if result.ok else "broken"

    if asyncio.run(go()) != "ok":
        sys.exit(1)


@audit.command("show")
@click.option("--user", "user_id", help="Only this user's events.")
@click.option("--subject", help="Only events about this request or message id.")
@click.option("--limit", default=50, show_default=True)
def audit_show(user_id: str | None, subject: str | None, limit: int) -> None:
    """Print the latest audit events, newest last, one JSON object per line."""
    from finstream.stores.postgres import connect

    async def go() -> None:
        conn = await connect(get_settings())
        try:
            rows = await conn.fetch(
                "SELECT seq, at, actor, action, subject_type, subject_id, user_id, reason, details "
                "FROM audit_events WHERE ($1::text IS NULL OR user_id = $1) "
                "AND ($2::text IS NULL OR subject_id = $2) ORDER BY seq DESC LIMIT $3",
                user_id,
                subject,
                limit,
            )
        finally:
            await conn.close()
        for row in reversed(rows):
            item = dict(row)
            item["at"] = item["at"].isoformat()
            item["details"] = json.loads(item["details"])
            click.echo(json.dumps(item, ensure_ascii=False))

    asyncio.run(go())
