"""`finstream demo seed`: demo data worth looking at (what `make run` sends).

Four personas, echoing the platform's demo accounts, each with different
settings so that the router has something to decide:

=================  ============================  ======  ===============  =====================
user               who                           locale  time zone        what to watch
=================  ============================  ======  ===============  =====================
advisor-anna       financial advisor             en-GB   Europe/London    push (APNs) + email,
                                                                          a push cap of 5 / 10 min
planner-pierre     certified financial planner   fr      Europe/Paris     SMS + email, price
                                                                          alerts capped and
                                                                          folded into a digest
client-klaus       client                        de      Europe/Berlin    inside quiet hours now:
                                                                          email and push held,
                                                                          in-app at once; an
                                                                          unverified address and
                                                                          phone are skipped
demo-user          demo account                  en      UTC              email + in-app, marketing
                                                                          consent given
=================  ============================  ======  ===============  =====================

Alert rules span the simulated symbols and fire at different rates (once a
minute, once per bar, every crossing with a cooldown, once only, on a move
within a minute); crossing levels are placed around the latest quote when
the quote cache has one, so they are crossed while you watch. A "demo
service" posts a few notifications of other categories: a welcome for
everyone, a critical security notice (breaks quiet hours), a product
announcement (delivered with consent, suppressed without), and a weekly
summary scheduled two minutes ahead (held, then released).

Seeding again gives the same state: rule and request ids are fixed, records
on the compacted topics are replaced, and the router sends a request id once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import click

from finstream.cli.common import fail
from finstream.settings import Settings, get_settings

DEMO_USER = "demo-user"
SOURCE = "demo-service"

Record = tuple[str, str, dict[str, Any]]  # catalogue topic, key, value


@dataclass(frozen=True)
class Persona:
    user_id: str
    name: str
    role: str
    locale: str
    timezone: str
    channels: str  # what the persona gets price alerts on, for the README and the console


PERSONAS = (
    Persona("advisor-anna", "Anna Berger", "financial advisor", "en-GB", "Europe/London", "push, email, in-app"),
    Persona("planner-pierre", "Pierre Laurent", "certified financial planner", "fr", "Europe/Paris", "SMS, email, in-app (digest)"),
    Persona("client-klaus", "Klaus Meyer", "client", "de", "Europe/Berlin", "email, push (held: quiet hours), in-app"),
    Persona(DEMO_USER, "Demo Account", "demo account", "en", "UTC", "email, in-app"),
)  # fmt: skip


def _quiet_window_around(now: datetime, tz: str) -> dict[str, Any]:
    """A quiet window (every day) from the hour before now until three hours later."""
    local = now.astimezone(ZoneInfo(tz))
    start = (local - timedelta(hours=1)).replace(minute=0)
    end = (local + timedelta(hours=3)).replace(minute=0)
    return {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}


def preferences(now: datetime) -> list[dict[str, Any]]:
    """The personas' preferences, as a client would send them (parse_preferences input)."""
    at = now.isoformat()
    return [
        {
            "user_id": "advisor-anna",
            "locale": "en-GB",
            "timezone": "Europe/London",
            "emails": [{"address": "anna.berger@advisors.example", "verified": True}],
            "push_tokens": [{"platform": "APNS", "token": "a1" * 32, "app": "finstream-ios"}],
            "categories": {
                "price_alert": {"channels": ["push", "email", "inapp"]},
                "product": {"enabled": False},
            },
            "caps": [
                {"channel": "push", "category": "price_alert", "limit": 5, "window_seconds": 600}
            ],
        },
        {
            "user_id": "planner-pierre",
            "locale": "fr",
            "timezone": "Europe/Paris",
            "emails": [{"address": "pierre.laurent@planners.example", "verified": True}],
            "phones": [{"number": "+33 6 12 34 56 78", "verified": True}],
            "categories": {"price_alert": {"channels": ["sms", "email", "inapp"], "digest": True}},
            "consents": [{"purpose": "sms", "granted": True, "at": at, "source": "demo-seed"}],
            "caps": [{"category": "price_alert", "limit": 3, "window_seconds": 900}],
        },
        {
            "user_id": "client-klaus",
            "locale": "de",
            "timezone": "Europe/Berlin",
            "emails": [
                {"address": "klaus.meyer@client.example", "verified": True},
                {"address": "k.meyer@oldmail.example", "verified": False},
            ],
            "phones": [{"number": "+49 151 23456789", "verified": False}],
            "push_tokens": [{"platform": "FCM", "token": "fcm-klaus-pixel-8", "app": "finstream"}],
            "categories": {"price_alert": {"channels": ["email", "push", "inapp"]}},
            "quiet_hours": [_quiet_window_around(now, "Europe/Berlin")],
        },
        {
            "user_id": DEMO_USER,
            "locale": "en",
            "timezone": "UTC",
            "emails": [{"address": "demo@example.com", "verified": True}],
            "categories": {"price_alert": {"channels": ["email", "inapp"]}},
            "consents": [
                {"purpose": "marketing", "granted": True, "at": at, "source": "demo-seed"}
            ],
        },
    ]


