"""The delivery engine against real Kafka, PostgreSQL and Redis, and the provider fakes.

One engine per channel runs in this process for the whole module (as the
worker roles run them: a BatchConsumer on notify.outbound.<channel> feeding
the engine), and the tests flip the fakes' fault switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from finstream.agents.delivery import Intake
from finstream.codec import Codec
from finstream.domain.deadletter import parse_headers
from finstream.domain.resilience import RateLimiter
from finstream.domain.time import utcnow
from finstream.runtime.engine import StreamEngine
from finstream.runtime.health import HealthServer
from finstream.runtime.kafka import KafkaPublisher
from finstream.settings import Settings
from finstream.sinks.delivery import metrics as m
from finstream.sinks.delivery.base import CHANNEL_TOPICS, build_chain
from finstream.sinks.delivery.engine import Breaker, DeliveryEngine
from finstream.stores.read_models import PreferencesStore
from finstream.stores.redis import connect
from tests.fakes.delivery.kit import DeliveryFakes
from tests.support.services import TestEnv
from tests.support.waiting import until

pytestmark = pytest.mark.integration
CODEC = Codec()


@dataclass
class Rig:
    env: TestEnv
    settings: Settings
    fakes: DeliveryFakes
    pool: asyncpg.Pool
    redis: aioredis.Redis
    engines: dict[str, DeliveryEngine] = field(default_factory=dict)

    def fresh_circuits(self, reset: float | None = None) -> None:
        """Close every circuit and lift rate-limit pauses left by an earlier test
        (``reset``: the circuits' cool-down, the settings' by default)."""
        self.fakes.reset()
        for engine in self.engines.values():
            for slot in engine.slots:
                slot.breaker = Breaker(
                    failure_threshold=self.settings.delivery_circuit_failures,
                    reset_timeout=reset or self.settings.delivery_circuit_reset,
                )
                slot.limiter = RateLimiter(
                    rate=slot.provider.rate, burst=max(1.0, slot.provider.rate)
                )

    async def produce(self, channel: str, *messages: dict[str, Any]) -> None:
        records = [(msg["user_id"], msg) for msg in messages]
        await asyncio.to_thread(
            self.env.produce_records, CHANNEL_TOPICS[channel], "OutboundMessage", records
        )

    async def state(self, message_id: str) -> str | None:
        return await self.pool.fetchval(
            "SELECT state FROM deliveries WHERE message_id = $1", message_id
        )

    async def results(self, message_id: str) -> list[asyncpg.Record]:
        return list(
            await self.pool.fetch(
                "SELECT * FROM delivery_results WHERE message_id = $1 ORDER BY at, attempt",
                message_id,
            )
        )

    async def settled(self, *ids: str, within: float = 20.0) -> dict[str, str]:
        final = {"sent", "delivered", "rejected", "failed", "expired"}

        async def done() -> dict[str, str] | None:
            states = {i: await self.state(i) for i in ids}
            return states if all(s in final for s in states.values()) else None  # type: ignore[return-value]

        return await eventually(done, within, f"{ids} settled")

    async def records(
        self, name: str, schema: str | None, keep: Callable[[Any], bool], count: int
    ) -> list[Any]:
        """Wait until `count` records of a topic pass `keep` (the outbox relays after commit)."""

        async def check() -> list[Any] | None:
            found = [x for x in await self.topic(name, schema) if keep(x)]
            return found if len(found) >= count else None

        found: list[Any] = await eventually(check, 15, f"{count} records on {name}")
        return found

    async def topic(self, name: str, schema: str | None) -> list[Any]:
        msgs = await asyncio.to_thread(self.env.consume_all, name, 10.0)
        if schema is None:
            return msgs
        return [CODEC.decode(x.value(), schema) for x in msgs]


async def eventually(
    check: Callable[[], Awaitable[Any]], within: float = 20.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryFakes]:
    with DeliveryFakes(tmp_path_factory.mktemp("engine-fakes")) as f:
        yield f


@pytest.fixture(scope="module")
async def rig(env: TestEnv, fakes: DeliveryFakes) -> AsyncIterator[Rig]:
    settings = fakes.settings(
        env.settings,
        delivery_max_attempts=4,
        delivery_concurrency=8,
        delivery_twilio_rate=50.0,
    )
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(), min_size=2, max_size=40
    )
    redis = connect(settings)
    publisher = KafkaPublisher(settings, "delivery-test")
    await publisher.start()
    rig = Rig(env, settings, fakes, pool, redis)
    stop = asyncio.Event()
    tasks = []
    healths: list[HealthServer] = []
    for channel in ("EMAIL", "PUSH", "SMS", "INAPP"):
        role = f"delivery-{channel.lower()}"
        engine = DeliveryEngine(
            settings=settings,
            codec=CODEC,
            channel=channel,
            role=role,
            chain=build_chain(settings, channel),
            pool=pool,
            redis=redis,
            publisher=publisher,
        )
        rig.engines[channel] = engine
        health = HealthServer(role, "127.0.0.1", 0)
        # Readiness includes the background dependency probes (Kafka), which start with it.
        await health.start()
        healths.append(health)
        consumer = StreamEngine(
            # In pytest's own process: no freezing of the test session's heap.
            settings.model_copy(update={"stream_gc_fold_seconds": 0}),
            role,
            [CHANNEL_TOPICS[channel]],
            Intake(engine, publisher),
            health,
            guarantee="at_least_once",
            batch_size=100,
            batch_wait=0.05,
        )
        tasks.append(asyncio.create_task(consumer.run(stop)))
        tasks.append(asyncio.create_task(engine.run(stop)))
    try:
        # Consumers are assigned and reading before the first test produces.
        await eventually(lambda: _all_ready(healths), 60, "delivery consumers assigned")
        yield rig
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for health in healths:
            await health.stop()
        await publisher.stop()
        await redis.aclose()
        await pool.close()


async def _all_ready(healths: list[HealthServer]) -> bool:
    return all(h.readiness()[0] for h in healths)


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


def sms(**over: Any) -> dict[str, Any]:
    return outbound("SMS", over.pop("recipient", "+14155552671"), **over)


def email(**over: Any) -> dict[str, Any]:
    return outbound("EMAIL", over.pop("recipient", "ann@example.com"), **over)


# -- retry and failover ----------------------------------------------------------------


async def test_email_fails_over_sendgrid_to_ses_to_smtp_and_back(rig: Rig) -> None:
    # The cool-down and SES's pause outlast the second batch on a loaded machine:
    # it must find SendGrid's circuit open (one probe at most) and SES paused.
    rig.fresh_circuits(reset=5.0)
    f = rig.fakes
    f.sendgrid.faults.mode = "error"  # 503 on every call
    f.ses.faults.mode = "throttle"  # 429 TooManyRequestsException
    f.ses.faults.retry_after = 60.0
    first = [email() for _ in range(3)]
    await rig.produce("EMAIL", *first)
    states = await rig.settled(*(x["message_id"] for x in first))
    assert set(states.values()) == {"sent"}
    assert {x["message_id"] for x in first} <= f.smtp.recorder.ids()
    chains = [
        [(r["provider"], r["status"]) for r in await rig.results(x["message_id"])] for x in first
    ]
    assert all(c[-1] == ("smtp", "SENT") for c in chains)
    assert [("sendgrid", "RETRYING"), ("ses", "RETRYING"), ("smtp", "SENT")] in chains
    assert m.CIRCUIT.labels("EMAIL", "sendgrid")._value.get() == 2  # open after 3 failures

    # Next messages skip what is known broken: SendGrid's circuit is open (at
    # most one half-open probe) and SES asked for 60 s of quiet.
    sendgrid_calls, ses_calls = f.sendgrid.recorder.requests, f.ses.recorder.requests
    second = [email() for _ in range(3)]
    await rig.produce("EMAIL", *second)
    assert set((await rig.settled(*(x["message_id"] for x in second))).values()) == {"sent"}
    assert f.ses.recorder.requests == ses_calls
    assert f.sendgrid.recorder.requests - sendgrid_calls <= 1
    assert {x["message_id"] for x in second} <= f.smtp.recorder.ids()
    f.ses.faults.retry_after = 1.0

    # SendGrid recovers; after the cool-down a probe closes its circuit again.
    f.reset()
    sendgrid = rig.engines["EMAIL"].by_name["sendgrid"].breaker
    await until(lambda: sendgrid.retry_in(time.monotonic()) == 0, "SendGrid's cool-down")
    later = email()
    await rig.produce("EMAIL", later)
    await rig.settled(later["message_id"])
    assert [(r["provider"], r["status"]) for r in await rig.results(later["message_id"])] == [
        ("sendgrid", "SENT")
    ]
    assert m.CIRCUIT.labels("EMAIL", "sendgrid")._value.get() == 0


async def test_a_probe_answered_about_the_message_closes_the_circuit(rig: Rig) -> None:
    rig.fresh_circuits()
    f = rig.fakes
    f.sendgrid.faults.mode = "error"
    opening = [email() for _ in range(3)]
    await rig.produce("EMAIL", *opening)
    await rig.settled(*(x["message_id"] for x in opening))
    assert m.CIRCUIT.labels("EMAIL", "sendgrid")._value.get() == 2
    f.sendgrid.faults.reset()
    f.sendgrid.bounce_addresses.add("bounced@example.com")
    await asyncio.sleep(rig.settings.delivery_circuit_reset + 0.1)
    # The half-open probe gets a clear answer about its recipient (400 on `to`):
    # SendGrid works, so its circuit closes rather than hanging half-open.
    probe = email(recipient="bounced@example.com")
    await rig.produce("EMAIL", probe)
    assert (await rig.settled(probe["message_id"]))[probe["message_id"]] == "rejected"
    assert m.CIRCUIT.labels("EMAIL", "sendgrid")._value.get() == 0
    after = email()
    await rig.produce("EMAIL", after)
    await rig.settled(after["message_id"])
    assert [(r["provider"], r["status"]) for r in await rig.results(after["message_id"])] == [
        ("sendgrid", "SENT")
    ]


async def test_throttling_pauses_the_provider_and_honours_retry_after(rig: Rig) -> None:
    rig.fresh_circuits()
    f = rig.fakes
    f.twilio.faults.retry_after = 1.0
    f.twilio.faults.then("throttle", "error")
    slow = sms(body_text=f"slow {uuid.uuid4()}")
    await rig.produce("SMS", slow)
    await rig.settled(slow["message_id"])
    results = await rig.results(slow["message_id"])
    assert [(r["status"], r["error_class"]) for r in results] == [
        ("RETRYING", "throttled"),
        ("RETRYING", "transient"),
        ("SENT", None),
    ]
    # The 429 said Retry-After: 1; the next call came no earlier.
    assert (results[1]["at"] - results[0]["at"]).total_seconds() >= 0.95
    assert f.twilio.recorder.counts()[slow["message_id"]] == 1


async def test_a_waiting_retry_does_not_block_the_partition(rig: Rig) -> None:
    rig.fresh_circuits()
    f = rig.fakes
    # Long enough that the later messages are produced, taken and sent before the
    # retry on a loaded machine: the test proves they did not wait for it.
    f.fcm.faults.retry_after = 8.0
    f.fcm.faults.then("error")  # 503 UNAVAILABLE with Retry-After: 8
    user = f"u-{uuid.uuid4().hex[:8]}"  # one key: one partition
    slow = outbound("PUSH", "fcm-slow", platform="FCM", user_id=user)
    await rig.produce("PUSH", slow)
    await eventually(lambda: rig.results(slow["message_id"]), 10, "the first attempt")
    quick = [outbound("PUSH", f"fcm-quick-{i}", platform="FCM", user_id=user) for i in range(3)]
    await rig.produce("PUSH", *quick)
    await rig.settled(slow["message_id"], *(x["message_id"] for x in quick))
    f.fcm.faults.retry_after = 1.0
    results = await rig.results(slow["message_id"])
    assert [(r["status"], r["error_class"]) for r in results] == [
        ("RETRYING", "transient"),
        ("SENT", None),
    ]
    assert (results[1]["at"] - results[0]["at"]).total_seconds() >= 7.95
    # The later messages of the same partition went out while `slow` waited.
    for q in quick:
        sent = await rig.results(q["message_id"])
        assert [r["status"] for r in sent] == ["SENT"]
        assert sent[0]["at"] < results[1]["at"]


async def test_push_goes_to_each_platforms_provider_and_retries(rig: Rig) -> None:
    rig.fresh_circuits()
    f = rig.fakes
    f.fcm.faults.then("error")  # 503 UNAVAILABLE once
    f.apns.faults.then("throttle")  # 429 once
    android = outbound("PUSH", "fcm-device-1", platform="FCM")
    ios = outbound("PUSH", "c3" * 32, platform="APNS")
    await rig.produce("PUSH", android, ios)
    assert set((await rig.settled(android["message_id"], ios["message_id"])).values()) == {"sent"}
    assert f.fcm.recorder.counts()[android["message_id"]] == 1
    assert f.apns.recorder.counts()[ios["message_id"]] == 1
    for msg, provider in ((android, "fcm"), (ios, "apns")):
        assert [(r["provider"], r["status"]) for r in await rig.results(msg["message_id"])] == [
            (provider, "RETRYING"),
            (provider, "SENT"),
        ]


class GrantLog(RateLimiter):
    """The limiter, noting the dispatcher's clock at each call it lets through."""

    grants: list[float]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.grants = []

    def try_acquire(self, now: float) -> bool:
        granted = super().try_acquire(now)
        if granted:
            self.grants.append(now)
        return granted


