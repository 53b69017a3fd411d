"""Erasure and export: ``DELETE /v1/users/{user_id}`` and ``GET /v1/users/{user_id}/export``.

A user erases and exports themselves (``me``); an operator may erase or
export anyone (the one write operators have on users' data: a support or
legal request). Both are idempotent and audited; see
:mod:`finstream.privacy.erasure` and :mod:`finstream.privacy.export` for what
they cover.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from finstream.api.auth import Principal
from finstream.api.deps import Caller, Res, Resources, correlation_id
from finstream.api.privacy_models import Erasure
from finstream.api.problems import Problem, not_found, problem_responses
from finstream.api.routes.common import UserPath
from finstream.privacy import erasure, export
from finstream.privacy.prefs import audit_record, publish_audit

router = APIRouter(tags=["privacy"])


def _subject(caller: Principal, path_user: str) -> str:
    user = caller.subject if path_user == "me" else path_user
    if caller.has("operator"):
        return user
    if caller.has("user"):
        if user != caller.subject:
            raise not_found()
        return user
    raise Problem(403, "Only the user themselves or an operator may erase or export a user.")


def services(res: Resources) -> erasure.Services:
    return erasure.Services(res.settings, res.codec, res.pg, res.redis, res.publisher, res.keys)


@router.delete(
    "/v1/users/{user_id}",
    response_model=Erasure,
    summary="Erase a user: destroy their keys, delete what can be deleted",
    description="Idempotent: erasing again answers 200 with `already_erased`. Their data keys "
    "are destroyed first, so every sealed copy (topics, changelogs, dead letters, backups) "
    "stops opening at once; then PostgreSQL rows, Redis keys and the compacted records "
    "(preferences, alert rules) are deleted, and the erasure is audited. Workers forget "
    "the keys within `privacy_key_cache_seconds`; a second sweep follows. An erased user "
    "id stays erased. A user erases themselves; an operator anyone.",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def erase_user(user_id: UserPath, request: Request, res: Res, caller: Caller) -> Any:
    user = _subject(caller, user_id)
    done = await erasure.erase(
        services(res),
        user,
        by=f"{'operator' if user != caller.subject else 'user'}:{caller.subject}",
        correlation_id=correlation_id(request),
    )
    return JSONResponse(done.as_json())


@router.get(
    "/v1/users/{user_id}/export",
    summary="Everything held about a user, as one JSON document",
    description="Preferences (contacts in clear), consents with their times, contact "
    "verifications, alert rules, the in-app inbox, every delivery with its content and "
    "attempts, and the audit trail about the user. Audited. A user exports themselves; an "
    "operator anyone.",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def export_user(user_id: UserPath, request: Request, res: Res, caller: Caller) -> Any:
    user = _subject(caller, user_id)
    bundle = await export.export(
        export.Sources(res.settings, res.codec, res.pg, res.redis, res.keys), user
    )
    await publish_audit(
        res.publisher,
        res.settings,
        res.codec,
        audit_record(
            actor="api",
            action="user_exported",
            subject_type="user",
            subject_id=user,
            user_id=user,
            reason=f"export requested by {caller.subject}",
            details={
                "deliveries": str(len(bundle["deliveries"])),
                "inbox": str(len(bundle["inbox"])),
                "audit": str(len(bundle["audit"])),
            },
            correlation_id=correlation_id(request),
        ),
    )
    return JSONResponse(
        bundle,
        headers={"Content-Disposition": f'attachment; filename="finstream-export-{user}.json"'},
    )
