"""One-click unsubscribe (RFC 8058): ``/v1/unsubscribe/{token}``, no login.

Marketing email carries ``List-Unsubscribe: <.../v1/unsubscribe/TOKEN>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``; the token is sealed,
says whose subscription to which category it ends, and expires
(:mod:`finstream.domain.unsubscribe`). A mail client's one-click POST opts
the user out of that category; ``scope=marketing`` withdraws their consent to
all marketing. ``GET`` only shows a page with those two buttons: link
scanners that follow links never unsubscribe anyone. Every change is
audited (old -> new).
"""

from __future__ import annotations

import html
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from finstream.api.deps import Res, correlation_id
from finstream.api.privacy_models import Unsubscribed
from finstream.api.problems import Problem, problem_responses
from finstream.domain import feedback as fb
from finstream.domain import unsubscribe as unsub
from finstream.domain.envelope import UserErased
from finstream.domain.time import utcnow
from finstream.privacy.prefs import Busy

router = APIRouter(tags=["unsubscribe"])

TokenPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{20,600}$")]
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Unsubscribe</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: Helvetica, Arial, sans-serif; max-width: 32rem; margin: 3rem auto">
{body}
</body></html>"""


def _page(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(body=body), status_code=status)


def _read(res: Any, token: str) -> unsub.Unsubscribe:
    try:
        return unsub.read(res.secrets, token, utcnow())
    except unsub.ExpiredToken:
        raise Problem(410, "This unsubscribe link has expired.") from None
    except unsub.InvalidToken:
        raise Problem(404, "This is not a valid unsubscribe link.") from None


@router.get(
    "/v1/unsubscribe/{token}",
    response_class=HTMLResponse,
    summary="The unsubscribe page of a marketing email's link (changes nothing)",
    responses={
        200: {"content": {"text/html": {}}},
        # A person follows the link: a page, not problem JSON, says what is wrong.
        404: {"description": "Not a valid unsubscribe link", "content": {"text/html": {}}},
        410: {"description": "The link has expired", "content": {"text/html": {}}},
        **problem_responses(422),
    },
)
async def unsubscribe_page(token: TokenPath, res: Res) -> Response:
    try:
        found = _read(res, token)
    except Problem as exc:
        return _page(f"<p>{html.escape(str(exc.detail))}</p>", exc.status)
    category = html.escape(found.category)
    return _page(
        f"""<h1>Unsubscribe</h1>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<p><button type="submit">Stop {category} emails</button></p></form>
<form method="post"><input type="hidden" name="scope" value="marketing">
<p><button type="submit">Stop all marketing messages</button></p></form>"""
    )


@router.post(
    "/v1/unsubscribe/{token}",
    response_model=Unsubscribed,
    summary="One-click unsubscribe (RFC 8058): opt out of the link's category, or all marketing",
    description="The body a mail client sends is `List-Unsubscribe=One-Click` (form-encoded): "
    "the user is opted out of the message's category. `scope=marketing` withdraws their "
    "consent to all marketing. No login: the link's token is the authority. Idempotent; "
    "audited.",
    responses=problem_responses(400, 404, 409, 410, 413, 422),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "List-Unsubscribe": {"type": "string", "enum": ["One-Click"]},
                            "scope": {"type": "string", "enum": ["category", "marketing"]},
                        },
                    }
                }
            },
        }
    },
)
async def unsubscribe(token: TokenPath, request: Request, res: Res) -> Any:
    found = _read(res, token)
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
    scope = unsub.Scope.MARKETING if form.get("scope") == ["marketing"] else unsub.Scope.CATEGORY
    now = utcnow()

    def apply(record: dict[str, Any]) -> dict[str, Any] | None:
        updated = fb.apply_change(
            record, fb.Change.UNSUBSCRIBED, recipient=None, category=found.category, now=now
        )
        if scope is unsub.Scope.MARKETING:
            withdrawn = fb.withdraw_consent(updated or record, "marketing", now, "unsubscribe")
            updated = withdrawn or updated
        return updated

    try:
        written = await res.writer.update(
            found.user_id,
            apply,
            action="unsubscribed",
            reason=f"one-click unsubscribe ({scope.value}) from message {found.message_id}",
            correlation_id=correlation_id(request),
            details={
                "category": found.category,
                "scope": scope.value,
                "message_id": found.message_id,
            },
        )
    except UserErased:
        written = None
    except Busy:
        raise Problem(409, "Try again in a moment.", headers={"Retry-After": "1"}) from None
    answer = {"category": found.category, "scope": scope.value, "changed": written is not None}
    if "text/html" in request.headers.get("accept", ""):
        what = "all marketing messages" if scope is unsub.Scope.MARKETING else found.category
        return _page(f"<p>Done: you will not receive {html.escape(what)} any more.</p>")
    return JSONResponse(answer)