async def test_per_provider_rate_limit_spreads_calls(rig: Rig) -> None:
    rig.fresh_circuits()
    engine = rig.engines["SMS"]
    slot = engine.slots[0]
    limiter = GrantLog(rate=5.0, burst=5.0)
    slot.limiter = limiter
    deferred = m.DEFERRED.labels("SMS")._value.get()
    batch = [sms(body_text=f"rate {i} {uuid.uuid4()}") for i in range(15)]
    await rig.produce("SMS", *batch)
    await rig.settled(*(x["message_id"] for x in batch))
    ids = {x["message_id"] for x in batch}
    assert sum(n for mid, n in rig.fakes.twilio.recorder.counts().items() if mid in ids) == 15
    # 5 at once (the burst), then 5 per second: by the dispatcher's own clock
    # any 15 calls let through span at least 2 seconds. (The rows' recorded
    # times do not show it: a loaded machine can record the first ones late.)
    assert len(limiter.grants) >= 15
    assert limiter.grants[14] - limiter.grants[0] >= 2.0 - 1e-6
    # Waiting for the limiter parked messages without spending their attempts.
    assert m.DEFERRED.labels("SMS")._value.get() > deferred
    assert (
        await rig.pool.fetchval(
            "SELECT max(attempts) FROM deliveries WHERE message_id = ANY($1::text[])", list(ids)
        )
        == 1
    )
    slot.limiter = RateLimiter(rate=slot.provider.rate, burst=slot.provider.rate)


