"""The in-app inbox: ``/v1/users/{user_id}/inbox`` (Redis, written by the inapp role)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse

from finstream.api.deps import Caller, Res
from finstream.api.models import INBOX_EXAMPLES, InboxMessage, InboxPage, InboxUpdate
from finstream.api.policy import resolve_user
from finstream.api.problems import not_found, problem_responses
from finstream.api.routes.common import MessageIdPath, UserPath
from finstream.stores.inbox import open_entry

router = APIRouter(tags=["inbox"])


def _score(message: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(message["created_at"])).timestamp()
    except (KeyError, ValueError):
        return None


@router.get(
    "/v1/users/{user_id}/inbox",
    response_model=InboxPage,
    summary="The user's in-app messages, newest first",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def list_inbox(
    *,
    user_id: UserPath,
    res: Res,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: Annotated[
        float | None,
        Query(ge=0, le=1e11, description="Continue below this `next_before` of a previous page."),
    ] = None,
    unread_only: bool = False,
    include_archived: bool = False,
) -> Any:
    user = resolve_user(caller, user_id, write=False)
    page = await res.inbox.page(
        user,
        limit=limit,
        before=before,
        unread_only=unread_only,
        include_archived=include_archived,
    )
    next_before = _score(page.messages[-1]) if len(page.messages) == limit else None
    keys = await res.keys.get(user)  # entries are sealed under the user's key
    return JSONResponse(
        {
            "items": [open_entry(m, keys) for m in page.messages],
            "unread": page.unread,
            "total": page.total,
            "next_before": next_before,
        }
    )


@router.get(
    "/v1/users/{user_id}/inbox/{message_id}",
    response_model=InboxMessage,
    summary="One in-app message",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def get_message(
    user_id: UserPath, message_id: MessageIdPath, res: Res, caller: Caller
) -> Any:
    user = resolve_user(caller, user_id, write=False)
    message = await res.inbox.get(user, message_id)
    if message is None:
        raise not_found()
    return JSONResponse(open_entry(message, await res.keys.get(user)))


@router.patch(
    "/v1/users/{user_id}/inbox/{message_id}",
    response_model=InboxMessage,
    summary="Mark a message read or unread, archive or unarchive it",
    responses=problem_responses(401, 403, 404, 413, 422, 429),
)
async def update_message(
    user_id: UserPath,
    message_id: MessageIdPath,
    body: Annotated[InboxUpdate, Body(openapi_examples=INBOX_EXAMPLES)],
    res: Res,
    caller: Caller,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    if body.read is not None and not await res.inbox.mark_read(user, message_id, body.read):
        raise not_found()
    if body.archived is not None and not await res.inbox.archive(user, message_id, body.archived):
        raise not_found()
    message = await res.inbox.get(user, message_id)
    if message is None:
        raise not_found()
    return JSONResponse(open_entry(message, await res.keys.get(user)))
