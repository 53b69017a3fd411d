"""Kafka clients of every role: one place for their configuration, one publisher.

Every Kafka client of finstream is confluent-kafka (librdkafka): the stream
engine's transactional producer and consumers (:mod:`finstream.runtime.engine`),
the publisher of service roles (connectors, the API, the CLI) and the admin
client. Their configuration starts from :func:`client_config`, so connection
and security settings apply to all of them alike.

Producers partition keyed records with ``murmur2_random``: Kafka's default
(Java client's) partitioner, so a user's or a symbol's records meet on the
same partition whoever wrote them (see :func:`finstream.topics.key_partition`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from finstream.domain.deadletter import DeadLetter
from finstream.domain.time import utcnow
from finstream.runtime.logging import CORRELATION_HEADER, get_logger
from finstream.runtime.metrics import DEAD_LETTERS, EVENTS_FAILED, EVENTS_OUT
from finstream.settings import Settings

log = get_logger(__name__)

Headers = Sequence[tuple[str, bytes]]


def client_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """What every client (producer, consumer, admin) needs to reach the cluster:
    the bootstrap servers and the security settings (TLS, SASL, mTLS)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        # librdkafka logs through its own channel; warnings and errors only.
        "log_level": 4,
        **security_config(settings),
    }
    config.update(overrides)
    return config


def security_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's security properties for the FINSTREAM_KAFKA_* security settings."""
    protocol = settings.kafka_security_protocol
    config: dict[str, Any] = {"security.protocol": protocol.lower()}
    if protocol.startswith("SASL_"):
        assert settings.kafka_sasl_password is not None  # Settings checks it
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if protocol.endswith("SSL"):
        # Without a CA file librdkafka trusts the system's CA store (a public CA).
        if settings.kafka_ssl_ca_file is not None:
            config["ssl.ca.location"] = str(settings.kafka_ssl_ca_file)
        if settings.kafka_ssl_cert_file is not None:
            config["ssl.certificate.location"] = str(settings.kafka_ssl_cert_file)
            config["ssl.key.location"] = str(settings.kafka_ssl_key_file)
        if settings.kafka_ssl_key_password is not None:
            config["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if settings.kafka_ssl_verify_hostname else "none"
        )
    return config


def describe_cluster(settings: Settings) -> str:
    """Where and as whom clients connect, for error messages (never the password)."""
    who = ""
    if settings.kafka_security_protocol.startswith("SASL_"):
        who = f" as {settings.kafka_sasl_username!r} ({settings.kafka_sasl_mechanism})"
    elif settings.kafka_ssl_cert_file is not None:
        who = f" with the client certificate {settings.kafka_ssl_cert_file}"
    return f"Kafka at {settings.kafka_bootstrap} over {settings.kafka_security_protocol}{who}"


class KafkaAccessError(RuntimeError):
    """Kafka refused us: credentials, certificates or TLS. Retrying will not help."""