def _near(price: Decimal | None, offset: str) -> str | None:
    if price is None:
        return None
    return str((price * (1 + Decimal(offset))).quantize(Decimal("0.01")))


def rules(symbols: list[str], quotes: Mapping[str, Decimal]) -> list[dict[str, Any]]:
    """Alert rules (parse_rule input) over the simulated symbols, firing at different rates.

    Crossing rules need a level near the price: they are left out for a
    symbol the quote cache does not know yet.
    """

    def sym(i: int) -> str:
        return symbols[i % len(symbols)]

    out: list[dict[str, Any]] = [
        # Every simulated price is above a cent: fires on the first tick, then once a minute.
        {
            "rule_id": f"demo-{sym(0).lower()}-above",
            "user_id": DEMO_USER,
            "symbol": sym(0),
            "condition": "greater-than",
            "value": "0.01",
            "frequency": "once-per-minute",
            "message": "Demo alert from `finstream run`",
        },
        {
            "rule_id": f"seed-anna-{sym(1).lower()}-move",
            "user_id": "advisor-anna",
            "symbol": sym(1),
            "condition": "moving-up-percent",
            "percent": "0.05",
            "window_seconds": 60,
            "frequency": "once-per-minute",
            "message": "Momentum on a client holding",
        },
        {
            "rule_id": f"seed-pierre-{sym(2).lower()}-bar",
            "user_id": "planner-pierre",
            "symbol": sym(2),
            "condition": "greater-than",
            "value": "0.01",
            "frequency": "once-per-bar",
            "message": "Point de contrôle horaire du portefeuille",
        },
        {
            "rule_id": f"seed-klaus-{sym(3).lower()}-once",
            "user_id": "client-klaus",
            "symbol": sym(3),
            "condition": "greater-than",
            "value": "0.01",
            "frequency": "only-once",
            "message": "Kursalarm aktiv",
        },
    ]
    crossings = [
        ("advisor-anna", 4, "0.001", 30, "Rebalancing level"),
        ("planner-pierre", 5, "-0.001", 45, "Seuil de rééquilibrage"),
        ("client-klaus", 6, "0.0005", 60, "Kaufzone erreicht"),
        (DEMO_USER, 0, "-0.0005", 20, "Demo crossing"),
    ]
    for user, i, offset, cooldown, note in crossings:
        level = _near(quotes.get(sym(i)), offset)
        if level is None:
            continue
        out.append(
            {
                "rule_id": f"seed-{user.split('-')[-1]}-{sym(i).lower()}-cross",
                "user_id": user,
                "symbol": sym(i),
                "condition": "crossing",
                "value": level,
                "frequency": "every-time",
                "cooldown_seconds": cooldown,
                "message": note,
            }
        )
    return out


