"""Health, readiness and metrics over HTTP for every worker role.

``/healthz`` answers as long as the event loop runs (liveness); ``/readyz`` is
200 only when the role says it is ready (connected, assigned, tables
recovered), which is what Kubernetes' readiness and startup probes use;
``/metrics`` is the Prometheus exposition of the process registry.

Readiness tells the truth about what a role cannot work without: a role
registers a probe per dependency (:meth:`HealthServer.add_dependency`: Kafka,
PostgreSQL, Redis), which runs in the background every
``health_probe_interval`` seconds with a deadline of its own, so ``/readyz``
never waits on a dead service and says which one is missing and since when.
``finstream_ready`` follows the same answer, and
``finstream_dependency_up{dependency}`` shows each probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import DEPENDENCY_UP, READY

log = get_logger(__name__)

Probe = Callable[[], Awaitable[None]]


@dataclass
class _Dependency:
    name: str
    probe: Probe
    problem: str | None = "not probed yet"
    since: float = 0.0  # monotonic time of the first failure of the current outage


class HealthServer:
    def __init__(
        self,
        role: str,
        host: str,
        port: int,
        probe_interval: float = 2.0,
        probe_timeout: float = 5.0,
    ) -> None:
        self.role = role
        self.host = host
        self.port = port
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self._ready = False
        self._reason = "starting"
        self._checks: list[Callable[[], str | None]] = []
        self._dependencies: dict[str, _Dependency] = {}
        self._prober: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready = ready
        self._reason = reason
        READY.labels(self.role).set(1 if self.readiness()[0] else 0)

    def add_check(self, check: Callable[[], str | None]) -> None:
        """A check returns None when fine, or a sentence saying why not ready."""
        self._checks.append(check)

    def add_dependency(self, name: str, probe: Probe) -> None:
        """A service the role cannot work without; ``probe`` raises when it is unusable.

        Probed in the background from :meth:`start` on (the first name given
        wins: a role's engine and its publisher both need Kafka, probed once).
        Until the first answer the dependency counts as not ready.
        """
        if name not in self._dependencies:
            self._dependencies[name] = _Dependency(name, probe, since=time.monotonic())
            DEPENDENCY_UP.labels(self.role, name).set(0)
            self._wake.set()

    def readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, self._reason or "not ready"
        now = time.monotonic()
        for dep in self._dependencies.values():
            if dep.problem is not None:
                return False, f"{dep.name} unavailable for {now - dep.since:.0f}s: {dep.problem}"
        for check in self._checks:
            problem = check()
            if problem:
                return False, problem
        return True, "ready"

    async def probe_once(self) -> None:
        """Ask every dependency once, concurrently, each within ``probe_timeout``."""
        deps = list(self._dependencies.values())
        results = await asyncio.gather(
            *(asyncio.wait_for(d.probe(), self.probe_timeout) for d in deps),
            return_exceptions=True,
        )
        now = time.monotonic()
        for dep, result in zip(deps, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                problem = (
                    f"no answer within {self.probe_timeout:g}s"
                    if isinstance(result, TimeoutError)
                    else f"{type(result).__name__}: {result}"[:300]
                )
                if dep.problem is None:
                    dep.since = now
                    log.warning("dependency unavailable", dependency=dep.name, problem=problem)
                dep.problem = problem
                DEPENDENCY_UP.labels(self.role, dep.name).set(0)
            else:
                if dep.problem is not None and dep.problem != "not probed yet":
                    log.info(
                        "dependency available again",
                        dependency=dep.name,
                        after_seconds=round(now - dep.since, 1),
                    )
                dep.problem = None
                DEPENDENCY_UP.labels(self.role, dep.name).set(1)
        ok, _ = self.readiness()
        READY.labels(self.role).set(1 if ok else 0)

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe bug must not end the probing
                log.exception("dependency probe failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.probe_interval)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self._prober = asyncio.create_task(self._probe_loop(), name="health-probes")
        log.info("health server listening", url=f"http://{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
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
