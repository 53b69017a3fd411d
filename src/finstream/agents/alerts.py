"""Alerts role: users' rules against ticks, co-partitioned by symbol, exactly once.

One stream-engine processor reads three topics; range assignment gives
partition *p* of each to the same replica:

``alerts.rules`` (keyed by rule id)
    Each rule (validated at the edge) is forwarded to ``alerts.rules.by-symbol``
    with the key ``SYMBOL/rule_id``, on the partition md.ticks uses for the
    symbol (Kafka's default murmur2 partitioner). A tombstone carries no
    symbol, so the ``rule-symbol`` store remembers each rule's symbol; a rule
    that moves to another symbol is deleted from the old one.

``alerts.rules.by-symbol``
    Keeps the ``rules`` store: symbol -> that symbol's rules. It is
    co-partitioned with md.ticks, so a replica holds exactly the rules of the
    symbols whose ticks it reads.

``md.ticks``
    Looks up the tick's symbol only (a tick's cost does not grow with other
    symbols' rules), runs the pure evaluation of
    :mod:`finstream.domain.alerts.engine` (shared with back-testing), and
    publishes an AlertFired (``alerts.fired``, keyed by user) and a
    NotificationRequest (``notify.requests``, category ``price_alert``) per
    firing; the symbol's evaluation state goes to the ``state`` store.

Exactly once: forwards, firings, dead letters, the three stores' changelogs
and the input offsets commit in one Kafka transaction. A worker killed at any
point comes back with the state of its last commit and evaluates the ticks
after it again; what it had published since is aborted, never seen by a
read_committed consumer. Firing ids (``fired_id``, ``request_id``) stay
deterministic, so a back-test gives the same ids as the live role.

Bad input becomes a dead letter with its reason: undecodable or invalid
rules and ticks (the engine's contracts), a key that does not match its
record, a symbol over ``FINSTREAM_ALERT_MAX_RULES_PER_SYMBOL`` rules, and a
tick on a partition other than its symbol's.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from prometheus_client import Counter, Gauge

from finstream.codec import EncodeError
from finstream.domain.alerts.books import RuleBook
from finstream.domain.alerts.engine import Evaluation, SymbolState, evaluate
from finstream.domain.alerts.rules import AlertRule
from finstream.domain.marketdata.bars import Interval, parse_interval
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.partitioning import key_partition
from finstream.domain.time import utcnow
from finstream.runtime.engine import StreamEngine
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import get_logger
from finstream.runtime.state import Store
from finstream.runtime.stream.events import Event, Output, Processor
from finstream.runtime.worker import ServiceContext
from finstream.topics import Contract, contract

log = get_logger(__name__)

ALERTS_FIRED = Counter("finstream_alerts_fired_total", "Alert firings published", ["condition"])
TICKS_SKIPPED = Counter(
    "finstream_alerts_ticks_skipped_total",
    "Ticks not evaluated: stale (older than the symbol's last) or seen before",
    ["reason"],
)
SYMBOLS_WITH_RULES = Gauge(
    "finstream_alerts_symbols_with_rules", "Symbols with at least one rule on this worker"
)
RULES_HELD = Gauge("finstream_alerts_rules", "Rules held by this worker (for its partitions)")
BY_SYMBOL = "alerts.rules.by-symbol"


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


def encode_rules(rules_topic: Contract, rules: dict[str, AlertRule]) -> bytes:
    """A symbol's rules for the changelog: each as its alerts.rules value."""
    return json.dumps(
        {
            rid: base64.b64encode(rules_topic.encode(r.to_record())).decode()
            for rid, r in sorted(rules.items())
        },
        separators=(",", ":"),
    ).encode()


def decode_rules(rules_topic: Contract, raw: bytes) -> dict[str, AlertRule]:
    doc = json.loads(raw)
    return {
        rid: AlertRule.from_record(rules_topic.decode_record(base64.b64decode(b)))
        for rid, b in doc.items()
    }


