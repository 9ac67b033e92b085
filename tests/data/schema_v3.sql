-- weex_sync schema (python weex_sync.py --print-schema); weex_sync creates it when missing.

-- One row per fill, exactly as the exchange reported it (raw) plus typed columns.
CREATE TABLE IF NOT EXISTS trade_fills (
    user_id    text        NOT NULL,
    order_id   text        NOT NULL,
    trade_id   text        NOT NULL,
    symbol     text        NOT NULL,                             -- contract, e.g. cmt_btcusdt
    side       text        NOT NULL CHECK (side IN ('1', '2')),  -- '1' buy, '2' sell
    price      numeric     NOT NULL,
    size       numeric     NOT NULL,
    fee        numeric     NOT NULL,                             -- sign as sent (negative = rebate)
    fee_coin   text        NOT NULL,
    trade_time bigint      NOT NULL,                             -- ms since epoch
    raw        jsonb       NOT NULL,
    synced_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trade_fills_fill_key UNIQUE (user_id, order_id, trade_id, trade_time)
);
CREATE INDEX IF NOT EXISTS trade_fills_user_symbol_time
    ON trade_fills (user_id, symbol, trade_time DESC);

-- Append-only: one row per (user, symbol) per pass; symbol '*' for sync.symbols: all.
CREATE TABLE IF NOT EXISTS sync_status (
    id              bigserial   PRIMARY KEY,
    pass_id         text        NOT NULL,
    user_id         text        NOT NULL,
    symbol          text        NOT NULL,
    last_sync_time  timestamptz NOT NULL DEFAULT now(),
    last_trade_time bigint,                  -- newest fill stored for (user, symbol), ms
    records_count   integer     NOT NULL,    -- rows inserted this pass
    fetched_count   integer     NOT NULL,    -- fills received this pass
    requests_count  integer     NOT NULL,    -- HTTP requests sent, retries included
    duration_ms     integer     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('success', 'error')),
    error_message   text,
    late_count      integer     NOT NULL DEFAULT 0, -- of records_count: fills that became
                                                    -- visible after a walk had read their time
    rejected_count  integer     NOT NULL DEFAULT 0, -- fills put in rejected_fills this pass
    synced_through  bigint,                 -- every fill up to here is stored (ms): the
                                            -- cursor's last walk end minus the lookback
    error_kind      text                    -- credentials, access, symbol, rejected_fills,
                                            -- exchange, unreachable, rate_limit, database, ...
);
CREATE INDEX IF NOT EXISTS sync_status_last_sync_time ON sync_status (last_sync_time DESC);
CREATE INDEX IF NOT EXISTS sync_status_user_symbol
    ON sync_status (user_id, symbol, last_sync_time DESC);

-- The incremental cursor, written in the same transaction as the fills it covers.
-- Every fill with trade_time < synced_through has been read, except while walk_end is set:
-- then an interrupted walk still owes [synced_through, walk_end] and, when it completes,
-- moves synced_through to walk_target. last_end: every fill up to it has been read once (one
-- stored later at or before it was late). reconciled_at: the last re-read of the reconcile
-- window. Where the next walk starts is the cursor rule (README, "How it stays exact").
CREATE TABLE IF NOT EXISTS sync_cursor (
    user_id        text        NOT NULL,
    symbol         text        NOT NULL,
    synced_through bigint      NOT NULL,
    walk_end       bigint,
    walk_target    bigint,
    last_end       bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    reconciled_at  bigint,
    PRIMARY KEY (user_id, symbol)
);

-- The quarantine: fills the exchange served that weex_sync will not store as they are (a bad
-- amount or id, a time outside the request, another version of a stored fill). One row per
-- distinct fill as sent; resolved_at is set when a valid version of it is stored.
CREATE TABLE IF NOT EXISTS rejected_fills (
    id          bigserial   PRIMARY KEY,
    user_id     text        NOT NULL,
    symbol      text        NOT NULL,    -- the fill's contract if readable, else '*'
    order_id    text,                    -- if readable
    trade_id    text,                    -- if readable
    trade_time  bigint,                  -- if readable, ms
    reason      text        NOT NULL,
    raw         text        NOT NULL,    -- the fill as sent, JSON text (escaped, cut at 16 KB)
    fingerprint text        NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    seen_count  integer     NOT NULL DEFAULT 1,
    resolved_at timestamptz,
    CONSTRAINT rejected_fills_fill UNIQUE (user_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS rejected_fills_open
    ON rejected_fills (user_id, order_id, trade_id) WHERE resolved_at IS NULL;

-- Upgrades from weex_sync 1.x and 2.x (no-ops on a new database).
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS late_count integer NOT NULL DEFAULT 0;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS rejected_count integer NOT NULL DEFAULT 0;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS synced_through bigint;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS error_kind text;
ALTER TABLE sync_cursor ADD COLUMN IF NOT EXISTS last_end bigint;
ALTER TABLE sync_cursor ADD COLUMN IF NOT EXISTS reconciled_at bigint;

-- For analysts: times as timestamptz (UTC) and sides as words.
CREATE OR REPLACE VIEW trade_fills_readable AS
SELECT user_id, symbol, order_id, trade_id,
       CASE side WHEN '1' THEN 'buy' WHEN '2' THEN 'sell' END AS side,
       price, size, fee, fee_coin,
       to_timestamp(trade_time / 1000.0) AS trade_time,
       synced_at
  FROM trade_fills;

-- When this says the current version, weex_sync runs none of the statements above: no pass
-- ever waits for a lock that an analyst's open transaction holds.
CREATE TABLE IF NOT EXISTS weex_sync_schema (version integer NOT NULL);
DELETE FROM weex_sync_schema;
INSERT INTO weex_sync_schema (version) VALUES (3);