# librdkafka error codes that say the configuration is wrong, not the network.
_ACCESS_ERRORS = {
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


def access_problem(error: KafkaError) -> bool:
    if error.code() in _ACCESS_ERRORS:
        return True
    # Under TLS 1.3 a broker refuses a client certificate after the handshake:
    # librdkafka sees a transport error carrying the TLS alert.
    return error.code() == KafkaError._TRANSPORT and "SSL routines" in error.str()


def check_access(settings: Settings, timeout: float = 15.0) -> str | None:
    """One line saying why Kafka refuses our credentials or certificates, else None.

    A reachable broker that rejects the client fails the same way on every
    retry, so roles and commands check this first and stop with the reason;
    an unreachable one (a rolling restart, a network blip) is None: clients
    keep retrying as they always do.
    """
    import time

    from confluent_kafka.admin import AdminClient

    refused: list[KafkaError] = []
    others: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        (refused if access_problem(error) else others).append(error)

    try:
        admin = AdminClient(
            client_config(settings, log_level=0, error_cb=on_error, **{"socket.timeout.ms": 10_000})
        )
    except KafkaException as exc:
        # librdkafka checks the files it is given at once (a missing CA bundle, a bad key).
        return f"{describe_cluster(settings)}: invalid client configuration: {exc.args[0]}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return None
        except KafkaException as exc:
            error = kafka_error(exc)
            if error is not None and access_problem(error):
                refused.append(error)
        admin.poll(0.1)  # serves error_cb
        if refused:
            break
        if any(e.code() == KafkaError._ALL_BROKERS_DOWN for e in others):
            return None  # unreachable, not refused: the clients' own retries apply
    if refused:
        return f"{describe_cluster(settings)} refused the connection: {refused[0].str()}"
    return None


def producer_config(settings: Settings, transactional_id: str | None = None) -> dict[str, Any]:
    config = {
        **client_config(settings),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": settings.kafka_linger_ms,
        "batch.size": 512 * 1024,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": 120_000,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
        # A SIGKILLed worker's open transaction blocks read_committed readers
        # (and the next owner's offset fetch) until the broker aborts it; Kafka
        # Streams uses 10 s for the same reason. A restarted worker with the same
        # instance id aborts it at once (init_transactions).
        config["transaction.timeout.ms"] = settings.stream_transaction_timeout_ms
        # librdkafka requires a message to time out within its transaction.
        config["message.timeout.ms"] = settings.stream_transaction_timeout_ms
    return config


def consumer_config(settings: Settings, group: str | None) -> dict[str, Any]:
    config = {
        **client_config(settings),
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": int(settings.consumer_session_timeout * 1000),
        # Kafka's guidance: heartbeat at most a third of the session timeout.
        "heartbeat.interval.ms": int(settings.consumer_session_timeout * 1000 / 10),
        "max.poll.interval.ms": 300_000,
        # The broker answers a fetch as soon as one byte is there; this bounds
        # the wait when there is nothing, which is what an idle partition costs.
        "fetch.wait.max.ms": 100,
    }
    if group is not None:
        config["group.id"] = group
    else:
        config["group.id"] = "finstream-unused"  # librdkafka wants one even without a group
    return config


def kafka_error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


class Publisher(Protocol):
    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        """Queue a message; it is durable after :meth:`flush` returns."""

    async def flush(self) -> None: ...


@dataclass(frozen=True)
class Delivered:
    topic: str
    partition: int
    offset: int


class DeliveryError(RuntimeError):
    """The broker did not take a message (after the producer's own retries)."""


class KafkaPublisher:
    """An idempotent producer for asyncio code (service roles, the API, the CLI).

    librdkafka sends in its own threads; a poller thread serves delivery
    reports and hands them to the event loop in bulk, so a send costs no
    round trip and :meth:`flush` waits only for what was sent before it.
    """

    def __init__(self, settings: Settings, role: str) -> None:
        self.role = role
        self._producer = Producer(producer_config(settings))
        self._pending: list[asyncio.Future[Delivered]] = []
        self._reports: collections.deque[tuple[asyncio.Future[Delivered], Any, Any]] = (
            collections.deque()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._poll, name=f"{self.role}-producer", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        try:
            await self.flush()
        finally:
            self._stopping.set()
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join, 10)
                self._thread = None
            await asyncio.to_thread(self._producer.flush, 10)

    def _poll(self) -> None:
        while not self._stopping.is_set():
            if self._producer.poll(0.05) and self._reports and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while self._reports:
            fut, err, msg = self._reports.popleft()
            if fut.done():
                continue
            if err is not None:
                fut.set_exception(DeliveryError(f"{msg.topic()}: {err}"))
            else:
                fut.set_result(Delivered(msg.topic(), msg.partition(), msg.offset()))

    def _submit(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        partition: int | None,
    ) -> asyncio.Future[Delivered]:
        assert self._loop is not None, "KafkaPublisher.start() was not awaited"
        fut: asyncio.Future[Delivered] = self._loop.create_future()
        reports = self._reports

        def report(err: Any, msg: Any) -> None:
            reports.append((fut, err, msg))

        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": report}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                # The local queue is full: let librdkafka send some first.
                self._producer.poll(0.1)
        EVENTS_OUT.labels(self.role, topic).inc()
        return fut

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers = (),
        partition: int | None = None,
    ) -> None:
        self._pending.append(self._submit(topic, key, value, headers, partition))

    async def send_and_wait(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers = ()
    ) -> Delivered:
        """Send one message and wait for the broker's acknowledgement."""
        return await self._submit(topic, key, value, headers, None)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        for fut in pending:
            # Raises if the broker refused the message: the caller must not commit.
            await fut


class DeadLetters:
    """Builds dead letters for the dlq topic and moves the counters."""

    def __init__(self, publisher: Publisher | None, settings: Settings, role: str) -> None:
        self._publisher = publisher
        self.topic = settings.topic("dlq")
        self._role = role

    def letter(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: BaseException | str,
        error_class: str | None = None,
        headers: Headers = (),
        attempts: int | None = None,
    ) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]:
        """The dlq record (key, value, headers) for one failed message; counts it."""
        if isinstance(error, BaseException):
            error_class = error_class or type(error).__name__
            reason = str(error) or type(error).__name__
        else:
            error_class = error_class or "Error"
            reason = error
        letter = DeadLetter(
            source_topic=source_topic,
            source_partition=partition,
            source_offset=offset,
            error_class=error_class,
            reason=reason,
            role=self._role,
            at=utcnow(),
            key=key,
            value=value,
            original_headers=tuple((k, bytes(v or b"")) for k, v in headers),
            attempts=attempts,
        )
        DEAD_LETTERS.labels(self._role, source_topic, error_class).inc()
        EVENTS_FAILED.labels(self._role, source_topic, error_class).inc()
        log.warning(
            "dead letter",
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            error_class=error_class,
            reason=reason[:300],
        )
        return key, value, letter.headers()

    async def send(
        self,
        *,
        source_topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: BaseException | str,
        error_class: str | None = None,
        headers: Headers = (),
        attempts: int | None = None,
    ) -> None:
        assert self._publisher is not None, "DeadLetters without a publisher cannot send"
        k, v, h = self.letter(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            error=error,
            error_class=error_class,
            headers=headers,
            attempts=attempts,
        )
        await self._publisher.send(self.topic, k, v, h)

    async def send_message(
        self,
        message: Any,
        error: BaseException | str,
        *,
        error_class: str | None = None,
        attempts: int | None = None,
    ) -> None:
        """Dead-letter a consumed record (anything with topic/partition/offset/key/value/headers)."""
        await self.send(
            source_topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            error=error,
            error_class=error_class,
            headers=message_header_pairs(message.headers),
            attempts=attempts,
        )


def message_header_pairs(headers: Any) -> list[tuple[str, bytes]]:
    """Headers of a consumed record as (name, bytes) pairs."""
    pairs = headers.items() if isinstance(headers, dict) else (headers or ())
    return [(k, v.encode() if isinstance(v, str) else bytes(v or b"")) for k, v in pairs]


def correlation_header(correlation_id: str | None) -> list[tuple[str, bytes]]:
    return [(CORRELATION_HEADER, correlation_id.encode())] if correlation_id else []
