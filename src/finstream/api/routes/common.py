"""Pieces the user-resource routes share: the path's user, ETags, publishing."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import Header, Path, Request

from finstream.api.auth import USER_ID_PATTERN
from finstream.api.deps import Resources, correlation_id
from finstream.api.problems import Problem
from finstream.domain.time import to_micros
from finstream.runtime.kafka import correlation_header

UserPath = Annotated[
    str,
    Path(pattern=USER_ID_PATTERN, description="A user id, or `me` for the token's subject."),
]
RuleIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")]
MessageIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9._:@|+=-]{1,200}$")]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        max_length=100,
        description="Only change the resource if its ETag still matches (optimistic concurrency).",
    ),
]


def etag(updated_at: datetime) -> str:
    return f'"{to_micros(updated_at)}"'


def check_if_match(if_match: str | None, current: datetime) -> None:
    if if_match is None:
        return
    tags = {t.strip().removeprefix("W/") for t in if_match.split(",")}
    if "*" in tags or etag(current) in tags:
        return
    raise Problem(
        412, "The resource changed since you read it (ETag mismatch); read it again and retry."
    )


async def publish(
    res: Resources, request: Request, topic: str, key: str, value: bytes | None
) -> None:
    """Publish and wait for the broker's acknowledgement before answering."""
    await res.publisher.send_and_wait(
        res.settings.topic(topic),
        key.encode(),
        value,
        correlation_header(correlation_id(request)),
    )


# -- privacy (issue 14) ------------------------------------------------------------------


def erased_problem() -> Problem:
    return Problem(410, "This user was erased: nothing is stored for them any more.")


async def refuse_erased(res: Resources, user: str) -> None:
    """410 for a user whose data keys were destroyed (an erased user stays erased)."""
    if (await res.keys.get(user)).erased:
        raise erased_problem()
