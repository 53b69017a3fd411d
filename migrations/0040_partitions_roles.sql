-- Time partitions, database roles and the bookkeeping of backups and retention.
--
-- 1. ticks (by ts, daily), bars (by start, monthly), delivery_results (by at,
--    monthly) and audit_events (by recorded_at, monthly) become natively
--    range-partitioned. An existing table keeps its rows without a copy: it is
--    attached as the partition [MINVALUE, end of its last day/month), and the
--    retention job drops it whole once that range is past the table's policy.
--    An empty one is dropped. Each table has a DEFAULT partition, so a row no
--    partition covers (a replayed tick from years ago, a month nobody created
--    yet) is stored rather than refused; partition maintenance (finstream db
--    retention, the retention role) creates the periods ahead and moves any
--    such rows into their partition when it creates it.
--
--    Unique keys of a partitioned table must include the partition key:
--    ticks' idempotency key becomes (symbol, tick_id, ts) -- a tick id is
--    derived from the tick's content, ts included, so nothing changes for
--    writers but the ON CONFLICT target. delivery_results' key becomes
--    (result_id, at) (result ids are random). audit_events is keyed by (seq,
--    recorded_at); event_id and hash stay indexed, and their uniqueness is
--    kept by the writer, which checks event ids under the chain head's row
--    lock. recorded_at is now taken with clock_timestamp(), after that lock,
--    so it grows with seq and the oldest partition holds the oldest chain.
--
-- 2. audit_chain_head gains base_seq/base_hash: where the chain starts once
--    retention removed its oldest partitions (finstream audit verify starts
--    there; the removal itself is an audit event in the chain).
--
-- 3. Roles (cluster-wide, created once; a DBA may create them beforehand):
--    finstream_owner owns every object and runs migrations and partition
--    maintenance; each worker role's group is granted only what it touches.
--    Login users are members of one group (deploy/README.md, Least privilege).
--
-- 4. db_backups records each `finstream db backup`; db_maintenance_runs each
--    retention pass (health checks and metrics read both).

-- -- ticks -----------------------------------------------------------------------
ALTER TABLE ticks RENAME TO ticks_legacy;
ALTER TABLE ticks_legacy RENAME CONSTRAINT ticks_pkey TO ticks_legacy_pkey;
ALTER INDEX ticks_symbol_ts RENAME TO ticks_legacy_symbol_ts;
CREATE TABLE ticks (
    LIKE ticks_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (symbol, tick_id, ts)
) PARTITION BY RANGE (ts);
CREATE INDEX ticks_symbol_ts ON ticks (symbol, ts);
CREATE TABLE ticks_default PARTITION OF ticks DEFAULT;

-- -- bars ------------------------------------------------------------------------
ALTER TABLE bars RENAME TO bars_legacy;
ALTER TABLE bars_legacy RENAME CONSTRAINT bars_pkey TO bars_legacy_pkey;
ALTER INDEX bars_interval_start RENAME TO bars_legacy_interval_start;
CREATE TABLE bars (
    LIKE bars_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (symbol, interval, start)
) PARTITION BY RANGE (start);
CREATE INDEX bars_interval_start ON bars (interval, start);
CREATE TABLE bars_default PARTITION OF bars DEFAULT;

-- -- delivery_results ------------------------------------------------------------
ALTER TABLE delivery_results RENAME TO delivery_results_legacy;
ALTER TABLE delivery_results_legacy RENAME CONSTRAINT delivery_results_pkey TO delivery_results_legacy_pkey;
ALTER TABLE delivery_results_legacy RENAME CONSTRAINT delivery_results_message_id_fkey TO delivery_results_legacy_message_id_fkey;
ALTER INDEX delivery_results_message RENAME TO delivery_results_legacy_message;
ALTER INDEX delivery_results_at RENAME TO delivery_results_legacy_at;
CREATE TABLE delivery_results (
    LIKE delivery_results_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (result_id, at),
    FOREIGN KEY (message_id) REFERENCES deliveries (message_id) ON DELETE CASCADE
) PARTITION BY RANGE (at);
CREATE INDEX delivery_results_message ON delivery_results (message_id, at);
CREATE INDEX delivery_results_at ON delivery_results (at);
CREATE TABLE delivery_results_default PARTITION OF delivery_results DEFAULT;

