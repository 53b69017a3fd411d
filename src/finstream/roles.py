"""The worker roles of finstream: one process kind each, scaled on its own.

A role is what `finstream worker <role>` runs and what the Helm chart turns
into one Deployment. ``inputs`` are the catalogue topics the role consumes;
their partition count bounds the replicas that can share the work (the chart's
autoscaling maximum), and a test keeps the chart's values in line with this
table. Adding a role is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RoleSpec:
    name: str
    # stream: exactly-once on the stream engine with changelog-backed state;
    # sink: the stream engine at least once, writing idempotently outside Kafka;
    # service: no consumer group (sources, the API).
    kind: Literal["stream", "sink", "service"]
    target: str  # "module:function", an async run(ctx)
    inputs: tuple[str, ...]
    description: str


_ROLES = [
    RoleSpec(
        "simulator",
        "service",
        "finstream.connectors.simulated:run",
        (),
        "Simulated market feed (geometric Brownian motion) publishing to md.ticks.",
    ),
    RoleSpec(
        "sandbox",
        "service",
        "finstream.sandbox.server:run",
        (),
        "FCM, APNs and Twilio sandboxes for make run: keep what they receive, show it on a page.",
    ),
    RoleSpec(
        "connector",
        "service",
        "finstream.connectors.runner:run",
        (),
        "Market-data provider failover chains (FINSTREAM_MD_CHAIN) publishing to md.ticks.",
    ),
    RoleSpec(
        "quotes",
        "stream",
        "finstream.agents.quotes:run",
        ("md.ticks",),
        "Latest quote per symbol (Redis cache) and OHLCV bars to md.bars.1m, exactly once.",
    ),
    RoleSpec(
        "history",
        "sink",
        "finstream.agents.history:run",
        ("md.ticks",),
        "Writes ticks to PostgreSQL in idempotent batches.",
    ),
    RoleSpec(
        "router",
        "stream",
        "finstream.agents.router:run",
        ("notify.requests", "notify.preferences", "notify.scheduled.commands"),
        "Routes notification requests by users' preferences (consent, quiet hours, caps, "
        "digests, schedules) to outbound channel topics.",
    ),
    RoleSpec(
        "audit",
        "sink",
        "finstream.agents.audit:run",
        ("audit.events",),
        "Hash-chains audit events into PostgreSQL (tamper-evident; `finstream audit verify`).",
    ),
    RoleSpec(
        "inapp",
        "sink",
        "finstream.agents.delivery:run_inapp",
        ("notify.outbound.inapp",),
        "Stores in-app messages in users' Redis inboxes.",
    ),
    RoleSpec(
        "delivery-email",
        "sink",
        "finstream.agents.delivery:run_email",
        ("notify.outbound.email",),
        "Sends email through the provider chain (SendGrid, SES, SMTP) with retries and failover.",
    ),
    RoleSpec(
        "delivery-push",
        "sink",
        "finstream.agents.delivery:run_push",
        ("notify.outbound.push",),
        "Sends push notifications (FCM, APNs); marks unregistered tokens in preferences.",
    ),
    RoleSpec(
        "delivery-sms",
        "sink",
        "finstream.agents.delivery:run_sms",
        ("notify.outbound.sms",),
        "Sends SMS through Twilio; marks opted-out numbers in preferences.",
    ),
    RoleSpec(
        "statestore",
        "sink",
        "finstream.agents.statestore:run",
        ("alerts.rules", "notify.preferences", "notify.scheduled.items"),
        "Keeps the Redis read models of alert rules, preferences and scheduled items current.",
    ),
    RoleSpec(
        "api",
        "service",
        "finstream.api.service:run",
        (),
        "HTTP API and WebSocket streams (uvicorn on FINSTREAM_API_PORT).",
    ),
    RoleSpec(
        "bars",
        "sink",
        "finstream.agents.bars:run",
        ("md.bars.1m",),
        "Stores bars in PostgreSQL (highest revision wins) and the latest ones in Redis.",
    ),
    RoleSpec(
        "alerts",
        "stream",
        "finstream.agents.alerts:run",
        ("md.ticks", "alerts.rules", "alerts.rules.by-symbol"),
        "Evaluates alert rules on ticks (co-partitioned by symbol); fires alerts.fired and notify.requests.",
    ),
]

_ROLES.append(
    RoleSpec(
        "feedback",
        "sink",
        "finstream.agents.feedback:run",
        ("notify.delivery", "audit.events"),
        "Delivery outcomes and webhooks into the funnel (PostgreSQL) and users' preferences: "
        "bounces, complaints, unsubscribes, STOP.",
    )
)

_ROLES.append(
    RoleSpec(
        "retention",
        "service",
        "finstream.db.role:run",
        (),
        "Creates time partitions ahead, removes what is past each table's retention policy "
        "(audited) and exports database health metrics.",
    )
)

ROLES: dict[str, RoleSpec] = {r.name: r for r in _ROLES}
