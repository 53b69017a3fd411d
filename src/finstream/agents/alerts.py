"""Alerts agent: users' rules against ticks, co-partitioned by symbol.

Three agents in one faust app (the ``alerts`` role):

``rules-intake`` (alerts.rules, keyed by rule id)
    Validates each rule and forwards it to ``alerts.rules.by-symbol`` with the
    key ``SYMBOL/rule_id`` on the partition md.ticks uses for the symbol
    (Kafka's default murmur2 partitioner). A tombstone carries no symbol, so
    the ``alert-rule-symbol`` table remembers each rule's symbol; a rule that
    moves to another symbol is deleted from the old one.

``rulebook`` (alerts.rules.by-symbol)
    Keeps the ``alert-rules`` table: symbol -> that symbol's rules. It is
    co-partitioned with md.ticks, so every worker holds exactly the rules of
    the symbols whose ticks it reads.

``alerts`` (md.ticks)
    Looks up the tick's symbol only (the cost of a tick does not grow with the
    number of rules of other symbols), runs the pure evaluation of
    :mod:`finstream.domain.alert_engine`, publishes an AlertFired (alerts.fired,
    keyed by user) and a NotificationRequest (notify.requests, category
    price_alert) per firing, and stores the symbol's evaluation state.

Exactly one firing per alert across kills and rebalances: firings are flushed
to Kafka *before* the new evaluation state is written to its changelog. A
worker killed in between comes back with the old state, evaluates the tick
again and sends the same firing again with the same deterministic ids
(fired_id, request_id), which downstream consumers already deduplicate; a
worker killed earlier sent nothing; one killed later has the new state and
treats the replayed tick as already seen. No crossing is missed and none is
fired under two ids.

Nothing escapes an agent: bad input becomes a dead letter with its reason.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import faust
from aiokafka.partitioner import murmur2
from prometheus_client import Counter, Gauge

from finstream.agents.gaps import GapGuard
from finstream.agents.ordering import EventAck, KeyedWrites, table_delete, table_write
from finstream.app import RAW, AgentContext
from finstream.codec import Codec, DecodeError, EncodeError
from finstream.domain.alert_engine import Evaluation, RuleBook, SymbolState, evaluate
from finstream.domain.alerts import AlertRule, RuleValidationError, validate_rule
from finstream.domain.bars import Interval, parse_interval
from finstream.domain.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.time import utcnow
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import get_logger
from finstream.runtime.metrics import EVENTS_IN, EVENTS_OUT, PROCESSING_SECONDS
from finstream.topics import load_catalogue

log = get_logger(__name__)

ALERTS_FIRED = Counter("finstream_alerts_fired_total", "Alert firings published", ["condition"])
TICKS_SKIPPED = Counter(
    "finstream_alerts_ticks_skipped_total",
    "Ticks not evaluated: stale (older than the symbol's last) or seen before",
    ["reason"],
)
HELD_WRITES = Gauge(
    "finstream_alerts_held_writes", "State writes waiting for their firings to be delivered"
)
SYMBOLS_WITH_RULES = Gauge(
    "finstream_alerts_symbols_with_rules", "Symbols with at least one rule on this worker"
)
BY_SYMBOL = "alerts.rules.by-symbol"


@functools.lru_cache(maxsize=65_536)
def symbol_partition(symbol: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives the key ``symbol``."""
    return int(murmur2(symbol.encode()) & 0x7FFFFFFF) % partitions


def by_symbol_key(symbol: str, rule_id: str) -> bytes:
    # Rule ids never contain "/", symbols may (RDS/A): split on the last one.
    return f"{symbol}/{rule_id}".encode()


def split_by_symbol_key(key: bytes) -> tuple[str, str]:
    symbol, sep, rule_id = key.decode().rpartition("/")
    if not sep or not symbol or not rule_id:
        raise ValueError(f"key {key!r} is not SYMBOL/rule_id")
    return symbol, rule_id


