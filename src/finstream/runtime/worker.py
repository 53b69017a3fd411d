"""Running one worker role in this process: `finstream worker <role>`.

Two kinds of role exist (see :mod:`finstream.roles`):

* ``faust`` roles register agents and tables on a faust App and run it under a
  faust Worker, which handles signals, rebalances and commits;
* ``service`` roles are plain asyncio coroutines (connectors, batch sinks,
  delivery workers) that run until SIGTERM/SIGINT sets their stop event.

Both get the same logging, health server and metrics.
"""

from __future__ import annotations

import asyncio
import importlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from finstream.codec import Codec, default_codec
from finstream.roles import ROLES, RoleSpec
from finstream.runtime.health import HealthServer
from finstream.runtime.kafka import AiokafkaPublisher, DeadLetters
from finstream.runtime.logging import configure_logging, get_logger, logging_dict_config
from finstream.settings import Settings, get_settings

log = get_logger(__name__)


@dataclass
class ServiceContext:
    """What a service role's ``run(ctx)`` gets."""

    role: str
    settings: Settings
    codec: Codec
    health: HealthServer
    stop: asyncio.Event
    options: dict[str, Any] = field(default_factory=dict)
    _publisher: AiokafkaPublisher | None = None

    async def publisher(self) -> AiokafkaPublisher:
        """A started producer shared by the role; stopped (and flushed) on exit."""
        if self._publisher is None:
            pub = AiokafkaPublisher(self.settings, self.role)
            await pub.start()
            self._publisher = pub
        return self._publisher

    async def dead_letters(self) -> DeadLetters:
        return DeadLetters(await self.publisher(), self.settings, self.role)

    async def close(self) -> None:
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None


def _load(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


def run_role(role: str, options: dict[str, Any] | None = None) -> None:
    settings = get_settings()
    spec = ROLES.get(role)
    if spec is None:
        raise SystemExit(f"unknown role {role!r}; known roles: {', '.join(sorted(ROLES))}")
    configure_logging(settings.log_level, settings.log_format, role=role)
    if spec.kind == "faust":
        _run_faust(spec, settings)
    else:
        asyncio.run(_run_service(spec, settings, options or {}))


async def _run_service(spec: RoleSpec, settings: Settings, options: dict[str, Any]) -> None:
    health = HealthServer(spec.name, settings.http_host, settings.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctx = ServiceContext(spec.name, settings, default_codec(), health, stop, options)
    target: Callable[[ServiceContext], Awaitable[None]] = _load(spec.target)
    await health.start()
    log.info("worker starting", kind="service")
    try:
        await target(ctx)
    finally:
        health.set_ready(False, "stopping")
        await ctx.close()
        await health.stop()
        log.info("worker stopped")


def _run_faust(spec: RoleSpec, settings: Settings) -> None:
    import faust

    from finstream.app import agent_context, create_app
    from finstream.runtime.faust_support import install_runtime

    app = create_app(spec.name, settings)
    health = HealthServer(spec.name, settings.http_host, settings.http_port)
    ctx = agent_context(app, spec.name, settings, health)
    register: Callable[..., None] = _load(spec.target)
    register(app, ctx)
    install_runtime(app, ctx)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        quiet=True,
        logging_config=logging_dict_config(settings.log_level, settings.log_format),
        redirect_stdouts=False,
    )
    log.info("worker starting", kind="faust")
    worker.execute_from_commandline()
