-- Delivery state: one row per outbound message, keyed by its idempotency key.
--
-- This table is the truth behind "a provider is never called twice for one
-- message_id". A worker claims a row (state 'queued', with a lease) before it
-- may call a provider, moves it to 'sending' in a conditional UPDATE right
-- before the call, and records the outcome right after. Life cycle:
--
--   queued  -> sending -> sent | delivered                   (success)
--                      -> queued (fail over to the next provider at once)
--                      -> retry  (transient: next_attempt_at, backoff + jitter)
--                      -> unknown (outcome ambiguous: reconcile at next_attempt_at)
--                      -> rejected | failed | expired       (final failure, dead-lettered)
--   retry   -> queued  (due; claimed by any worker of the channel)
--   unknown -> sent (found at the provider) | queued (provably not sent) | failed
--   rejected | failed | expired -> redrive (finstream dlq redrive) -> queued
--
-- A 'sending' row whose lease ran out is a worker that died between the
-- provider call and the record: it is reconciled like 'unknown', never resent
-- blindly.
CREATE TABLE IF NOT EXISTS deliveries (
    message_id          text        PRIMARY KEY,
    channel             text        NOT NULL,
    user_id             text        NOT NULL,
    request_id          text        NOT NULL,
    state               text        NOT NULL CHECK (state IN (
                            'queued', 'sending', 'retry', 'unknown', 'redrive',
                            'sent', 'delivered', 'rejected', 'failed', 'expired')),
    attempts            integer     NOT NULL DEFAULT 0,   -- provider calls made
    rounds              integer     NOT NULL DEFAULT 0,   -- scheduled retry rounds
    provider            text,                             -- of the in-flight or last call
    provider_message_id text,
    claim_token         uuid,
    lease_until         timestamptz,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    sending_at          timestamptz,                      -- start of the in-flight call
    deadline            timestamptz NOT NULL,             -- expires_at, or created_at + max age
    last_error_class    text,
    last_error          text,
    correlation_id      text,
    source_topic        text        NOT NULL,
    source_partition    integer     NOT NULL,
    source_offset       bigint      NOT NULL,
    message             bytea       NOT NULL,             -- the OutboundMessage as consumed
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);

-- What the schedulers poll: due retries and reconciliations, expired leases.
CREATE INDEX IF NOT EXISTS deliveries_due
    ON deliveries (channel, next_attempt_at) WHERE state IN ('retry', 'unknown');
CREATE INDEX IF NOT EXISTS deliveries_leased
    ON deliveries (channel, lease_until) WHERE state IN ('queued', 'sending');
CREATE INDEX IF NOT EXISTS deliveries_provider_message
    ON deliveries (provider, provider_message_id) WHERE provider_message_id IS NOT NULL;

-- One row per attempt outcome (the DeliveryResult records of notify.delivery).
CREATE TABLE IF NOT EXISTS delivery_results (
    result_id           text             PRIMARY KEY,
    message_id          text             NOT NULL REFERENCES deliveries (message_id) ON DELETE CASCADE,
    request_id          text             NOT NULL,
    user_id             text             NOT NULL,
    channel             text             NOT NULL,
    provider            text             NOT NULL,
    status              text             NOT NULL,
    attempt             integer          NOT NULL,
    provider_message_id text,
    error_class         text,
    error               text,
    latency_ms          double precision,
    at                  timestamptz      NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_results_message ON delivery_results (message_id, at);
CREATE INDEX IF NOT EXISTS delivery_results_at ON delivery_results (at);

-- Transactional outbox: every Kafka record a state change implies (results,
-- dead letters, preference feedback, audit events) is written here in the
-- same transaction, and a relay publishes and deletes it. A worker killed
-- after the commit loses nothing; one killed after publishing but before the
-- delete publishes again (consumers dedupe on result_id / event_id).
CREATE TABLE IF NOT EXISTS delivery_outbox (
    id          bigserial   PRIMARY KEY,
    topic       text        NOT NULL,
    key         bytea,
    value       bytea,
    headers     jsonb       NOT NULL DEFAULT '[]'::jsonb,   -- [[name, hex value], ...]
    created_at  timestamptz NOT NULL DEFAULT now()
);
