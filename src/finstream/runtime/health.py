"""Health, readiness and metrics over HTTP for every worker role.

``/healthz`` answers as long as the event loop runs (liveness); ``/readyz`` is
200 only when the role says it is ready (connected, assigned, tables
recovered), which is what Kubernetes' readiness and startup probes use;
``/metrics`` is the Prometheus exposition of the process registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import READY

log = get_logger(__name__)


class HealthServer:
    def __init__(self, role: str, host: str, port: int) -> None:
        self.role = role
        self.host = host
        self.port = port
        self._ready = False
        self._reason = "starting"
        self._checks: list[Callable[[], str | None]] = []
        self._runner: web.AppRunner | None = None

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready = ready
        self._reason = reason
        READY.labels(self.role).set(1 if ready else 0)

    def add_check(self, check: Callable[[], str | None]) -> None:
        """A check returns None when fine, or a sentence saying why not ready."""
        self._checks.append(check)

    def readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, self._reason or "not ready"
        for check in self._checks:
            problem = check()
            if problem:
                return False, problem
        return True, "ready"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        log.info("health server listening", url=f"http://{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "role": self.role})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, reason = self.readiness()
        return web.Response(
            status=200 if ok else 503,
            text=json.dumps({"ready": ok, "role": self.role, "reason": reason}),
            content_type="application/json",
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(REGISTRY))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        resp.charset = "utf-8"
        return resp
