"""Errors as ``application/problem+json`` (RFC 9457), for every status the API returns.

Handlers turn FastAPI's validation errors, Starlette's routing errors (404,
405), our own :class:`Problem` and anything unexpected into one shape:
``type``, ``title``, ``status``, ``detail`` and, for validation, an
``errors`` list whose ``pointer`` (RFC 6901, into the request part named by
``in``) names the offending field. Bodies carry no request id or path: a
"not found" for someone else's resource must be byte-for-byte the one for a
resource that does not exist, so such details travel in headers instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from finstream.runtime.logging import get_logger

log = get_logger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://finstream.dev/problems/"

_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    406: "not-acceptable",
    409: "conflict",
    412: "precondition-failed",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    429: "too-many-requests",
    500: "internal-error",
    502: "bad-gateway",
    503: "unavailable",
}


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or _SLUGS.get(status, "error")
        self.title = title or HTTPStatus(status).phrase
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extensions,
        }

    def response(self) -> Response:
        return problem_response(self.status, self.body(), self.headers)


def problem_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers or {}),
    )


def not_found() -> Problem:
    """The one answer for "missing" and "someone else's": nothing tells them apart."""
    return Problem(404, "The resource does not exist.")


def _pointer(loc: Sequence[Any]) -> tuple[str, str]:
    """("body", "rule", 0, "x") -> ("body", "/rule/0/x"), per RFC 6901 escaping."""
    where = str(loc[0]) if loc else "body"
    parts = [str(p).replace("~", "~0").replace("/", "~1") for p in loc[1:]]
    return where, "/" + "/".join(parts) if parts else ""


def validation_problem(errors: Sequence[Mapping[str, Any]]) -> Problem:
    items = []
    for err in errors:
        where, pointer = _pointer(err.get("loc", ()))
        items.append({"in": where, "pointer": pointer, "detail": str(err.get("msg", "invalid"))})
    if items:
        first = items[0]
        field = first["pointer"] or first["in"]
        detail = f"{field}: {first['detail']}"
        if len(items) > 1:
            detail += f" (and {len(items) - 1} more)"
    else:
        detail = "The request is invalid."
    return Problem(422, detail, extensions={"errors": items})


def json_pointer(field: str) -> str:
    """``phones[0].number`` -> ``/phones/0/number`` (RFC 6901)."""
    parts = re.findall(r"[^.\[\]]+", field)
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def field_problem(where: str, field: str, message: str, status: int = 422) -> Problem:
    """A domain validation error about one field (``field`` as the domain names it)."""
    pointer = json_pointer(field)
    return Problem(
        status,
        message,
        extensions={"errors": [{"in": where, "pointer": pointer, "detail": message}]},
    )


async def _validation_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(exc.errors()).response()


async def _http_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).description
    if status == 404:
        return not_found().response()
    return Problem(status, detail, headers=exc.headers).response()


async def _problem_handler(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response()


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    # Never the exception text: it may hold internals. The log has it, with the route.
    route = request.scope.get("route")
    log.error(
        "unhandled error",
        method=request.method,
        route=getattr(route, "path", "?"),
        error_class=type(exc).__name__,
        exc_info=exc,
    )
    return Problem(500, "An internal error occurred; it has been logged.").response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(Exception, _unexpected_handler)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["in", "pointer", "detail"],
                "properties": {
                    "in": {"type": "string"},
                    "pointer": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": True,
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses.

    400 (a body that is not even text, a bad Content-Length) and 503 (a backing
    service is down) can happen to any operation, so every one documents them.
    """
    return {
        s: {
            "description": HTTPStatus(s).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for s in sorted({400, 503, *statuses})
    }
