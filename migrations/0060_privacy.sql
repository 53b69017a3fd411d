-- Privacy (issue 14): crypto-shredding keys, erasures, contact verification,
-- the delivery funnel, and the grants the new roles and endpoints need.
--
-- user_keys: each user's data keys (AES-256), wrapped by a master key
-- (finstream.privacy.keys). Version 1, 2, ... : the newest seals, every one
-- held opens. Erasing a user deletes them: everything sealed for the user,
-- wherever it was copied, no longer opens.
CREATE TABLE IF NOT EXISTS user_keys (
    user_id        text        NOT NULL,
    version        integer     NOT NULL CHECK (version >= 1),
    master_key_id  text        NOT NULL,   -- which master key wrapped it (rotation)
    wrapped        bytea       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, version)
);
CREATE INDEX IF NOT EXISTS user_keys_master ON user_keys (master_key_id);

-- erased_users: who was erased, when and by whom. A key is never used (nor
-- created) for a user listed here, whatever user_keys still holds; the sweep
-- (sweep_due) deletes again what a worker with a cached key wrote meanwhile.
CREATE TABLE IF NOT EXISTS erased_users (
    user_id    text        PRIMARY KEY,
    erased_at  timestamptz NOT NULL DEFAULT now(),
    erased_by  text        NOT NULL,
    sweep_due  timestamptz,
    swept_at   timestamptz
);
CREATE INDEX IF NOT EXISTS erased_users_sweep ON erased_users (sweep_due) WHERE swept_at IS NULL;

-- contact_verifications: one open code per contact (an email address or a
-- phone number of the user's preferences), stored as a keyed digest only.
CREATE TABLE IF NOT EXISTS contact_verifications (
    user_id       text        NOT NULL,
    contact_id    text        NOT NULL,
    channel       text        NOT NULL CHECK (channel IN ('email', 'sms')),
    code_digest   text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    attempts      integer     NOT NULL DEFAULT 0,   -- wrong guesses of the current code
    sends         integer     NOT NULL DEFAULT 1,   -- codes sent in the current window
    window_start  timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz NOT NULL DEFAULT now(),
    verified_at   timestamptz,
    PRIMARY KEY (user_id, contact_id)
);

-- notification_funnel: one row per (request, channel, contact) the router
-- decided about, with the time of each stage; kept by the feedback role from
-- the router's audit events and every DeliveryResult (attempts, webhooks).
-- item_key is the message id, or request_id|channel for a channel that
-- never became a message (suppressed).
CREATE TABLE IF NOT EXISTS notification_funnel (
    item_key        text        PRIMARY KEY,
    request_id      text        NOT NULL,
    message_id      text,
    user_id         text        NOT NULL,
    channel         text        NOT NULL,
    template        text,
    category        text,
    provider        text,
    first_at        timestamptz NOT NULL,
    requested_at    timestamptz,
    suppressed_at   timestamptz,
    sent_at         timestamptz,
    delivered_at    timestamptz,
    opened_at       timestamptz,
    clicked_at      timestamptz,
    bounced_at      timestamptz,
    complained_at   timestamptz,
    unsubscribed_at timestamptz,
    failed_at       timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notification_funnel_first_at ON notification_funnel (first_at);
CREATE INDEX IF NOT EXISTS notification_funnel_user ON notification_funnel (user_id);

-- deliveries.content: what a delivery's message said (recipient, subject,
-- bodies), sealed under the user's key -- always, by construction. The
-- journey and the export read it (and open it with the user's key); the
-- message body in clear (deliveries.message of rows written before sealing)
-- stays out of the API's reach. New rows keep subject NULL.
ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS content text;
CREATE INDEX IF NOT EXISTS deliveries_user ON deliveries (user_id);
CREATE INDEX IF NOT EXISTS delivery_results_user ON delivery_results (user_id);

DO $$
DECLARE
    r text;
    migrator text := current_user;
BEGIN
    FOREACH r IN ARRAY ARRAY['finstream_router', 'finstream_feedback']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            -- Roles are cluster-wide: created by the login that migrates (or a
            -- DBA beforehand), not by finstream_owner, whose role is in force.
            RESET ROLE;
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it just now
            END;
            EXECUTE format('SET ROLE %I', migrator);
        END IF;
    END LOOP;
END $$;

-- router: seals what it routes; reads users' keys and creates a user's first.
GRANT SELECT, INSERT ON user_keys TO finstream_router;
GRANT SELECT ON erased_users TO finstream_router;
-- delivery workers (email, push, sms, inapp): open what they send, seal what
-- arrives unsealed.
GRANT SELECT, INSERT ON user_keys TO finstream_delivery;
GRANT SELECT ON erased_users TO finstream_delivery;
-- feedback: the funnel; reads a message's sealed content to find the address
-- a bounce or complaint is about.
GRANT SELECT ON user_keys, erased_users TO finstream_feedback;
GRANT SELECT, INSERT, UPDATE, DELETE ON notification_funnel TO finstream_feedback;
GRANT SELECT (message_id, request_id, user_id, channel, provider, provider_message_id, content)
    ON deliveries TO finstream_feedback;
-- api: seals what users give it, erases and exports users, verifies contacts,
-- serves the funnel. Message content only sealed (deliveries.content), never
-- deliveries.message.
GRANT SELECT, INSERT, DELETE ON user_keys TO finstream_api;
GRANT SELECT, INSERT, UPDATE ON erased_users TO finstream_api;
GRANT SELECT, INSERT, UPDATE, DELETE ON contact_verifications TO finstream_api;
GRANT SELECT, DELETE ON notification_funnel TO finstream_api;
GRANT SELECT (content, correlation_id, deadline, updated_at) ON deliveries TO finstream_api;
GRANT DELETE ON deliveries, delivery_results TO finstream_api;
