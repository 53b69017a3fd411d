-- The audit trail: every routing and delivery decision, hash-chained.
--
-- Each row stores the hash of the row before it (prev_hash) and its own hash,
-- sha256(prev_hash || canonical event), where the canonical event is the
-- row's sequence number and fields as sorted, compact JSON (see
-- finstream.sinks.audit.canonical). Editing, inserting or deleting a row in
-- the middle breaks the chain; audit_chain_head remembers the last seq and
-- hash, so deleting rows at the end shows too (`finstream audit verify`).
--
-- Writers lock the head row (SELECT ... FOR UPDATE) for the length of their
-- transaction: concurrent sink replicas append one after the other and never
-- fork the chain. event_id is the idempotency key: a redelivered event is
-- stored once.
CREATE TABLE IF NOT EXISTS audit_events (
    seq             bigint       PRIMARY KEY,
    event_id        text         NOT NULL UNIQUE,
    at              timestamptz  NOT NULL,
    actor           text         NOT NULL,
    action          text         NOT NULL,
    subject_type    text         NOT NULL,
    subject_id      text         NOT NULL,
    user_id         text,
    reason          text,
    details         jsonb        NOT NULL DEFAULT '{}'::jsonb,
    correlation_id  text,
    prev_hash       text         NOT NULL,
    hash            text         NOT NULL UNIQUE,
    recorded_at     timestamptz  NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS audit_events_user_at ON audit_events (user_id, at);
CREATE INDEX IF NOT EXISTS audit_events_subject ON audit_events (subject_type, subject_id);

CREATE TABLE IF NOT EXISTS audit_chain_head (
    id          smallint     PRIMARY KEY CHECK (id = 1),
    seq         bigint       NOT NULL,
    hash        text         NOT NULL,
    updated_at  timestamptz  NOT NULL DEFAULT now()
);

INSERT INTO audit_chain_head (id, seq, hash)
VALUES (1, 0, repeat('0', 64))
ON CONFLICT (id) DO NOTHING;