class BadInput(ValueError):
    """Input that cannot be used; its message is the dead letter's reason."""


# -- the rules of a symbol, as stored in the alert-rules table --------------------------


def encode_rules(codec: Codec, rules: dict[str, AlertRule]) -> bytes:
    return json.dumps(
        {
            rid: base64.b64encode(codec.encode("AlertRule", r.to_record())).decode()
            for rid, r in sorted(rules.items())
        },
        separators=(",", ":"),
    ).encode()


def decode_rules(codec: Codec, raw: bytes) -> dict[str, AlertRule]:
    doc = json.loads(raw)
    return {
        rid: AlertRule.from_record(codec.decode(base64.b64decode(b), "AlertRule"))
        for rid, b in doc.items()
    }


@dataclass
class _Cached:
    raw: bytes
    value: Any


class _DecodedTable:
    """Decoded values of a bytes-valued faust table, decoded once per stored value.

    The table keeps the bytes that went to (or came from) its changelog; the
    decoded object is cached next to them and reused while the table still
    holds the very same bytes object, so a restore or another worker's write
    is never masked by a stale cache.
    """

    def __init__(self, table: Any, decode: Any) -> None:
        self.table = table
        self._decode = decode
        self._cache: dict[bytes, _Cached] = {}

    def get(self, key: bytes) -> Any:
        raw = self.table.get(key)
        if raw is None:
            self._cache.pop(key, None)
            return None
        hit = self._cache.get(key)
        if hit is not None and hit.raw is raw:
            return hit.value
        value = self._decode(raw)
        self._cache[key] = _Cached(raw, value)
        return value

    def remember(self, key: bytes, raw: bytes, value: Any) -> None:
        """The decoded form of bytes just written to the table under ``key``."""
        self._cache[key] = _Cached(raw, value)


