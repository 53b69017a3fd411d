"""Scheduled notifications: ``/v1/users/{user_id}/scheduled``.

What the router holds for a user (a ``deliver_at`` time, quiet hours, an open
digest) is read from the Redis read model of ``notify.scheduled.items``
(written by the statestore role). ``PATCH`` (a new ``deliver_at``) and
``DELETE`` publish a command to ``notify.scheduled.commands`` and answer 202
with its id: the router applies it on the user's partition, serialized with
the release of the same hold, and audits the outcome (``cancelled``,
``rescheduled``, or ``command_refused`` with the reason, e.g. already
released) under the item's id, which its journey shows.

A user acts on their own items; operators on anyone's (to stop a wrong
broadcast); the command names who asked.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse

from finstream.api.auth import Principal
from finstream.api.deps import Caller, Res, Resources, correlation_id
from finstream.api.models import (
    RescheduleIn,
    ScheduleCommandAccepted,
    ScheduledItem,
    ScheduledList,
)
from finstream.api.policy import resolve_user
from finstream.api.problems import Problem, field_problem, problem_responses
from finstream.api.routes.common import UserPath, publish
from finstream.domain.notify.scheduled import Command, InvalidCommand, check_deliver_at
from finstream.domain.time import utcnow
from finstream.stores.read_models import ScheduledStore

router = APIRouter(tags=["scheduled"])

ItemIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=200,
        description="The held request's id, or a digest's id (`digest-...`), as listed.",
    ),
]


def _store(res: Resources) -> ScheduledStore:
    return ScheduledStore(res.redis, res.settings, res.codec)


def _item(record: dict[str, Any]) -> dict[str, Any]:
    return {
        **record,
        "kind": str(record["kind"]).lower(),
        "state": str(record["state"]).lower(),
        "due": record["due"].isoformat(),
        "updated_at": record["updated_at"].isoformat(),
    }


def _acting_user(caller: Principal, user_id: str) -> str:
    """The user whose items a command changes: one's own, or anyone's for an operator."""
    if caller.has("operator"):
        return resolve_user(caller, user_id, write=False)
    return resolve_user(caller, user_id, write=True)


def _requested_by(caller: Principal) -> str:
    role = "operator" if caller.has("operator") else "user"
    return f"{role}:{caller.subject}"[:200]


async def _command(
    *,
    res: Resources,
    request: Request,
    caller: Caller,
    user_id: str,
    item_id: str,
    action: str,
    deliver_at: Any = None,
) -> JSONResponse:
    user = _acting_user(caller, user_id)
    if await _store(res).get(user, item_id) is None:
        raise Problem(
            404,
            f"No scheduled notification {item_id!r} for this user: it was released or "
            "cancelled, or never held (list them with GET /v1/users/{user_id}/scheduled).",
        )
    now = utcnow()
    command = Command(
        command_id=f"sc-{uuid.uuid4().hex}",
        user_id=user,
        item_id=item_id,
        action=action,
        deliver_at=deliver_at,
        requested_at=now,
        requested_by=_requested_by(caller),
        correlation_id=correlation_id(request),
    )
    value = res.topic("notify.scheduled.commands").encode(command.record())
    await publish(res, request, "notify.scheduled.commands", user, value)
    answer = ScheduleCommandAccepted(
        command_id=command.command_id,
        user_id=user,
        item_id=item_id,
        action="cancel" if action == "CANCEL" else "reschedule",
        status="accepted",
    )
    return JSONResponse(answer.model_dump(), status_code=202)


@router.get(
    "/v1/users/{user_id}/scheduled",
    response_model=ScheduledList,
    summary="The user's held notifications (deliver_at, quiet hours, digests), soonest first",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def list_scheduled(user_id: UserPath, res: Res, caller: Caller) -> Any:
    user = resolve_user(caller, user_id, write=False)
    items = [_item(r) for r in await _store(res).list_for_user(user)]
    return JSONResponse({"user_id": user, "items": items})


@router.get(
    "/v1/users/{user_id}/scheduled/{item_id}",
    response_model=ScheduledItem,
    summary="One held notification",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def get_scheduled(user_id: UserPath, item_id: ItemIdPath, res: Res, caller: Caller) -> Any:
    user = resolve_user(caller, user_id, write=False)
    record = await _store(res).get(user, item_id)
    if record is None:
        raise Problem(404, f"No scheduled notification {item_id!r} for this user.")
    return JSONResponse(_item(record))


@router.patch(
    "/v1/users/{user_id}/scheduled/{item_id}",
    status_code=202,
    response_model=ScheduleCommandAccepted,
    summary="Reschedule a held notification (a new deliver_at)",
    description="Answers 202 with the command's id once the command is published; the "
    "router applies it in order with the release of the hold and audits the outcome. "
    "Quiet hours still apply at the new time.",
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)
async def reschedule(
    *,
    user_id: UserPath,
    item_id: ItemIdPath,
    body: Annotated[RescheduleIn, Body()],
    request: Request,
    res: Res,
    caller: Caller,
) -> Any:
    try:
        deliver_at = check_deliver_at(body.deliver_at, utcnow())
    except InvalidCommand as exc:
        raise field_problem("body", "deliver_at", str(exc)) from None
    return await _command(
        res=res,
        request=request,
        caller=caller,
        user_id=user_id,
        item_id=item_id,
        action="RESCHEDULE",
        deliver_at=deliver_at,
    )


@router.delete(
    "/v1/users/{user_id}/scheduled/{item_id}",
    status_code=202,
    response_model=ScheduleCommandAccepted,
    summary="Cancel a held notification",
    description="Answers 202 with the command's id. If the release wins the race, the "
    "command's audited outcome is `already released`; a cancelled hold is never sent.",
    responses=problem_responses(401, 403, 404, 422, 429, 503),
)
async def cancel(
    *, user_id: UserPath, item_id: ItemIdPath, request: Request, res: Res, caller: Caller
) -> Any:
    return await _command(
        res=res, request=request, caller=caller, user_id=user_id, item_id=item_id, action="CANCEL"
    )
