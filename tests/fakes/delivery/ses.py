"""Fake AWS SES v2: POST /v2/email/outbound-emails, SigV4 verified.

The Authorization header is checked the way SES does: the credential's key
id and scope (date/region/ses/aws4_request), then the signature recomputed
over the signed headers with botocore's canonical request. Errors are
restJson: ``x-amzn-ErrorType`` header and ``{"message": ...}``.
``rejected_addresses``: recipients answered with MessageRejected.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

from aiohttp import web
from tests.fakes.aws import sigv4_problem

from finstream.sandbox.base import HttpFake


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    h = {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazonaws.sesv2/"}
    h.update(headers or {})
    return web.json_response({"message": message}, status=status, headers=h)


class FakeSes(HttpFake):
    def __init__(
        self,
        access_key: str = "AKIDFAKESES",
        secret_key: str = "fake-ses-secret",
        region: str = "us-east-1",
    ) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.rejected_addresses: set[str] = set()
        self.paused = False
        self.bad_signatures = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2/email/outbound-emails", self.send)
        return app

    def _signature_ok(self, request: web.Request, body: bytes) -> str | None:
        return sigv4_problem(
            request,
            body,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            service="ses",
        )

    async def send(self, request: web.Request) -> web.Response:
        kind = await self.fault(request)
        body = await request.read()
        problem = self._signature_ok(request, body)
        if problem or kind == "auth":
            self.bad_signatures += 1
            return _error(
                403,
                "SignatureDoesNotMatch" if problem != "UnrecognizedClientException" else problem,
                f"The request signature we calculated does not match ({problem or 'forced'})",
            )
        if kind == "throttle":
            return _error(
                429,
                "TooManyRequestsException",
                "Maximum sending rate exceeded.",
                {"Retry-After": str(int(self.faults.retry_after))},
            )
        if kind in ("error", "timeout"):
            return _error(503, "ServiceUnavailable", "Service unavailable")
        if self.paused:
            return _error(400, "SendingPausedException", "Sending is paused for this account.")
        try:
            data: Any = json.loads(body)
            to = data["Destination"]["ToAddresses"][0]
            simple = data["Content"]["Simple"]
            subject = simple["Subject"]["Data"]
            tags = {t["Name"]: t["Value"] for t in data.get("EmailTags", [])}
            assert data["FromEmailAddress"]
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            return _error(400, "BadRequestException", "Missing or malformed field")
        if to in self.rejected_addresses:
            return _error(400, "MessageRejected", "Email address is not verified.")
        mid = f"0100018f{secrets.token_hex(8)}-{secrets.token_hex(4)}-000000"
        self.recorder.take(
            tags.get("message_id"),
            to=to,
            subject=subject,
            body=simple.get("Body"),
            headers={h["Name"]: h["Value"] for h in simple.get("Headers", [])},
            ses_message_id=mid,
        )
        if kind == "accept_hang":
            await asyncio.sleep(self.faults.hang)
        return web.json_response({"MessageId": mid})
