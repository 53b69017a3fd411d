"""Health, readiness and lag metrics for faust roles."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faust

from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import CONSUMER_LAG

if TYPE_CHECKING:
    from finstream.app import AgentContext

log = get_logger(__name__)


def _readiness_problem(app: faust.App) -> str | None:
    if app.rebalancing:
        return "rebalancing"
    recovery = getattr(app.tables, "recovery", None)
    if recovery is not None and getattr(recovery, "in_recovery", False):
        return "recovering tables"
    return None


def install_runtime(app: faust.App, ctx: AgentContext) -> None:
    health = ctx.health
    health.add_check(lambda: _readiness_problem(app))

    @app.task
    async def _start_health() -> None:
        await health.start()

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def _ready(sender: Any, **_: Any) -> None:
        health.set_ready(True, "")

    @app.timer(5.0)
    async def _lag() -> None:
        consumer = app.consumer
        read: dict[Any, int | None] = getattr(consumer, "_read_offset", {})
        for tp in consumer.assignment():
            highwater: int | None = consumer.highwater(tp)
            position = read.get(tp)
            if highwater is None:
                continue
            # The read offset is the last offset processed; the next is +1.
            lag = highwater - (position + 1 if position is not None else 0)
            CONSUMER_LAG.labels(ctx.role, tp.topic, str(tp.partition)).set(max(lag, 0))

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _stopping(sender: Any, **_: Any) -> None:
        health.set_ready(False, "stopping")
