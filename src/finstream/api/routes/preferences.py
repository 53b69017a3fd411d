"""Notification preferences: ``/v1/users/{user_id}/preferences``.

Published to the compacted ``notify.preferences`` topic (keyed by user id),
which the router reads; the answer comes once the statestore role has applied
it to the Redis read model (read-your-writes), or 202 when that takes longer
than ``prefs_apply_wait`` (:class:`finstream.privacy.prefs.PreferencesWriter`).
A change while the user's last one is not applied yet is refused with 409. Fields that the
platform, not the user, decides (verification, bounces, STOP, invalid push
tokens, consent timestamps) are kept as recorded: see
:func:`finstream.api.policy.protect_preferences`.

Contact points are stored sealed under the user's data key and opened only
to answer (:class:`finstream.privacy.prefs.PreferencesWriter`); every change
is audited, old -> new with contacts masked; each new address or number gets
an id and a verification code (``/v1/users/{user_id}/contacts/{id}/verify``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from finstream.api.deps import Caller, Res, Resources, correlation_id
from finstream.api.models import (
    PREFERENCES_EXAMPLES,
    PREFERENCES_PATCH_EXAMPLES,
    Preferences,
    PreferencesIn,
)
from finstream.api.policy import (
    merge_patch,
    new_contacts,
    protect_preferences,
    resolve_user,
    to_json,
)
from finstream.api.problems import field_problem, not_found, problem_responses, validation_problem
from finstream.api.routes.common import IfMatch, UserPath, check_if_match, erased_problem, etag
from finstream.domain.envelope import UserErased
from finstream.domain.notify.preferences import PreferencesValidationError, parse_preferences
from finstream.domain.time import utcnow

router = APIRouter(tags=["preferences"])

NOT_APPLIED: dict[str, Any] = {
    "description": "Published, not yet applied to what GET reads (the statestore role is "
    "behind): the user's next change is refused with 409 until it is",
    "model": Preferences,
}


def _response(record: Mapping[str, Any], status_code: int = 200) -> Response:
    return JSONResponse(
        to_json(record), status_code=status_code, headers={"ETag": etag(record["updated_at"])}
    )


async def _store(
    res: Resources,
    request: Request,
    user: str,
    data: dict[str, Any],
    *,
    current: Mapping[str, Any] | None,
    opened: Mapping[str, Any] | None,
) -> Response:
    if data.get("user_id") not in (None, user):
        raise field_problem("body", "user_id", "user_id: must be the user of the path")
    data = {k: v for k, v in data.items() if k != "updated_at"}
    data["user_id"] = user
    now = utcnow()
    try:
        parsed = parse_preferences(data, now=now)
    except PreferencesValidationError as exc:
        raise field_problem("body", exc.field, str(exc)) from None
    record = protect_preferences(parsed, opened, now)
    cid = correlation_id(request)
    try:
        written = await res.writer.write(
            user, record, current, opened, reason="changed through the API", correlation_id=cid
        )
    except UserErased:
        raise erased_problem() from None
    for contact_id, channel in new_contacts(written.opened, opened):
        await res.contacts.send(user, contact_id, channel, correlation_id=cid)
    # 202: on the topic, not yet in the read model (the statestore role is behind):
    # a GET may show the version before it for a while.
    return _response(written.opened, 200 if written.applied else 202)


@router.get(
    "/v1/users/{user_id}/preferences",
    response_model=Preferences,
    summary="The user's notification preferences",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def get_preferences(user_id: UserPath, res: Res, caller: Caller) -> Any:
    user = resolve_user(caller, user_id, write=False)
    _record, opened = await res.writer.read(user)
    if opened is None:
        raise not_found()
    return _response(opened)


@router.put(
    "/v1/users/{user_id}/preferences",
    response_model=Preferences,
    summary="Replace the user's notification preferences",
    responses={**problem_responses(401, 403, 404, 409, 412, 413, 422, 429), 202: NOT_APPLIED},
)
async def replace_preferences(
    *,
    user_id: UserPath,
    body: Annotated[PreferencesIn, Body(openapi_examples=PREFERENCES_EXAMPLES)],
    request: Request,
    res: Res,
    caller: Caller,
    if_match: IfMatch = None,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    data = body.model_dump(mode="json", exclude_none=True)
    async with res.locks.hold(f"prefs:{user}"):
        current, opened = await res.writer.settled(user)
        if if_match is not None:
            if current is None:
                raise not_found()
            check_if_match(if_match, current["updated_at"])
        return await _store(res, request, user, data, current=current, opened=opened)


@router.patch(
    "/v1/users/{user_id}/preferences",
    response_model=Preferences,
    summary="Change some preferences (JSON merge patch, RFC 7396; lists are replaced whole)",
    responses={**problem_responses(401, 403, 404, 409, 412, 413, 422, 429), 202: NOT_APPLIED},
)
async def patch_preferences(
    *,
    user_id: UserPath,
    request: Request,
    res: Res,
    caller: Caller,
    patch: Annotated[
        dict[str, Any],
        Body(
            media_type="application/merge-patch+json",
            openapi_examples=PREFERENCES_PATCH_EXAMPLES,
        ),
    ],
    if_match: IfMatch = None,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    async with res.locks.hold(f"prefs:{user}"):
        current, opened = await res.writer.settled(user)
        if current is not None:
            check_if_match(if_match, current["updated_at"])
        elif if_match is not None:
            raise not_found()
        base = to_json(opened) if opened is not None else {"user_id": user}
        merged = merge_patch(base, patch)
        try:
            shaped = PreferencesIn.model_validate(merged)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            raise validation_problem(errors) from None
        data = shaped.model_dump(mode="json", exclude_none=True)
        return await _store(res, request, user, data, current=current, opened=opened)
