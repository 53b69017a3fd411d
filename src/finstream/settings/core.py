"""The general settings, the services (Kafka and its security, PostgreSQL, Redis),
the local stack and the worker runtime (the stream engine, readiness)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from finstream.settings.common import absolute, default_stack_dir


class CoreSettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- general -------------------------------------------------------------
    env: str = "dev"
    namespace: str = Field(
        default="",
        description="Prefix for topics, consumer groups, Redis keys and app ids.",
        pattern=r"^[a-zA-Z0-9._-]*$",
    )
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"

    # -- services --------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_socket_timeout_ms: int = Field(
        default=60_000,
        ge=1000,
        description="A Kafka request not answered within this fails and its connection is "
        "dropped (librdkafka socket.timeout.ms): how long a half-open broker connection holds "
        "a client.",
    )
    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent-compatible registry; when set, events use the Confluent "
        "wire format instead of Avro single-object encoding.",
    )
    # -- Kafka security (issue 15): every client, via runtime/kafka.py client_config.
    # Strimzi's conventions: a SCRAM-SHA-512 KafkaUser's Secret holds `password`;
    # a TLS KafkaUser's holds user.crt/user.key; the cluster CA is ca.crt of
    # <cluster>-cluster-ca-cert (deploy/README.md, Securing Kafka).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description="PLAINTEXT locally; SASL_SSL (or SSL with a client certificate) in production.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="SCRAM-SHA-512", description="SASL mechanism (Strimzi's KafkaUsers: SCRAM-SHA-512)."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user (KafkaUser name).")
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle the brokers' certificates chain to (default: system).",
    )
    kafka_ssl_cert_file: Path | None = Field(
        default=None, description="PEM client certificate for mutual TLS (user.crt)."
    )
    kafka_ssl_key_file: Path | None = Field(
        default=None, description="PEM private key of the client certificate (user.key)."
    )
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_verify_hostname: bool = Field(
        default=True, description="Check that a broker's certificate names the host dialled."
    )
    database_url: SecretStr = SecretStr("postgresql://finstream:finstream@127.0.0.1:5432/finstream")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # A connection whose peer vanished without a reset (a half-open connection:
    # bytes stop flowing, the socket stays open) would otherwise wait forever.
    pg_connect_timeout: float = Field(
        default=10.0, gt=0, description="Seconds to open a PostgreSQL connection."
    )
    pg_command_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a PostgreSQL statement may take before it fails (and its "
        "connection is dropped).",
    )
    redis_socket_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds to connect to Redis, and for a Redis command to answer.",
    )
    redis_repair_check_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often roles that keep copies in Redis (quote cache, bars, read "
        "models, inboxes) check that Redis still holds them, and repair what it lost.",
    )
    prefs_apply_wait: float = Field(
        default=3.0,
        gt=0,
        # A change may wait twice (for the version before it, then for its own)
        # under the writers' 10 s lock.
        le=4,
        description="How long a change of a user's preferences (API, `finstream prefs set`, "
        "the feedback role) waits for the statestore role, the read model's only writer, to "
        "apply it. Past it the API answers 202, and the user's next change waits for it "
        "(409 while it is not applied).",
    )

    # -- local stack (finstream stack up) ----------------------------------------
    stack_dir: Path = Field(default_factory=default_stack_dir)
    kafka_version: str = "4.1.1"
    kafka_controller_port: int = 9093
    kafka_heap: str = "1g"
    stack_start_timeout: float = 90.0

    # -- worker runtime ------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8081, description="Health and metrics port of a worker.")
    # The stream engine (finstream.runtime.engine) under every consuming role.
    # Latency against throughput: a transaction (exactly-once roles) or an
    # offset commit (sinks) every commit_interval seconds. Outputs of
    # exactly-once roles become visible to read_committed consumers only at
    # that commit, so it bounds their latency; a longer interval amortizes the
    # commit (a few milliseconds on a local broker) over more records. Batches
    # are at most stream_batch_size records, waiting at most
    # stream_batch_wait_ms to fill: a partial batch is processed as soon as
    # the wait is over, so the wait bounds the latency added at low rates.
    commit_interval: float = Field(
        default=0.1, gt=0, description="Seconds between commits (transactions) of stream roles."
    )
    # A worker that has caught up (its last batch did not fill) commits right
    # after it, not at the next interval: read_committed readers see outputs
    # without the interval's wait, at the cost of more (smaller) transactions
    # while the load is light. Behind (full batches), commit_interval applies.
    commit_when_caught_up: bool = Field(
        default=True, description="Commit after a batch that did not fill, not at the interval."
    )
    stream_batch_size: int = Field(default=5000, gt=0, description="Records per batch, at most.")
    stream_batch_wait_ms: int = Field(
        default=20, ge=0, description="Longest wait for a batch to fill."
    )
    # How a stream role's consumer fetches: the broker holds a fetch until
    # stream_fetch_min_bytes are there or stream_fetch_wait_ms pass. With one
    # byte, as elsewhere, a steady feed is fetched a few records at a time,
    # one request per producer batch; on the bench's 2-core machine at 5,000
    # ticks/s that cost the broker a third more CPU and doubled the quotes
    # role's p99 (bench/RESULTS.md). The wait is latency added at low rates
    # and how often an idle role asks.
    stream_fetch_min_bytes: int = Field(
        default=64 * 1024, ge=1, description="Bytes a fetch waits for (up to the fetch wait)."
    )
    stream_fetch_wait_ms: int = Field(
        default=20, ge=1, description="Longest time the broker holds a fetch for more bytes."
    )
    stream_transaction_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="How long the broker keeps a dead worker's open transaction before aborting it.",
    )
    # Garbage collection under a stateful role (finstream.runtime.heap): what
    # survives is frozen out of the collector's walks, folded in at most every
    # stream_gc_fold_seconds (0: the interpreter's defaults, nothing frozen);
    # cycles among frozen objects that died since are freed every
    # stream_gc_reclaim_seconds, by one walk of the whole heap.
    stream_gc_fold_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds between folds of surviving objects into the frozen set (0: off).",
    )
    stream_gc_reclaim_seconds: float = Field(
        default=600.0,
        ge=0,
        description="Seconds between full collections of the frozen set (0: never).",
    )
    instance_id: str | None = Field(
        default=None,
        pattern=r"^[a-zA-Z0-9._-]+$",
        description="Stable identity of this replica (the pod name): its transactional id is "
        "<group>-<instance_id>, so a restarted replica fences its predecessor at once. "
        "Unique per live replica; unset, a random id per process.",
    )
    kafka_linger_ms: float = Field(
        default=5.0, ge=0, description="Producers wait this long to batch records."
    )
    consumer_session_timeout: float = Field(
        default=30.0,
        ge=6.0,
        description="Seconds before a silent consumer loses its partitions; "
        "the broker's group.min.session.timeout.ms is 6 s.",
    )
    internal_topic_replication: int = Field(
        default=1, description="Replication of the stream roles' changelog topics."
    )
    # Readiness (/readyz) tells the truth: every worker probes what it cannot
    # work without (Kafka; PostgreSQL and Redis where the role writes to them)
    # in the background, and a consuming role that commits no progress while
    # records wait for it reports itself stalled (and
    # finstream_stream_stalled_seconds grows, which the chart's
    # FinstreamConsumerStalled alert watches).
    health_probe_interval: float = Field(
        default=2.0, gt=0, description="Seconds between a worker's probes of its dependencies."
    )
    health_probe_timeout: float = Field(
        default=5.0, gt=0, description="A dependency probe not answered within this fails."
    )
    stream_stall_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Seconds without committed progress, while records wait, after which a "
        "consuming role reports itself stalled (not ready).",
    )

    @field_validator(
        "stack_dir",
        "kafka_ssl_ca_file",
        "kafka_ssl_cert_file",
        "kafka_ssl_key_file",
        mode="after",
    )
    @classmethod
    def _absolute_core_paths(cls, value: Path | None) -> Path | None:
        return absolute(value)

    @model_validator(mode="after")
    def _kafka_security(self) -> Self:
        # A half-configured client would fail later with a librdkafka message far
        # from the cause; say which setting is missing instead.
        protocol = self.kafka_security_protocol
        if protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"FINSTREAM_KAFKA_SECURITY_PROTOCOL={protocol} needs FINSTREAM_KAFKA_SASL_USERNAME "
                "and FINSTREAM_KAFKA_SASL_PASSWORD"
            )
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            raise ValueError(
                "FINSTREAM_KAFKA_SSL_CERT_FILE and FINSTREAM_KAFKA_SSL_KEY_FILE go together "
                "(the client certificate and its private key)"
            )
        tls_files = (self.kafka_ssl_ca_file, self.kafka_ssl_cert_file)
        if any(tls_files) and not protocol.endswith("SSL"):
            raise ValueError(
                f"FINSTREAM_KAFKA_SSL_* files are set but FINSTREAM_KAFKA_SECURITY_PROTOCOL is "
                f"{protocol}: use SSL or SASL_SSL"
            )
        return self
