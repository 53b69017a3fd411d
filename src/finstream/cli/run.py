"""`finstream run`: the whole pipeline on one machine, for development and demos.

Brings the stack up, applies topics and migrations, starts one process per
worker role (each with its own health/metrics port and a log file under
``.stack/logs``) and, with ``FINSTREAM_RUN_SANDBOXES`` (default), Mailpit and
the ``sandbox`` role, with the delivery workers pointed at them; seeds the
demo (``finstream demo seed``) and prints where to look. What it started is
written to ``.stack/run.json`` for ``finstream status``.
Ctrl-C (or SIGTERM) stops the workers gracefully: each commits its offsets
and leaves its consumer group before the supervisor exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import click

from finstream.settings import Settings, child_environment, get_settings
from finstream.stack.common import port_bindable
from finstream.stack.status import run_file

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
    argv: list[str] | None = None  # a program other than a worker role (Mailpit)

    def start(self, extra_env: dict[str, str]) -> None:
        self.log_file = self.log_path.open("ab")
        env = child_environment(http_port=str(self.port), **extra_env)
        self.proc = subprocess.Popen(
            self.argv or [sys.executable, "-m", "finstream.cli", "worker", self.role],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _ports(settings: Settings, roles: list[str]) -> dict[str, int]:
    return {role: settings.run_base_port + i for i, role in enumerate(roles)}


def taken_ports(host: str, ports: dict[str, int]) -> list[str]:
    """The roles' ports something else listens on, as "port (role)".

    A worker whose health port is taken exits at once; found before the start, it is
    named here rather than after six restarts of that worker.
    """
    return [f"{port} ({role})" for role, port in ports.items() if not port_bindable(host, port)]


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _prepare(settings: Settings) -> None:
    from finstream.cli.db import db_migrate
    from finstream.cli.stack import stack_up
    from finstream.cli.topics import topics_apply

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


def _child_env(
    settings: Settings, child: Child, extra: dict[str, str], prepared: bool
) -> dict[str, str]:
    """A worker's settings: the sandboxes, its own database login, and a stable
    instance id, so that a restarted worker fences its predecessor's open
    transaction at once instead of waiting for the broker to abort it."""
    if child.argv is not None:
        return extra
    return {
        **extra,
        **_role_env(settings, child.role, prepared),
        "instance_id": f"run-{child.role}",
    }


def _demo_symbol(settings: Settings) -> str:
    return (settings.md_symbols or settings.sim_symbols).split(",")[0].strip().upper()


def _seed_in_background(settings: Settings) -> threading.Thread:
    """`finstream demo seed` beside the supervisor loop (it waits for the first quotes)."""
    from finstream.cli import demo

    def go() -> None:
        try:
            items = demo.seed(settings, quote_wait=15.0)
        except Exception as exc:
            click.echo(f"demo seed failed: {exc} (retry with `finstream demo seed`)")
            return
        rules = sum(1 for topic, *_ in items if topic == "alerts.rules")
        users = ", ".join(p.user_id for p in demo.PERSONAS)
        click.echo(f"demo: seeded {users}; {rules} alert rules; service notifications sent")

    thread = threading.Thread(target=go, name="demo-seed", daemon=True)
    thread.start()
    return thread


# -- sandboxes: Mailpit and the sandbox role ------------------------------------------


def _sandbox_env(settings: Settings) -> dict[str, str]:
    """Fresh sandbox credentials, and the settings that send every delivery to the sandboxes."""
    from finstream.sandbox import credentials

    return credentials.delivery_overrides(settings, credentials.create(settings))


def _mailpit_child(settings: Settings, logs: Path) -> Child | None:
    binary = settings.mailpit_path
    if not binary.is_file():
        click.echo(f"mailpit: {binary} is missing (`make tools` builds it); email stays queued")
        return None
    host = settings.sandbox_host
    argv = [
        str(binary),
        "--smtp",
        f"{host}:{settings.mailpit_smtp_port}",
        "--listen",
        f"{host}:{settings.mailpit_http_port}",
        "--smtp-auth-accept-any",
        "--smtp-auth-allow-insecure",
        "--disable-version-check",
        "--max",
        "2000",
    ]
    return Child("mailpit", settings.mailpit_http_port, logs / "mailpit.log", argv=argv)


def _write_run_file(settings: Settings, children: list[Child]) -> None:
    state = {
        "pid": os.getpid(),
        "started_at": time.time(),
        "roles": {
            c.role: {"port": c.port, "pid": c.proc.pid if c.proc else None}
            for c in children
            if c.argv is None
        },
        "api": f"http://{settings.api_host}:{settings.api_port}",
        "sandboxes": {
            "mailpit": settings.mailpit_url if any(c.role == "mailpit" for c in children) else None,
            "sandbox": settings.sandbox_url if any(c.role == "sandbox" for c in children) else None,
        },
    }
    run_file(settings).write_text(json.dumps(state, indent=2))


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
    if settings.run_sandboxes:
        with contextlib.suppress(Exception):
            import httpx

            async with httpx.AsyncClient(timeout=2) as http:
                got = await http.get(f"{settings.mailpit_url}/api/v1/messages", params={"limit": 1})
                parts.append(f"emails in Mailpit: {got.json()['total']}")
    with contextlib.suppress(Exception):
        counts = await asyncio.to_thread(
            _topic_sizes, settings, ["alerts.fired", "notify.outbound.email"]
        )
        parts += [f"{name}: {n}" for name, n in counts.items()]
    return ", ".join(parts)


def _topic_sizes(settings: Settings, names: list[str]) -> dict[str, int]:
    """Messages ever written to each topic (sum of high watermarks)."""
    from finstream.runtime.topic_reader import end_offsets

    return {name: sum(end_offsets(settings, settings.topic(name)).values()) for name in names}


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
        "  .venv/bin/finstream status                  # every role: ready, lag, throughput, DLQ",
        "  .venv/bin/finstream journey --user demo-user --from -10m   # each notification's path",
    ]
    if "api" in ports:
        lines[2:2] = [
            f"  console: http://{settings.api_host}:{settings.api_port}/console"
            "     # quotes, bars with alert levels, rules, inbox, journeys",
        ]
    if settings.run_sandboxes:
        lines[2:2] = [
            f"  email:   {settings.mailpit_url}     # Mailpit: every email the demo sends",
            f"  push:    {settings.sandbox_url}/push     # FCM and APNs sandbox",
            f"  SMS:     {settings.sandbox_url}/sms      # Twilio sandbox",
        ]
    if "api" in ports:
        lines += [
            f"  .venv/bin/finstream api stream {_demo_symbol(settings)}"
            "     # live quotes over WebSocket (dev token for demo-user)",
            f"  http://{settings.api_host}:{settings.api_port}/docs     # the API",
        ]
    lines += [
        f"  metrics of {role:<14} http://127.0.0.1:{port}/metrics" for role, port in ports.items()
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
    if not settings.run_sandboxes and "sandbox" in roles:
        roles.remove("sandbox")
    # Before the stack starts or anything is written: a refusal leaves no trace.
    ports = _ports(settings, roles)
    if roles and max(ports.values()) > 65535:
        raise click.ClickException(
            f"FINSTREAM_RUN_BASE_PORT={settings.run_base_port} leaves no room for "
            f"{len(roles)} roles' ports (one each, the last would be {max(ports.values())}; "
            "ports end at 65535)."
        )
    taken = taken_ports(settings.http_host, ports)
    if taken:
        raise click.ClickException(
            f"ports in use on {settings.http_host}: {', '.join(taken)}. Another `finstream run` "
            "may be running (`finstream stack status` shows it), or set "
            "FINSTREAM_RUN_BASE_PORT to the first of a free range."
        )
    if not no_prepare:
        _prepare(settings)
    logs = settings.stack_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = [Child(role, ports[role], logs / f"{role}.log") for role in roles]
    extra_env: dict[str, str] = {}
    if settings.run_sandboxes and any(r.startswith("delivery-") or r == "sandbox" for r in roles):
        extra_env = _sandbox_env(settings)
        mailpit = _mailpit_child(settings, logs)
        if mailpit is not None:
            children.insert(0, mailpit)
    stopping = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    for c in children:
        c.start(_child_env(settings, c, extra_env, not no_prepare))
        click.echo(f"started {c.role:<14} pid {c.proc.pid if c.proc else '?':<7} log {c.log_path}")
    _write_run_file(settings, children)
    if settings.run_demo:
        _seed_in_background(settings)
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
                            f"{c.role}: exited {c.restarts} times; giving up (see {c.log_path}; "
                            f"its last lines:)\n{_log_tail(c.log_path)}"
                        )
                        stopping = True
                        break
                    click.echo(
                        f"{c.role}: exited with {c.proc.returncode}; restarting (see {c.log_path})"
                    )
                    if c.log_file:
                        c.log_file.close()
                    c.start(_child_env(settings, c, extra_env, not no_prepare))
                    _write_run_file(settings, children)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                click.echo(f"[{time.strftime('%H:%M:%S')}] {asyncio.run(_progress(settings))}")
            time.sleep(0.5)
    finally:
        click.echo("stopping workers (committing offsets)...")
        _stop_children(children)
        run_file(settings).unlink(missing_ok=True)
        click.echo("stopped. `make stack-down` stops Kafka, PostgreSQL and Redis.")
