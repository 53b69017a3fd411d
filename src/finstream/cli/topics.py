"""`finstream topics`: apply and list the catalogue, tail and replay a topic."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from finstream.cli.common import fail
from finstream.cli.common import when as _when
from finstream.settings import get_settings


@click.group()
def topics() -> None:
    """The topic catalogue (topics.yaml)."""


@topics.command("apply")
@click.option("--dry-run", is_flag=True, help="Print the diff only.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Catalogue to apply (default: the project's topics.yaml).",
)
@click.option(
    "--replication-factor",
    type=int,
    default=None,
    help="Override every topic's replication factor (production clusters).",
)
def topics_apply(dry_run: bool, replication_factor: int | None, path: Path | None = None) -> None:
    """Create missing topics, raise partition counts and update configs; print the diff."""
    from finstream import topics as t

    settings = get_settings()
    try:
        catalogue = t.load_catalogue(path)
    except t.CatalogueError as exc:
        fail(str(exc))
    names = [settings.topic(n) for n in catalogue.names]
    from finstream.runtime.kafka import check_access, client_config

    problem = check_access(settings)
    if problem is not None:
        fail(problem)
    try:
        existing = t.describe(client_config(settings), names)
    except Exception as exc:
        fail(
            check_access(settings, timeout=5)
            or f"cannot read topics from Kafka at {settings.kafka_bootstrap}: {exc} (is `finstream stack up` done?)"
        )
    changes = t.plan(catalogue, existing, settings.namespace, replication_factor)
    if not changes:
        click.echo(f"topics: {len(names)} up to date")
        return
    for change in changes:
        click.echo(change.render())
    refused = [c for c in changes if c.kind == "refuse"]
    if refused:
        fail(f"{len(refused)} change(s) refused; nothing applied")
    if dry_run:
        click.echo("(dry run: nothing applied)")
        return
    try:
        t.apply(client_config(settings), changes, replication_factor)
    except RuntimeError as exc:
        fail(str(exc))
    applied = sum(1 for c in changes if c.kind in ("create", "partitions", "config"))
    click.echo(f"topics: {applied} change(s) applied")


@topics.command("list")
def topics_list() -> None:
    """The catalogue with each topic's partitions, policy and schema."""
    from finstream import topics as t

    settings = get_settings()
    for spec in t.load_catalogue().topics:
        click.echo(
            f"{settings.topic(spec.name):<28} p={spec.partitions:<3} {spec.cleanup_policy:<14} "
            f"key={spec.key:<14} value={spec.value_schema}"
        )


@topics.command("tail")
@click.argument("topic")
@click.option("-n", "--lines", default=10, show_default=True, help="Last N messages per partition.")
def topics_tail(topic: str, lines: int) -> None:
    """The last messages of a catalogue topic, decoded, as JSON lines."""
    from finstream.cli import replay
    from finstream.runtime.topic_reader import TopicReadError, read_range

    settings = get_settings()
    name = settings.topic(topic)
    try:
        records = read_range(settings, name, None, None, tail=lines, group=replay.GROUP)
        replay.write_jsonl(records, sys.stdout, replay.source_contract(settings, name))
    except TopicReadError as exc:
        fail(str(exc))


@topics.command("replay")
@click.argument("topic")
@click.option("--from", "start", required=True, help="Start time: ISO 8601 with zone, or -2h.")
@click.option("--to", "end", default=None, help="End time (exclusive); default: now.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write decoded JSON lines to this file ('-' for stdout).",
)
@click.option("--to-topic", default=None, help="Copy the records into this sandbox topic instead.")
def topics_replay(
    topic: str, start: str, end: str | None, out: Path | None, to_topic: str | None
) -> None:
    """Replay a topic over a time range into a file or a sandbox topic."""
    from tqdm import tqdm

    from finstream.cli import replay
    from finstream.runtime.topic_reader import TopicReadError, read_range

    if (out is None) == (to_topic is None):
        fail("give exactly one of --out FILE or --to-topic NAME")
    settings = get_settings()
    name = settings.topic(topic)
    t1, t2 = _when(start), _when(end)
    if t1 is not None and t2 is not None and t2 <= t1:
        fail("--to must be after --from")
    bar = tqdm(unit="msg", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        records = read_range(settings, name, t1, t2, on_progress=progress, group=replay.GROUP)
        if to_topic is not None:
            target = settings.topic(to_topic)
            replay.ensure_sandbox(settings, name, target)
            count = replay.copy_to_topic(settings, records, target)
            where = target
        elif str(out) == "-":
            count = replay.write_jsonl(records, sys.stdout, replay.source_contract(settings, name))
            where = "stdout"
        else:
            assert out is not None
            with out.open("w") as fh:
                count = replay.write_jsonl(records, fh, replay.source_contract(settings, name))
            where = str(out)
    except TopicReadError as exc:
        bar.close()
        fail(str(exc))
    bar.close()
    click.echo(f"replayed {count} message(s) of {name} into {where}", err=True)