# -- giving up, expiry, dead letters ---------------------------------------------------------


async def test_gives_up_after_the_last_attempt_with_the_whole_story(rig: Rig) -> None:
    rig.fresh_circuits()
    rig.fakes.twilio.faults.mode = "error"
    doomed = sms(body_text=f"doomed {uuid.uuid4()}")
    await rig.produce("SMS", doomed)
    states = await rig.settled(doomed["message_id"], within=20)
    rig.fakes.twilio.faults.reset()
    assert states[doomed["message_id"]] == "failed"
    results = await rig.results(doomed["message_id"])
    assert [r["status"] for r in results] == ["RETRYING", "RETRYING", "RETRYING", "FAILED"]
    letters = await rig.records("dlq", None, lambda x: x.key() == doomed["user_id"].encode(), 1)
    assert len(letters) == 1
    info = parse_headers(letters[0].headers())
    assert info["dlq.source.topic"] == rig.settings.topic("notify.outbound.sms")
    assert info["dlq.attempts"] == "4"
    assert info["dlq.error.class"] == "transient"
    reason = info["dlq.error.message"]
    assert reason.startswith("failed: gave up after 4 attempts")
    assert reason.count("twilio") == 4
    assert CODEC.decode(letters[0].value(), "OutboundMessage")["message_id"] == doomed["message_id"]