def register(app: faust.App, ctx: AgentContext) -> None:
    settings = ctx.settings
    codec = ctx.codec
    catalogue = load_catalogue()
    partitions = catalogue.get("md.ticks").partitions
    if catalogue.get(BY_SYMBOL).partitions != partitions:
        raise SystemExit(f"topics.yaml: {BY_SYMBOL} must have as many partitions as md.ticks")
    try:
        interval: Interval = parse_interval(settings.alert_bar_interval)
    except ValueError as exc:
        raise SystemExit(f"FINSTREAM_ALERT_BAR_INTERVAL: {exc}") from None
    max_rules = settings.alert_max_rules_per_symbol
    rules_topic_name = settings.topic("alerts.rules")
    rules_topic = app.topic(
        rules_topic_name, partitions=catalogue.get("alerts.rules").partitions, **RAW
    )
    by_symbol_name = settings.topic(BY_SYMBOL)
    by_symbol_topic = app.topic(by_symbol_name, partitions=partitions, **RAW)
    ticks_name = settings.topic("md.ticks")
    ticks_topic = app.topic(ticks_name, partitions=partitions, **RAW)
    fired_topic = settings.topic("alerts.fired")
    requests_topic = settings.topic("notify.requests")

    rule_symbol = app.Table(
        "alert-rule-symbol",
        partitions=catalogue.get("alerts.rules").partitions,
        key_type=bytes,
        value_type=bytes,
    )
    rules_by_symbol = _DecodedTable(
        app.Table("alert-rules", partitions=partitions, key_type=bytes, value_type=bytes),
        lambda raw: decode_rules(codec, raw),
    )
    books: dict[bytes, tuple[dict[str, AlertRule], RuleBook]] = {}
    empty_book = RuleBook.build((), interval)
    state_core = app.Table("alert-state", partitions=partitions, key_type=bytes, value_type=bytes)
    state_history = app.Table(
        "alert-history", partitions=partitions, key_type=bytes, value_type=bytes
    )
    # Decoded states, reused while the tables hold the same bytes objects.
    states: dict[bytes, tuple[Any, Any, SymbolState]] = {}
    # States evaluated but not yet written (their firings are in flight).
    live: dict[bytes, SymbolState] = {}
    held = KeyedWrites()
    crashing: set[Any] = set()
    guard = GapGuard(settings, ctx.role)

    def failed(exc: BaseException) -> None:
        # A firing or state write the producer could not deliver: its event is
        # never acked, and the worker restarts to process it again.
        log.error("delivery failed; restarting the worker", error=str(exc))
        crashing.add(asyncio.ensure_future(app.crash(exc)))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(sender: Any, revoked: Any, **_: Any) -> None:
        # Held writes of revoked partitions are dropped: their events were not
        # acked and are processed again by whoever owns the partitions next.
        lost = {tp.partition for tp in revoked if tp.topic in (ticks_name, rules_topic_name)}
        for key in held.drop_partitions(lost):
            live.pop(key, None)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _stop_guard(sender: Any, **_: Any) -> None:
        await guard.stop()

    async def consume(stream: Any, handle: Any) -> None:
        """Manual acks (see agents.ordering); skipped offsets first (see GapGuard)."""
        async for event in stream.noack().events():
            msg = event.message
            ack = EventAck(event, failed)
            try:
                missed = await guard.missing(msg)
            except Exception:
                log.exception(
                    "could not read skipped offsets", topic=msg.topic, partition=msg.partition
                )
                missed = []
            for record in missed:
                await handle(record, ack)
            await handle(msg, ack)
            ack.seal()

    def book_for(key: bytes) -> RuleBook:
        rules = rules_by_symbol.get(key)
        if not rules:
            return empty_book
        cached = books.get(key)
        if cached is not None and cached[0] is rules:
            return cached[1]
        book = RuleBook.build(rules.values(), interval)
        books[key] = (rules, book)
        return book

    def state_for(key: bytes) -> SymbolState:
        pending = live.get(key)
        if pending is not None:
            return pending
        core, history = state_core.get(key), state_history.get(key)
        cached = states.get(key)
        if cached is not None and cached[0] is core and cached[1] is history:
            return cached[2]
        state = SymbolState.from_json(core, history)
        states[key] = (core, history, state)
        return state

    async def dead_letter(
        msg: Any, error: BaseException | str, error_class: str | None = None
    ) -> None:
        await ctx.dead_letters.send_message(msg, error, error_class=error_class)

    async def publish(
        topic: str, key: bytes, value: bytes | None, partition: int | None = None, headers: Any = ()
    ) -> Any:
        """Send and return the delivery future (faust's producer, flushed before commits)."""
        fut = await app.producer.send(
            topic,
            key=key,
            value=value,
            partition=partition,
            timestamp=None,
            headers=list(headers) or None,
        )
        EVENTS_OUT.labels(ctx.role, topic).inc()
        return fut

    # -- alerts.rules -> alerts.rules.by-symbol ------------------------------------------

    @app.agent(rules_topic, name="rules-intake")
    async def rules_intake(stream: faust.StreamT[Any]) -> None:
        await consume(stream, _intake_one)

    async def _intake_one(msg: Any, ack: EventAck) -> None:
        EVENTS_IN.labels(ctx.role, msg.topic).inc()
        try:
            await _intake(msg, ack)
        except (BadInput, DecodeError, RuleValidationError, UnicodeDecodeError) as exc:
            await dead_letter(msg, exc)
        except Exception as exc:  # never stall the partition
            log.exception("rule intake failed", offset=msg.offset)
            await dead_letter(msg, exc, "UnexpectedError")

    async def _intake(msg: Any, ack: EventAck) -> None:
        if not msg.key:
            raise BadInput("alerts.rules message without a key (the key is the rule id)")
        rule_id = msg.key.decode()
        previous = rule_symbol.get(msg.key)
        forwarded: list[Any] = []
        if msg.value is None:
            if previous is None:
                return
            forwarded.append(await _forward(previous.decode(), rule_id, None))
            write = table_delete(rule_symbol, msg.partition, msg.key)
        else:
            rule = validate_rule(AlertRule.from_record(codec.decode(msg.value, "AlertRule")))
            if rule.rule_id != rule_id:
                raise BadInput(f"key {rule_id!r} is not the rule's rule_id {rule.rule_id!r}")
            if previous is not None and previous.decode() != rule.symbol:
                forwarded.append(await _forward(previous.decode(), rule_id, None))
            forwarded.append(await _forward(rule.symbol, rule_id, msg.value))
            if previous == rule.symbol.encode():
                for fut in forwarded:
                    ack.wait_for(fut)
                return
            write = table_write(rule_symbol, msg.partition, msg.key, rule.symbol.encode())
        # The rule's symbol is remembered only once the forwards are delivered:
        # a replayed tombstone must still find the symbol to delete from.
        for fut in forwarded:
            ack.wait_for(fut)
        held.hold(("rule", msg.key), msg.partition, forwarded, [write], ack)

    async def _forward(symbol: str, rule_id: str, value: bytes | None) -> Any:
        return await publish(
            by_symbol_name,
            by_symbol_key(symbol, rule_id),
            value,
            partition=symbol_partition(symbol, partitions),
        )

    # -- alerts.rules.by-symbol -> alert-rules table --------------------------------------

    @app.agent(by_symbol_topic, name="rulebook")
    async def rulebook(stream: faust.StreamT[Any]) -> None:
        await consume(stream, _apply_one)

    async def _apply_one(msg: Any, ack: EventAck) -> None:
        EVENTS_IN.labels(ctx.role, msg.topic).inc()
        try:
            _apply_rule(msg, ack)
        except (BadInput, DecodeError, RuleValidationError, ValueError) as exc:
            await dead_letter(msg, exc)
        except Exception as exc:
            log.exception("rule update failed", offset=msg.offset)
            await dead_letter(msg, exc, "UnexpectedError")

    def _apply_rule(msg: Any, ack: EventAck) -> None:
        if not msg.key:
            raise BadInput(f"{BY_SYMBOL} message without a key")
        symbol, rule_id = split_by_symbol_key(msg.key)
        expected = symbol_partition(symbol, partitions)
        if msg.partition != expected:
            raise BadInput(f"rule for {symbol} on partition {msg.partition}, expected {expected}")
        key = symbol.encode()
        current: dict[str, AlertRule] = rules_by_symbol.get(key) or {}
        if msg.value is None:
            if rule_id not in current:
                return
            rules = {rid: r for rid, r in current.items() if rid != rule_id}
        else:
            rule = validate_rule(AlertRule.from_record(codec.decode(msg.value, "AlertRule")))
            if (rule.symbol, rule.rule_id) != (symbol, rule_id):
                raise BadInput(
                    f"key {msg.key!r} does not match the rule ({rule.symbol}/{rule.rule_id})"
                )
            old = current.get(rule_id)
            if old is not None and old.updated_at > rule.updated_at:
                log.info("older rule version ignored", rule_id=rule_id)
                return
            if old is None and len(current) >= max_rules:
                raise BadInput(
                    f"{symbol} already has {len(current)} rules, the most one symbol may have "
                    "(FINSTREAM_ALERT_MAX_RULES_PER_SYMBOL)"
                )
            rules = {**current, rule_id: rule}
        if rules:
            raw = encode_rules(codec, rules)
            ack.wait_for(table_write(rules_by_symbol.table, msg.partition, key, raw)())
            rules_by_symbol.remember(key, raw, rules)
        else:
            ack.wait_for(table_delete(rules_by_symbol.table, msg.partition, key)())
        log.info("rule updated", symbol=symbol, rule_id=rule_id, deleted=msg.value is None)

    @app.timer(10.0)
    async def _gauges() -> None:
        SYMBOLS_WITH_RULES.set(len(rules_by_symbol.table))
        HELD_WRITES.set(len(held))

    # -- md.ticks -> alerts.fired + notify.requests ------------------------------------------

    @app.agent(ticks_topic, name="alerts")
    async def alerts(stream: faust.StreamT[Any]) -> None:
        await consume(stream, _tick_one)

    max_future = timedelta(seconds=settings.tick_max_future_seconds)
    ticks_in = EVENTS_IN.labels(ctx.role, ticks_name)
    tick_seconds = PROCESSING_SECONDS.labels(ctx.role, "tick")

    async def _tick_one(msg: Any, ack: EventAck) -> None:
        ticks_in.inc()
        started = time.perf_counter()
        try:
            await _on_tick(msg, ack)
        except (BadInput, DecodeError, TickValidationError) as exc:
            await dead_letter(msg, exc)
        except EncodeError as exc:
            log.exception("firing could not be encoded", offset=msg.offset)
            await dead_letter(msg, exc)
        except Exception as exc:
            log.exception("tick evaluation failed", offset=msg.offset)
            await dead_letter(msg, exc, "UnexpectedError")
        tick_seconds.observe(time.perf_counter() - started)

    async def _on_tick(msg: Any, ack: EventAck) -> None:
        tick = validate_tick(
            Tick.from_record(codec.decode(msg.value, "Tick")), utcnow(), max_future
        )
        expected = symbol_partition(tick.symbol, partitions)
        if msg.partition != expected:
            # The rules of this symbol live with partition `expected`; a
            # producer that does not use Kafka's default partitioner put the
            # tick elsewhere. Redriving it from the dlq places it correctly.
            raise BadInput(
                f"tick for {tick.symbol} on md.ticks partition {msg.partition}; Kafka's default "
                f"(murmur2) partitioner puts it on {expected}, where its alert rules are"
            )
        key = tick.symbol.encode()
        ev: Evaluation = evaluate(state_for(key), book_for(key), tick)
        if ev.stale or ev.duplicate:
            TICKS_SKIPPED.labels("stale" if ev.stale else "duplicate").inc()
            return
        outputs: list[Any] = []
        if ev.firings:
            now = utcnow()
            for firing in ev.firings:
                user = firing.rule.user_id.encode()
                headers = correlation_header(firing.fired_id)
                fired = codec.encode("AlertFired", firing.alert_fired(now))
                request = codec.encode("NotificationRequest", firing.notification_request(now))
                outputs.append(await publish(fired_topic, user, fired, headers=headers))
                outputs.append(await publish(requests_topic, user, request, headers=headers))
                ALERTS_FIRED.labels(firing.rule.condition).inc()
                log.info(
                    "alert fired",
                    rule_id=firing.rule.rule_id,
                    fired_id=firing.fired_id,
                    symbol=tick.symbol,
                    price=str(firing.price),
                )
        new = ev.state
        partition = msg.partition
        history = state_history.get(key) if not held.blocked(key) else None
        if ev.history_changed:
            # Another changelog topic than the core's, so no ordering between
            # the two: the core waits for the history it expects (a history
            # ahead of its core is trimmed on load).
            history = new.history_json()
            outputs.append(table_write(state_history, partition, key, history)())
        core = new.core_json()
        for fut in outputs:
            ack.wait_for(fut)
        if outputs or held.blocked(key):
            live[key] = new

            def applied(key: bytes = key, new: SymbolState = new, core: bytes = core) -> None:
                if not held.blocked(key):
                    live.pop(key, None)
                    states[key] = (core, state_history.get(key), new)

            held.hold(
                key,
                partition,
                outputs,
                [table_write(state_core, partition, key, core)],
                ack,
                on_applied=applied,
            )
            return
        ack.wait_for(table_write(state_core, partition, key, core)())
        states[key] = (core, history, new)
