"""Reopening a delivery for `finstream dlq redrive`: the write behind the command.

A redrive sends the dead letter back to its outbound topic; the row in
``deliveries`` decides whether the engine sends it again. Only a row that
ended without delivery (the life cycle's reopenable states) moves to
'redrive', and only once, so redriving the same dead letter twice still sends
the message at most once. The Redis marker goes too, or intake's fast path
would take the redriven record for a duplicate.
"""

from __future__ import annotations

import asyncpg

from finstream.domain.delivery.lifecycle import REOPENABLE_STATES, State
from finstream.settings import Settings
from finstream.stores.redis import connect

REOPENED = "reopened"

# Why a row was left alone, by its state (anything else is still in progress).
_NOT_REOPENED: dict[str, str] = {
    State.SENT: "already delivered",
    State.DELIVERED: "already delivered",
    State.REDRIVE: "already redriven, not yet taken",
}


def refusal(state: str) -> str:
    """Why a row in ``state``, which is not a reopenable one, is left alone."""
    return _NOT_REOPENED.get(state, f"in progress ({state})")


async def reopen(settings: Settings, message_id: str) -> str:
    """Reopen a delivery for a redrive; returns :data:`REOPENED` or why not."""
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        row = await conn.fetchrow(
            """UPDATE deliveries SET state = 'redrive', updated_at = now()
               WHERE message_id = $1 AND state = ANY($2::text[])
               RETURNING state""",
            message_id,
            sorted(str(s) for s in REOPENABLE_STATES),
        )
        if row is None:
            state = await conn.fetchval(
                "SELECT state FROM deliveries WHERE message_id = $1", message_id
            )
            if state is not None:
                return refusal(state)
            return REOPENED  # never recorded: the worker will treat it as new
    except asyncpg.UndefinedTableError:
        return REOPENED
    finally:
        await conn.close()
    redis = connect(settings)
    try:
        await redis.delete(settings.redis_key(f"dlv:{message_id}"))
    finally:
        await redis.aclose()
    return REOPENED
