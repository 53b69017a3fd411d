"""Every setting of finstream, read from environment variables in one place.

Each field is read from ``FINSTREAM_<FIELD>`` (upper case). The defaults work
with the local stack that ``finstream stack up`` starts, so a fresh checkout
needs no configuration. Nothing outside this module reads ``os.environ``.

``namespace`` prefixes every topic, consumer group and Redis key.
Tests use it to run side by side on one broker without seeing each other's
data; operators can use it to run several environments on one cluster.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_stack_dir() -> Path:
    return REPO_ROOT / ".stack"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINSTREAM_", extra="ignore")

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

    # -- local stack (finstream stack up) ----------------------------------------
    stack_dir: Path = Field(default_factory=_default_stack_dir)
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
    stream_transaction_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="How long the broker keeps a dead worker's open transaction before aborting it.",
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

    # -- market data -------------------------------------------------------------
    sim_symbols: str = "AAPL,MSFT,GOOG,AMZN,NVDA,TSLA,META,JPM"
    sim_rate: float = Field(default=20.0, gt=0, description="Simulated ticks per second, total.")
    sim_seed: int | None = None
    sim_count: int | None = Field(default=None, description="Stop after this many ticks.")
    tick_max_future_seconds: float = 300.0

    # Market-data connectors and provider failover (issue 3). The `connector`
    # role runs one failover chain per symbol set: an ordered list of providers
    # (simulated, replay, alphavantage, yahoo, finnhub, finnhub-ws, polygon,
    # iex). Base URLs are settings so that tests point them at local fakes.
    # Limits are comma-separated "N/sec|min|hour|day" token buckets, all of
    # which must allow a request; the defaults follow each provider's
    # documented free-tier limits.
    md_chain: str = Field(default="simulated", description="Ordered providers, comma-separated.")
    md_allow_synthetic: bool = Field(
        default=False,
        description="Let the connector run the simulated and replay providers when env is "
        "production (their prices are not real, yet would fire real users' alerts).",
    )
    md_symbols: str = Field(default="", description="Symbols of md_chain (empty: sim_symbols).")
    md_chains: dict[str, str] = Field(
        default_factory=dict,
        description='More symbol sets and their chains, JSON: {"BTC-USD,ETH-USD": "yahoo"}.',
    )
    md_poll_interval: float = Field(default=5.0, gt=0, description="Seconds between polls.")
    md_request_timeout: float = Field(default=10.0, gt=0)
    md_failure_threshold: int = Field(default=3, ge=1, description="Failures that open a circuit.")
    md_circuit_reset: float = Field(default=30.0, gt=0, description="Seconds before a probe.")
    md_throttle_pause: float = Field(
        default=60.0, ge=0, description="Pause after throttling that names no Retry-After."
    )
    md_unknown_symbol_retry: float = Field(
        default=600.0,
        gt=0,
        description="Seconds before asking a provider again for a symbol it did not know.",
    )
    md_silence_timeout: float = Field(
        default=30.0, gt=0, description="WebSocket: reconnect after this long without a message."
    )
    md_reconnect_base: float = Field(default=0.5, gt=0)
    md_reconnect_cap: float = Field(default=30.0, gt=0)
    md_dedupe_window: int = Field(
        default=4096, gt=0, description="Recent tick ids kept per symbol."
    )
    md_backfill_gaps: bool = Field(
        default=True, description="Fill coverage gaps from intraday bars when a provider has them."
    )
    md_alphavantage_url: str = "https://www.alphavantage.co"
    md_alphavantage_key: SecretStr | None = None
    md_alphavantage_limits: str = Field(
        default="1/sec,5/min,25/day",
        description="Free tier: 25 a day, 5 a minute, and bursts refused above 1 a second.",
    )
    md_alphavantage_daily_reset: str = Field(
        default="00:00 UTC,00:00 America/New_York",
        description="When the daily quota renews (HH:MM ZONE, comma-separated; undocumented, "
        "so the earliest candidate is tried first): the pause after the daily-limit message.",
    )
    md_yahoo_url: str = "https://query1.finance.yahoo.com"
    md_yahoo_cookie_url: str = "https://fc.yahoo.com"
    md_yahoo_limits: str = "60/min"
    md_finnhub_url: str = "https://finnhub.io"
    md_finnhub_ws_url: str = "wss://ws.finnhub.io"
    md_finnhub_key: SecretStr | None = None
    md_finnhub_limits: str = "60/min,30/sec"
    md_polygon_ws_url: str = "wss://socket.polygon.io/stocks"
    md_polygon_key: SecretStr | None = None
    md_polygon_channels: str = Field(default="T", description="T (trades) and/or AM (minute bars).")
    md_iex_enabled: bool = Field(default=False, description="IEX Cloud was retired on 2024-08-31.")
    md_iex_url: str = "https://cloud.iexapis.com"
    md_iex_key: SecretStr | None = None
    md_iex_limits: str = "100/sec"
    md_replay_path: Path | None = Field(
        default=None, description="CSV or Parquet of ticks or bars."
    )
    md_replay_speed: str = Field(default="1", description="Playback speed: 1, 10, ... or max.")

    # -- sinks -------------------------------------------------------------------
    history_batch_size: int = Field(default=5000, gt=0)
    history_batch_ms: int = Field(default=50, gt=0)
    inbox_max_messages: int = Field(default=500, gt=0)

    # Delivery workers (issue 6): delivery-email, delivery-push, delivery-sms and
    # inapp. Each channel has an ordered provider chain (failover order); a
    # provider without credentials is left out of its chain. Base URLs are
    # settings so that tests point them at local fakes. Rates are requests per
    # second per worker (a token bucket with a one-second burst).
    delivery_email_providers: str = Field(
        default="sendgrid,ses,smtp", description="Email chain, in failover order."
    )
    delivery_push_providers: str = Field(
        default="fcm,apns", description="Push providers (each takes its platform's tokens)."
    )
    delivery_sms_providers: str = "twilio"
    delivery_batch_size: int = Field(default=200, gt=0)
    delivery_batch_ms: int = Field(default=100, gt=0)
    delivery_concurrency: int = Field(default=16, gt=0, description="Provider calls in flight.")
    delivery_max_attempts: int = Field(default=6, ge=1, description="Provider calls per message.")
    delivery_backoff_base: float = Field(default=1.0, gt=0)
    delivery_backoff_cap: float = Field(default=300.0, gt=0)
    delivery_max_age: float = Field(
        default=86_400.0,
        gt=0,
        description="Seconds after created_at when a message without expires_at expires.",
    )
    delivery_timeout: float = Field(default=10.0, gt=0, description="Provider request timeout.")
    delivery_lease_seconds: float = Field(
        default=30.0, gt=0, description="A claimed message another worker may take over after this."
    )
    delivery_poll_interval: float = Field(
        default=0.5, gt=0, description="Seconds between scans for due retries and lapsed leases."
    )
    delivery_reconcile_delay: float = Field(
        default=30.0, ge=0, description="Wait before looking up an ambiguous send at the provider."
    )
    delivery_unknown_outcome: Literal["deadletter", "resend"] = Field(
        default="deadletter",
        description="A send whose outcome is unknown and cannot be looked up: dead-letter it "
        "(never twice) or send it again (never lost).",
    )
    delivery_circuit_failures: int = Field(default=5, ge=1)
    delivery_circuit_reset: float = Field(default=30.0, gt=0)
    delivery_rate_wait_max: float = Field(
        default=0.5, ge=0, description="Longest inline wait for a rate limit before failing over."
    )
    delivery_idempotency_ttl: int = Field(
        default=7 * 86_400, gt=0, description="Seconds Redis remembers a finished message."
    )
    delivery_email_from: str = "finstream <alerts@finstream.local>"
    delivery_email_unsubscribe_url: str | None = Field(
        default="https://finstream.local/v1/unsubscribe/{token}",
        description="List-Unsubscribe target of marketing email: the API's one-click endpoint "
        "with {token} (a signed, expiring link). The placeholder host is refused outside dev/test.",
    )
    delivery_email_unsubscribe_mailto: str | None = "unsubscribe@finstream.local"
    delivery_sendgrid_url: str = "https://api.sendgrid.com"
    delivery_sendgrid_api_key: SecretStr | None = None
    delivery_sendgrid_rate: float = Field(default=100.0, gt=0)
    delivery_sendgrid_activity_lookup: bool = Field(
        default=True, description="Reconcile ambiguous sends with the Email Activity API."
    )
    delivery_ses_url: str | None = Field(
        default=None, description="Default: https://email.<region>.amazonaws.com"
    )
    delivery_ses_region: str = "us-east-1"
    delivery_ses_access_key_id: str | None = None
    delivery_ses_secret_access_key: SecretStr | None = None
    delivery_ses_configuration_set: str | None = None
    delivery_ses_rate: float = Field(default=14.0, gt=0)
    delivery_smtp_host: str | None = None
    delivery_smtp_port: int = 587
    delivery_smtp_security: Literal["none", "starttls", "tls"] = "starttls"
    delivery_smtp_username: str | None = None
    delivery_smtp_password: SecretStr | None = None
    delivery_smtp_ca_file: Path | None = None
    delivery_smtp_validate_certs: bool = True
    delivery_smtp_rate: float = Field(default=20.0, gt=0)
    delivery_fcm_url: str = "https://fcm.googleapis.com"
    delivery_fcm_project_id: str | None = None
    delivery_fcm_service_account_file: Path | None = None
    delivery_fcm_token_url: str | None = Field(
        default=None, description="OAuth2 token endpoint; default: the service account's token_uri."
    )
    delivery_fcm_rate: float = Field(default=500.0, gt=0)
    delivery_apns_url: str = "https://api.push.apple.com"
    delivery_apns_key_file: Path | None = Field(default=None, description="The .p8 signing key.")
    delivery_apns_key_id: str | None = None
    delivery_apns_team_id: str | None = None
    delivery_apns_topic: str | None = Field(default=None, description="The app's bundle id.")
    delivery_apns_ca_file: Path | None = None
    delivery_apns_rate: float = Field(default=500.0, gt=0)
    delivery_twilio_url: str = "https://api.twilio.com"
    delivery_twilio_account_sid: str | None = None
    delivery_twilio_auth_token: SecretStr | None = None
    delivery_twilio_from: str | None = None
    delivery_twilio_messaging_service_sid: str | None = None
    delivery_twilio_status_callback: str | None = None
    delivery_twilio_rate: float = Field(default=10.0, gt=0)

    # Bars and alerts (issue 4). The quotes agent builds bars on exchange time
    # for every width in bar_intervals and publishes them to md.bars.1m (the
    # `interval` field tells widths apart); a tick that arrives more than
    # bar_allowed_lateness seconds after its bar's end goes to dlq. The `bars`
    # role stores bars in PostgreSQL and the latest bars_redis_keep per symbol
    # and width in Redis. The `alerts` role evaluates rules on bars of
    # alert_bar_interval (bar frequencies, moving windows, volume spikes).
    bar_intervals: str = Field(default="1m", description="Bar widths, comma-separated: 1m,5m,1h.")
    bar_allowed_lateness: float = Field(
        default=5.0,
        ge=0,
        description="Seconds after a bar's end during which late ticks correct it.",
    )
    bars_redis_keep: int = Field(default=500, gt=0, description="Bars kept per symbol and width.")
    bars_batch_size: int = Field(default=500, gt=0)
    bars_batch_ms: int = Field(default=200, gt=0)
    alert_bar_interval: str = Field(default="1m", description="Bar width of alert evaluation.")
    alert_max_rules_per_symbol: int = Field(
        default=2000, gt=0, description="More rules on one symbol are refused (dead-lettered)."
    )

    # Notification routing (issue 5). The `router` role routes notify.requests by
    # each user's preferences (notify.preferences) and releases held requests
    # (deliver_at, quiet hours) and digests every router_tick_seconds; the
    # `audit` role hash-chains audit.events into PostgreSQL. Windows are short
    # settings so that tests can shrink them.
    router_batch_size: int = Field(default=500, gt=0, description="Requests routed per batch.")
    router_batch_ms: int = Field(default=20, gt=0, description="Longest wait to fill a batch.")
    router_tick_seconds: float = Field(
        default=0.2, gt=0, le=1.0, description="How often due holds and digests are released."
    )
    router_dedupe_seconds: float = Field(
        default=86_400.0, gt=0, description="A request id seen again within this is a duplicate."
    )
    router_collapse_seconds: float = Field(
        default=60.0, ge=0, description="Requests sharing a collapse key within this go once."
    )
    router_digest_seconds: float = Field(
        default=3_600.0, gt=0, description="A digest collects a user's category for this long."
    )
    router_digest_max_items: int = Field(default=20, gt=0, description="Items listed per digest.")
    router_quiet_channels: str = Field(
        default="email,push,sms", description="Channels that quiet hours hold back."
    )
    router_sms_segments: int = Field(default=3, gt=0, le=10, description="SMS length limit.")
    router_default_locale: str = "en"
    audit_batch_size: int = Field(default=500, gt=0)
    audit_batch_ms: int = Field(default=200, gt=0)

    # -- database operations (issue 13) ------------------------------------------
    # Connection pools: every worker's asyncpg pool (the delivery workers and
    # the API size theirs below). Usage and acquire waits are Prometheus
    # metrics (finstream_db_pool_*).
    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=5, gt=0)
    db_pool_acquire_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a worker waits for a pooled connection."
    )
    delivery_db_pool_max_size: int | None = Field(
        default=None, gt=0, description="Default: delivery_concurrency + 4."
    )
    api_db_pool_max_size: int = Field(default=10, gt=0)
    # Partitions and retention (`finstream db retention`, the `retention` role).
    # Policies are a number and d, w, mo or y. Delivery rows are never purged
    # while their message may still be redriven from dlq or re-read from an
    # outbound topic (topics.yaml retention), nor before they are final.
    db_retention_ticks: str = "2y"
    db_retention_bars: str = "10y"
    db_retention_deliveries: str = Field(
        default="13mo", description="delivery_results partitions and final deliveries rows."
    )
    db_retention_audit: str = "7y"
    db_retention_action: Literal["drop", "detach"] = Field(
        default="drop", description="detach keeps an expired partition as a table to archive."
    )
    db_partitions_ahead: int = Field(
        default=7, ge=1, description="Periods created ahead (days of ticks, months of the others)."
    )
    retention_interval: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds between retention passes of the `retention` role (0: only monitor).",
    )
    audit_verify_interval: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds between walks of the audit chain by the `retention` role "
        "(finstream_audit_chain_ok; 0: never).",
    )
    db_monitor_interval: float = Field(
        default=30.0, gt=0, description="Seconds between database health metrics updates."
    )
    # Health thresholds (`finstream db health`).
    db_long_query_seconds: float = Field(default=300.0, gt=0)
    db_idle_in_transaction_seconds: float = Field(default=60.0, gt=0)
    # Backups with pgBackRest (`finstream db backup|backups|verify|restore`).
    # Locally `finstream stack up` writes <stack_dir>/pgbackrest/pgbackrest.conf
    # with a repository under the stack dir and archives WAL into it; in
    # production pgBackRest reads its own configuration (PGBACKREST_* variables
    # or pgbackrest_config) for a repository on a volume or S3-compatible storage.
    backup_stanza: str = Field(default="finstream", pattern=r"^[A-Za-z0-9._-]+$")
    pgbackrest_config: Path | None = Field(
        default=None, description="Default: <stack_dir>/pgbackrest/pgbackrest.conf when it exists."
    )
    backup_archive: bool = Field(
        default=True, description="Continuous WAL archiving on the stack's own PostgreSQL."
    )
    backup_full_every_hours: float = Field(default=24.0, gt=0, description="Full backup schedule.")
    backup_diff_every_hours: float | None = Field(
        default=None, gt=0, description="Differential backup schedule (off by default)."
    )
    backup_incr_every_hours: float | None = Field(
        default=1.0, gt=0, description="Incremental backup schedule."
    )
    backup_retention_days: int = Field(
        default=30, gt=0, description="Days of full backups (and their WAL) kept: the PITR window."
    )

    # -- make run (finstream run) -------------------------------------------------
    run_roles: str = (
        "connector,quotes,history,router,inapp,bars,alerts,audit,statestore,api,"
        "sandbox,delivery-email,delivery-push,delivery-sms"
    )
    run_base_port: int = Field(
        default=9201, description="Health/metrics ports: one per role from here."
    )
    run_demo: bool = True

    # -- the newcomer's demo: sandboxes, seed data, console (issue 16) --------------
    # `finstream run` starts Mailpit (a real SMTP server with a web UI, built by
    # `make tools`) and the `sandbox` role (FCM, APNs and Twilio sandboxes that
    # keep what they receive and show it on a page), and points the email,
    # push and SMS delivery workers at them.
    run_sandboxes: bool = Field(
        default=True, description="finstream run: start Mailpit and the sandbox role, use them."
    )
    sandbox_host: str = "127.0.0.1"
    sandbox_port: int = Field(default=8090, description="Sandbox page, FCM and Twilio (HTTP).")
    sandbox_apns_port: int = Field(default=8091, description="APNs sandbox (HTTP/2 over TLS).")
    sandbox_keep: int = Field(default=500, gt=0, description="Messages each sandbox shows.")
    mailpit_bin: Path | None = Field(
        default=None, description="Mailpit binary (default: .tools/bin/mailpit, `make tools`)."
    )
    mailpit_smtp_port: int = 1025
    mailpit_http_port: int = 8025
    templates_dir: Path | None = Field(
        default=None,
        description="Templates that override or extend the packaged ones "
        "(<template>/<channel>.<locale>.j2 and _layouts/), reloaded without a restart.",
    )
    templates_reload_seconds: float = Field(
        default=2.0, ge=0, description="How often FINSTREAM_TEMPLATES_DIR is checked for changes."
    )
    status_timeout: float = Field(
        default=2.0, gt=0, description="finstream status: seconds to wait for each role."
    )

    # -- api ---------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Authentication (issue 8). Tokens are OAuth2 bearer JWTs verified against a
    # JWKS (file path or http(s) URL). In env=dev without a JWKS, a development
    # key pair under <stack_dir>/api/ is used (`finstream api token` mints tokens).
    api_jwks: str | None = Field(default=None, description="JWKS file path or http(s) URL.")
    api_jwks_refresh_seconds: float = Field(default=300.0, gt=0)
    api_jwt_issuer: str = "finstream-dev"
    api_jwt_audience: str = "finstream-api"
    api_jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    api_jwt_roles_claim: str = "roles"
    api_jwt_hs256_secret: SecretStr | None = Field(
        default=None,
        description="Enables HS256 tokens with this shared secret (at least 32 bytes); "
        "unset, only asymmetric keys from the JWKS are accepted.",
    )
    api_public_url: str | None = Field(
        default=None,
        description="Public base URL of the API (behind proxies), used to check webhook signatures.",
    )
    api_max_body_bytes: int = Field(default=64 * 1024, gt=0)
    api_webhook_max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    api_rate_limit: int = Field(default=600, gt=0, description="Requests per window per token.")
    api_rate_window_seconds: float = Field(default=60.0, gt=0)
    api_idempotency_ttl_seconds: int = Field(default=86_400, gt=0)
    api_ws_queue_size: int = Field(default=256, gt=0, description="Messages buffered per client.")
    api_ws_max_subscriptions: int = Field(default=50, gt=0)
    api_ws_heartbeat_seconds: float = Field(default=15.0, gt=0)
    api_ws_auth_timeout_seconds: float = Field(default=10.0, gt=0)
    api_ws_max_message_bytes: int = Field(default=4096, gt=0)
    api_twilio_auth_token: SecretStr | None = Field(
        default=None, description="Checks X-Twilio-Signature on status callbacks."
    )
    api_sendgrid_webhook_public_key: str | None = Field(
        default=None,
        description="SendGrid Event Webhook verification key (base64 DER or PEM, ECDSA P-256).",
    )

    # -- privacy (issue 14): crypto-shredding, erasure, verification, feedback ----------
    # Personal data is sealed under a data key per user (AES-256-GCM), wrapped by
    # a master key. Locally the master keys are a setting; in production either
    # the setting (from a Secret) or AWS KMS (privacy_kms=aws-kms). In
    # FINSTREAM_ENV dev and test a built-in development key is used when none is
    # set; any other environment refuses to start without one.
    privacy_master_keys: SecretStr | None = Field(
        default=None,
        description="Master keys, 'ID:BASE64(32 bytes)' comma-separated; the first wraps new "
        "data keys, every one unwraps (rotation: put the new one first, then "
        "`finstream keys rewrap`, then drop the old one).",
    )
    privacy_kms: Literal["local", "aws-kms"] = Field(
        default="local", description="Who wraps data keys: the master keys setting, or AWS KMS."
    )
    privacy_aws_kms_key_id: str | None = Field(default=None, description="KMS key id or ARN.")
    privacy_aws_kms_region: str = "us-east-1"
    privacy_aws_kms_url: str | None = Field(
        default=None, description="Default: https://kms.<region>.amazonaws.com"
    )
    privacy_aws_access_key_id: str | None = None
    privacy_aws_secret_access_key: SecretStr | None = None
    privacy_key_cache_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long a worker keeps a user's unwrapped data keys: the longest a "
        "running worker can still open an erased user's data.",
    )
    privacy_key_cache_size: int = Field(default=100_000, gt=0, description="Users' keys cached.")
    privacy_token_secrets: SecretStr | None = Field(
        default=None,
        description="Secrets (comma-separated, at least 32 characters each; the first signs) "
        "for unsubscribe links and verification code digests; dev/test use a built-in one.",
    )
    privacy_erasure_sweep_seconds: float = Field(
        default=90.0,
        gt=0,
        description="An erasure sweeps again this long after it ran (past every worker's key "
        "cache), removing what a worker still wrote in between.",
    )
    privacy_verify_code_ttl_seconds: float = Field(default=900.0, gt=0)
    privacy_verify_max_attempts: int = Field(default=5, ge=1, description="Guesses per code.")
    privacy_verify_sends_per_hour: int = Field(
        default=5, ge=1, description="Codes sent per contact per hour."
    )
    privacy_verify_attempts_per_hour: int = Field(
        default=20, ge=1, description="Verification attempts per user per hour."
    )
    privacy_unsubscribe_ttl_days: float = Field(
        default=60.0, gt=0, description="How long an unsubscribe link in an email works."
    )
    api_sns_topic_arns: str = Field(
        default="",
        description="SNS topics whose SES notifications the API accepts (comma-separated ARNs).",
    )
    api_sns_cert_url_pattern: str = Field(
        default=r"^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[A-Za-z0-9._/-]+\.pem$",
        description="Where SNS signing certificates may be fetched from (a regular expression).",
    )
    api_sns_confirm_subscriptions: bool = Field(
        default=True, description="Confirm SNS subscriptions of the configured topics."
    )

    @field_validator(
        "stack_dir",
        "pgbackrest_config",
        "templates_dir",
        "mailpit_bin",
        "kafka_ssl_ca_file",
        "kafka_ssl_cert_file",
        "kafka_ssl_key_file",
        mode="after",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
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

    # -- derived names -----------------------------------------------------------
    def topic(self, name: str) -> str:
        """The Kafka topic name for a catalogue name, with the namespace applied."""
        return f"{self.namespace}{name}"

    def group(self, role: str) -> str:
        return f"{self.namespace}finstream-{role}"

    def redis_key(self, key: str) -> str:
        return f"{self.namespace}{key}"

    @field_validator(
        "db_retention_ticks", "db_retention_bars", "db_retention_deliveries", "db_retention_audit"
    )
    @classmethod
    def _retention_policy(cls, value: str) -> str:
        from finstream.domain.retention import Policy

        Policy.parse(value)
        return value

    @property
    def production(self) -> bool:
        return self.env == "production"

    def synthetic_market_refusal(self, providers: set[str]) -> str | None:
        """Why synthetic prices (simulated, replay) may not be published here, if so.

        Their ticks land on the production md.ticks and fire real users' alerts.
        """
        synthetic = sorted(providers & {"simulated", "replay"})
        if not synthetic or not self.production or self.md_allow_synthetic:
            return None
        return (
            f"{', '.join(synthetic)} market data is not real, and FINSTREAM_ENV=production: "
            "its prices would reach production topics and fire real users' alerts. Configure "
            "real providers (FINSTREAM_MD_CHAIN), or set FINSTREAM_MD_ALLOW_SYNTHETIC=true "
            "for a load test"
        )

    @property
    def mailpit_path(self) -> Path:
        return self.mailpit_bin or REPO_ROOT / ".tools" / "bin" / "mailpit"

    @property
    def sandbox_url(self) -> str:
        return f"http://{self.sandbox_host}:{self.sandbox_port}"

    @property
    def mailpit_url(self) -> str:
        return f"http://{self.sandbox_host}:{self.mailpit_http_port}"

    @property
    def symbols(self) -> list[str]:
        return [s.strip().upper() for s in self.sim_symbols.split(",") if s.strip()]


def describe_invalid(exc: ValidationError) -> str:
    """A settings validation error as one line naming the variables (for the CLI)."""
    parts = []
    for error in exc.errors():
        msg = str(error["msg"]).removeprefix("Value error, ")
        loc = error.get("loc") or ()
        parts.append(f"FINSTREAM_{str(loc[0]).upper()}: {msg}" if loc else msg)
    return "invalid settings: " + "; ".join(parts)


@functools.cache
def get_settings() -> Settings:
    return Settings()


def child_environment(**overrides: str) -> dict[str, str]:
    """Environment for a child process: ours plus FINSTREAM_* overrides.

    Lives here so that the one module that touches os.environ stays the only one.
    """
    env = dict(os.environ)
    env.update({f"FINSTREAM_{k.upper()}": v for k, v in overrides.items()})
    return env