async def test_expired_messages_are_not_sent(rig: Rig) -> None:
    rig.fresh_circuits()
    before = rig.fakes.twilio.recorder.requests
    stale = sms(expires_at=utcnow() - timedelta(seconds=5))
    await rig.produce("SMS", stale)
    assert (await rig.settled(stale["message_id"]))[stale["message_id"]] == "expired"
    assert rig.fakes.twilio.recorder.requests == before
    assert [r["status"] for r in await rig.results(stale["message_id"])] == ["EXPIRED"]


async def test_invalid_and_undecodable_input_is_dead_lettered(rig: Rig) -> None:
    rig.fresh_circuits()
    before = rig.fakes.sendgrid.recorder.requests
    bad = email(recipient="not-an-address")
    await rig.produce("EMAIL", bad)
    await asyncio.to_thread(
        rig.env.produce, CHANNEL_TOPICS["EMAIL"], [(b"u-garbage", b"\x00 not avro")]
    )
    assert (await rig.settled(bad["message_id"]))[bad["message_id"]] == "rejected"
    assert rig.fakes.sendgrid.recorder.requests == before

    async def both() -> list[Any] | None:
        letters = [
            x
            for x in await rig.topic("dlq", None)
            if x.key() in (b"u-garbage", bad["user_id"].encode())
        ]
        return letters if len(letters) == 2 else None

    letters = await eventually(both, 15, "two dead letters")
    classes = {x.key(): parse_headers(x.headers())["dlq.error.class"] for x in letters}
    assert classes == {b"u-garbage": "DecodeError", bad["user_id"].encode(): "invalid_recipient"}


