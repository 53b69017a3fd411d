"""`finstream connect` and `finstream providers`: run and inspect market-data connectors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from finstream.settings import Settings, get_settings


class PrintOutput:
    """Ticks as JSON lines on stdout instead of Kafka (``--dry-run``)."""

    def __init__(self) -> None:
        self.count = 0

    async def publish(self, tick: Any) -> None:
        record = tick.to_record()
        line = {
            k: (str(v) if v is not None and not isinstance(v, (str, int)) else v)
            for k, v in record.items()
        }
        click.echo(json.dumps(line, sort_keys=True))
        self.count += 1

    async def flush(self) -> None:
        sys.stdout.flush()


def _overrides(settings: Settings, **values: Any) -> Settings:
    return settings.model_copy(update={k: v for k, v in values.items() if v is not None})


@click.command("connect")
@click.option(
    "--provider", "-p", required=True, help="A provider, or a comma-separated failover chain."
)
@click.option(
    "--symbols", "-s", default=None, help="Comma-separated symbols (default: FINSTREAM_MD_SYMBOLS)."
)
@click.option("--poll-interval", type=float, default=None, help="Seconds between polls.")
@click.option(
    "--file",
    "replay_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Replay: a CSV or Parquet file.",
)
@click.option("--speed", default=None, help="Replay speed: 1, 10, ... or max.")
@click.option(
    "--backfill",
    type=click.IntRange(1, 60 * 24 * 30),
    default=None,
    metavar="MINUTES",
    help="First publish the last MINUTES of intraday bars.",
)
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option(
    "--dry-run", is_flag=True, help="Print ticks as JSON lines instead of publishing to md.ticks."
)
def connect_command(
    *,
    provider: str,
    symbols: str | None,
    poll_interval: float | None,
    replay_file: Path | None,
    speed: str | None,
    backfill: int | None,
    duration: float | None,
    dry_run: bool,
) -> None:
    """Run market-data connectors in the foreground, publishing to md.ticks (Ctrl-C stops)."""  # fmt: skip
    from finstream.connectors.registry import ConfigError, chain_specs
    from finstream.runtime.logging import configure_logging

    base = get_settings()
    settings = _overrides(
        base,
        md_chain=provider,
        md_symbols=symbols,
        md_chains={},
        md_poll_interval=poll_interval,
        md_replay_path=replay_file.resolve() if replay_file else None,
        md_replay_speed=speed,
    )
    configure_logging(settings.log_level, "console", role="connect")
    try:
        specs = chain_specs(settings)
        play_whole_file = specs[0].providers == ("replay",) and not symbols
        code = asyncio.run(_connect(settings, dry_run, duration, backfill, play_whole_file))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


async def _connect(
    settings: Settings,
    dry_run: bool,
    duration: float | None,
    backfill_minutes: int | None,
    play_whole_file: bool,
) -> int:
    from datetime import timedelta

    from finstream.connectors.base import StreamConnector
    from finstream.connectors.file_feed import ReplayConnector
    from finstream.connectors.publish import TickOutput, TickPublisher, TickSink
    from finstream.connectors.runner import build_runner
    from finstream.domain.marketdata.dedupe import Gap
    from finstream.domain.marketdata.ticks import Tick
    from finstream.domain.resilience import ProviderError
    from finstream.domain.time import utcnow
    from finstream.runtime.kafka import KafkaPublisher
    from finstream.topics import contract

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kafka: KafkaPublisher | None = None
    out: TickOutput
    if dry_run:
        out = PrintOutput()
    else:
        kafka = KafkaPublisher(settings, "connect")
        await kafka.start()
        out = TickPublisher(kafka, contract("md.ticks", settings.namespace))
    sink = TickSink(out, settings.md_dedupe_window)
    runner, connectors = build_runner(settings, sink)
    started = time.monotonic()
    try:
        if play_whole_file:
            replay = connectors["replay"]
            assert isinstance(replay, ReplayConnector)
            replay.all_symbols = True

            async def emit(provider: str, tick: Tick) -> None:
                await sink.offer(provider, tick)

            task = asyncio.create_task(replay.run(emit, stop))
            waiter = asyncio.create_task(stop.wait())
            await asyncio.wait(
                {task, waiter}, timeout=duration, return_when=asyncio.FIRST_COMPLETED
            )
            stop.set()
            await task
            await runner.close()
        else:
            if backfill_minutes:
                end = utcnow()
                for chain in runner.chains:
                    for sym in runner.specs[chain.name].symbols:
                        try:
                            n = await runner.backfill(
                                chain, Gap(sym, end - timedelta(minutes=backfill_minutes), end)
                            )
                        except ProviderError as exc:
                            click.echo(f"backfill {sym}: {exc}", err=True)
                            continue
                        click.echo(f"backfill {sym}: {n} ticks", err=True)
            # A chain of replays alone ends when the files have played.
            finite = all(isinstance(c, ReplayConnector) for c in connectors.values())
            run = asyncio.create_task(runner.run(stop))
            while not stop.is_set():
                if duration is not None and time.monotonic() - started >= duration:
                    break
                if finite and all(
                    c.finished for c in connectors.values() if isinstance(c, StreamConnector)
                ):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
            stop.set()
            await run
    finally:
        await sink.flush()
        if kafka is not None:
            await kafka.stop()
    click.echo(
        f"published {sink.published} ticks, suppressed {sink.suppressed} "
        f"({'dry run' if dry_run else settings.topic('md.ticks')})",
        err=True,
    )
    return 0


@click.group("providers")
def providers_group() -> None:
    """Market-data providers: what exists, and whether the configured ones work."""


@providers_group.command("list")
def providers_list() -> None:
    """Every provider with its kind and documented limits."""
    from finstream.connectors.registry import PROVIDERS, build

    settings = get_settings()
    connectors, _ = build(settings, list(PROVIDERS), settings.symbols)
    try:
        for name, conn in connectors.items():
            click.echo(f"{name:<13} {conn.kind:<7} {conn.description}")
            if conn.documented_limits:
                click.echo(f"{'':<21} documented limits: {conn.documented_limits}")
    finally:
        asyncio.run(_close(connectors))


async def _close(connectors: dict[str, Any]) -> None:
    for conn in connectors.values():
        await conn.aclose()


@providers_group.command("check")
@click.option("--provider", "-p", "names", multiple=True, help="Check only these (repeatable).")
@click.option("--symbol", default=None, help="Symbol to probe with (default: the chain's first).")
def providers_check(names: tuple[str, ...], symbol: str | None) -> None:
    """For each configured provider: credentials, a live probe, and its rate limits."""
    from finstream.connectors.registry import PROVIDERS, ConfigError, chain_specs, limits

    settings = get_settings()
    try:
        specs = chain_specs(settings)
        for n in names:
            if n not in PROVIDERS:
                raise ConfigError(f"unknown provider {n!r}; known: {', '.join(PROVIDERS)}")
        limit_text = {n: ", ".join(s.render() for s in limits(settings, n)) for n in PROVIDERS}
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    probe: dict[str, str] = {}
    for spec in specs:
        for p in spec.providers:
            probe.setdefault(p, spec.symbols[0])
    wanted = list(names) or list(probe)
    results = asyncio.run(
        _check(settings, wanted, {n: symbol or probe.get(n, settings.symbols[0]) for n in wanted})
    )
    failed = 0
    for name, ok, lines in results:
        failed += not ok
        click.echo(f"{name}: {'OK' if ok else 'FAILED'}")
        for line in lines:
            click.echo(f"  {line}")
        click.echo(f"  configured limits: {limit_text.get(name) or 'none'}")
    if failed:
        sys.exit(1)


async def _check(
    settings: Settings, names: list[str], symbols: dict[str, str]
) -> list[tuple[str, bool, list[str]]]:
    from finstream.connectors.registry import build
    from finstream.domain.resilience import ProviderError

    connectors, _ = build(settings, names, sorted(set(symbols.values())))
    out: list[tuple[str, bool, list[str]]] = []
    try:
        for name in names:
            conn = connectors[name]
            lines = [conn.description]
            if conn.documented_limits:
                lines.append(f"documented limits: {conn.documented_limits}")
            problem = conn.configuration_problem()
            if problem:
                lines.append(f"configuration: {problem}")
            if name == "iex" and not settings.md_iex_enabled:
                out.append((name, False, [*lines, "not probed: disabled"]))
                continue
            try:
                result = await asyncio.wait_for(
                    conn.check(symbols[name]), settings.md_request_timeout * 3
                )
                out.append((name, True, [*lines, result]))
            except ProviderError as exc:
                verdict = {
                    "auth": "credentials rejected",
                    "throttled": "rate limited right now",
                    "unknown_symbol": "credentials accepted, symbol unknown",
                }.get(exc.error_class.value, exc.error_class.value)
                ok = exc.error_class.value == "unknown_symbol"
                out.append((name, ok, [*lines, f"probe {symbols[name]}: {verdict}: {exc}"]))
            except (TimeoutError, ValueError) as exc:
                out.append(
                    (name, False, [*lines, f"probe {symbols[name]}: {type(exc).__name__}: {exc}"])
                )
    finally:
        await _close(connectors)
    return out