-- -- audit_events ----------------------------------------------------------------
ALTER TABLE audit_events RENAME TO audit_events_legacy;
ALTER TABLE audit_events_legacy RENAME CONSTRAINT audit_events_pkey TO audit_events_legacy_pkey;
ALTER TABLE audit_events_legacy RENAME CONSTRAINT audit_events_event_id_key TO audit_events_legacy_event_id_key;
ALTER TABLE audit_events_legacy RENAME CONSTRAINT audit_events_hash_key TO audit_events_legacy_hash_key;
ALTER INDEX audit_events_user_at RENAME TO audit_events_legacy_user_at;
ALTER INDEX audit_events_subject RENAME TO audit_events_legacy_subject;
CREATE TABLE audit_events (
    LIKE audit_events_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (seq, recorded_at)
) PARTITION BY RANGE (recorded_at);
ALTER TABLE audit_events ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();
CREATE INDEX audit_events_event_id ON audit_events (event_id);
CREATE INDEX audit_events_hash ON audit_events (hash);
CREATE INDEX audit_events_user_at ON audit_events (user_id, at);
CREATE INDEX audit_events_subject ON audit_events (subject_type, subject_id);
CREATE TABLE audit_events_default PARTITION OF audit_events DEFAULT;

ALTER TABLE audit_chain_head
    ADD COLUMN base_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN base_hash text NOT NULL DEFAULT repeat('0', 64);

-- -- the old tables: attached whole, or dropped when empty -----------------------
DO $$
DECLARE
    spec record;
    newest timestamptz;
    bound timestamptz;
BEGIN
    FOR spec IN SELECT * FROM (VALUES
        ('ticks', 'ts', 'day', true),
        ('bars', 'start', 'month', false),
        ('delivery_results', 'at', 'month', true),
        ('audit_events', 'recorded_at', 'month', true)) AS t(tbl, key, grain, new_key)
    LOOP
        EXECUTE format('SELECT max(%I) FROM %I', spec.key, spec.tbl || '_legacy') INTO newest;
        IF newest IS NULL THEN
            EXECUTE format('DROP TABLE %I', spec.tbl || '_legacy');
        ELSE
            -- The end of the period holding the newest row (or now, if later):
            -- partitions created from then on never overlap it.
            bound := (date_trunc(spec.grain, greatest(newest, now()) AT TIME ZONE 'UTC')
                      + ('1 ' || spec.grain)::interval) AT TIME ZONE 'UTC';
            IF spec.new_key THEN
                -- The parent's primary key adds the partition key; attaching
                -- builds that index on the old table in place of its own.
                EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I',
                               spec.tbl || '_legacy', spec.tbl || '_legacy_pkey');
            END IF;
            EXECUTE format(
                'ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                spec.tbl, spec.tbl || '_legacy', bound);
        END IF;
    END LOOP;
END $$;

-- -- bookkeeping -------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS db_backups (
    label          text        PRIMARY KEY,
    type           text        NOT NULL CHECK (type IN ('full', 'diff', 'incr')),
    started_at     timestamptz NOT NULL,
    stopped_at     timestamptz NOT NULL,
    size_bytes     bigint,
    repo_bytes     bigint,
    wal_start      text,
    wal_stop       text,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS db_maintenance_runs (
    id           bigserial   PRIMARY KEY,
    kind         text        NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    ok           boolean     NOT NULL,
    detail       jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS db_maintenance_runs_kind ON db_maintenance_runs (kind, finished_at);

-- -- roles -------------------------------------------------------------------------
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['finstream_owner', 'finstream_history', 'finstream_bars',
                             'finstream_audit', 'finstream_delivery', 'finstream_api']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it just now
            END;
        END IF;
    END LOOP;
    IF NOT pg_has_role(current_user, 'finstream_owner', 'MEMBER') THEN
        EXECUTE format('GRANT finstream_owner TO %I', current_user);
    END IF;
    -- Every table and sequence of the schema belongs to the owner role.
    FOR r IN
        SELECT format('%s %I.%I', CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                      n.nspname, c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'S')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d
                          WHERE d.objid = c.oid AND d.deptype = 'a' AND c.relkind = 'S')
    LOOP
        EXECUTE format('ALTER %s OWNER TO finstream_owner', r);
    END LOOP;
END $$;

-- history: appends ticks; nothing else.
GRANT SELECT, INSERT ON ticks TO finstream_history;
-- bars: upserts bars (highest revision wins).
GRANT SELECT, INSERT, UPDATE ON bars TO finstream_bars;
-- audit: appends to the chain and moves its head.
GRANT SELECT, INSERT ON audit_events TO finstream_audit;
GRANT SELECT, UPDATE ON audit_chain_head TO finstream_audit;
-- delivery workers: the deliveries state machine, results and the outbox.
GRANT SELECT, INSERT, UPDATE ON deliveries TO finstream_delivery;
GRANT SELECT, INSERT ON delivery_results TO finstream_delivery;
GRANT SELECT, INSERT, UPDATE, DELETE ON delivery_outbox TO finstream_delivery;
GRANT USAGE ON SEQUENCE delivery_outbox_id_seq TO finstream_delivery;
-- api: reads what it serves (bars, ticks) and attributes webhook events to
-- deliveries by their ids -- never the message bodies.
GRANT SELECT ON ticks, bars TO finstream_api;
GRANT SELECT (message_id, request_id, user_id, attempts, provider, provider_message_id)
    ON deliveries TO finstream_api;