# -- feedback ----------------------------------------------------------------------------------


async def test_unregistered_tokens_and_opt_outs_are_named_in_results_for_the_feedback_role(
    rig: Rig,
) -> None:
    """The worker says what a refusal means for the recipient; it changes no preferences
    itself (the feedback role does, under the user's lock: tests/e2e/test_feedback_suppression.py)."""
    rig.fresh_circuits()
    f = rig.fakes
    user = f"u-{uuid.uuid4().hex[:8]}"
    apns_token = "d4" * 32
    f.fcm.unregistered.add("fcm-dead")
    f.apns.unregistered.add(apns_token)
    f.twilio.opted_out.add("+14155552699")
    a = outbound("PUSH", "fcm-dead", platform="FCM", user_id=user)
    b = outbound("PUSH", apns_token, platform="APNS", user_id=user)
    c = sms(recipient="+14155552699", user_id=user)
    alive = outbound("PUSH", "fcm-alive", platform="FCM", user_id=user)
    await rig.produce("PUSH", a, b, alive)
    await rig.produce("SMS", c)
    states = await rig.settled(a["message_id"], b["message_id"], c["message_id"])
    assert set(states.values()) == {"rejected"}
    assert (await rig.settled(alive["message_id"]))[alive["message_id"]] == "sent"

    results = await rig.records(
        "notify.delivery", "DeliveryResult", lambda r: r["user_id"] == user, 4
    )
    classes = {r["message_id"]: (r["status"], r["error_class"]) for r in results}
    assert classes == {
        a["message_id"]: ("REJECTED", "token_invalid"),
        b["message_id"]: ("REJECTED", "token_invalid"),
        c["message_id"]: ("REJECTED", "opted_out"),
        alive["message_id"]: ("SENT", None),
    }
    # The results (and the audit of each refusal) are out; no preferences record is.
    await rig.records(
        "audit.events",
        "AuditEvent",
        lambda e: e["user_id"] == user and e["action"] == "delivery_rejected",
        3,
    )
    mine = [p for p in await rig.topic("notify.preferences", None) if p.key() == user.encode()]
    assert mine == []
    assert await PreferencesStore(rig.redis, rig.settings, CODEC).get(user) is None


# -- never twice -------------------------------------------------------------------------------------


