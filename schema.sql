-- weex_sync schema (python weex_sync.py --print-schema); weex_sync creates it when missing.
-- sync_status is partitioned by day: a pass run by the tables' owner makes the partitions
-- ahead (and drops those older than sync.status_retention_days); days without one go to
-- sync_status_default. Apply this file as the owner (or run a pass as the owner).

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
ALTER TABLE trade_fills ADD COLUMN IF NOT EXISTS quote_value numeric;
ALTER TABLE trade_fills ADD COLUMN IF NOT EXISTS realized_pnl numeric;
ALTER TABLE trade_fills ADD COLUMN IF NOT EXISTS maker boolean;
ALTER TABLE trade_fills ADD COLUMN IF NOT EXISTS position_side text;
CREATE INDEX IF NOT EXISTS trade_fills_user_symbol_time
    ON trade_fills (user_id, symbol, trade_time DESC);
CREATE INDEX IF NOT EXISTS trade_fills_user_time ON trade_fills (user_id, trade_time);
CREATE INDEX IF NOT EXISTS trade_fills_time ON trade_fills USING brin (trade_time);
CREATE INDEX IF NOT EXISTS trade_fills_time_utc ON trade_fills USING brin ((to_timestamp(trade_time / 1000.0)));

-- Append-only: one row per (user, symbol) per pass; symbol '*' for sync.symbols: all.
-- Partitioned by day of last_sync_time (sync_status_pYYYYMMDD; an upgraded table is the
-- partition sync_status_until_YYYYMMDD): retention drops whole days, and deletes old rows
-- of sync_status_default in small batches.
CREATE SEQUENCE IF NOT EXISTS sync_status_id_seq;
CREATE TABLE IF NOT EXISTS sync_status (
    id              bigint NOT NULL DEFAULT nextval('sync_status_id_seq'),
    pass_id         text NOT NULL,
    user_id         text NOT NULL,
    symbol          text NOT NULL,
    last_sync_time  timestamptz NOT NULL DEFAULT now(),
    last_trade_time bigint,  -- newest fill stored for (user, symbol), ms
    records_count   integer NOT NULL,  -- rows inserted this pass
    fetched_count   integer NOT NULL,  -- fills received this pass
    requests_count  integer NOT NULL,  -- HTTP requests sent, retries included
    duration_ms     integer NOT NULL,
    status          text NOT NULL CONSTRAINT sync_status_status_check CHECK (status IN ('success', 'error')),
    error_message   text,
    late_count      integer NOT NULL DEFAULT 0,  -- of records_count: fills that became visible after a walk had read their time
    rejected_count  integer NOT NULL DEFAULT 0,  -- fills put in rejected_fills this pass
    synced_through  bigint,  -- every fill up to here is stored (ms): the last walk end minus the lookback
    error_kind      text  -- credentials, access, symbol, rejected_fills, exchange, rate_limit, database, ...
) PARTITION BY RANGE (last_sync_time);
ALTER SEQUENCE sync_status_id_seq OWNED BY sync_status.id;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS late_count integer NOT NULL DEFAULT 0;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS rejected_count integer NOT NULL DEFAULT 0;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS synced_through bigint;
ALTER TABLE sync_status ADD COLUMN IF NOT EXISTS error_kind text;
CREATE TABLE IF NOT EXISTS sync_status_default PARTITION OF sync_status DEFAULT;
CREATE INDEX IF NOT EXISTS sync_status_default_time ON sync_status_default (last_sync_time);
CREATE INDEX IF NOT EXISTS sync_status_default_pair
    ON sync_status_default (user_id, symbol, last_sync_time);
-- The latest status of each pair, and its last success: written with every status row (the
-- same statement), so --status costs the same however long a pair has failed, and a last
-- success stays known after retention dropped its row.
CREATE TABLE IF NOT EXISTS sync_latest (
    user_id         text NOT NULL,
    symbol          text NOT NULL,
    status_id       bigint NOT NULL,  -- sync_status.id of the latest row
    pass_id         text NOT NULL,
    last_sync_time  timestamptz NOT NULL,
    last_trade_time bigint,  -- newest fill stored for (user, symbol), ms
    records_count   integer NOT NULL,  -- rows inserted this pass
    fetched_count   integer NOT NULL,  -- fills received this pass
    requests_count  integer NOT NULL,  -- HTTP requests sent, retries included
    duration_ms     integer NOT NULL,
    status          text NOT NULL,
    error_message   text,
    late_count      integer NOT NULL,  -- of records_count: fills that became visible after a walk had read their time
    rejected_count  integer NOT NULL,  -- fills put in rejected_fills this pass
    synced_through  bigint,  -- every fill up to here is stored (ms): the last walk end minus the lookback
    error_kind      text,  -- credentials, access, symbol, rejected_fills, exchange, rate_limit, database, ...
    last_success_time timestamptz,  -- the latest row with status 'success'
    PRIMARY KEY (user_id, symbol)
);
ALTER TABLE sync_latest ADD COLUMN IF NOT EXISTS late_count integer NOT NULL DEFAULT 0;
ALTER TABLE sync_latest ADD COLUMN IF NOT EXISTS rejected_count integer NOT NULL DEFAULT 0;
ALTER TABLE sync_latest ADD COLUMN IF NOT EXISTS synced_through bigint;
ALTER TABLE sync_latest ADD COLUMN IF NOT EXISTS error_kind text;

