"""The `retention` role: partition maintenance, retention and database metrics.

Every ``retention_interval`` seconds (0: never; the chart's CronJob runs the
passes instead) it runs the pass of finstream.db.retention, and every
``db_monitor_interval`` seconds it refreshes the database gauges the
dashboard and the alert rules read (finstream.db.health.update_metrics):
connections, WAL archiving, backup age, replication lag, blocked queries,
table sizes, the last successful retention pass and the health score.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg

from finstream.db.audit_check import check_chain
from finstream.db.health import update_metrics
from finstream.db.retention import RetentionBusy, publish_to_audit_topic, run_pass
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger
from finstream.runtime.worker import ServiceContext

log = get_logger(__name__)


async def run(ctx: ServiceContext) -> None:
    settings = ctx.settings
    url = settings.database_url.get_secret_value()
    next_pass = time.monotonic() if settings.retention_interval > 0 else float("inf")
    # issue 15: the audit chain walked on a schedule (finstream.db.audit_check).
    next_verify = time.monotonic() if settings.audit_verify_interval > 0 else float("inf")
    ready = False
    while not ctx.stop.is_set():
        try:
            conn = await asyncpg.connect(url, timeout=10)
            try:
                await update_metrics(conn, settings)
                if not ready:
                    ctx.health.set_ready(True)
                    ready = True
                if time.monotonic() >= next_verify:
                    next_verify = time.monotonic() + settings.audit_verify_interval
                    await check_chain(conn)
                if time.monotonic() >= next_pass:
                    next_pass = time.monotonic() + settings.retention_interval

                    async def publish(events: list[dict[str, object]]) -> None:
                        await publish_to_audit_topic(settings, events)

                    report = await run_pass(conn, settings, utcnow(), publish)
                    log.info("retention pass done", lines=report.lines())
            finally:
                await conn.close()
        except RetentionBusy as exc:
            log.info("retention pass skipped", reason=str(exc))
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("database check failed", error=f"{type(exc).__name__}: {exc}")
            ctx.health.set_ready(False, f"database: {exc}")
            ready = False
        except Exception as exc:  # a failed pass is counted and retried next interval
            log.error("retention pass failed", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), settings.db_monitor_interval)
