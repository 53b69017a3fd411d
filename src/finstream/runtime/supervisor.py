"""`finstream run`: the whole pipeline on one machine, for development and demos.

Brings the stack up, applies topics and migrations, starts one process per
worker role (each with its own health/metrics port and a log file under
``.stack/logs``), sends a demo notification request, and prints where to look.
Ctrl-C (or SIGTERM) stops the workers gracefully: each commits its offsets
and leaves its consumer group before the supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from finstream.settings import Settings, child_environment, get_settings

STOP_GRACE_SECONDS = 30.0
DEMO_USER = "demo-user"


@dataclass
class Child:
    role: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self, extra_env: dict[str, str]) -> None:
        self.log_file = self.log_path.open("ab")
        env = child_environment(http_port=str(self.port), **extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finstream.cli", "worker", self.role],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _ports(settings: Settings, roles: list[str]) -> dict[str, int]:
    return {role: settings.run_base_port + i for i, role in enumerate(roles)}


def _prepare(settings: Settings) -> None:
    from finstream.cli import db_migrate, stack_up, topics_apply

    ctx = click.get_current_context()
    ctx.invoke(stack_up)
    ctx.invoke(topics_apply, dry_run=False, replication_factor=None)
    ctx.invoke(db_migrate)
    if settings.env == "dev":
        asyncio.run(_dev_logins(settings))


async def _dev_logins(settings: Settings) -> None:
    import asyncpg

    from finstream.db.grants import provision_dev_logins

    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        await provision_dev_logins(conn)
    finally:
        await conn.close()


def _role_env(settings: Settings, role: str, prepared: bool) -> dict[str, str]:
    """Least privilege locally too: each role connects as its own database login
    (dev, once _prepare has created the logins)."""
    from finstream.db.grants import WORKER_DB_ROLES, role_database_url

    group = WORKER_DB_ROLES.get(role)
    if settings.env != "dev" or group is None or not prepared:
        return {}
    return {"database_url": role_database_url(settings.database_url.get_secret_value(), group)}


def _demo_symbol(settings: Settings) -> str:
    return (settings.md_symbols or settings.sim_symbols).split(",")[0].strip().upper()


def demo_records(settings: Settings) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The demo's (topic, key, schema, record): the demo user's preferences, a price
    alert that fires within seconds on the simulated feed, and a welcome message."""
    from finstream.domain.alerts import parse_rule
    from finstream.domain.preferences import parse_preferences
    from finstream.domain.time import utcnow

    now = utcnow()
    symbol = _demo_symbol(settings)
    prefs = parse_preferences(
        {
            "user_id": DEMO_USER,
            "locale": "en",
            "timezone": "UTC",
            "emails": [{"address": "demo@example.com", "verified": True}],
            "categories": {"price_alert": {"channels": ["email", "inapp"]}},
        },
        now=now,
        consent_source="finstream-run",
    )
    # Every simulated price is above a cent, so this fires on the first tick and
    # then once a minute while the demo runs.
    rule = parse_rule(
        {
            "rule_id": f"demo-{symbol.lower()}-above",
            "user_id": DEMO_USER,
            "symbol": symbol,
            "condition": "greater-than",
            "value": "0.01",
            "frequency": "once-per-minute",
            "message": "Demo alert from `finstream run`",
        },
        now=now,
    )
    cid = uuid.uuid4().hex
    welcome: dict[str, Any] = {
        "request_id": f"demo-{uuid.uuid4().hex[:12]}",
        "user_id": DEMO_USER,
        "category": "account",
        "priority": "NORMAL",
        "template": "welcome",
        "data": {"title": "Welcome to finstream", "body": "Your pipeline is running."},
        "channels": [],
        "deliver_at": None,
        "expires_at": None,
        "collapse_key": None,
        "created_at": now,
        "source": "finstream-run",
        "correlation_id": cid,
    }
    return [
        ("notify.preferences", DEMO_USER, "UserPreferences", prefs),
        ("alerts.rules", rule.rule_id, "AlertRule", rule.to_record()),
        ("notify.requests", DEMO_USER, "NotificationRequest", welcome),
    ]


async def send_demo(settings: Settings) -> None:
    from finstream.codec import default_codec
    from finstream.runtime.kafka import KafkaPublisher

    pub = KafkaPublisher(settings, "run")
    await pub.start()
    try:
        for topic, key, schema, record in demo_records(settings):
            # Preferences first, in their own flush: the router must know the
            # user before the alert's request arrives.
            await pub.send(
                settings.topic(topic), key.encode(), default_codec().encode(schema, record)
            )
            await pub.flush()
    finally:
        await pub.stop()


