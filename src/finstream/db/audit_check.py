"""The audit chain, verified on a schedule by the `retention` role (issue 15).

``finstream audit verify`` walks the hash chain on demand; an operator also
needs to hear when it breaks. Every ``FINSTREAM_AUDIT_VERIFY_INTERVAL``
seconds the role walks it (the same :func:`finstream.sinks.audit.verify`, in
one read-only snapshot) and sets the gauges the PrometheusRule
``FinstreamAuditChainBroken`` reads: ``finstream_audit_chain_ok`` (1 intact,
0 broken) and the time of the last walk, so that a walk that stopped
happening is seen too.
"""

from __future__ import annotations

import time

import asyncpg
from prometheus_client import Gauge

from finstream.runtime.logging import get_logger
from finstream.sinks.audit import Verification, verify

log = get_logger(__name__)

CHAIN_OK = Gauge("finstream_audit_chain_ok", "1 when the last walk found the audit chain intact")
CHAIN_CHECKED = Gauge(
    "finstream_audit_chain_checked_timestamp_seconds", "When the audit chain was last walked"
)
CHAIN_EVENTS = Gauge("finstream_audit_chain_events", "Events in the audit chain at the last walk")


async def check_chain(conn: asyncpg.Connection) -> Verification:
    result = await verify(conn)
    CHAIN_OK.set(1 if result.ok else 0)
    CHAIN_EVENTS.set(result.checked)
    CHAIN_CHECKED.set(time.time())
    if result.ok:
        log.info("audit chain verified", events=result.checked, head_seq=result.head_seq)
    else:
        log.error("audit chain broken", problem=result.render(), seq=result.seq)
    return result
