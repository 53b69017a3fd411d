"""Faults between the delivery engine and what it depends on: providers that never
answer, and network faults (Toxiproxy) to the provider fakes, PostgreSQL and Redis.

The engine is driven directly, as a worker drives it: records go to its intake,
its dispatch, schedule and outbox loops run beside the test. Every test ends
with exact counts at the fakes: a provider that may have taken a message is
reconciled as the README says (SendGrid and Twilio looked up, in-app and push
sent again where a second copy cannot show, SES and SMTP dead-lettered), and no
message reaches a provider twice except where a resend is documented to
replace the first copy (push: the same apns-id / collapse id, counted here).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from finstream.codec import Codec
from finstream.domain.resilience import CircuitState
from finstream.domain.time import utcnow
from finstream.runtime.kafka import KafkaPublisher
from finstream.runtime.stream.events import Event
from finstream.settings import Settings
from finstream.sinks.delivery.base import CHANNEL_TOPICS, build_chain
from finstream.sinks.delivery.engine import DeliveryEngine
from finstream.stores.postgres import create_pool
from finstream.stores.redis import connect
from tests.fakes.delivery.kit import DeliveryFakes
from tests.support.services import TestEnv
from tests.support.toxiproxy import Proxy, Toxiproxy
from tests.support.waiting import until

pytestmark = pytest.mark.integration
CODEC = Codec()
FINAL = {"sent", "delivered", "rejected", "failed", "expired"}
FOREVER = 3600.0  # what "never answers" means within a test
OFFSETS = itertools.count()


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryFakes]:
    with DeliveryFakes(tmp_path_factory.mktemp("fault-fakes")) as f:
        yield f


@pytest.fixture(scope="module")
def toxiproxy(log_dir: Path) -> Iterator[Toxiproxy]:
    with Toxiproxy(log_dir) as proxy:
        yield proxy


@pytest.fixture(scope="module")
async def publisher(env: TestEnv) -> AsyncIterator[KafkaPublisher]:
    pub = KafkaPublisher(env.settings, "faults-test")
    await pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


@pytest.fixture(scope="module")
async def db(env: TestEnv) -> AsyncIterator[asyncpg.Pool]:
    """A direct pool (never through a proxy) for the test's own reads."""
    pool = await asyncpg.create_pool(
        env.settings.database_url.get_secret_value(), min_size=1, max_size=4
    )
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def clean(fakes: DeliveryFakes, toxiproxy: Toxiproxy) -> Iterator[None]:
    fakes.reset()
    yield
    fakes.reset()
    for fake in fakes.all:
        fake.faults.hang = 3.0
    toxiproxy.reset()


def settings_for(env: TestEnv, fakes: DeliveryFakes, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "delivery_max_attempts": 6,
        "delivery_concurrency": 4,
        "pg_command_timeout": 2.0,
        "pg_connect_timeout": 2.0,
        "redis_socket_timeout": 1.0,
    }
    return fakes.settings(env.settings, **{**values, **extra})


@contextlib.asynccontextmanager
async def running(
    settings: Settings, channel: str, publisher: KafkaPublisher
) -> AsyncIterator[DeliveryEngine]:
    """An engine with its own pool and Redis client (through proxies if settings say so)."""
    pool = await create_pool(settings, min_size=1, max_size=8)
    redis = connect(settings)
    engine = DeliveryEngine(
        settings=settings,
        codec=CODEC,
        channel=channel,
        role=f"delivery-{channel.lower()}",
        chain=build_chain(settings, channel),
        pool=pool,
        redis=redis,
        publisher=publisher,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(engine.run(stop))
    try:
        yield engine
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)  # a hung loop fails the test here
        await redis.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 10)


def outbound(channel: str, recipient: str, **over: Any) -> dict[str, Any]:
    mid = f"m-{uuid.uuid4().hex[:20]}"
    msg: dict[str, Any] = {
        "message_id": mid,
        "request_id": f"r-{mid}",
        "user_id": over.pop("user_id", f"u-{uuid.uuid4().hex[:8]}"),
        "channel": channel,
        "category": "price_alert",
        "priority": "HIGH",
        "recipient": recipient,
        "platform": None,
        "locale": "en",
        "subject": "AAPL crossed 200",
        "body_text": f"AAPL crossed 200 [{mid}]",
        "body_html": None,
        "data": {"symbol": "AAPL"},
        "transactional": True,
        "created_at": utcnow(),
        "expires_at": None,
        "attempt": 0,
        "correlation_id": f"c-{mid}",
    }
    msg.update(over)
    return msg


RECIPIENTS = {
    "EMAIL": ("ann@example.com", None),
    "SMS": ("+14155552671", None),
    "PUSH-apns": ("a7" * 32, "APNS"),
    "PUSH-fcm": ("fcm-token-faults", "FCM"),
    "INAPP": ("u-inbox", None),
}


def message_for(channel: str, provider: str) -> dict[str, Any]:
    key = f"{channel}-{provider}" if channel == "PUSH" else channel
    recipient, platform = RECIPIENTS[key]
    if channel == "INAPP":
        user = f"u-{uuid.uuid4().hex[:8]}"
        return outbound(channel, user, user_id=user)
    return outbound(channel, recipient, platform=platform)


async def deliver(engine: DeliveryEngine, *messages: dict[str, Any]) -> None:
    topic = engine.settings.topic(CHANNEL_TOPICS[engine.channel])
    source = CHANNEL_TOPICS[engine.channel]
    # What the stream engine hands the intake: the record, decoded by its contract.
    await engine.intake(
        [
            Event(
                topic,
                source,
                0,
                next(OFFSETS),
                m["user_id"].encode(),
                CODEC.encode("OutboundMessage", m),
                m,
                [],
                0,
            )
            for m in messages
        ]
    )


async def state(db: asyncpg.Pool, message_id: str) -> str | None:
    value: str | None = await db.fetchval(
        "SELECT state FROM deliveries WHERE message_id = $1", message_id
    )
    return value


async def settled(db: asyncpg.Pool, *ids: str, within: float = 60.0) -> dict[str, str]:
    async def check() -> dict[str, str] | None:
        states = {i: await state(db, i) for i in ids}
        return states if all(s in FINAL for s in states.values()) else None  # type: ignore[return-value]

    return await eventually(check, f"{ids} settled", within)


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        if last := await check():
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")


async def results(db: asyncpg.Pool, message_id: str) -> list[asyncpg.Record]:
    return list(
        await db.fetch(
            "SELECT provider, status, error_class, error FROM delivery_results "
            "WHERE message_id = $1 ORDER BY at, attempt",
            message_id,
        )
    )


def takes(fakes: DeliveryFakes, message_id: str) -> int:
    """How many times any provider fake took the message."""
    return sum(fake.recorder.counts()[message_id] for fake in fakes.all)


def fake_of(fakes: DeliveryFakes, provider: str) -> Any:
    return getattr(fakes, provider)


# -- a provider that takes the message and never answers ------------------------------------

# (channel, provider, final state, how many requests reached the fake, how it was settled)
NEVER_ANSWERS = [
    pytest.param("EMAIL", "sendgrid", "sent", 1, "reconciled: found", id="sendgrid-looked-up"),
    pytest.param("SMS", "twilio", "sent", 1, "reconciled: found", id="twilio-looked-up"),
    pytest.param("PUSH", "apns", "sent", 2, None, id="apns-resent-same-apns-id"),
    pytest.param("PUSH", "fcm", "sent", 2, None, id="fcm-resent-same-collapse-id"),
    pytest.param("EMAIL", "ses", "failed", 1, "unknown_outcome", id="ses-dead-lettered"),
    pytest.param("EMAIL", "smtp", "failed", 1, "unknown_outcome", id="smtp-dead-lettered"),
]


@pytest.mark.parametrize(("channel", "provider", "final", "requests", "how"), NEVER_ANSWERS)
@pytest.mark.usefixtures("clean")
async def test_a_provider_that_takes_the_message_and_never_answers(
    env: TestEnv,
    fakes: DeliveryFakes,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
    channel: str,
    provider: str,
    final: str,
    requests: int,
    how: str | None,
) -> None:
    chain = {"EMAIL": "delivery_email_providers", "PUSH": "delivery_push_providers"}
    extra = {chain[channel]: provider} if channel in chain else {}
    settings = settings_for(env, fakes, **extra)
    fake = fake_of(fakes, provider)
    fake.faults.hang = FOREVER
    fake.faults.then("accept_hang")  # the first request is taken, and never answered
    msg = message_for(channel, provider)
    async with running(settings, channel, publisher) as engine:
        await deliver(engine, msg)
        states = await settled(db, msg["message_id"])
        # The timeout fired: the engine went on while the fake still holds the request.
        # The final row is written before the job that wrote it returns, so wait for it.
        await until(lambda: engine.inflight == 0, "the last job to return", within=60)
    assert states[msg["message_id"]] == final
    taken = [e for e in fake.recorder.accepted if e["message_id"] == msg["message_id"]]
    assert len(taken) == requests
    assert takes(fakes, msg["message_id"]) == requests, "no other provider was tried"
    if provider == "apns":
        assert len({(e["apns_id"], e["collapse"]) for e in taken}) == 1  # shown once
    if provider == "fcm":
        assert len({e["collapse"] for e in taken}) == 1  # shown once (the same tag)
    history = await results(db, msg["message_id"])
    assert history[0]["error_class"] in ("transient", "unknown_outcome")
    if how == "reconciled: found":
        assert history[-1]["status"] == "SENT"
        assert how in history[-1]["error"]
    elif how == "unknown_outcome":
        assert (history[-1]["status"], history[-1]["error_class"]) == ("FAILED", how)


# -- network faults between the engine and an HTTP provider (Toxiproxy) -----------------------


@dataclass
class Fault:
    kind: str
    attributes: dict[str, Any]
    stream: str = "downstream"


HTTP_FAULTS = [
    pytest.param(Fault("timeout", {"timeout": 0}), id="half-open"),
    pytest.param(Fault("latency", {"latency": 2500}), id="latency-past-the-timeout"),
    pytest.param(Fault("limit_data", {"bytes": 10}), id="answer-cut"),
    pytest.param(Fault("limit_data", {"bytes": 100}, "upstream"), id="request-cut"),
    pytest.param(Fault("reset_peer", {"timeout": 0}), id="reset"),
    pytest.param(Fault("bandwidth", {"rate": 1}, "upstream"), id="bandwidth"),
]


def proxied(
    toxiproxy: Toxiproxy, fakes: DeliveryFakes, provider: str, name: str
) -> tuple[Proxy, dict[str, Any]]:
    """A proxy in front of a provider fake, and the settings that point the provider at it."""
    fake = fake_of(fakes, provider)
    proxy = toxiproxy.proxy(name, fake.url.removeprefix("http://").removeprefix("https://"))
    return proxy, {f"delivery_{provider}_url": proxy.url}


@pytest.mark.parametrize("fault", HTTP_FAULTS)
@pytest.mark.parametrize("provider", ["sendgrid", "twilio"])
@pytest.mark.usefixtures("clean")
async def test_a_network_fault_to_a_provider_that_can_be_asked_never_sends_twice(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
    provider: str,
    fault: Fault,
) -> None:
    channel = "EMAIL" if provider == "sendgrid" else "SMS"
    proxy, urls = proxied(toxiproxy, fakes, provider, f"{provider}-{fault.kind}-{fault.stream}")
    extra = {"delivery_email_providers": "sendgrid"} if provider == "sendgrid" else {}
    settings = settings_for(env, fakes, **urls, **extra)
    msg = message_for(channel, provider)
    try:
        async with running(settings, channel, publisher) as engine:
            proxy.add(fault.kind, stream=fault.stream, **fault.attributes)
            await deliver(engine, msg)
            # The first call fails or times out; while the fault lasts nothing settles
            # it for good, and the provider never gets the message twice.
            await eventually(
                lambda: _first_attempt_done(db, msg["message_id"]), "the first attempt"
            )
            assert takes(fakes, msg["message_id"]) <= 1
            proxy.clear()  # the network heals
            states = await settled(db, msg["message_id"])
    finally:
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert states[msg["message_id"]] == "sent"
    assert takes(fakes, msg["message_id"]) == 1


async def _first_attempt_done(db: asyncpg.Pool, message_id: str) -> bool:
    return bool(await results(db, message_id)) or (await state(db, message_id)) in FINAL


