"""The ``api`` worker role and ``finstream api``: uvicorn serving the app in this process.

As a role (``finstream worker api``, started by ``make run``) it shares the
worker runtime: the health/metrics server on ``http_port``, SIGTERM through
the role's stop event. uvicorn's own signal handling is turned off in that
case, so the worker runtime stays the one place that decides when to stop;
on stop, uvicorn stops accepting, lets requests finish and closes the
WebSockets (code 1012, service restart) before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn

from finstream.api.app import create_app
from finstream.api.deps import Resources
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext
from finstream.settings import Settings

log = get_logger(__name__)

# Room for a first "auth" message carrying a long token; ordinary client
# messages are held to api_ws_max_message_bytes by the stream itself.
WS_FRAME_LIMIT = 16 * 1024


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(settings: Settings, app: Any, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
        ws_max_size=max(WS_FRAME_LIMIT, settings.api_ws_max_message_bytes),
        # Compression is per connection: with fan-out the same frame would be
        # deflated once per client, which costs more CPU than small JSON frames save.
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=10,
    )


async def _dependencies_ready(resources: Resources) -> None:
    checks = await resources.readiness()
    failing = {name: state for name, state in checks.items() if state != "ok"}
    if failing:
        raise RuntimeError(", ".join(f"{name} {state}" for name, state in failing.items()))


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    app = create_app(settings)
    server = EmbeddedServer(uvicorn_config(settings, app, settings.api_host, settings.api_port))
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    stop = asyncio.create_task(ctx.stop.wait())
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
        await asyncio.sleep(0.05)
    if server.started:
        ctx.health.add_check(lambda: None if not serving.done() else "the API server stopped")
        # The worker's /readyz (what Kubernetes probes) says what the API's own does.
        resources: Resources = app.state.resources
        ctx.health.add_dependency("api", lambda: _dependencies_ready(resources))
        ctx.health.set_ready(True)
        log.info("api listening", url=f"http://{settings.api_host}:{settings.api_port}")
    await asyncio.wait([serving, stop], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stop.cancel()
    await serving
    if not ctx.stop.is_set():
        raise SystemExit("the API server stopped on its own (see the log above)")