async def test_redelivered_messages_are_never_sent_twice(rig: Rig) -> None:
    rig.fresh_circuits()
    msg = email()
    await rig.produce("EMAIL", msg, msg)  # the same message twice in one batch
    await rig.settled(msg["message_id"])

    def duplicates(n: int) -> Callable[[], Awaitable[list[asyncpg.Record] | None]]:
        async def check() -> list[asyncpg.Record] | None:
            rows = [r for r in await rig.results(msg["message_id"]) if r["status"] == "DUPLICATE"]
            return rows if len(rows) == n else None

        return check

    # Redis learns the final state after PostgreSQL (the relay loop writes the
    # markers in batches): the next copy is Redis's to recognise once it has.
    key = rig.settings.redis_key(f"dlv:{msg['message_id']}")

    async def marked_final() -> bool:
        return (await rig.redis.get(key)) not in (None, b"claimed")

    await eventually(marked_final, 30, "the final state's marker in Redis")
    await rig.produce("EMAIL", msg)  # and again later: Redis knows it
    await eventually(duplicates(2), 15, "two DUPLICATE results")
    await rig.redis.delete(key)
    await rig.produce("EMAIL", msg)  # and with Redis forgetting it: PostgreSQL knows it
    dupes = await eventually(duplicates(3), 15, "three DUPLICATE results")
    sources = sorted(
        r["error"].split("recognized by ", 1)[1].split(":")[0].rstrip(")") for r in dupes
    )
    assert sources == ["batch", "postgres", "redis"]
    total = sum(fake.recorder.counts()[msg["message_id"]] for fake in rig.fakes.all)
    assert total == 1


async def test_ambiguous_sendgrid_send_is_looked_up_not_resent(rig: Rig) -> None:
    rig.fresh_circuits()
    f = rig.fakes
    f.sendgrid.faults.hang = 2.0
    f.sendgrid.faults.then("accept_hang")
    lookups = f.sendgrid.lookups
    msg = email()
    await rig.produce("EMAIL", msg)
    await rig.settled(msg["message_id"])
    results = await rig.results(msg["message_id"])
    assert [(r["provider"], r["status"], r["error_class"]) for r in results] == [
        ("sendgrid", "RETRYING", "transient"),
        ("sendgrid", "SENT", None),
    ]
    assert "reconciled: found" in results[-1]["error"]
    assert f.sendgrid.lookups > lookups
    assert f.sendgrid.recorder.counts()[msg["message_id"]] == 1
    assert msg["message_id"] not in f.ses.recorder.ids() | f.smtp.recorder.ids()


async def test_ambiguous_ses_send_is_dead_lettered_not_resent(rig: Rig) -> None:
    rig.fresh_circuits()
    f = rig.fakes
    f.sendgrid.faults.mode = "auth"  # SendGrid refuses our key: fail over to SES
    f.ses.faults.hang = 2.0
    f.ses.faults.then("accept_hang")
    msg = email()
    await rig.produce("EMAIL", msg)
    states = await rig.settled(msg["message_id"])
    f.reset()
    assert states[msg["message_id"]] == "failed"
    results = await rig.results(msg["message_id"])
    assert [(r["provider"], r["status"]) for r in results] == [
        ("sendgrid", "RETRYING"),
        ("ses", "FAILED"),
    ]
    assert results[-1]["error_class"] == "unknown_outcome"
    assert f.ses.recorder.counts()[msg["message_id"]] == 1
    assert msg["message_id"] not in f.smtp.recorder.ids()


async def test_claimed_but_unrecorded_sends_are_reconciled(rig: Rig) -> None:
    """The crash window: a worker died between the provider's answer and the record."""
    rig.fresh_circuits()
    f = rig.fakes
    engine = rig.engines["SMS"]
    twilio = engine.slots[0].provider
    accepted, lost = (
        sms(body_text=f"accepted {uuid.uuid4()}"),
        sms(body_text=f"lost {uuid.uuid4()}"),
    )
    await twilio.send(accepted)  # Twilio has it; our record never happened
    for msg in (accepted, lost):
        await rig.pool.execute(
            """INSERT INTO deliveries (message_id, channel, user_id, request_id, state, attempts,
                   provider, claim_token, lease_until, sending_at, deadline, source_topic,
                   source_partition, source_offset, message)
               VALUES ($1, 'SMS', $2, $3, 'sending', 1, 'twilio', $4, now() - interval '1 second',
                   now() - interval '5 seconds', now() + interval '1 hour', $5, 0, 0, $6)""",
            msg["message_id"],
            msg["user_id"],
            msg["request_id"],
            uuid.uuid4(),
            rig.settings.topic("notify.outbound.sms"),
            CODEC.encode("OutboundMessage", msg),
        )
    states = await rig.settled(accepted["message_id"], lost["message_id"])
    assert set(states.values()) == {"sent"}
    counts = f.twilio.recorder.counts()
    assert counts[accepted["message_id"]] == 1  # found by the lookup, not resent
    assert counts[lost["message_id"]] == 1  # provably not sent: sent now, once
    found = await rig.results(accepted["message_id"])
    assert "reconciled: found" in found[-1]["error"]


