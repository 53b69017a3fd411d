"""Running one worker role in this process: `finstream worker <role>`.

Every role is an asyncio coroutine ``run(ctx)`` (see :mod:`finstream.roles`)
that runs until SIGTERM/SIGINT sets its stop event; consuming roles run a
:class:`finstream.runtime.engine.StreamEngine`. All get the same logging,
health server and metrics.
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
from finstream.runtime.kafka import DeadLetters, KafkaPublisher, check_access
from finstream.runtime.logging import configure_logging, get_logger
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
    _publisher: KafkaPublisher | None = None

    async def publisher(self) -> KafkaPublisher:
        """A started producer shared by the role; stopped (and flushed) on exit."""
        if self._publisher is None:
            pub = KafkaPublisher(self.settings, self.role)
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
    # Wrong credentials or certificates fail every retry alike: stop with the
    # reason rather than run unable to read or write (a crash loop names it).
    problem = check_access(settings)
    if problem is not None:
        raise SystemExit(f"error: {problem}")
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
    log.info("worker starting", kind=spec.kind)
    try:
        await target(ctx)
    finally:
        health.set_ready(False, "stopping")
        await ctx.close()
        await health.stop()
        log.info("worker stopped")
