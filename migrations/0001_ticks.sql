-- Tick history. Prices are numeric: no cent is lost to binary floats.
-- (symbol, tick_id) is the idempotency key: a replayed tick never makes a second row.
CREATE TABLE IF NOT EXISTS ticks (
    symbol       text           NOT NULL,
    tick_id      text           NOT NULL,
    ts           timestamptz    NOT NULL,
    kind         text           NOT NULL,
    price        numeric(24, 8) NOT NULL CHECK (price > 0),
    size         numeric(24, 8),
    bid          numeric(24, 8),
    ask          numeric(24, 8),
    prev_close   numeric(24, 8),
    currency     text,
    source       text           NOT NULL,
    received_at  timestamptz    NOT NULL,
    inserted_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, tick_id)
);

CREATE INDEX IF NOT EXISTS ticks_symbol_ts ON ticks (symbol, ts);