# -- in-app ------------------------------------------------------------------------------------------


async def test_inapp_messages_land_in_the_inbox_and_on_the_live_channel(rig: Rig) -> None:
    rig.fresh_circuits()
    user = f"u-{uuid.uuid4().hex[:8]}"
    engine = rig.engines["INAPP"]
    inbox = engine.slots[0].provider.inbox  # type: ignore[attr-defined]
    pubsub = rig.redis.pubsub()
    await pubsub.subscribe(inbox.channel(user))
    msg = outbound("INAPP", user, user_id=user)
    await rig.produce("INAPP", msg)
    assert (await rig.settled(msg["message_id"]))[msg["message_id"]] == "delivered"
    live = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            while live is None:
                got = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                live = got
    await pubsub.aclose()
    assert live is not None
    assert msg["message_id"] in live["data"].decode()
    page = await inbox.page(user)
    assert [x["message_id"] for x in page.messages] == [msg["message_id"]]
    assert page.unread == 1
    results = await rig.records(
        "notify.delivery", "DeliveryResult", lambda r: r["message_id"] == msg["message_id"], 1
    )
    assert [(r["provider"], r["status"]) for r in results] == [("redis-inbox", "DELIVERED")]


# -- operator: dlq list / show / redrive ---------------------------------------------------------------


def cli(rig: Rig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finstream.cli", "dlq", *args],
        env=rig.env.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_dlq_redrive_sends_a_failed_message_once(rig: Rig) -> None:
    rig.fresh_circuits()
    rig.fakes.twilio.faults.mode = "error"
    msg = sms(body_text=f"redrive me {uuid.uuid4()}")
    await rig.produce("SMS", msg)
    await rig.settled(msg["message_id"])
    rig.fakes.twilio.faults.reset()
    # The outbox relays the dead letter after the final row commits.
    await rig.records("dlq", None, lambda x: x.key() == msg["user_id"].encode(), 1)
    listing = await asyncio.to_thread(cli, rig, "list", "--source-topic", "notify.outbound.sms")
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if "redrive" not in x and "gave up" in x)
    refs = [
        x.split()[0]
        for x in listing.stdout.splitlines()
        if x[:1].isdigit() and "gave up after 4" in x
    ]
    assert line
    shown = None
    for ref in refs:
        out = await asyncio.to_thread(cli, rig, "show", ref)
        if msg["message_id"] in out.stdout:
            shown = (ref, out.stdout)
    assert shown is not None, refs
    ref, text = shown
    assert "#4 twilio FAILED" in text
    # The dead letter holds the message sealed under the user's key (issue 14) ...
    assert "+14155552671" not in text
    # ... which an operator opens on purpose (and the reveal is audited).
    revealed = await asyncio.to_thread(cli, rig, "show", "--reveal", ref)
    assert revealed.returncode == 0, revealed.stderr
    assert '"recipient": "+14155552671"' in revealed.stdout

    first = await asyncio.to_thread(cli, rig, "redrive", ref)
    assert first.returncode == 0, first.stderr
    assert "1 redriven" in first.stdout
    await eventually(lambda: _is(rig.state(msg["message_id"]), "sent"), 15, "redriven message sent")
    second = await asyncio.to_thread(cli, rig, "redrive", ref)
    assert "already delivered" in second.stdout
    assert "0 redriven" in second.stdout
    await asyncio.sleep(0.5)
    assert rig.fakes.twilio.recorder.counts()[msg["message_id"]] == 1


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected
