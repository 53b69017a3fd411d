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
    kind: Literal["faust", "service"]
    target: str  # "module:function": register(app, ctx) for faust, run(ctx) for services
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
        "faust",
        "finstream.agents.quotes:register",
        ("md.ticks",),
        "Latest quote per symbol in a faust table and the Redis quote cache.",
    ),
    RoleSpec(
        "history",
        "service",
        "finstream.sinks.history:run",
        ("md.ticks",),
        "Writes ticks to PostgreSQL in idempotent batches.",
    ),
    RoleSpec(
        "router",
        "service",
        "finstream.agents.router:run",
        ("notify.requests", "notify.preferences"),
        "Routes notification requests by users' preferences (consent, quiet hours, caps, "
        "digests, schedules) to outbound channel topics; keeps the preferences read model.",
    ),
    RoleSpec(
        "audit",
        "service",
        "finstream.sinks.audit:run",
        ("audit.events",),
        "Hash-chains audit events into PostgreSQL (tamper-evident; `finstream audit verify`).",
    ),
    RoleSpec(
        "inapp",
        "service",
        "finstream.sinks.delivery.inapp:run",
        ("notify.outbound.inapp",),
        "Stores in-app messages in users' Redis inboxes.",
    ),
    RoleSpec(
        "delivery-email",
        "service",
        "finstream.sinks.delivery.worker:run_email",
        ("notify.outbound.email",),
        "Sends email through the provider chain (SendGrid, SES, SMTP) with retries and failover.",
    ),
    RoleSpec(
        "delivery-push",
        "service",
        "finstream.sinks.delivery.worker:run_push",
        ("notify.outbound.push",),
        "Sends push notifications (FCM, APNs); marks unregistered tokens in preferences.",
    ),
    RoleSpec(
        "delivery-sms",
        "service",
        "finstream.sinks.delivery.worker:run_sms",
        ("notify.outbound.sms",),
        "Sends SMS through Twilio; marks opted-out numbers in preferences.",
    ),
    RoleSpec(
        "statestore",
        "service",
        "finstream.sinks.statestore_role:run",
        ("alerts.rules", "notify.preferences"),
        "Keeps the Redis read models of alert rules and preferences current.",
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
        "service",
        "finstream.sinks.bars:run",
        ("md.bars.1m",),
        "Stores bars in PostgreSQL (highest revision wins) and the latest ones in Redis.",
    ),
    RoleSpec(
        "alerts",
        "faust",
        "finstream.agents.alerts:register",
        ("md.ticks", "alerts.rules", "alerts.rules.by-symbol"),
        "Evaluates alert rules on ticks (co-partitioned by symbol); fires alerts.fired and notify.requests.",
    ),
]

ROLES: dict[str, RoleSpec] = {r.name: r for r in _ROLES}