-- The incremental cursor, written in the same transaction as the fills it covers.
-- Every fill with trade_time < synced_through has been read, except while walk_end is set:
-- then an interrupted walk still owes [synced_through, walk_end] and, when it completes,
-- moves synced_through to walk_target. last_end: every fill up to it has been read once (one
-- stored later at or before it was late). reconciled_at: the last re-read of the reconcile
-- window. Where the next walk starts is the cursor rule (docs/exactness.md).
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

-- Which pass works on a user, so that several processes or machines split a fleet without
-- syncing a user twice: a pass claims a user only if no other pass claimed it within
-- sync.min_interval_seconds; the holder renews claimed_at with every commit, and the claim of
-- a pass that died expires by itself.
CREATE TABLE IF NOT EXISTS sync_claims (
    claim_key  text        PRIMARY KEY,  -- 'user <user_id>', or 'account <account>'
    claimed_at timestamptz NOT NULL,
    claimed_by text        NOT NULL      -- the pass id
);

-- Users whose credentials or access the exchange refused: not asked again before next_try
-- (the wait doubles from one pass interval up to an hour: WEEX may disable a key that keeps
-- sending refused requests), or at once when the credentials in the configuration change
-- (fingerprint: a hash of api_key, secret_key and passphrase). A success deletes the row.
CREATE TABLE IF NOT EXISTS sync_backoff (
    user_id       text        PRIMARY KEY,
    fingerprint   text        NOT NULL,
    failures      integer     NOT NULL,  -- refused passes in a row
    failed_at     timestamptz NOT NULL,
    next_try      timestamptz NOT NULL,
    error_kind    text        NOT NULL,  -- credentials or access
    error_message text        NOT NULL
);

-- Upgrades from weex_sync 1.x and 2.x (no-ops on a new database).
ALTER TABLE sync_cursor ADD COLUMN IF NOT EXISTS last_end bigint;
ALTER TABLE sync_cursor ADD COLUMN IF NOT EXISTS reconciled_at bigint;
WITH RECURSIVE pairs AS (
    (SELECT user_id, symbol FROM sync_status ORDER BY user_id, symbol LIMIT 1)
    UNION ALL
    SELECT later.user_id, later.symbol FROM pairs CROSS JOIN LATERAL (
        SELECT user_id, symbol FROM sync_status s
         WHERE (s.user_id, s.symbol) > (pairs.user_id, pairs.symbol)
         ORDER BY user_id, symbol LIMIT 1) later
)
INSERT INTO sync_latest (user_id, symbol, status_id, pass_id, last_sync_time, last_trade_time, records_count, fetched_count, requests_count, duration_ms, status, error_message, late_count, rejected_count, synced_through, error_kind, last_success_time)
SELECT pairs.user_id, pairs.symbol, latest.id, pass_id, last_sync_time, last_trade_time, records_count, fetched_count, requests_count, duration_ms, status, error_message, late_count, rejected_count, synced_through, error_kind, success.last_success_time
  FROM pairs
 CROSS JOIN LATERAL (
        SELECT * FROM sync_status s WHERE s.user_id = pairs.user_id AND s.symbol = pairs.symbol
         ORDER BY s.last_sync_time DESC, s.id DESC LIMIT 1) latest
  LEFT JOIN LATERAL (
        SELECT s.last_sync_time AS last_success_time FROM sync_status s
         WHERE s.user_id = pairs.user_id AND s.symbol = pairs.symbol AND s.status = 'success'
         ORDER BY s.last_sync_time DESC LIMIT 1) success ON true
ON CONFLICT (user_id, symbol) DO NOTHING;

-- For analysts: times as timestamptz (UTC) and sides as words.
CREATE OR REPLACE VIEW trade_fills_readable AS
SELECT user_id, symbol, order_id, trade_id,
       CASE side WHEN '1' THEN 'buy' WHEN '2' THEN 'sell' END AS side,
       price, size, fee, fee_coin,
       to_timestamp(trade_time / 1000.0) AS trade_time,
       synced_at, quote_value, realized_pnl, maker, position_side
  FROM trade_fills;
-- (WHERE trade_time >= now() - interval '1 day' on the view uses trade_fills_time_utc.)

-- Per user, contract, UTC day and fee coin: what the fills of trade_fills add up to. Kept in
-- the transaction that inserts them, from the rows the INSERT really inserted, so it always
-- equals the same aggregate over trade_fills (sums of NULLs stay NULL, as sum() does); an
-- upgrade builds it from the stored fills. weex_sync never deletes fills: a user who deletes
-- or detaches some deletes their days here too.
CREATE TABLE IF NOT EXISTS trade_fills_daily (
    user_id      text    NOT NULL,
    symbol       text    NOT NULL,
    day          date    NOT NULL,  -- UTC day of trade_time
    fee_coin     text    NOT NULL,
    fills        bigint  NOT NULL,
    size         numeric NOT NULL,
    quote_value  numeric,
    fee          numeric NOT NULL,
    realized_pnl numeric,
    maker_fills  bigint  NOT NULL,  -- of fills: maker = true
    taker_fills  bigint  NOT NULL,  -- of fills: maker = false (v2 does not say: neither)
    PRIMARY KEY (user_id, symbol, day, fee_coin)
);
CREATE INDEX IF NOT EXISTS trade_fills_daily_day ON trade_fills_daily (day);  -- every account's days

-- When this says the current version, weex_sync runs none of the statements above: no pass
-- ever waits for a lock that an analyst's open transaction holds.
CREATE TABLE IF NOT EXISTS weex_sync_schema (version integer NOT NULL);
DELETE FROM weex_sync_schema;
INSERT INTO weex_sync_schema (version) VALUES (7);
