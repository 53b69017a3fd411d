"""Contact verification: ``/v1/users/{user_id}/contacts/{contact_id}/...``.

Adding an email address or a phone number (``PUT``/``PATCH`` preferences)
gives it an id and sends it a six-digit code through the pipeline itself.
``POST .../verify`` with the code marks the contact verified (and usable by
the router); ``POST .../verification`` sends a new code. Limits: a code
expires after ``privacy_verify_code_ttl_seconds`` and takes
``privacy_verify_max_attempts`` wrong guesses; a contact gets
``privacy_verify_sends_per_hour`` codes an hour and a user makes
``privacy_verify_attempts_per_hour`` guesses an hour (429 with Retry-After).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import JSONResponse

from finstream.api.deps import Caller, Res, correlation_id
from finstream.api.policy import resolve_user
from finstream.api.privacy_models import ContactVerification, VerifyIn
from finstream.api.problems import Problem, not_found, problem_responses
from finstream.api.routes.common import UserPath, erased_problem
from finstream.domain.envelope import UserErased
from finstream.domain.verification import Outcome
from finstream.privacy.verify import RateLimited

router = APIRouter(tags=["contacts"])

ContactPath = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_-]{2,39}$")]

_REFUSALS = {
    Outcome.WRONG: "The code is wrong.",
    Outcome.EXPIRED: "The code has expired: ask for a new one.",
    Outcome.EXHAUSTED: "Too many wrong codes: ask for a new one.",
    Outcome.NO_CODE: "No code was sent to this contact: ask for one.",
}


def _contact(opened: dict[str, Any] | None, contact_id: str) -> tuple[str, dict[str, Any]]:
    for field, channel in (("emails", "email"), ("phones", "sms")):
        for item in (opened or {}).get(field) or ():
            if item.get("id") == contact_id:
                return channel, item
    raise not_found()


def _limited(exc: RateLimited) -> Problem:
    return Problem(429, f"{exc}; retry later.", headers={"Retry-After": str(int(exc.retry_after))})


@router.post(
    "/v1/users/{user_id}/contacts/{contact_id}/verify",
    response_model=ContactVerification,
    summary="Confirm a contact with the code sent to it",
    description="The contact becomes verified and the router may use it. A wrong, expired "
    "or exhausted code answers 422 with `reason`; too many attempts in an hour 429.",
    responses=problem_responses(401, 403, 404, 409, 410, 413, 422, 429),
)
async def verify_contact(
    *,
    user_id: UserPath,
    contact_id: ContactPath,
    body: Annotated[VerifyIn, Body(openapi_examples={"code": {"value": {"code": "123456"}}})],
    request: Request,
    res: Res,
    caller: Caller,
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    _current, opened = await res.writer.read(user)
    channel, _item = _contact(opened, contact_id)
    try:
        outcome = await res.contacts.guess(user, contact_id, body.code)
    except RateLimited as exc:
        raise _limited(exc) from None
    if outcome is Outcome.ALREADY:
        return JSONResponse(
            {"contact_id": contact_id, "channel": channel, "verified": True, "verified_at": None}
        )
    if outcome is not Outcome.VERIFIED:
        left = res.contacts.attempts_left(await res.contacts.state(user, contact_id))
        raise Problem(
            422,
            _REFUSALS[outcome],
            extensions={"reason": outcome.value, "attempts_left": left},
        )

    def mark(record: dict[str, Any]) -> dict[str, Any] | None:
        for field in ("emails", "phones"):
            for item in record.get(field) or []:
                if item.get("id") == contact_id and not item.get("verified"):
                    item["verified"] = True
                    return record
        return None

    try:
        written = await res.writer.update(
            user,
            mark,
            action="contact_verified",
            reason=f"{channel} contact {contact_id} confirmed with its code",
            correlation_id=correlation_id(request),
            details={"contact_id": contact_id, "channel": channel},
        )
    except UserErased:
        raise erased_problem() from None
    when = written.record["updated_at"].isoformat() if written else None
    return JSONResponse(
        {"contact_id": contact_id, "channel": channel, "verified": True, "verified_at": when}
    )


@router.post(
    "/v1/users/{user_id}/contacts/{contact_id}/verification",
    status_code=202,
    response_model=ContactVerification,
    summary="Send a new verification code to a contact",
    description="The previous code stops working. 409 for a contact already verified; 429 "
    "past the codes a contact may get in an hour.",
    responses=problem_responses(401, 403, 404, 409, 410, 422, 429),
)
async def resend_code(
    user_id: UserPath, contact_id: ContactPath, request: Request, res: Res, caller: Caller
) -> Any:
    user = resolve_user(caller, user_id, write=True)
    _current, opened = await res.writer.read(user)
    channel, item = _contact(opened, contact_id)
    if item.get("verified"):
        raise Problem(409, "This contact is verified already.")
    try:
        sent = await res.contacts.send(
            user, contact_id, channel, correlation_id=correlation_id(request)
        )
    except RateLimited as exc:
        raise _limited(exc) from None
    except UserErased:
        raise erased_problem() from None
    return JSONResponse(
        {
            "contact_id": contact_id,
            "channel": channel,
            "verified": False,
            "expires_at": sent.expires_at.isoformat(),
        },
        status_code=202,
    )