async def _progress(settings: Settings) -> str:
    import asyncpg
    import redis.asyncio as aioredis

    parts = []
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=3)
        try:
            parts.append(
                f"ticks in PostgreSQL: {await conn.fetchval('SELECT count(*) FROM ticks')}"
            )
        finally:
            await conn.close()
    with contextlib.suppress(Exception):
        r = aioredis.from_url(settings.redis_url.get_secret_value())
        try:
            keys = [k async for k in r.scan_iter(match=settings.redis_key("quote:*"), count=500)]
            parts.append(f"quotes in Redis: {len(keys)}")
            inbox = await r.zcard(settings.redis_key(f"inbox:{{{DEMO_USER}}}:index"))
            parts.append(f"{DEMO_USER} inbox: {inbox}")
        finally:
            await r.aclose()
    with contextlib.suppress(Exception):
        counts = await asyncio.to_thread(
            _topic_sizes, settings, ["alerts.fired", "notify.outbound.email"]
        )
        parts += [f"{name}: {n}" for name, n in counts.items()]
    return ", ".join(parts)


def _topic_sizes(settings: Settings, names: list[str]) -> dict[str, int]:
    """Messages ever written to each topic (sum of high watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "finstream-run-progress",
            "log_level": 3,
        }
    )
    try:
        sizes = {}
        for name in names:
            topic = settings.topic(name)
            partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
            sizes[name] = sum(
                consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
                for p in partitions
            )
        return sizes
    finally:
        consumer.close()


def _where_to_look(settings: Settings, ports: dict[str, int]) -> str:
    db = settings.database_url.get_secret_value()
    redis_url = settings.redis_url.get_secret_value()
    lines = [
        "",
        "finstream is running. Look at:",
        f"  psql '{db}' -c 'SELECT symbol, count(*), max(ts) FROM ticks GROUP BY symbol'",
        f"  redis-cli -u {redis_url} HGETALL {settings.redis_key('quote:' + _demo_symbol(settings))}",
        f"  redis-cli -u {redis_url} HVALS '{settings.redis_key('inbox:{' + DEMO_USER + '}:msgs')}'",
        "  .venv/bin/finstream topics tail notify.outbound.email     # the demo alert's email",
        "  .venv/bin/finstream topics tail alerts.fired",
    ]
    if "api" in ports:
        lines += [
            f"  .venv/bin/finstream api stream {_demo_symbol(settings)}"
            "     # live quotes over WebSocket (dev token for demo-user)",
            f"  http://{settings.api_host}:{settings.api_port}/docs     # the API",
        ]
    lines += [
        f"  metrics of {role:<10} http://127.0.0.1:{port}/metrics" for role, port in ports.items()
    ]
    lines += [
        f"  logs: {settings.stack_dir / 'logs'}/<role>.log",
        "Ctrl-C stops everything cleanly.",
        "",
    ]
    return "\n".join(lines)


def _stop_children(children: list[Child]) -> None:
    for c in children:
        if c.proc and c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for c in children:
        if c.proc is None:
            continue
        try:
            c.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            click.echo(f"{c.role}: did not stop in {STOP_GRACE_SECONDS:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()
        if c.log_file:
            c.log_file.close()


@click.command("run")
@click.option(
    "--roles",
    "roles_opt",
    default=None,
    help="Comma-separated roles (default: FINSTREAM_RUN_ROLES).",
)
@click.option("--no-prepare", is_flag=True, help="Skip stack up, topics apply and db migrate.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
def run_command(roles_opt: str | None, no_prepare: bool, duration: float | None) -> None:
    """Run the whole pipeline locally: stack, topics, migrations, every worker role."""
    from finstream.roles import ROLES

    settings = get_settings()
    roles = [r.strip() for r in (roles_opt or settings.run_roles).split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise click.ClickException(f"unknown roles {unknown}; known: {', '.join(ROLES)}")
    if not no_prepare:
        _prepare(settings)
    logs = settings.stack_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ports = _ports(settings, roles)
    children = [Child(role, ports[role], logs / f"{role}.log") for role in roles]
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    for c in children:
        c.start(_role_env(settings, c.role, not no_prepare))
        click.echo(f"started {c.role:<10} pid {c.proc.pid if c.proc else '?':<7} log {c.log_path}")
    if settings.run_demo:
        asyncio.run(send_demo(settings))
        click.echo(
            f"demo: preferences, a price alert and a welcome message for {DEMO_USER} "
            "(in-app inbox and email)"
        )
    click.echo(_where_to_look(settings, ports))
    started = time.monotonic()
    last_report = 0.0
    try:
        while not stopping:
            if duration is not None and time.monotonic() - started > duration:
                break
            for c in children:
                if c.proc is not None and c.proc.poll() is not None:
                    c.restarts += 1
                    if c.restarts > 5:
                        click.echo(
                            f"{c.role}: exited {c.restarts} times; giving up (see {c.log_path})"
                        )
                        stopping = True
                        break
                    click.echo(
                        f"{c.role}: exited with {c.proc.returncode}; restarting (see {c.log_path})"
                    )
                    if c.log_file:
                        c.log_file.close()
                    c.start(_role_env(settings, c.role, not no_prepare))
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                click.echo(f"[{time.strftime('%H:%M:%S')}] {asyncio.run(_progress(settings))}")
            time.sleep(0.5)
    finally:
        click.echo("stopping workers (committing offsets)...")
        _stop_children(children)
        click.echo("stopped. `make stack-down` stops Kafka, PostgreSQL and Redis.")
