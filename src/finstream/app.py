"""The faust app of each stream-processing role, and the wiring of agents to topics.

Every faust role (quotes, router, ...) is its own faust App whose id is the
role's consumer group, so that operators scale and lag-monitor each role on
its own (one Deployment per role in the Helm chart). Agents read raw bytes and
decode them themselves with :mod:`finstream.codec`: a message that does not
decode must become a dead letter, not a crashed agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faust

from finstream.codec import Codec, default_codec
from finstream.runtime.health import HealthServer
from finstream.runtime.kafka import DeadLetters, Headers
from finstream.settings import Settings

RAW: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}


def create_app(role: str, settings: Settings) -> faust.App:
    app = faust.App(
        settings.group(role),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=settings.faust_store,
        datadir=str(settings.faust_data_dir or settings.stack_dir / "faust"),
        # Our own health server serves /healthz, /readyz and /metrics.
        web_enabled=False,
        autodiscover=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval,
        # One setting for every role (faust or not) decides how long a dead
        # member keeps its partitions.
        broker_session_timeout=settings.consumer_session_timeout,
        broker_heartbeat_interval=settings.consumer_session_timeout / 10,
        producer_acks=-1,
        # Changelog writes (one per table update) otherwise go out one request
        # each; a few milliseconds of linger batches them (measured: bench_pipeline).
        producer_linger=0.005,
        topic_replication_factor=settings.internal_topic_replication,
        table_standby_replicas=0,
        # Everything on the wire is Avro bytes that we decode ourselves.
        key_serializer="raw",
        value_serializer="raw",
    )
    return app


class FaustPublisher:
    """Publishes through the faust app's producer; faust flushes it before committing."""

    def __init__(self, app: faust.App) -> None:
        self._app = app

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        await self._app.producer.send(
            topic,
            key=key,
            value=value,
            partition=partition,
            timestamp=None,
            headers=list(headers) or None,
        )

    async def flush(self) -> None:
        await self._app.producer.flush()


@dataclass
class AgentContext:
    """What an agent module needs to wire itself into an app."""

    role: str
    settings: Settings
    codec: Codec
    health: HealthServer
    publisher: FaustPublisher
    dead_letters: DeadLetters


def agent_context(
    app: faust.App, role: str, settings: Settings, health: HealthServer
) -> AgentContext:
    publisher = FaustPublisher(app)
    return AgentContext(
        role=role,
        settings=settings,
        codec=default_codec(),
        health=health,
        publisher=publisher,
        dead_letters=DeadLetters(publisher, settings, role),
    )
