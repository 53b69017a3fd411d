"""The ``sandbox`` role: FCM, APNs and Twilio sandboxes a person can look at.

The delivery workers of ``make run`` send push and SMS here instead of to
Google, Apple and Twilio. Each sandbox speaks its provider's wire format
(the same servers the tests use as fakes: OAuth2 token exchange and
``messages:send`` for FCM, HTTP/2 over TLS with ES256 provider tokens for
APNs, Basic-auth form posts for Twilio), keeps the latest
``FINSTREAM_SANDBOX_KEEP`` messages it accepted, and shows them:

* ``/push`` and ``/sms``: pages listing what arrived, newest first;
* ``/api/messages?channel=push|sms``: the same as JSON.

FCM, Twilio and the pages share ``FINSTREAM_SANDBOX_PORT``; APNs, which is
HTTP/2 over TLS only, listens on ``FINSTREAM_SANDBOX_APNS_PORT``.
"""

from __future__ import annotations

import html
import time
from typing import Any

from aiohttp import web

from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.sandbox import credentials
from finstream.sandbox.apns import FakeApns
from finstream.sandbox.fcm import FakeFcm
from finstream.sandbox.twilio import FakeTwilio
from finstream.settings import Settings

log = get_logger(__name__)

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>finstream {title} sandbox</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222 }}
table {{ border-collapse: collapse; width: 100% }}
td, th {{ border-bottom: 1px solid #ddd; padding: .4em; text-align: left; vertical-align: top }}
th {{ background: #f4f4f4 }} .muted {{ color: #777 }} nav a {{ margin-right: 1em }}
</style></head><body>
<nav><a href="/push">push</a><a href="/sms">SMS</a><a href="/api/messages?channel={channel}">JSON</a></nav>
<h1>{title} sandbox</h1>
<p class="muted">{count} message(s) received; this page refreshes every 5 seconds.</p>
<table><tr>{head}</tr>{rows}</table>
</body></html>
"""


def _when(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


class Sandbox:
    """The three provider sandboxes and the pages, on two ports."""

    def __init__(self, settings: Settings, creds: credentials.Credentials) -> None:
        self.settings = settings
        keep = settings.sandbox_keep
        self.fcm = FakeFcm(project_id=credentials.FCM_PROJECT)
        self.fcm.public_key = creds.fcm_public_key()
        self.fcm.recorder.keep = keep
        self.twilio = FakeTwilio(credentials.TWILIO_SID, credentials.TWILIO_TOKEN)
        self.twilio.recorder.keep = keep
        self.apns = FakeApns(
            creds.certs,
            team_id=credentials.APNS_TEAM,
            key_id=credentials.APNS_KEY_ID,
            public_key=creds.apns_public_key(),
            topic=credentials.APNS_TOPIC,
        )
        self.apns.recorder.keep = keep
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        self.fcm.add_routes(app.router)
        self.twilio.add_routes(app.router)
        app.router.add_get("/", self._index)
        app.router.add_get("/push", self._push_page)
        app.router.add_get("/sms", self._sms_page)
        app.router.add_get("/api/messages", self._messages)
        return app

    async def start(self) -> None:
        host, port = self.settings.sandbox_host, self.settings.sandbox_port
        self.fcm.url = f"http://{host}:{port}"  # the token endpoint checks its own audience
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        await self.apns.start(host, self.settings.sandbox_apns_port)
        log.info("sandbox listening", url=self.fcm.url, apns=self.apns.url)

    async def stop(self) -> None:
        await self.apns.stop()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- what arrived ---------------------------------------------------------------
    def push(self) -> list[dict[str, Any]]:
        items = []
        for e in list(self.fcm.recorder.accepted):
            note = e.get("notification") or {}
            items.append(
                {
                    "at": e["at"],
                    "provider": "fcm",
                    "message_id": e["message_id"],
                    "to": e["token"],
                    "title": note.get("title"),
                    "body": note.get("body"),
                }
            )
        for e in list(self.apns.recorder.accepted):
            alert = (e.get("payload") or {}).get("aps", {}).get("alert") or {}
            if isinstance(alert, str):
                alert = {"body": alert}
            items.append(
                {
                    "at": e["at"],
                    "provider": "apns",
                    "message_id": e["message_id"],
                    "to": e["token"],
                    "title": alert.get("title"),
                    "body": alert.get("body"),
                }
            )
        return sorted(items, key=lambda i: i["at"], reverse=True)

    def sms(self) -> list[dict[str, Any]]:
        items = [
            {
                "at": e["at"],
                "provider": "twilio",
                "message_id": e["message_id"],
                "to": e["to"],
                "sid": e["sid"],
                "body": e["body"],
            }
            for e in list(self.twilio.recorder.accepted)
        ]
        return sorted(items, key=lambda i: i["at"], reverse=True)

    async def _messages(self, request: web.Request) -> web.Response:
        channel = request.query.get("channel", "push")
        if channel not in ("push", "sms"):
            return web.json_response({"error": "channel must be push or sms"}, status=400)
        items = self.push() if channel == "push" else self.sms()
        return web.json_response({"channel": channel, "items": items})

    async def _index(self, _: web.Request) -> web.Response:
        raise web.HTTPFound("/push")

    def _page(self, title: str, channel: str, head: list[str], rows: list[list[Any]]) -> str:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v or ''))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        return _PAGE.format(title=title, channel=channel, head=cells, rows=body, count=len(rows))

    async def _push_page(self, _: web.Request) -> web.Response:
        rows = [
            [_when(i["at"]), i["provider"], i["to"][:16] + "…", i["title"], i["body"]]
            for i in self.push()
        ]
        page = self._page("Push", "push", ["time", "provider", "token", "title", "body"], rows)
        return web.Response(text=page, content_type="text/html")

    async def _sms_page(self, _: web.Request) -> web.Response:
        rows = [[_when(i["at"]), i["to"], i["sid"], i["body"]] for i in self.sms()]
        page = self._page("SMS", "sms", ["time", "to", "sid", "body"], rows)
        return web.Response(text=page, content_type="text/html")


async def run(ctx: ServiceContext) -> None:
    sandbox = Sandbox(ctx.settings, credentials.load(ctx.settings))
    await sandbox.start()
    ctx.health.set_ready(True)
    try:
        await ctx.stop.wait()
    finally:
        await sandbox.stop()