@pytest.mark.usefixtures("clean")
async def test_a_half_open_ses_connection_is_dead_lettered_not_resent(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    proxy, urls = proxied(toxiproxy, fakes, "ses", "ses-half-open")
    settings = settings_for(env, fakes, delivery_email_providers="ses,smtp", **urls)
    msg = message_for("EMAIL", "ses")
    try:
        async with running(settings, "EMAIL", publisher) as engine:
            proxy.add("timeout", timeout=0)  # SES takes it; its answer never comes back
            await deliver(engine, msg)
            states = await settled(db, msg["message_id"])
    finally:
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert states[msg["message_id"]] == "failed"
    assert fakes.ses.recorder.counts()[msg["message_id"]] == 1
    assert takes(fakes, msg["message_id"]) == 1, "not failed over to SMTP either"
    history = await results(db, msg["message_id"])
    assert (history[-1]["status"], history[-1]["error_class"]) == ("FAILED", "unknown_outcome")


@pytest.mark.usefixtures("clean")
async def test_an_unreachable_provider_opens_its_circuit_fails_over_and_closes_again(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    proxy, urls = proxied(toxiproxy, fakes, "sendgrid", "sendgrid-down")
    # A cool-down longer than the next message takes to reach dispatch on a loaded
    # machine: that message must find the circuit open, not already half-open.
    settings = settings_for(
        env, fakes, delivery_email_providers="sendgrid,ses", delivery_circuit_reset=6.0, **urls
    )
    try:
        async with running(settings, "EMAIL", publisher) as engine:
            sendgrid = engine.by_name["sendgrid"]
            proxy.enable(False)  # connections refused: plainly not taken, fail over at once
            first = [message_for("EMAIL", "sendgrid") for _ in range(3)]
            for msg in first:  # one by one: each failure is counted before the next call
                await deliver(engine, msg)
                await settled(db, msg["message_id"])
            assert sendgrid.breaker.state(time.monotonic()) is CircuitState.OPEN
            refused = fakes.sendgrid.recorder.requests
            second = message_for("EMAIL", "sendgrid")
            await deliver(engine, second)
            await settled(db, second["message_id"])
            assert [r["provider"] for r in await results(db, second["message_id"])] == ["ses"]
            proxy.enable(True)
            # After the cool-down, the half-open probe reaches SendGrid and closes the circuit.
            await until(lambda: sendgrid.breaker.retry_in(time.monotonic()) == 0, "the cool-down")
            third = message_for("EMAIL", "sendgrid")
            await deliver(engine, third)
            await settled(db, third["message_id"])
            assert [r["provider"] for r in await results(db, third["message_id"])] == ["sendgrid"]
            assert sendgrid.breaker.state(time.monotonic()) is CircuitState.CLOSED
    finally:
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert fakes.sendgrid.recorder.requests == refused + 1
    for msg in (*first, second, third):
        assert takes(fakes, msg["message_id"]) == 1
    assert {msg["message_id"] for msg in (*first, second)} <= fakes.ses.recorder.ids()


# -- PostgreSQL and Redis through Toxiproxy -----------------------------------------------


def pg_proxy(toxiproxy: Toxiproxy, env: TestEnv, name: str) -> tuple[Proxy, dict[str, Any]]:
    url = env.settings.database_url.get_secret_value()
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    proxy = toxiproxy.proxy(name, host_port)
    proxied_url = url.replace(f"@{host_port}/", f"@{proxy.listen}/")
    return proxy, {"database_url": type(env.settings.database_url)(proxied_url)}


def redis_proxy(toxiproxy: Toxiproxy, env: TestEnv, name: str) -> tuple[Proxy, dict[str, Any]]:
    url = env.settings.redis_url.get_secret_value()
    host_port = url.split("//", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    proxy = toxiproxy.proxy(name, host_port)
    return proxy, {
        "redis_url": type(env.settings.redis_url)(url.replace(host_port, proxy.listen, 1))
    }


@pytest.mark.usefixtures("clean")
async def test_postgresql_half_open_after_the_provider_took_the_message(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    """The provider answers, but PostgreSQL stops answering before the send is recorded:
    the statement times out (no hang), the claim lapses, and the send is reconciled
    by a lookup once PostgreSQL is back: sent, once."""
    proxy, urls = pg_proxy(toxiproxy, env, "pg-half-open")
    settings = settings_for(env, fakes, delivery_email_providers="sendgrid", **urls)
    fakes.sendgrid.faults.hang = 1.0
    fakes.sendgrid.faults.then("accept_hang")  # takes it, answers a second later
    msg = message_for("EMAIL", "sendgrid")
    try:
        async with running(settings, "EMAIL", publisher) as engine:
            await deliver(engine, msg)
            await until(lambda: fakes.sendgrid.recorder.counts()[msg["message_id"]] == 1, "taken")
            proxy.add("timeout", stream="downstream", timeout=0)
            proxy.add("timeout", stream="upstream", timeout=0)
            # The record cannot be written: the statement times out and the job gives up
            # (its claim stays until the lease lapses); nothing waits forever.
            await until(lambda: engine.inflight == 0, "the job to give up", within=60)
            assert await state(db, msg["message_id"]) == "sending"
            proxy.clear()
            states = await settled(db, msg["message_id"], within=90)
    finally:
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert states[msg["message_id"]] == "sent"
    assert takes(fakes, msg["message_id"]) == 1
    history = await results(db, msg["message_id"])
    assert "reconciled: found" in (history[-1]["error"] or "")


@pytest.mark.usefixtures("clean")
async def test_postgresql_latency_and_resets_slow_delivery_down_but_lose_and_double_nothing(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    proxy, urls = pg_proxy(toxiproxy, env, "pg-latency")
    settings = settings_for(env, fakes, delivery_email_providers="sendgrid", **urls)
    slow, reset = (
        [message_for("EMAIL", "sendgrid") for _ in range(5)],
        [message_for("EMAIL", "sendgrid") for _ in range(5)],
    )
    try:
        async with running(settings, "EMAIL", publisher) as engine:
            proxy.add("latency", stream="downstream", latency=150, jitter=50)
            await deliver(engine, *slow)
            await settled(db, *(m["message_id"] for m in slow))
            proxy.clear()
            # Each send answers a second after SendGrid took it; PostgreSQL connections
            # are reset before the answers can be recorded.
            fakes.sendgrid.faults.hang = 1.0
            fakes.sendgrid.faults.then(*["accept_hang"] * len(reset))
            lookups = fakes.sendgrid.lookups
            await deliver(engine, *reset)
            await until(
                lambda: any(fakes.sendgrid.recorder.counts()[m["message_id"]] for m in reset),
                "a send in flight",
            )
            proxy.add("reset_peer", stream="upstream", timeout=0)
            await until(lambda: engine.inflight == 0, "the jobs to give up", within=60)
            proxy.clear()
            states = await settled(db, *(m["message_id"] for m in reset), within=90)
    finally:
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert set(states.values()) == {"sent"}
    assert fakes.sendgrid.lookups > lookups, "a lost record was reconciled by a lookup"
    assert [takes(fakes, m["message_id"]) for m in slow + reset] == [1] * 10


@pytest.mark.usefixtures("clean")
async def test_a_claim_that_fails_in_postgresql_hands_the_half_open_probe_back(
    env: TestEnv,
    fakes: DeliveryFakes,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    """The half-open probe was granted, then PostgreSQL refused the claim before any
    call: the probe must go back, or the healthy provider stays unused for good."""
    settings = settings_for(env, fakes, delivery_email_providers="sendgrid,ses")
    probe_msg = message_for("EMAIL", "sendgrid")
    # One injected failure of exactly that claim (a sequence is not rolled back).
    await db.execute(
        f"""
        CREATE SEQUENCE fault_once;
        CREATE FUNCTION fail_claim_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.message_id = '{probe_msg["message_id"]}' AND NEW.state = 'sending'
             AND nextval('fault_once') = 1 THEN
            RAISE EXCEPTION 'injected: the claim fails once';
          END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER fail_claim_once BEFORE UPDATE ON deliveries
          FOR EACH ROW EXECUTE FUNCTION fail_claim_once();
        """
    )
    try:
        async with running(settings, "EMAIL", publisher) as engine:
            sendgrid = engine.by_name["sendgrid"]
            fakes.sendgrid.faults.mode = "error"
            opening = [message_for("EMAIL", "sendgrid") for _ in range(3)]
            for msg in opening:
                await deliver(engine, msg)
                await settled(db, msg["message_id"])
            assert sendgrid.breaker.state(time.monotonic()) is CircuitState.OPEN
            fakes.sendgrid.faults.reset()
            await until(lambda: sendgrid.breaker.retry_in(time.monotonic()) == 0, "half-open")
            await deliver(engine, probe_msg)
            states = await settled(db, probe_msg["message_id"])
            assert sendgrid.breaker.state(time.monotonic()) is CircuitState.CLOSED
    finally:
        await db.execute(
            "DROP TRIGGER fail_claim_once ON deliveries; DROP FUNCTION fail_claim_once(); "
            "DROP SEQUENCE fault_once;"
        )
    assert states[probe_msg["message_id"]] == "sent"
    assert [r["provider"] for r in await results(db, probe_msg["message_id"])] == ["sendgrid"]
    assert takes(fakes, probe_msg["message_id"]) == 1
    for msg in opening:
        assert takes(fakes, msg["message_id"]) == 1


@pytest.mark.usefixtures("clean")
async def test_redis_half_open_leaves_the_inbox_with_each_message_once(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    """In-app delivery when Redis takes a command but its answer never comes back: the
    command times out (no hang), the store is repeated once Redis answers again, and
    the inbox holds the message once and published it once."""
    proxy, urls = redis_proxy(toxiproxy, env, "redis-half-open")
    settings = settings_for(env, fakes, delivery_max_attempts=20, **urls)
    warm = message_for("INAPP", "inbox")
    msg = message_for("INAPP", "inbox")
    user = msg["user_id"]
    # Not connect(): its command timeout would end a quiet subscription.
    direct = aioredis.from_url(env.settings.redis_url.get_secret_value())
    pubsub = direct.pubsub()
    inbox_channel = env.settings.redis_key(f"inbox:{user}")
    await pubsub.subscribe(inbox_channel)
    published: list[bytes] = []

    async def listen() -> None:
        async for item in pubsub.listen():
            if item["type"] == "message":
                published.append(item["data"])

    listener = asyncio.create_task(listen())
    try:
        async with running(settings, "INAPP", publisher) as engine:
            # A connection that is already open when the answers stop: Redis acts on the
            # command, we never hear (a new connection would not even get through its
            # handshake, so nothing would reach Redis).
            await deliver(engine, warm)
            await settled(db, warm["message_id"])
            proxy.add("timeout", stream="downstream", timeout=0)
            await deliver(engine, msg)
            await eventually(
                lambda: _first_attempt_done(db, msg["message_id"]), "the first attempt"
            )
            await until(lambda: published, "the store went through to Redis")
            proxy.clear()
            states = await settled(db, msg["message_id"])
            await asyncio.sleep(0.5)  # a second publish would show up now
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    stored = await direct.hgetall(env.settings.redis_key(f"inbox:{{{user}}}:msgs"))
    await direct.aclose()
    assert states[msg["message_id"]] == "delivered"
    assert list(stored) == [msg["message_id"].encode()]
    assert len(published) == 1
    history = await results(db, msg["message_id"])
    assert [r["status"] for r in history][-1] == "DELIVERED"
    assert len(history) >= 2, "the first store timed out"


@pytest.mark.usefixtures("clean")
async def test_a_slow_redis_link_delays_in_app_delivery_but_doubles_nothing(
    env: TestEnv,
    fakes: DeliveryFakes,
    toxiproxy: Toxiproxy,
    publisher: KafkaPublisher,
    db: asyncpg.Pool,
) -> None:
    proxy, urls = redis_proxy(toxiproxy, env, "redis-slow")
    settings = settings_for(env, fakes, **urls)
    batch = [message_for("INAPP", "inbox") for _ in range(5)]
    try:
        async with running(settings, "INAPP", publisher) as engine:
            proxy.add("latency", stream="downstream", latency=200, jitter=100)
            proxy.add("bandwidth", stream="upstream", rate=2)
            await deliver(engine, *batch)
            states = await settled(db, *(m["message_id"] for m in batch))
    finally:
        toxiproxy.api.delete(f"/proxies/{proxy.name}")
    assert set(states.values()) == {"delivered"}
    direct = aioredis.from_url(env.settings.redis_url.get_secret_value())
    try:
        for msg in batch:
            key = env.settings.redis_key(f"inbox:{{{msg['user_id']}}}:msgs")
            assert list(await direct.hgetall(key)) == [msg["message_id"].encode()]
    finally:
        await direct.aclose()
