"""Fake Twilio Messages: POST and GET /2010-04-01/Accounts/{sid}/Messages.json.

HTTP Basic auth (AccountSid:AuthToken). A send answers 201 with the Message
resource (sid, status "queued", num_segments, date_created in RFC 2822, ...);
errors are ``{"code", "message", "more_info", "status"}``: 21211 invalid To,
21610 for numbers in ``opted_out`` (they replied STOP), 20429 throttled
(429 with Retry-After), 20003 bad credentials, 20500 internal error.
The list answers the account's messages to ``To``, newest first.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from finstream.domain.delivery.channels import sms_segments
from finstream.sandbox.base import HttpFake

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def _error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
        headers=headers,
    )


class FakeTwilio(HttpFake):
    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "twilio-test-token",  # noqa: S107 (a sandbox account)
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.opted_out: set[str] = set()
        self.lookups = 0

    def app(self) -> web.Application:
        app = web.Application()
        self.add_routes(app.router)
        return app

    def add_routes(self, router: web.UrlDispatcher) -> None:
        path = "/2010-04-01/Accounts/{sid}/Messages.json"
        router.add_post(path, self.send)
        router.add_get(path, self.list)

    def _authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        return (
            request.headers.get("Authorization") == f"Basic {expected}"
            and request.match_info["sid"] == self.account_sid
        )

    async def send(self, request: web.Request) -> web.Response:
        kind = await self.fault(request)
        if kind == "auth" or not self._authorized(request):
            return _error(401, 20003, "Authenticate")
        if kind == "throttle":
            return _error(
                429, 20429, "Too Many Requests", {"Retry-After": str(int(self.faults.retry_after))}
            )
        if kind in ("error", "timeout"):
            return _error(500, 20500, "Internal Server Error")
        form = await request.post()
        to, body = str(form.get("To", "")), str(form.get("Body", ""))
        if not _E164.match(to):
            return _error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not body:
            return _error(400, 21602, "Message body is required.")
        if len(body) > 1600:
            return _error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return _error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required.")
        if to in self.opted_out:
            return _error(400, 21610, "Attempt to send to unsubscribed recipient")
        callback = str(form.get("StatusCallback", ""))
        ids = parse_qs(urlsplit(callback).query).get("message_id")
        message_id = ids[0] if ids else None
        resource = self._resource(to, str(form.get("From", "")), body)
        self.recorder.take(message_id, to=to, body=body, sid=resource["sid"], resource=resource)
        if kind == "accept_hang":
            await asyncio.sleep(self.faults.hang)
        return web.json_response(resource, status=201)

    def _resource(self, to: str, sender: str, body: str) -> dict[str, Any]:
        now = formatdate(time.time(), usegmt=True)
        sid = "SM" + secrets.token_hex(16)
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": sender,
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": str(sms_segments(body).segments),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "to": to,
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }

    async def list(self, request: web.Request) -> web.Response:
        self.lookups += 1
        if not self._authorized(request):
            return _error(401, 20003, "Authenticate")
        to = request.query.get("To")
        size = int(request.query.get("PageSize", "50"))
        items = [
            e["resource"]
            for e in reversed(list(self.recorder.accepted))
            if to is None or e["to"] == to
        ]
        return web.json_response(
            {
                "messages": items[:size],
                "page": 0,
                "page_size": size,
                "next_page_uri": None,
                "uri": request.path_qs,
            }
        )