def service_requests(now: datetime) -> list[dict[str, Any]]:
    """What the demo service posts: other categories than price alerts."""
    day = now.strftime("%Y%m%d")

    def request(
        kind: str,
        user: str,
        category: str,
        template: str,
        data: dict[str, str],
        *,
        priority: str = "NORMAL",
        deliver_at: datetime | None = None,
    ) -> dict[str, Any]:
        return {
            "request_id": f"seed-{kind}-{user}-{day}",
            "user_id": user,
            "category": category,
            "priority": priority,
            "template": template,
            "data": data,
            "channels": [],
            "deliver_at": deliver_at,
            "expires_at": None,
            "collapse_key": None,
            "created_at": now,
            "source": SOURCE,
            "correlation_id": f"seed-{kind}-{user}-{day}",
        }

    out = [
        request(
            "welcome",
            p.user_id,
            "account",
            "welcome",
            {"title": "Welcome to finstream", "body": f"Hello {p.name}, your pipeline is running."},
        )
        for p in PERSONAS
    ]
    out += [
        request(
            "security",
            "client-klaus",
            "security",
            "message",
            {"title": "Neue Anmeldung", "body": "Neue Anmeldung von Chrome unter Linux."},
            priority="CRITICAL",
        ),
        request(
            "product",
            DEMO_USER,
            "product",
            "message",
            {"title": "New: live journeys", "body": "See every notification's path in /console."},
        ),
        request(
            "product",
            "client-klaus",
            "product",
            "message",
            {"title": "Neu: Live-Journeys", "body": "Jede Benachrichtigung nachverfolgen."},
        ),
        request(
            "summary",
            "advisor-anna",
            "account",
            "message",
            {"title": "Your weekly summary", "body": "12 alerts fired for your clients this week."},
            deliver_at=now + timedelta(minutes=2),
        ),
    ]
    return out


def records(settings: Settings, now: datetime, quotes: Mapping[str, Decimal]) -> list[Record]:
    """Everything the seed publishes, in order: preferences, rules, requests."""
    from finstream.domain.alerts.rules import parse_rule
    from finstream.domain.notify.preferences import parse_preferences

    out: list[Record] = []
    for prefs in preferences(now):
        parsed = parse_preferences(prefs, now=now, consent_source="demo-seed")
        out.append(("notify.preferences", prefs["user_id"], parsed))
    symbols = [s.strip().upper() for s in (settings.md_symbols or settings.sim_symbols).split(",")]
    for raw in rules([s for s in symbols if s], quotes):
        rule = parse_rule(raw, now=now)
        out.append(("alerts.rules", rule.rule_id, rule.to_record()))
    out += [("notify.requests", r["user_id"], r) for r in service_requests(now)]
    return out


async def latest_quotes(settings: Settings, wait: float) -> dict[str, Decimal]:
    """The quote cache's prices; waits up to ``wait`` seconds for the first ones."""
    from finstream.stores.quotes import QuoteCache
    from finstream.stores.redis import connect

    symbols = [s.strip().upper() for s in (settings.md_symbols or settings.sim_symbols).split(",")]
    redis = connect(settings)
    try:
        cache = QuoteCache(redis, settings)
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            found: dict[str, Decimal] = {}
            for s in symbols:
                with contextlib.suppress(Exception):
                    quote = await cache.get(s)
                    if quote and quote.get("price"):
                        found[s] = Decimal(quote["price"])
            if len(found) == len(symbols) or asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()


