"""`finstream dlq`: inspect dead letters and send them back to their topic.

A dead letter is the original record (key, value, headers) plus ``dlq.*``
headers saying where it came from and why it failed
(:mod:`finstream.domain.deadletter`). ``redrive`` produces the original
record again to its ``dlq.source.topic``, without the ``dlq.*`` headers.

Redrive stays idempotent for outbound messages: the message's row in
``deliveries`` is reopened only if it ended without delivery (rejected,
failed, expired), and only once: a message that was delivered, is still in
progress, or was already redriven is not sent back, so redriving the same
dead letter twice still sends the message at most once
(:mod:`finstream.sinks.delivery.redrive` makes that write).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import click

from finstream.cli.common import fail
from finstream.domain.deadletter import (
    DLQ_HEADER_PREFIX,
    H_AT,
    H_ATTEMPTS,
    H_ERROR_CLASS,
    H_ERROR_MESSAGE,
    H_ROLE,
    H_SOURCE_OFFSET,
    H_SOURCE_PARTITION,
    H_SOURCE_TOPIC,
    parse_headers,
)
from finstream.settings import Settings, get_settings

REDRIVE_HEADER = "redrive.from"
OUTBOUND_PREFIX = "notify.outbound."


@dataclass(frozen=True)
class Letter:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def ref(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def info(self) -> dict[str, str]:
        return parse_headers(self.headers)

    @property
    def source_topic(self) -> str:
        return self.info.get(H_SOURCE_TOPIC, "")

    def original_headers(self) -> list[tuple[str, bytes]]:
        return [(k, v) for k, v in self.headers if not k.startswith(DLQ_HEADER_PREFIX)]


def read_letters(settings: Settings, timeout: float = 10.0) -> list[Letter]:
    """Every dead letter currently in the dlq topic, oldest first per partition."""
    from finstream.runtime.topic_reader import TopicMissing, TopicReadError, read_to_end

    topic = settings.topic("dlq")
    try:
        letters = [
            Letter(r.partition, r.offset, r.key, r.value, r.headers)
            for r in read_to_end(settings, topic, group="finstream-dlq-cli", idle_timeout=timeout)
        ]
    except TopicMissing as exc:
        fail(f"{exc} (run `finstream topics apply`)")
    except TopicReadError as exc:
        fail(str(exc))
    return sorted(letters, key=lambda x: (x.info.get(H_AT, ""), x.partition, x.offset))


def _matches(
    letter: Letter,
    source: str | None,
    error_class: str | None,
    role: str | None,
    settings: Settings,
) -> bool:
    info = letter.info
    if source and info.get(H_SOURCE_TOPIC) not in (source, settings.topic(source)):
        return False
    if error_class and info.get(H_ERROR_CLASS) != error_class:
        return False
    return not (role and info.get(H_ROLE) != role)


def _filters(f: Any) -> Any:
    f = click.option("--source-topic", "source", help="Only letters from this topic.")(f)
    f = click.option("--error-class", help="Only letters with this error class.")(f)
    return click.option("--role", help="Only letters written by this worker role.")(f)


@click.group()
def dlq() -> None:
    """Dead letters: list, show, redrive to their source topic."""


@dlq.command("list")
@_filters
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_command(
    source: str | None, error_class: str | None, role: str | None, limit: int, as_json: bool
) -> None:
    """Dead letters, oldest first: where from, when, why."""
    settings = get_settings()
    letters = [
        letter
        for letter in read_letters(settings)
        if _matches(letter, source, error_class, role, settings)
    ]
    for letter in letters[-limit:] if limit > 0 else letters:
        info = letter.info
        if as_json:
            click.echo(json.dumps({"ref": letter.ref, **info}))
            continue
        reason = info.get(H_ERROR_MESSAGE, "").replace("\n", " ")
        click.echo(
            f"{letter.ref:<10} {info.get(H_AT, '?')[:19]:<19} {info.get(H_SOURCE_TOPIC, '?'):<30} "
            f"{info.get(H_ERROR_CLASS, '?'):<18} {reason[:100]}"
        )
    if not as_json:
        click.echo(
            f"({len(letters)} dead letter(s){' matching' if source or error_class or role else ''})"
        )


def _parse_ref(ref: str) -> tuple[int, int]:
    try:
        partition, offset = ref.split(":", 1)
        return int(partition), int(offset)
    except ValueError:
        raise click.BadParameter(
            f"{ref!r}: expected PARTITION:OFFSET (see `finstream dlq list`)"
        ) from None


def _decode_value(letter: Letter, settings: Settings) -> Any:
    from finstream.codec import DecodeError
    from finstream.topics import contract

    name = letter.source_topic.removeprefix(settings.namespace)
    try:
        source = contract(name, settings.namespace)
    except (KeyError, ValueError):
        return None
    if source.spec.type == "raw" or letter.value is None:
        return None
    try:
        return source.decode_record(letter.value)
    except DecodeError as exc:
        return f"<not a {source.schema}: {exc}>"


@dlq.command("show")
@click.argument("ref")
@click.option(
    "--reveal",
    is_flag=True,
    help="Open what is sealed in the value with the user's key (audited).",
)
def show_command(ref: str, reveal: bool) -> None:
    """One dead letter: its headers, key and decoded value (PARTITION:OFFSET).

    Personal data in it stays sealed unless --reveal (issue 14).
    """
    settings = get_settings()
    partition, offset = _parse_ref(ref)
    found = [
        letter
        for letter in read_letters(settings)
        if (letter.partition, letter.offset) == (partition, offset)
    ]
    if not found:
        fail(f"no dead letter at {ref}")
    letter = found[0]
    info = letter.info
    for header in (
        H_SOURCE_TOPIC,
        H_SOURCE_PARTITION,
        H_SOURCE_OFFSET,
        H_ROLE,
        H_AT,
        H_ATTEMPTS,
        H_ERROR_CLASS,
    ):
        if header in info:
            click.echo(f"{header}: {info[header]}")
    click.echo(f"{H_ERROR_MESSAGE}:")
    for part in info.get(H_ERROR_MESSAGE, "").split(" | "):
        click.echo(f"  {part}")
    for k, v in letter.original_headers():
        click.echo(f"header {k}: {v.decode('utf-8', 'replace')}")
    click.echo(f"key: {letter.key.decode('utf-8', 'replace') if letter.key else None}")
    decoded = _decode_value(letter, settings)
    if reveal and isinstance(decoded, dict) and decoded.get("user_id"):
        decoded = _reveal(settings, letter, decoded)
    if decoded is not None:
        click.echo("value:")
        click.echo(json.dumps(decoded, indent=2, default=str))
    else:
        click.echo(f"value: {len(letter.value or b'')} bytes")


def _reveal(settings: Settings, letter: Letter, decoded: dict[str, Any]) -> dict[str, Any]:
    """The value with its sealed parts opened; the reveal is audited."""
    from finstream.privacy.prefs import audit_record
    from finstream.privacy.tools import audit_now, open_record
    from finstream.topics import load_catalogue

    schema = load_catalogue().get(letter.source_topic.removeprefix(settings.namespace))
    opened = open_record(settings, schema.value_schema, decoded)
    audit_now(
        settings,
        [
            audit_record(
                actor="cli",
                action="dead_letter_revealed",
                subject_type="dead_letter",
                subject_id=f"dlq:{letter.ref}",
                user_id=str(decoded["user_id"]),
                reason="finstream dlq show --reveal",
                details={"source_topic": letter.source_topic},
            )
        ],
    )
    return opened


def _redrive_audit(settings: Settings, letter: Letter, target: str) -> dict[str, Any]:
    from finstream.codec import DecodeError, default_codec
    from finstream.privacy.prefs import audit_record
    from finstream.topics import load_catalogue

    subject_type, subject_id, user = "dead_letter", f"dlq:{letter.ref}", None
    schema = load_catalogue().get(target.removeprefix(settings.namespace)).value_schema
    if schema in ("OutboundMessage", "NotificationRequest") and letter.value is not None:
        try:
            record = default_codec().decode(letter.value, schema)
        except DecodeError:
            record = {}
        if record:
            user = str(record.get("user_id") or "") or None
            if schema == "OutboundMessage":
                subject_type, subject_id = "message", str(record["message_id"])
            else:
                subject_type, subject_id = "request", str(record["request_id"])
    return audit_record(
        actor="cli",
        action="redriven",
        subject_type=subject_type,
        subject_id=subject_id,
        user_id=user,
        reason=letter.info.get(H_ERROR_MESSAGE, "")[:500] or None,
        details={"dead_letter": f"dlq:{letter.ref}", "to": target},
    )


@dlq.command("redrive")
@click.argument("refs", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every letter matching the filters.")
@_filters
@click.option("--dry-run", is_flag=True, help="Say what would be redriven; send nothing.")
def redrive_command(  # noqa: PLR0917 (click passes options positionally)
    refs: tuple[str, ...],
    everything: bool,
    source: str | None,
    error_class: str | None,
    role: str | None,
    dry_run: bool,
) -> None:
    """Send dead letters back to their source topic (PARTITION:OFFSET ..., or --all)."""
    from confluent_kafka import Producer

    from finstream.codec import DecodeError
    from finstream.runtime.kafka import producer_config
    from finstream.sinks.delivery.redrive import REOPENED, reopen
    from finstream.topics import contract, load_catalogue

    if not refs and not everything:
        fail("name dead letters (PARTITION:OFFSET) or pass --all")
    settings = get_settings()
    wanted = {_parse_ref(r) for r in refs}
    letters = [
        letter
        for letter in read_letters(settings)
        if (everything or (letter.partition, letter.offset) in wanted)
        and _matches(letter, source, error_class, role, settings)
    ]
    missing = wanted - {(x.partition, x.offset) for x in letters}
    if missing and not everything:
        fail(f"no dead letter at {', '.join(f'{p}:{o}' for p, o in sorted(missing))}")
    producer = (
        None
        if dry_run
        # Every finstream producer's configuration (murmur2): a redriven key lands
        # on the partition its co-partitioned state lives on.
        else Producer({**producer_config(settings), "log_level": 3})
    )
    catalogue_names = set(load_catalogue().names)
    sent = skipped = 0
    audited: list[dict[str, Any]] = []  # every redrive changes a message's fate: audited
    for letter in letters:
        target = letter.source_topic
        if not target:
            click.echo(f"{letter.ref}: skipped (no {H_SOURCE_TOPIC} header)")
            skipped += 1
            continue
        name = target.removeprefix(settings.namespace)
        if not target.startswith(settings.namespace) or name not in catalogue_names:
            # e.g. webhook:twilio — the letter came from outside Kafka; nothing to send it back to.
            click.echo(f"{letter.ref}: skipped ({target} is not a topic of the catalogue)")
            skipped += 1
            continue
        if name.startswith(OUTBOUND_PREFIX) and letter.value is not None:
            try:
                message_id = contract(name, settings.namespace).decode_record(letter.value)[
                    "message_id"
                ]
            except DecodeError:
                message_id = None
            if message_id and not dry_run:
                outcome = asyncio.run(reopen(settings, message_id))
                if outcome != REOPENED:
                    click.echo(f"{letter.ref}: skipped, message {message_id} {outcome}")
                    skipped += 1
                    continue
        if producer is not None:
            producer.produce(
                target,
                key=letter.key,
                value=letter.value,
                headers=[
                    *letter.original_headers(),
                    (REDRIVE_HEADER, f"dlq:{letter.ref}".encode()),
                ],
            )
            producer.poll(0)
        click.echo(f"{letter.ref}: {'would redrive' if dry_run else 'redriven'} to {target}")
        sent += 1
        if not dry_run:
            audited.append(_redrive_audit(settings, letter, target))
    if producer is not None and producer.flush(30) != 0:
        fail("some redriven records were not acknowledged by Kafka")
    if audited:
        from finstream.privacy.tools import audit_now

        audit_now(settings, audited)
    click.echo(f"{sent} redriven, {skipped} skipped{' (dry run)' if dry_run else ''}")
