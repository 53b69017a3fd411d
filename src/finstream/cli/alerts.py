"""`finstream alerts`: manage alert rules and back-test them.

Rules live in the compacted ``alerts.rules`` topic (the source of truth):
``add`` writes a rule under its id, ``rm`` writes a tombstone, ``list`` and
``show`` read the topic from its beginning to its current end, applying
tombstones, so they need nothing but Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from finstream.cli.common import fail
from finstream.domain.alerts.rules import AlertRule, RuleValidationError, parse_rule
from finstream.domain.time import utcnow
from finstream.settings import Settings, get_settings

_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_when(text: str, now: datetime, *, name: str) -> datetime:
    """ISO 8601 with a zone, a date (UTC midnight), ``now``, or ``-2h``/``+7d`` from now."""
    value = text.strip()
    if value == "now":
        return now
    sign = -1 if value.startswith("-") else 1
    match = _RELATIVE.match(value.lstrip("+-"))
    if match and value[:1] in "+-":
        return now + sign * timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not ISO 8601, 'now', or relative like -2h / +7d", param_hint=name
        ) from None
    if when.tzinfo is None:
        if len(value) == 10:  # a plain date
            return when.replace(tzinfo=now.tzinfo)
        raise click.BadParameter(f"{text!r} needs a time zone (e.g. Z)", param_hint=name)
    return when


def read_rules(settings: Settings, timeout: float = 15.0) -> dict[str, AlertRule]:
    """Every live rule in alerts.rules: the topic read to its current end, tombstones applied."""
    from finstream.codec import DecodeError
    from finstream.runtime.topic_reader import TopicMissing, TopicReadError, read_to_end
    from finstream.topics import contract

    rules_topic = contract("alerts.rules", settings.namespace)
    rules: dict[str, AlertRule] = {}
    try:
        for record in read_to_end(
            settings,
            rules_topic.name,
            isolation="read_committed",
            group="finstream-cli",
            idle_timeout=timeout,
        ):
            key = (record.key or b"").decode("utf-8", "replace")
            if record.value is None:
                rules.pop(key, None)
            else:
                # Undecodable is not a rule (the alerts role dead-letters it).
                with contextlib.suppress(DecodeError):
                    rules[key] = AlertRule.from_record(rules_topic.decode_record(record.value))
    except TopicMissing as exc:
        raise click.ClickException(f"{exc} (run `finstream topics apply`)") from None
    except TopicReadError as exc:
        raise click.ClickException(str(exc)) from None
    return rules


def _publish(settings: Settings, items: list[tuple[str, bytes | None]]) -> None:
    from finstream.runtime.kafka import KafkaPublisher

    async def go() -> None:
        pub = KafkaPublisher(settings, "cli")
        await pub.start()
        try:
            for key, value in items:
                await pub.send(settings.topic("alerts.rules"), key.encode(), value)
        finally:
            await pub.stop()

    try:
        asyncio.run(go())
    except OSError as exc:
        raise click.ClickException(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}"
        ) from None


def _line(rule: AlertRule) -> str:
    flags = [rule.frequency.lower()]
    if rule.cooldown_seconds:
        flags.append(f"cooldown {rule.cooldown_seconds}s")
    if rule.expires_at:
        flags.append(f"expires {rule.expires_at.isoformat()}")
    if not rule.enabled:
        flags.append("disabled")
    return f"{rule.rule_id:<38} {rule.user_id:<16} {rule.describe():<44} {', '.join(flags)}"


@click.group("alerts")
def alerts() -> None:
    """Alert rules: add, list, show, remove, back-test."""


@alerts.command("add")
@click.option("--user", "user_id", help="Owner of the rule.")
@click.option("--symbol")
@click.option(
    "--condition",
    help="crossing, crossing-up, crossing-down, greater-than, less-than, entering-channel, "
    "exiting-channel, inside-channel, outside-channel, moving-up-percent, moving-down-percent, "
    "change-from-prev-close-percent, volume-spike.",
)
@click.option("--value", help="Price level (crossing, greater/less than).")
@click.option("--lower", help="Channel lower bound.")
@click.option("--upper", help="Channel upper bound.")
@click.option("--percent", help="Percentage (moving, change from previous close).")
@click.option("--bars", type=int, help="Window in bars (moving, volume spike).")
@click.option("--window", "window_seconds", type=int, help="Window in seconds (moving).")
@click.option("--multiplier", help="Volume spike factor over the average.")
@click.option(
    "--frequency",
    default="only-once",
    show_default=True,
    help="only-once, once-per-bar, once-per-bar-close, once-per-minute, every-time.",
)
@click.option(
    "--cooldown", "cooldown_seconds", type=int, help="Seconds between firings (every-time)."
)
@click.option("--expires", help="ISO 8601 time or relative (+7d).")
@click.option("--message", help="A note shown with the alert.")
@click.option("--id", "rule_id", help="Rule id (default: generated). An existing id is replaced.")
@click.option("--disabled", is_flag=True, help="Store the rule switched off.")
@click.option(
    "--file",
    "rules_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Add every rule of a JSON, JSON lines or YAML file instead.",
)
def alerts_add(rules_file: Path | None, **fields: Any) -> None:
    """Add (or replace) an alert rule. Refused with the offending field named."""
    from finstream.topics import contract

    settings = get_settings()
    now = utcnow()
    if rules_file is not None:
        from finstream.cli.backtest import BacktestError, load_rules

        try:
            rules = load_rules(rules_file, now=now)
        except BacktestError as exc:
            fail(str(exc))
    else:
        data = {k: v for k, v in fields.items() if v not in (None, False)}
        if fields.get("expires"):
            data["expires_at"] = parse_when(data.pop("expires"), now, name="--expires")
        if fields.get("disabled"):
            data.pop("disabled")
            data["enabled"] = False
        try:
            rules = [parse_rule(data, now=now)]
        except RuleValidationError as exc:
            option = {
                "user_id": "--user",
                "window_seconds": "--window",
                "cooldown_seconds": "--cooldown",
                "expires_at": "--expires",
                "rule_id": "--id",
            }.get(exc.field, f"--{exc.field}")
            fail(f"rule refused: {exc.message} (option {option})")
    rules_topic = contract("alerts.rules", settings.namespace)
    _publish(settings, [(r.rule_id, rules_topic.encode(r.to_record())) for r in rules])
    for r in rules:
        click.echo(f"added {r.rule_id}: {r.describe()} ({r.frequency.lower()}) for {r.user_id}")


@alerts.command("list")
@click.option("--user", "user_id", help="Only this user's rules.")
@click.option("--symbol", help="Only rules on this symbol.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def alerts_list(user_id: str | None, symbol: str | None, as_json: bool) -> None:
    """List rules (from the alerts.rules topic)."""
    rules = sorted(read_rules(get_settings()).values(), key=lambda r: (r.user_id, r.created_at))
    if user_id:
        rules = [r for r in rules if r.user_id == user_id]
    if symbol:
        rules = [r for r in rules if r.symbol == symbol.strip().upper()]
    for r in rules:
        click.echo(json.dumps(r.to_json()) if as_json else _line(r))
    if not as_json:
        click.echo(f"{len(rules)} rule(s)", err=True)


@alerts.command("show")
@click.argument("rule_id")
def alerts_show(rule_id: str) -> None:
    """Show one rule in full (JSON)."""
    rule = read_rules(get_settings()).get(rule_id)
    if rule is None:
        fail(f"no rule {rule_id!r}")
    click.echo(json.dumps(rule.to_json(), indent=2))
    click.echo(rule.describe(), err=True)


@alerts.command("rm")
@click.argument("rule_ids", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Write the tombstone even if the rule is not found.")
def alerts_rm(rule_ids: tuple[str, ...], force: bool) -> None:
    """Delete rules (a tombstone in alerts.rules)."""
    settings = get_settings()
    if not force:
        known = read_rules(settings)
        missing = [r for r in rule_ids if r not in known]
        if missing:
            fail(f"no rule {', '.join(missing)} (--force deletes anyway)")
    _publish(settings, [(r, None) for r in rule_ids])
    for r in rule_ids:
        click.echo(f"removed {r}")


@alerts.command("backtest")
@click.option(
    "--rules",
    "rules_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON, JSON lines or YAML file of rules.",
)
@click.option("--from", "since", required=True, help="Start (ISO 8601, or relative like -1d).")
@click.option("--to", "until", default="now", show_default=True, help="End (exclusive).")
@click.option(
    "--source",
    type=click.Choice(["kafka", "postgres"]),
    default="kafka",
    show_default=True,
    help="md.ticks by timestamp, or the ticks table.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "jsonl"]),
    default=None,
    help="Default: from the output file's extension, else table.",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
@click.option(
    "--interval", default=None, help="Evaluation bar width (default: FINSTREAM_ALERT_BAR_INTERVAL)."
)
@click.option(
    "--slack",
    default=300,
    show_default=True,
    help="Seconds of Kafka timestamps read before --from.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def alerts_backtest(  # noqa: PLR0917 (a click command's options)
    rules_file: Path,
    since: str,
    until: str,
    source: str,
    fmt: str | None,
    output: Path | None,
    interval: str | None,
    slack: int,
    quiet: bool,
) -> None:
    """Run rules over history and report every firing with the tick that caused it."""
    from finstream.cli.backtest import Backtest, BacktestError, load_rules, write_firings
    from finstream.domain.marketdata.bars import IntervalError, parse_interval

    settings = get_settings()
    now = utcnow()
    start = parse_when(since, now, name="--from")
    end = parse_when(until, now, name="--to")
    try:
        iv = parse_interval(interval or settings.alert_bar_interval)
        rules = load_rules(rules_file, now=start)
        bt = Backtest(
            rules,
            iv,
            start,
            end,
            max_future=timedelta(seconds=settings.tick_max_future_seconds),
        )
    except (BacktestError, IntervalError) as exc:
        fail(str(exc))
    if source == "kafka":
        read = _from_kafka(settings, bt, start, timedelta(seconds=slack), quiet)
    else:
        read = asyncio.run(_from_postgres(settings, bt, quiet))
    fmt = fmt or {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}.get(
        output.suffix if output else "", "table"
    )
    if output is not None:
        with output.open("w", newline="") as out:
            n = write_firings(bt.firings, out, fmt)
        click.echo(f"{n} firing(s) written to {output}", err=True)
    else:
        write_firings(bt.firings, sys.stdout, fmt)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(bt.counts.items()))
    click.echo(
        f"{len(rules)} rule(s), {len(bt.firings)} firing(s) from {read} tick(s) "
        f"between {start.isoformat()} and {end.isoformat()} ({counts})",
        err=True,
    )


def _from_kafka(settings: Settings, bt: Any, start: datetime, slack: timedelta, quiet: bool) -> int:
    from tqdm import tqdm

    from finstream.cli.backtest import KafkaSource
    from finstream.runtime.topic_reader import TopicReadError
    from finstream.topics import contract

    src = KafkaSource(settings, contract("md.ticks", settings.namespace), start, slack)
    n = 0
    with tqdm(unit="tick", disable=quiet, file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            for tick in src.ticks(progress):
                bt.feed(tick)
                n += 1
        except TopicReadError as exc:
            fail(str(exc))
    if src.misrouted or src.undecodable:
        click.echo(
            f"skipped {src.misrouted} tick(s) on the wrong partition and "
            f"{src.undecodable} undecodable message(s), as the live agent does",
            err=True,
        )
    return n


async def _from_postgres(settings: Settings, bt: Any, quiet: bool) -> int:
    from tqdm import tqdm

    from finstream.cli.backtest import postgres_ticks

    try:
        total, rows = await postgres_ticks(
            settings.database_url.get_secret_value(), bt.since, bt.until, bt.symbols
        )
    except OSError as exc:
        fail(f"cannot reach PostgreSQL: {exc}")
    n = 0
    with tqdm(total=total, unit="tick", disable=quiet, file=sys.stderr) as bar:
        async for tick in rows:
            bt.feed(tick)
            n += 1
            bar.update(1)
    return n
