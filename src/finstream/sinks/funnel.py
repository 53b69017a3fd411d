"""The delivery funnel in PostgreSQL (``notification_funnel``): written by the feedback
role, read by ``GET /v1/analytics/deliveries``.

One row per request, channel and contact the router decided about (the
message id; ``request_id|channel`` for a channel it suppressed), with the
first time each stage was reached. Writes are idempotent upserts that only
ever fill an empty stage, so a redelivered batch changes nothing, and
events may arrive in any order (a webhook before the router's audit event):
the dimensions (template, category, provider) are filled by whichever comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from finstream.domain.feedback import FUNNEL, GROUP_BY, FunnelRow, Stage

_UPSERT = """
INSERT INTO notification_funnel AS f (item_key, request_id, message_id, user_id, channel,
    template, category, provider, first_at, {column}{extra_column})
SELECT k, r, m, u, c, t, g, p, a, a{extra_value}
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::timestamptz[]) AS x(k, r, m, u, c, t, g, p, a)
ON CONFLICT (item_key) DO UPDATE SET
    {column} = coalesce(f.{column}, excluded.{column}),{extra_update}
    first_at = least(f.first_at, excluded.first_at),
    message_id = coalesce(f.message_id, excluded.message_id),
    template = coalesce(f.template, excluded.template),
    category = coalesce(f.category, excluded.category),
    provider = coalesce(excluded.provider, f.provider),
    channel = CASE WHEN f.channel = 'none' THEN excluded.channel ELSE f.channel END,
    request_id = CASE WHEN f.request_id = '' THEN excluded.request_id ELSE f.request_id END,
    updated_at = now()
WHERE f.{column} IS NULL
RETURNING item_key, channel
"""


def _statement(stage: Stage) -> str:
    column = f"{stage.value}_at"
    if stage is Stage.SUPPRESSED:
        # A suppressed channel was requested too: both stages at once.
        return _UPSERT.format(
            column=column,
            extra_column=", requested_at",
            extra_value=", a",
            extra_update="\n    requested_at = coalesce(f.requested_at, excluded.requested_at),",
        )
    return _UPSERT.format(column=column, extra_column="", extra_value="", extra_update="")


_STATEMENTS = {stage: _statement(stage) for stage in Stage}


async def record(conn: Any, rows: Sequence[FunnelRow]) -> list[tuple[Stage, str]]:
    """Store funnel rows; returns (stage, channel) of each stage reached for the first time."""
    by_stage: dict[Stage, dict[str, FunnelRow]] = {}
    for row in rows:
        seen = by_stage.setdefault(row.stage, {})
        earlier = seen.get(row.item_key)
        # One row per key and statement (ON CONFLICT cannot touch a row twice): the earliest.
        if earlier is None or row.at < earlier.at:
            seen[row.item_key] = row
    reached: list[tuple[Stage, str]] = []
    for stage, keyed in by_stage.items():
        items = list(keyed.values())
        done = await conn.fetch(
            _STATEMENTS[stage],
            [r.item_key for r in items],
            [r.request_id for r in items],
            [r.message_id for r in items],
            [r.user_id for r in items],
            [r.channel for r in items],
            [r.template for r in items],
            [r.category for r in items],
            [r.provider for r in items],
            [r.at for r in items],
        )
        reached.extend((stage, str(d["channel"])) for d in done)
    return reached


async def funnel(
    conn: asyncpg.Pool | asyncpg.Connection, start: datetime, end: datetime, group_by: str | None
) -> list[dict[str, Any]]:
    """The funnel per ``group_by`` value (None: one total) for rows first seen in [start, end)."""
    if group_by is not None and group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
    counts = ",\n".join(f"count({s.value}_at) AS {s.value}" for s in FUNNEL)
    key = f"coalesce({group_by}, 'unknown')" if group_by else "'total'"
    rows = await conn.fetch(
        f"""SELECT {key} AS key,
                   count(DISTINCT request_id) AS requests,
                   {counts}
            FROM notification_funnel
            WHERE first_at >= $1 AND first_at < $2
            {"GROUP BY 1 ORDER BY 1" if group_by else ""}""",
        start,
        end,
    )
    return [
        {
            **({group_by: r["key"]} if group_by else {}),
            "requests": int(r["requests"]),
            **{s.value: int(r[s.value]) for s in FUNNEL},
        }
        for r in rows
    ]
