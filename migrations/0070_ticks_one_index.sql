-- ticks kept two indexes that lead with the same column: the idempotency key
-- (symbol, tick_id, ts) and ticks_symbol_ts (symbol, ts) for reads by time.
-- One primary key ordered (symbol, ts, tick_id) serves both: reads by symbol
-- and time range use its prefix, and ON CONFLICT (symbol, tick_id, ts) infers
-- a unique index by its columns in any order. Every COPY of the history sink
-- then maintains one index fewer: 1.24-1.43x the rows/s of COPY into a
-- partitioned ticks table, measured on the bench machine (bench/RESULTS.md).
-- On a large table this rebuilds the key of every partition: run it in a
-- quiet hour (the history role waits on the lock, then catches up).
ALTER TABLE ticks DROP CONSTRAINT ticks_pkey;
ALTER TABLE ticks ADD PRIMARY KEY (symbol, ts, tick_id);
DROP INDEX IF EXISTS ticks_symbol_ts;
