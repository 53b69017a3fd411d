"""``POST /v1/notifications``: services ask to notify a user, idempotently.

The ``Idempotency-Key`` header is required. The request id published to
``notify.requests`` is derived from (calling service, key), so even when the
stored answer has expired or was lost, a retry carries the same request id
and the router sends it at most once (see ``idempotency.py``).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime

from finstream.api.deps import Caller, Res, Resources, correlation_id
from finstream.api.idempotency import StoredResponse, fingerprint, parse_key
from finstream.api.metrics import IDEMPOTENT_REPLAYS
from finstream.api.models import NOTIFICATION_EXAMPLES, NotificationAccepted, NotificationIn
from finstream.api.policy import require_role, resolve_user
from finstream.api.problems import Problem, field_problem, not_found, problem_responses
from finstream.api.routes.common import UserPath, erased_problem
from finstream.domain.envelope import EnvelopeError, UserErased, seal_data
from finstream.domain.notify.request import MAX_DATA_BYTES
from finstream.domain.time import utcnow
from finstream.runtime.kafka import correlation_header
from finstream.stores import journeys

router = APIRouter(tags=["notifications"])

_NAMESPACE = uuid.UUID("9b6f3f7e-1c0e-4d55-8a9a-5d2b7f0e4c21")
MAX_SCHEDULE_AHEAD = timedelta(days=366)


async def check_renderable(res: Resources, body: NotificationIn) -> None:
    """Refuse (422) a request the router could not render, before accepting it.

    Every requested channel (for none requested: every channel the template
    has) is rendered with the request's data in the user's locale (from the
    preferences read model) and the default one; the problem names the
    template, each channel and the variables it lacks.
    """
    templates = res.templates
    if not templates.exists(body.template):
        raise Problem(
            422,
            f"template {body.template!r} does not exist",
            extensions={
                "template": body.template,
                "errors": [{"in": "body", "pointer": "/template", "detail": "unknown template"}],
            },
        )
    offered = templates.channels(body.template)
    requested = [c.lower() for c in body.channels] or offered
    locales = [templates.default_locale]
    prefs = await res.prefs.get(body.user_id)
    if prefs and prefs.get("locale") and prefs["locale"] not in locales:
        locales.insert(0, str(prefs["locale"]))
    found: list[dict[str, Any]] = []
    for channel in requested:
        if channel not in offered:
            found.append({"channel": channel, "missing": [], "detail": "no version"})
            continue
        missing: set[str] = set()
        for locale in locales:
            missing.update(
                templates.missing_variables(body.template, channel, locale, dict(body.data))
            )
        if missing:
            found.append({"channel": channel, "missing": sorted(missing), "detail": "missing"})
    if not found:
        return
    parts = [
        f"{f['channel']} lacks {', '.join(f['missing'])}"
        if f["missing"]
        else f"it has no {f['channel']} version"
        for f in found
    ]
    raise Problem(
        422,
        f"template {body.template!r} cannot be rendered: {'; '.join(parts)}",
        extensions={
            "template": body.template,
            "channels": [{"channel": f["channel"], "missing": f["missing"]} for f in found],
            "errors": [
                {
                    "in": "body",
                    "pointer": "/data" if f["missing"] else "/channels",
                    "detail": (
                        f"{f['channel']}: missing {', '.join(f['missing'])}"
                        if f["missing"]
                        else f"{f['channel']}: template has no version for this channel"
                    ),
                }
                for f in found
            ],
        },
    )


def request_id_for(service: str, key: str) -> str:
    name = service + "\x1f" + key
    return f"api-{uuid.uuid5(_NAMESPACE, name).hex}"


@router.post(
    "/v1/notifications",
    status_code=202,
    response_model=NotificationAccepted,
    summary="Ask to notify a user (services only)",
    description="Requires the `service` role and an `Idempotency-Key`. Repeating a request "
    "with the same key and body answers as the first time (`Idempotent-Replayed: true`); "
    "the same key with another body is refused with 422, and while the first is still "
    "being processed with 409. A request whose template cannot be rendered for a requested "
    "channel (for none requested: any channel the template has) with the given data is "
    "refused with 422 naming the template, each channel and the missing variables.",
    responses=problem_responses(400, 401, 403, 409, 413, 422, 429, 503),
)
async def create_notification(
    body: Annotated[NotificationIn, Body(openapi_examples=NOTIFICATION_EXAMPLES)],
    request: Request,
    res: Res,
    caller: Caller,
    idempotency_key: Annotated[
        str,
        Header(
            alias="Idempotency-Key",
            max_length=300,
            description="A unique key per notification, e.g. a UUID (quoted or not).",
        ),
    ],
) -> Any:
    require_role(caller, "service", "post notification requests")
    key = parse_key(idempotency_key)
    now = utcnow()
    if body.expires_at is not None and body.expires_at <= now:
        raise field_problem("body", "expires_at", "expires_at: must be in the future")
    if body.deliver_at is not None:
        if body.deliver_at > now + MAX_SCHEDULE_AHEAD:
            raise field_problem("body", "deliver_at", "deliver_at: at most 366 days ahead")
        if body.expires_at is not None and body.expires_at <= body.deliver_at:
            raise field_problem("body", "expires_at", "expires_at: must be after deliver_at")
    await check_renderable(res, body)
    raw = body.model_dump(mode="json")
    begun = await res.idempotency.begin(
        f"{caller.subject}:notifications", key, fingerprint("POST", "/v1/notifications", raw)
    )
    if isinstance(begun, StoredResponse):
        IDEMPOTENT_REPLAYS.inc()
        return JSONResponse(
            begun.body, status_code=begun.status, headers={"Idempotent-Replayed": "true"}
        )
    request_id = request_id_for(caller.subject, key)
    cid = correlation_id(request)
    try:
        # issue 14: the data is sealed under the user's key before it leaves the API
        sealed = seal_data(dict(body.data), await res.keys.seal_keys(body.user_id))
    except UserErased:
        await res.idempotency.abandon(begun)
        raise erased_problem() from None
    if sum(len(k.encode()) + len(v.encode()) for k, v in sealed.items()) > MAX_DATA_BYTES:
        await res.idempotency.abandon(begun)
        raise field_problem("body", "data", f"data: at most {MAX_DATA_BYTES} bytes once sealed")
    record = {
        "request_id": request_id,
        "user_id": body.user_id,
        "category": body.category,
        "priority": body.priority,
        "template": body.template,
        "data": sealed,
        "channels": list(body.channels),
        "deliver_at": body.deliver_at,
        "expires_at": body.expires_at,
        "collapse_key": body.collapse_key,
        "created_at": now,
        "source": f"api:{caller.subject}"[:200],
        "correlation_id": cid,
    }
    try:
        requests = res.topic("notify.requests")
        await res.publisher.send_and_wait(
            requests.name,
            body.user_id.encode(),
            requests.encode(record),
            correlation_header(cid),
        )
    except BaseException:
        await res.idempotency.abandon(begun)
        raise
    answer = NotificationAccepted(request_id=request_id, user_id=body.user_id, status="accepted")
    await res.idempotency.complete(begun, 202, answer.model_dump())
    return JSONResponse(answer.model_dump(), status_code=202)


# -- journeys (issue 16) ------------------------------------------------------------------


@router.get(
    "/v1/notifications/{request_id}/journey",
    summary="The journey of one notification request, with timings",
    description="Request received; each channel's preference decision with its reason; holds "
    "and their release; the rendered template and locale; every provider attempt with its "
    "outcome and latency; the final state. Built from the audit trail and the delivery "
    "records. Operators read any request; a user reads their own (anyone else's is 404).",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def get_journey(
    request_id: Annotated[str, Path(min_length=1, max_length=200)], res: Res, caller: Caller
) -> Any:
    if not (caller.has("operator") or caller.has("user")):
        raise Problem(403, "Only a user (their own) or an operator may read journeys.")

    async def subject_of(user: str, content: str) -> str | None:
        try:
            opened = (await res.keys.get(user)).open_json(content)
        except EnvelopeError:
            return None  # the user was erased: their messages' content is gone
        return str(opened.get("subject") or "") or None

    found = await journeys.journey(res.pg, res.codec, request_id, subject_of=subject_of)
    if found is None:
        raise not_found()
    if not caller.has("operator") and found.get("user_id") != caller.subject:
        raise not_found()
    return JSONResponse(found)


@router.get(
    "/v1/users/{user_id}/journeys",
    summary="A user's notification requests in a time range, newest first",
    description="Each with its last routing decision; open one with "
    "`/v1/notifications/{request_id}/journey`. `from` defaults to an hour ago, `to` to now.",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def list_journeys(
    *,
    user_id: UserPath,
    res: Res,
    caller: Caller,
    start: Annotated[AwareDatetime | None, Query(alias="from")] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Any:
    user = resolve_user(caller, user_id, write=False)
    now = utcnow()
    end = end or now
    start = start or end - timedelta(hours=1)
    if start >= end:
        raise field_problem("query", "from", "from: must be before to")
    items = await journeys.search(res.pg, user, start, end, limit)
    return JSONResponse(
        {"user_id": user, "from": start.isoformat(), "to": end.isoformat(), "items": items}
    )
