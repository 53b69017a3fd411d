-- OHLCV bars built by the quotes agent from md.ticks (1m by default; 5m, 1h by setting).
-- One row per (symbol, interval, start). A late tick republishes a bar with a
-- higher revision; the bars sink upserts and keeps the highest revision, so
-- redelivered or reordered publications never move a bar backwards.
CREATE TABLE IF NOT EXISTS bars (
    symbol      text           NOT NULL,
    interval    text           NOT NULL,
    start       timestamptz    NOT NULL,
    "end"       timestamptz    NOT NULL,
    open        numeric(24, 8) NOT NULL,
    high        numeric(24, 8) NOT NULL,
    low         numeric(24, 8) NOT NULL,
    close       numeric(24, 8) NOT NULL,
    volume      numeric(24, 8) NOT NULL,
    vwap        numeric(24, 8),
    trades      integer        NOT NULL DEFAULT 0,
    final       boolean        NOT NULL DEFAULT false,
    revision    integer        NOT NULL DEFAULT 0,
    updated_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, interval, start),
    CHECK ("end" > start),
    CHECK (low <= high)
);

-- Time-range reads across symbols (the API reads by symbol, interval and range
-- through the primary key; this serves "every bar of the last hour").
CREATE INDEX IF NOT EXISTS bars_interval_start ON bars (interval, start);