class Alerts(Processor):
    def __init__(self, ctx: ServiceContext) -> None:
        settings = ctx.settings
        codec = ctx.codec
        ns = settings.namespace
        self.ticks = contract("md.ticks", ns, codec)
        self.rules_topic = contract("alerts.rules", ns, codec)
        self.by_symbol = contract(BY_SYMBOL, ns, codec)
        self.fired_topic = contract("alerts.fired", ns, codec)
        self.requests_topic = contract("notify.requests", ns, codec)
        if self.by_symbol.partitions != self.ticks.partitions:
            raise SystemExit(f"topics.yaml: {BY_SYMBOL} must have as many partitions as md.ticks")
        try:
            self.interval: Interval = parse_interval(settings.alert_bar_interval)
        except ValueError as exc:
            raise SystemExit(f"FINSTREAM_ALERT_BAR_INTERVAL: {exc}") from None
        self.max_rules = settings.alert_max_rules_per_symbol
        self.rule_symbol: Store[str] = Store("alert-rule-symbol", str.encode, bytes.decode)
        self.rules: Store[dict[str, AlertRule]] = Store(
            "alert-rules",
            lambda r: encode_rules(self.rules_topic, r),
            lambda raw: decode_rules(self.rules_topic, raw),
        )
        self.state: Store[SymbolState] = Store(
            "alert-state", SymbolState.to_bytes, SymbolState.from_bytes
        )
        self.stores: list[Store[Any]] = [self.rule_symbol, self.rules, self.state]
        self._books: dict[bytes, tuple[dict[str, AlertRule], RuleBook]] = {}
        self._empty = RuleBook.build((), self.interval)

    # -- the batch ---------------------------------------------------------------------

    async def process(self, events: list[Event], out: Output) -> None:
        ticks_name, rules_name = self.ticks.name, self.rules_topic.name
        rules_changed = False
        for ev in events:
            try:
                if ev.topic == ticks_name:
                    self._tick(ev, out)
                elif ev.topic == rules_name:
                    self._intake(ev, out)
                else:
                    rules_changed = True
                    self._apply_rule(ev)
            except (BadInput, EncodeError, UnicodeDecodeError) as exc:
                out.dead_letter(ev, exc)
        if rules_changed:
            self._count_rules()

    def _count_rules(self) -> None:
        # A walk over the symbols: only after a batch that changed rules, or a
        # (re)assignment, never per tick batch.
        SYMBOLS_WITH_RULES.set(len(self.rules))
        RULES_HELD.set(sum(len(rules) for _, _, rules in self.rules.items()))

    # -- alerts.rules -> alerts.rules.by-symbol ----------------------------------------

    def _intake(self, ev: Event, out: Output) -> None:
        if not ev.key:
            raise BadInput("alerts.rules message without a key (the key is the rule id)")
        rule_id = ev.key.decode()
        previous = self.rule_symbol.get(ev.partition, ev.key)
        if ev.item is None:
            if previous is not None:
                self._forward(out, previous, rule_id, None)
                self.rule_symbol.delete(ev.partition, ev.key)
            return
        rule: AlertRule = ev.item
        if rule.rule_id != rule_id:
            raise BadInput(f"key {rule_id!r} is not the rule's rule_id {rule.rule_id!r}")
        if previous is not None and previous != rule.symbol:
            self._forward(out, previous, rule_id, None)
        self._forward(out, rule.symbol, rule_id, ev.value)
        if previous != rule.symbol:
            self.rule_symbol.put(ev.partition, ev.key, rule.symbol)

    def _forward(self, out: Output, symbol: str, rule_id: str, value: bytes | None) -> None:
        out.produce(
            self.by_symbol.name,
            by_symbol_key(symbol, rule_id),
            value,
            partition=key_partition(symbol.encode(), self.by_symbol.partitions),
        )

    # -- alerts.rules.by-symbol -> the rules store -------------------------------------

    def _apply_rule(self, ev: Event) -> None:
        if not ev.key:
            raise BadInput(f"{BY_SYMBOL} message without a key")
        try:
            symbol, rule_id = split_by_symbol_key(ev.key)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        expected = key_partition(symbol.encode(), self.by_symbol.partitions)
        if ev.partition != expected:
            raise BadInput(f"rule for {symbol} on partition {ev.partition}, expected {expected}")
        key = symbol.encode()
        current = self.rules.get(ev.partition, key) or {}
        if ev.item is None:
            if rule_id not in current:
                return
            rules = {rid: r for rid, r in current.items() if rid != rule_id}
        else:
            rule: AlertRule = ev.item
            if (rule.symbol, rule.rule_id) != (symbol, rule_id):
                raise BadInput(
                    f"key {ev.key!r} does not match the rule ({rule.symbol}/{rule.rule_id})"
                )
            old = current.get(rule_id)
            if old is not None and old.updated_at > rule.updated_at:
                log.info("older rule version ignored", rule_id=rule_id)
                return
            if old is None and len(current) >= self.max_rules:
                raise BadInput(
                    f"{symbol} already has {len(current)} rules, the most one symbol may have "
                    "(FINSTREAM_ALERT_MAX_RULES_PER_SYMBOL)"
                )
            rules = {**current, rule_id: rule}
        if rules:
            self.rules.put(ev.partition, key, rules)
        else:
            self.rules.delete(ev.partition, key)
        log.info("rule updated", symbol=symbol, rule_id=rule_id, deleted=ev.item is None)

    def _book(self, partition: int, key: bytes) -> RuleBook:
        rules = self.rules.get(partition, key)
        if not rules:
            return self._empty
        cached = self._books.get(key)
        if cached is not None and cached[0] is rules:
            return cached[1]
        book = RuleBook.build(rules.values(), self.interval)
        self._books[key] = (rules, book)
        return book

    # -- md.ticks -> alerts.fired + notify.requests ------------------------------------

    def _tick(self, ev: Event, out: Output) -> None:
        tick: Tick = ev.item
        key = tick.symbol.encode()
        p = ev.partition
        expected = key_partition(key, self.ticks.partitions)
        if p != expected:
            # The rules of this symbol live with partition `expected`; a
            # producer that does not use Kafka's default partitioner put the
            # tick elsewhere. Redriving it from the dlq places it correctly.
            raise BadInput(
                f"tick for {tick.symbol} on md.ticks partition {p}; Kafka's default "
                f"(murmur2) partitioner puts it on {expected}, where its alert rules are"
            )
        state = self.state.get(p, key) or _EMPTY_STATE
        result: Evaluation = evaluate(state, self._book(p, key), tick)
        if result.stale or result.duplicate:
            TICKS_SKIPPED.labels("stale" if result.stale else "duplicate").inc()
            return
        if result.firings:
            now = utcnow()
            for firing in result.firings:
                user = firing.rule.user_id.encode()
                headers = correlation_header(firing.fired_id)
                out.produce(
                    self.fired_topic.name,
                    user,
                    self.fired_topic.encode(firing.alert_fired(now)),
                    headers,
                )
                out.produce(
                    self.requests_topic.name,
                    user,
                    self.requests_topic.encode(firing.notification_request(now)),
                    headers,
                )
                ALERTS_FIRED.labels(firing.rule.condition).inc()
                log.info(
                    "alert fired",
                    rule_id=firing.rule.rule_id,
                    fired_id=firing.fired_id,
                    symbol=tick.symbol,
                    price=str(firing.price),
                )
        self.state.put(p, key, result.state)

    async def assigned(self, partitions: frozenset[int]) -> None:
        self._books.clear()
        self._count_rules()


_EMPTY_STATE = SymbolState()


async def run(ctx: ServiceContext) -> None:
    alerts = Alerts(ctx)
    engine = StreamEngine(
        ctx.settings,
        ctx.role,
        ["alerts.rules", BY_SYMBOL, "md.ticks"],
        alerts,
        ctx.health,
        guarantee="exactly_once",
        stores=alerts.stores,
    )
    await engine.run(ctx.stop)
