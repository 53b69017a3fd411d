"""Alert rules: ``/v1/users/{user_id}/rules``.

Writes go to the compacted ``alerts.rules`` topic (keyed by rule id; delete
is a tombstone), which the alert engine reads. The API then writes the same
record through to the Redis read model with the same ``updated_at``: the
``statestore`` role will apply the identical record again when it reads the
topic, which changes nothing, and an older record it may still be catching
up on is refused by version. So a client reads its own write at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Request, Response
from fastapi.responses import JSONResponse

from finstream.api.deps import Caller, Res, Resources, correlation_id
from finstream.api.idempotency import Claim, StoredResponse, fingerprint, parse_key
from finstream.api.metrics import IDEMPOTENT_REPLAYS
from finstream.api.models import (
    RULE_EXAMPLES,
    RULE_PATCH_EXAMPLES,
    Rule,
    RuleFields,
    RuleList,
    RulePatch,
)
from finstream.api.policy import merge_patch, next_version, resolve_user
from finstream.api.problems import Problem, field_problem, not_found, problem_responses
from finstream.api.routes.common import (
    IfMatch,
    RuleIdPath,
    UserPath,
    check_if_match,
    etag,
    publish,
    refuse_erased,
)
from finstream.domain.alerts.rules import AlertRule, RuleValidationError, parse_rule
from finstream.domain.privacy_audit import rule_changes
from finstream.domain.time import to_micros, utcnow
from finstream.privacy.prefs import audit_record, publish_audit

router = APIRouter(tags=["alert rules"])

MAX_RULES_PER_USER = 500
_EDITABLE = tuple(RuleFields.model_fields)
_NAMESPACE = uuid.UUID("4f1d6c55-3bb8-4f7e-9a53-bd8e0c1c7a10")


def _parse(data: Mapping[str, Any]) -> AlertRule:
    try:
        return parse_rule(data, now=utcnow())
    except RuleValidationError as exc:
        raise field_problem("body", exc.field, str(exc)) from None


def _body(rule: AlertRule) -> dict[str, Any]:
    return rule.to_json()


def _json(rule: AlertRule, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        _body(rule), status_code=status, headers={"ETag": etag(rule.updated_at), **(headers or {})}
    )


async def _owned(res: Resources, user: str, rule_id: str) -> AlertRule:
    record = await res.rules.get(rule_id)
    if record is None or record["user_id"] != user:
        raise not_found()
    return AlertRule.from_record(record)


async def _write(
    res: Resources, request: Request, rule: AlertRule, previous: AlertRule | None = None
) -> None:
    value = res.topic("alerts.rules").encode(rule.to_record())
    await publish(res, request, "alerts.rules", rule.rule_id, value)
    await res.rules.put(value)
    await _audit(res, request, rule.user_id, rule.rule_id, old=previous, new=rule)


async def _audit(
    res: Resources,
    request: Request,
    user: str,
    rule_id: str,
    *,
    old: AlertRule | None,
    new: AlertRule | None,
) -> None:
    """Every rule change is audited, old -> new (issue 14)."""
    action = "rule_created" if old is None else "rule_deleted" if new is None else "rule_changed"
    await publish_audit(
        res.publisher,
        res.settings,
        res.codec,
        audit_record(
            actor="api",
            action=action,
            subject_type="rule",
            subject_id=rule_id,
            user_id=user,
            details=rule_changes(old.to_json() if old else None, new.to_json() if new else None),
            correlation_id=correlation_id(request),
        ),
    )


@router.get(
    "/v1/users/{user_id}/rules",
    response_model=RuleList,
    summary="The user's alert rules, oldest first",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def list_rules(user_id: UserPath, res: Res, caller: Caller) -> Any:
    user = resolve_user(caller, user_id, write=False)
    records = await res.rules.list_for_user(user)
    return JSONResponse({"items": [AlertRule.from_record(r).to_json() for r in records]})


@router.post(
    "/v1/users/{user_id}/rules",
    status_code=201,
    response_model=Rule,
    summary="Create an alert rule",
    description="With an `Idempotency-Key`, a retried create answers with the rule it made "
    "the first time instead of making a second one.",
    responses=problem_responses(401, 403, 404, 409, 413, 422, 429),
)
async def create_rule(
    *,
    user_id: UserPath,
    body: Annotated[RuleFields, Body(openapi_examples=RULE_EXAMPLES)],
    request: Request,
    res: Res,
    caller: Caller,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=300)] = None,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    raw = body.model_dump(mode="json", exclude_none=True)
    claim: Claim | None = None
    if idempotency_key is not None:
        key = parse_key(idempotency_key)
        begun = await res.idempotency.begin(
            f"{caller.subject}:rules", key, fingerprint("POST", f"/rules/{user}", raw)
        )
        if isinstance(begun, StoredResponse):
            IDEMPOTENT_REPLAYS.inc()
            return JSONResponse(
                begun.body, status_code=begun.status, headers={"Idempotent-Replayed": "true"}
            )
        claim = begun
        rule_id = f"r-{uuid.uuid5(_NAMESPACE, f'{user}:{key}').hex}"
    else:
        rule_id = f"r-{uuid.uuid4().hex}"
    try:
        await refuse_erased(res, user)
        if len(await res.rules.list_for_user(user)) >= MAX_RULES_PER_USER:
            raise Problem(409, f"A user can have at most {MAX_RULES_PER_USER} alert rules.")
        rule = _parse({**raw, "rule_id": rule_id, "user_id": user})
        async with res.locks.hold(f"rule:{rule_id}"):
            await _write(res, request, rule)
    except BaseException:
        if claim is not None:
            await res.idempotency.abandon(claim)
        raise
    if claim is not None:
        await res.idempotency.complete(claim, 201, _body(rule))
    location = f"/v1/users/{user_id}/rules/{rule.rule_id}"
    return _json(rule, 201, {"Location": location})


@router.get(
    "/v1/users/{user_id}/rules/{rule_id}",
    response_model=Rule,
    summary="One alert rule",
    responses=problem_responses(401, 403, 404, 422, 429),
)
async def get_rule(user_id: UserPath, rule_id: RuleIdPath, res: Res, caller: Caller) -> Any:
    user = resolve_user(caller, user_id, write=False)
    return _json(await _owned(res, user, rule_id))


async def _replace(
    *, res: Resources, request: Request, user: str, rule_id: str, if_match: str | None, edit: Any
) -> Response:
    async with res.locks.hold(f"rule:{rule_id}"):
        current = await _owned(res, user, rule_id)
        check_if_match(if_match, current.updated_at)
        fields = edit(current)
        now = utcnow()
        rule = _parse(
            {
                **fields,
                "rule_id": rule_id,
                "user_id": user,
                "created_at": current.created_at,
                "updated_at": next_version(now, current.updated_at),
            }
        )
        await _write(res, request, rule, current)
    return _json(rule)


@router.put(
    "/v1/users/{user_id}/rules/{rule_id}",
    response_model=Rule,
    summary="Replace an alert rule's settings",
    responses=problem_responses(401, 403, 404, 409, 412, 413, 422, 429),
)
async def replace_rule(
    *,
    user_id: UserPath,
    rule_id: RuleIdPath,
    body: Annotated[RuleFields, Body(openapi_examples=RULE_EXAMPLES)],
    request: Request,
    res: Res,
    caller: Caller,
    if_match: IfMatch = None,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    raw = body.model_dump(mode="json", exclude_none=True)
    return await _replace(
        res=res, request=request, user=user, rule_id=rule_id, if_match=if_match, edit=lambda _c: raw
    )


@router.patch(
    "/v1/users/{user_id}/rules/{rule_id}",
    response_model=Rule,
    summary="Change some of an alert rule's settings (JSON merge patch, RFC 7396)",
    responses=problem_responses(401, 403, 404, 409, 412, 413, 422, 429),
)
async def patch_rule(
    *,
    user_id: UserPath,
    rule_id: RuleIdPath,
    request: Request,
    res: Res,
    caller: Caller,
    body: Annotated[
        RulePatch,
        Body(media_type="application/merge-patch+json", openapi_examples=RULE_PATCH_EXAMPLES),
    ],
    if_match: IfMatch = None,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    patch = body.model_dump(mode="json", exclude_unset=True)

    def edit(current: AlertRule) -> dict[str, Any]:
        editable = {k: v for k, v in current.to_json().items() if k in _EDITABLE}
        merged: dict[str, Any] = merge_patch(editable, patch)
        return merged

    return await _replace(
        res=res, request=request, user=user, rule_id=rule_id, if_match=if_match, edit=edit
    )


@router.delete(
    "/v1/users/{user_id}/rules/{rule_id}",
    status_code=204,
    summary="Delete an alert rule",
    responses=problem_responses(401, 403, 404, 409, 412, 422, 429),
)
async def delete_rule(
    *,
    user_id: UserPath,
    rule_id: RuleIdPath,
    request: Request,
    res: Res,
    caller: Caller,
    if_match: IfMatch = None,
) -> Response:
    user = resolve_user(caller, user_id, write=True)
    async with res.locks.hold(f"rule:{rule_id}"):
        current = await _owned(res, user, rule_id)
        check_if_match(if_match, current.updated_at)
        deleted_at = next_version(utcnow(), current.updated_at)
        await publish(res, request, "alerts.rules", rule_id, None)
        await res.rules.delete(rule_id, to_micros(deleted_at))
        await _audit(res, request, user, rule_id, old=current, new=None)
    return Response(status_code=204)
