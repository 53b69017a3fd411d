"""Delivery analytics: ``GET /v1/analytics/deliveries`` (operators).

The funnel from PostgreSQL (``notification_funnel``, kept by the feedback
role): for the requests first seen in ``[from, to)``, grouped by channel,
provider, template or category, how many were requested, suppressed, sent,
delivered, opened, clicked, bounced (hard), complained, unsubscribed and
failed, plus the number of distinct requests. Each row is one request,
channel and contact; a stage counts once per row however often a provider
reported it. The Grafana dashboard "finstream notifications and privacy"
shows the same stages (``finstream_funnel_events_total``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime

from finstream.api.deps import Caller, Res
from finstream.api.policy import require_role
from finstream.api.privacy_models import Funnel
from finstream.api.problems import field_problem, problem_responses
from finstream.domain.time import utcnow
from finstream.sinks import funnel

router = APIRouter(tags=["analytics"])
MAX_RANGE = timedelta(days=400)


@router.get(
    "/v1/analytics/deliveries",
    response_model=Funnel,
    response_model_by_alias=True,
    summary="The delivery funnel by channel, provider, template or category (operators)",
    description="`from` defaults to 7 days before `to`, `to` to now; at most 400 days.",
    responses=problem_responses(401, 403, 422, 429),
)
async def deliveries(
    *,
    res: Res,
    caller: Caller,
    start: Annotated[AwareDatetime | None, Query(alias="from")] = None,
    end: Annotated[AwareDatetime | None, Query(alias="to")] = None,
    group_by: Literal["channel", "provider", "template", "category"] = "channel",
) -> Any:
    require_role(caller, "operator", "read delivery analytics")
    end = end or utcnow()
    start = start or end - timedelta(days=7)
    if start >= end:
        raise field_problem("query", "from", "from: must be before to")
    if end - start > MAX_RANGE:
        raise field_problem("query", "from", "from: at most 400 days before to")
    groups = await funnel.funnel(res.pg, start, end, group_by)
    (total,) = await funnel.funnel(res.pg, start, end, None)
    return JSONResponse(
        {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": group_by,
            "groups": groups,
            "total": total,
        }
    )
