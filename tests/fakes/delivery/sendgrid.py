"""Fake SendGrid v3: POST /v3/mail/send and the Email Activity API (GET /v3/messages).

Mail send answers 202 with an X-Message-Id header; errors are
``{"errors": [{"field", "message", "help"}]}`` with 400/401/413/429/5xx, the
429 carrying X-RateLimit-Limit / -Remaining / -Reset (epoch seconds).
``bounce_addresses``: recipients refused with a 400 on the ``to`` field.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import Any

from aiohttp import web

from finstream.sandbox.base import HttpFake

_QUERY = re.compile(r"""^unique_args\['message_id'\]="(?P<id>[^"]*)"$""")


def _errors(
    status: int, *errors: tuple[str | None, str], headers: dict[str, str] | None = None
) -> web.Response:
    body = {"errors": [{"field": f, "message": m, "help": None} for f, m in errors]}
    return web.json_response(body, status=status, headers=headers)


class FakeSendGrid(HttpFake):
    def __init__(self, api_key: str = "SG.test-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.bounce_addresses: set[str] = set()
        self.lookups = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=30 * 1024 * 1024)
        app.router.add_post("/v3/mail/send", self.send)
        app.router.add_get("/v3/messages", self.messages)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def send(self, request: web.Request) -> web.Response:
        kind = await self.fault(request)
        if kind == "auth" or not self._authorized(request):
            return _errors(
                401, (None, "The provided authorization grant is invalid, expired, or revoked")
            )
        if kind == "throttle":
            reset = int(time.time() + self.faults.retry_after)
            return _errors(
                429,
                (None, "too many requests"),
                headers={
                    "X-RateLimit-Limit": "600",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset),
                },
            )
        if kind in ("error", "timeout"):
            return _errors(503, (None, "service unavailable"))
        try:
            body: Any = await request.json()
        except json.JSONDecodeError:
            return _errors(400, (None, "Bad Request"))
        problems = _validate(body)
        if problems:
            return _errors(400, *problems)
        to = body["personalizations"][0]["to"][0]["email"]
        if to in self.bounce_addresses:
            return _errors(
                400, ("personalizations.0.to.0.email", "Does not contain a valid address.")
            )
        xid = secrets.token_urlsafe(16)
        self.recorder.take(
            body["personalizations"][0].get("custom_args", {}).get("message_id"),
            to=to,
            subject=body.get("subject"),
            content=body.get("content"),
            headers=body.get("headers") or {},
            x_message_id=xid,
            at=time.time(),
        )
        if kind == "accept_hang":
            await asyncio.sleep(self.faults.hang)
        return web.Response(status=202, headers={"X-Message-Id": xid})

    async def messages(self, request: web.Request) -> web.Response:
        self.lookups += 1
        if not self._authorized(request):
            return _errors(401, (None, "authorization required"))
        match = _QUERY.match(request.query.get("query", ""))
        if not match:
            return _errors(400, ("query", "invalid query"))
        wanted = match.group("id")
        found = [
            {
                "from_email": "alerts@finstream.local",
                "msg_id": f"{e['x_message_id']}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
                "subject": e["subject"],
                "to_email": e["to"],
                "status": "delivered",
                "opens_count": 0,
                "clicks_count": 0,
                "last_event_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e["at"])),
            }
            for e in list(self.recorder.accepted)
            if e["message_id"] == wanted
        ]
        return web.json_response({"messages": found[: int(request.query.get("limit", "10"))]})


def _validate(body: Any) -> list[tuple[str | None, str]]:
    problems: list[tuple[str | None, str]] = []
    if not isinstance(body, dict):
        return [(None, "Bad Request")]
    pers = body.get("personalizations")
    if not isinstance(pers, list) or not pers or not pers[0].get("to"):
        problems.append(
            (
                "personalizations",
                "The personalizations field is required and must have at least one personalization.",
            )
        )
    else:
        for i, to in enumerate(pers[0]["to"]):
            if "@" not in str(to.get("email", "")):
                problems.append(
                    (f"personalizations.0.to.{i}.email", "Does not contain a valid address.")
                )
    if not isinstance(body.get("from"), dict) or "@" not in str(body["from"].get("email", "")):
        problems.append(("from.email", "The from email does not contain a valid address."))
    if not body.get("subject"):
        problems.append(("subject", "The subject is required."))
    content = body.get("content")
    if not isinstance(content, list) or not content or content[0].get("type") != "text/plain":
        problems.append(("content", "text/plain must come first and content is required."))
    headers = body.get("headers") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        problems.append(("headers", "Headers must be strings."))
    return problems