def publish(settings: Settings, items: list[Record], *, router_wait: float = 60.0) -> bool:
    """Produce with Kafka's default (murmur2) partitioner, preferences first.

    The router reads preferences and requests from two topics, and Kafka
    orders neither against the other: a router that starts after the seed can
    fetch a request before its user's preferences and route it by the
    category's defaults (no email for the demo alert). So rules and requests
    go out only once the router's group has committed past the preferences,
    waiting up to ``router_wait`` seconds; returns whether it had.
    """
    from confluent_kafka import Producer

    from finstream.runtime.kafka import producer_config
    from finstream.topics import contract

    producer = Producer({**producer_config(settings), "log_level": 3})
    errors: list[str] = []
    written: dict[int, int] = {}  # partition of notify.preferences -> next offset

    def done(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        elif msg.topic() == prefs_topic:
            written[msg.partition()] = max(written.get(msg.partition(), 0), msg.offset() + 1)

    prefs_topic = contract("notify.preferences", settings.namespace).name
    caught_up = True
    for phase in ("notify.preferences", "alerts.rules", "notify.requests"):
        target = contract(phase, settings.namespace)
        for topic, key, value in items:
            if topic == phase:
                producer.produce(
                    target.name, key=key.encode(), value=target.encode(value), on_delivery=done
                )
        if producer.flush(30) != 0:
            errors.append(f"{phase}: messages left unsent after 30 s")
        if errors:
            raise RuntimeError(f"seeding failed: {errors[0]}")
        if phase == "notify.preferences" and written:
            caught_up = router_has_consumed(settings, prefs_topic, written, router_wait)
    return caught_up


def router_has_consumed(
    settings: Settings, topic: str, offsets: Mapping[int, int], timeout: float
) -> bool:
    """Whether the router's group commits ``offsets`` of ``topic`` within ``timeout`` seconds.

    Asked through the admin API (OffsetFetch): no consumer with the router's
    group id is created, so nothing can join or disturb the router's group.
    """
    import time

    from confluent_kafka import (
        ConsumerGroupTopicPartitions,
        KafkaError,
        KafkaException,
        TopicPartition,
    )
    from confluent_kafka.admin import AdminClient

    from finstream.runtime.kafka import client_config

    admin = AdminClient(client_config(settings, log_level=3))
    query = ConsumerGroupTopicPartitions(
        settings.group("router"), [TopicPartition(topic, p) for p in sorted(offsets)]
    )
    refused = {
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
    deadline = time.monotonic() + timeout
    while True:
        try:
            future = admin.list_consumer_group_offsets([query], request_timeout=5)
            got = next(iter(future.values())).result(timeout=10).topic_partitions or []
            if len(got) == len(offsets) and all(tp.offset >= offsets[tp.partition] for tp in got):
                return True
        except Exception as exc:
            # A refusal does not pass with time; anything else (the coordinator
            # still loading, a timeout) may: asked again until the deadline.
            error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if isinstance(error, KafkaError) and error.code() in refused:
                raise RuntimeError(
                    f"cannot read the router's committed offsets: {error.str()}"
                ) from exc
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def seed(
    settings: Settings, *, quote_wait: float = 20.0, router_wait: float = 60.0
) -> list[Record]:
    """Publish the demo; raises when Kafka refuses. Says on stderr when the router lagged."""
    from finstream.domain.time import utcnow

    quotes = asyncio.run(latest_quotes(settings, quote_wait))
    items = asyncio.run(_sealed(settings, records(settings, utcnow(), quotes)))
    if not publish(settings, items, router_wait=router_wait):
        click.echo(
            f"demo seed: the router had not consumed the preferences after {router_wait:.0f} s "
            "(is it running?); the first requests may be routed by the categories' defaults",
            err=True,
        )
    return items


async def _sealed(settings: Settings, items: list[Record]) -> list[Record]:
    """Contacts and request data sealed under each persona's key, as the API does."""
    from finstream.privacy.producer import Sealer
    from finstream.topics import load_catalogue

    catalogue = load_catalogue()
    with_schemas = [(t, k, catalogue.get(t).value_schema, v) for t, k, v in items]
    async with Sealer.open(settings) as sealer:
        sealed = await sealer.records(with_schemas)
    return [(t, k, v) for t, k, _schema, v in sealed]


# -- the command ----------------------------------------------------------------


@click.group()
def demo() -> None:
    """Demo data for make run: personas, alert rules, a notifying service."""


@demo.command("seed")
@click.option(
    "--quote-wait",
    type=float,
    default=20.0,
    show_default=True,
    help="Seconds to wait for quotes (crossing levels are placed around them).",
)
@click.option(
    "--router-wait",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the router to consume the preferences before the first requests.",
)
def seed_command(quote_wait: float, router_wait: float) -> None:
    """Publish the demo personas' preferences, alert rules and a few notifications (idempotent)."""
    from collections import Counter

    try:
        items = seed(get_settings(), quote_wait=quote_wait, router_wait=router_wait)
    except Exception as exc:  # one clear line: Kafka or Redis unreachable, a bad record
        fail(f"demo seed: {exc}")
    counts = Counter(topic for topic, *_ in items)
    click.echo(
        f"demo: {counts['notify.preferences']} personas, {counts['alerts.rules']} alert rules, "
        f"{counts['notify.requests']} service notifications"
    )
    for p in PERSONAS:
        click.echo(f"  {p.user_id:<15} {p.role:<28} {p.locale:<5} {p.timezone:<14} {p.channels}")
