"""Templates: what is loaded (with refused files), and previews with sample variables."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from fastapi.responses import JSONResponse
from pydantic import Field

from finstream.api.deps import Caller, Res
from finstream.api.models import RequestChannel, _In
from finstream.api.problems import Problem, not_found, problem_responses
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.templates import ChannelNotAvailable, TemplateError

router = APIRouter(tags=["templates"])


class PreviewIn(_In):
    channel: RequestChannel | None = None
    locale: Annotated[str, Field(pattern=r"^[a-zA-Z]{2}([-_][a-zA-Z]{2})?$")] | None = None
    # Sample variables: small enough that a body at every maximum stays under the
    # API's body limit (64 KiB by default), whatever the characters.
    data: Annotated[
        dict[Annotated[str, Field(max_length=50)], Annotated[str, Field(max_length=400)]],
        Field(max_length=20),
    ] = {}


def _may_read_templates(caller: Any) -> None:
    if not (caller.has("service") or caller.has("operator")):
        raise Problem(403, "Only a token with the 'service' or 'operator' role may read templates.")


@router.get(
    "/v1/templates",
    summary="Loaded templates, their channels, and files refused at load",
    responses=problem_responses(401, 403, 429),
)
async def list_templates(res: Res, caller: Caller) -> Any:
    _may_read_templates(caller)
    t = res.templates
    return JSONResponse(
        {
            "templates": [{"name": n, "channels": t.channels(n)} for n in t.names()],
            "errors": [{"file": e.path, "line": e.line, "message": e.message} for e in t.errors],
        }
    )


@router.post(
    "/v1/templates/{name}/preview",
    summary="Render a template with sample variables: what each channel would send",
    description="Renders one channel (or every channel the template has) in a locale (default: "
    "the default locale; a missing file falls back as for users). Variables the data lacks are "
    "filled with `<name>` and listed in `missing`.",
    responses=problem_responses(401, 403, 404, 413, 422, 429),
)
async def preview(
    name: Annotated[str, Path(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")],
    body: Annotated[PreviewIn, Body()],
    res: Res,
    caller: Caller,
) -> Any:
    _may_read_templates(caller)
    t = res.templates
    if not t.exists(name):
        raise not_found()
    channels = [body.channel.lower()] if body.channel else t.channels(name)
    out = []
    for channel in channels:
        if channel not in CHANNELS:
            continue
        try:
            missing = t.missing_variables(name, channel, body.locale, body.data)
        except ChannelNotAvailable:
            raise Problem(422, f"template {name!r} has no {channel} version") from None
        data = {**{m: f"<{m}>" for m in missing}, **body.data}
        try:
            rendered = t.render(name, channel, body.locale, data)
        except TemplateError as exc:
            raise Problem(422, f"template {name!r} ({channel}) does not render: {exc}") from None
        out.append(
            {
                "channel": channel.upper(),
                "locale": rendered.locale,
                "subject": rendered.subject,
                "text": rendered.text,
                "html": rendered.html,
                "missing": missing,
            }
        )
    return JSONResponse({"template": name, "channels": out})
