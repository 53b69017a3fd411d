"""The console (``/console``): its configuration, and the operators' status panel.

The page itself is plain static files in ``finstream/api/console`` (mounted by
the app); its one JavaScript dependency (lightweight-charts) is copied there
from the npm registry at build time (``make console``, pinned by
``deploy/console/package-lock.json``). The page uses the same REST API and
WebSocket as any client.

``config.json`` tells the page what to show. With ``FINSTREAM_ENV=dev`` and
no JWKS configured (the development keys sign tokens) it also carries a
development token for ``demo-user`` with the ``user`` and ``operator``
roles, so that ``make run`` opens signed in; in any other set-up the page
asks for a bearer token.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from finstream.api.deps import Caller, Res
from finstream.api.policy import require_role
from finstream.api.problems import problem_responses

router = APIRouter(tags=["console"])

CONSOLE_USER = "demo-user"
DEV_TOKEN_SECONDS = 12 * 3600


@router.get("/console/config.json", include_in_schema=False)
async def console_config(res: Res) -> Any:
    settings = res.settings
    symbols = [s.strip().upper() for s in (settings.md_symbols or settings.sim_symbols).split(",")]
    links = {"API docs": "/docs"}
    if settings.run_sandboxes:
        links = {
            "Mailpit": settings.mailpit_url,
            "Push sandbox": f"{settings.sandbox_url}/push",
            "SMS sandbox": f"{settings.sandbox_url}/sms",
            **links,
        }
    body: dict[str, Any] = {
        "env": settings.env,
        "symbols": [s for s in symbols if s],
        "roles_claim": settings.api_jwt_roles_claim,
        "links": links,
        "dev_token": None,
    }
    if settings.env == "dev" and not settings.api_jwks:
        from finstream.api.devkeys import mint_token

        body["dev_token"] = mint_token(
            settings, CONSOLE_USER, ("user", "operator"), DEV_TOKEN_SECONDS
        )
    return JSONResponse(body)


@router.get(
    "/v1/ops/status",
    summary="Every worker role of this run: ready, consumer lag, events/s, dead letters, last error",
    description="Operators only. Read from each role's /readyz and /metrics (the ports "
    "`finstream run` recorded) and the last error line of its log, as `finstream status`.",
    responses=problem_responses(401, 403, 429),
)
async def ops_status(res: Res, caller: Caller) -> Any:
    require_role(caller, "operator", "read the status of the roles")
    from finstream.stack import status

    rows = await asyncio.to_thread(status.collect, res.settings, sleep=lambda _s: None)
    return JSONResponse({"roles": [asdict(r) for r in rows]})
