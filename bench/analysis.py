#!/usr/bin/env python3
"""Scenario analysis: the analysts' questions at a year's scale (issue: analysts' questions).

A database is loaded with growth.py's synthetic year (1,000 accounts, 20 contracts, one account
a tenth of the fills) as weex_sync 3.3 stored it: no analysis columns filled, no daily rollup.
Then, in one run:

- the upgrade's two data steps at UPGRADE_FILLS fills (3,000,000): the analysis columns filled
  from raw in batches of pages (backfill_analysis_columns), then trade_fills_daily built
  (build_daily_rollup);
- the table grown to FILLS (10,000,000) and the rollup built again;
- the statistics query ("fills, volume and fees per user and symbol") over trade_fills and over
  trade_fills_daily, and a month's realized PnL per user from the rollup: median of 5, warm;
- Store.save_batch of 200,000 new fills (batches of 1,000, as a pass commits them) with the
  rollup kept in the same statement and without it (INSERT_FILLS_SQL less its rolled_up CTE),
  interleaved, 3 rounds: the ratio of their times.

usage: analysis.py [--fills N] [--upgrade-fills N] [--insert-fills N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psycopg2
from growth import BASES, COINS, FILLS_SQL, SCALES, SYNTHETIC_ORDER_ID, SYNTHETIC_TRADE_ID
from run_bench import PG, ROOT, log

sys.path[:0] = [str(ROOT), str(ROOT / "dev")]
import weex_sync

DAY_MS = 86_400_000
# The README's statistics query, for the heaviest account (growth0: a tenth of the fills) as
# an analyst asks it of one account, and for every account.
STATISTICS_FILLS = """SELECT user_id, symbol, count(*), sum(size), sum(fee)
  FROM trade_fills WHERE user_id = 'growth0' GROUP BY user_id, symbol"""
STATISTICS_ROLLUP = """SELECT user_id, symbol, sum(fills), sum(size), sum(fee)
  FROM trade_fills_daily WHERE user_id = 'growth0' GROUP BY user_id, symbol"""
STATISTICS_ROLLUP_ALL = """SELECT user_id, symbol, sum(fills), sum(size), sum(fee)
  FROM trade_fills_daily GROUP BY user_id, symbol"""
MONTH_PNL = """SELECT user_id, sum(realized_pnl), sum(fee) FROM trade_fills_daily
 WHERE user_id = 'growth0' AND day >= current_date - 30 GROUP BY user_id"""
MONTH_PNL_ALL = """SELECT user_id, sum(realized_pnl), sum(fee) FROM trade_fills_daily
 WHERE day >= current_date - 30 GROUP BY user_id"""
# The INSERT as it was before the rollup: the same statement less its rolled_up CTE.
WITHOUT_ROLLUP = re.sub(
    r"\), rolled_up AS \(.*?\n\), resolved AS \(",
    "), resolved AS (",
    weex_sync.INSERT_FILLS_SQL,
    flags=re.DOTALL,
)


def connect(dbname: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dbname=dbname, **PG)
    conn.autocommit = True
    return conn


def load(cur: psycopg2.extensions.cursor, first: int, last: int, total: int, now: int) -> None:
    """Fills first..last-1 of growth.py's synthetic year of ``total`` fills."""
    t0, end = now - 365 * DAY_MS + 3_600_000, now - DAY_MS
    common = {"accounts": 1000, "failing": 10, "fail_from": now, "first_failing": 990}
    for lo in range(first, last, 250_000):
        args: dict[str, object] = {"t0": t0, "step": (end - t0) / total, "lo": lo}
        args["hi"] = min(last, lo + 250_000) - 1
        args |= {"coins": list(COINS), "bases": BASES, "scales": SCALES}
        args |= {"trade_base": SYNTHETIC_TRADE_ID, "order_base": SYNTHETIC_ORDER_ID}
        cur.execute(FILLS_SQL, {**common, **args})


def timed_ms(cur: psycopg2.extensions.cursor, query: str, repeats: int = 5) -> float:
    cur.execute(query)  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cur.execute(query)
        cur.fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def new_fills(n: int, now: int) -> list[weex_sync.Fill]:
    out = []
    for i in range(n):
        size, price = Decimal("0.0100"), Decimal("60000.5")
        out.append(
            weex_sync.Fill(
                trade_id=str(9 * 10**18 + i),
                order_id=str(8 * 10**18 + i // 3),
                symbol="cmt_btcusdt",
                side="1",
                price=price,
                size=size,
                fee=Decimal("0.36"),
                fee_coin="USDT",
                trade_time=now - 20 * DAY_MS + i * 1000,
                raw=f'{{"id": {i}}}',
                quote_value=price * size,
                realized_pnl=Decimal("1.5"),
                maker=i % 3 == 0,
                position_side="LONG",
            )
        )
    return out


def insert_seconds(db: weex_sync.DatabaseConfig, fills: list, user: str) -> float:
    store = weex_sync.Store(db)
    started = time.perf_counter()
    for i in range(0, len(fills), 1000):
        batch = fills[i : i + 1000]
        cursor = weex_sync.Cursor(0, batch[-1].trade_time, fills[0].trade_time + 1)
        store.save_batch(
            user, weex_sync.ALL_SYMBOLS, weex_sync.Batch(batch, [], cursor, False), cursor, None
        )
    took = time.perf_counter() - started
    store.close()
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fills", type=int, default=10_000_000)
    parser.add_argument("--upgrade-fills", type=int, default=3_000_000)
    parser.add_argument("--insert-fills", type=int, default=200_000)
    args = parser.parse_args(argv)
    now = int(time.time() * 1000)
    dbname = f"bench_analysis_{os.getpid()}"
    admin = connect("postgres")
    admin.cursor().execute(f"CREATE DATABASE \"{dbname}\" TEMPLATE template0 ENCODING 'UTF8'")
    db = weex_sync.DatabaseConfig(PG["host"], PG["port"], PG["user"], "", dbname, "disable")
    rows: list[tuple[str, str]] = []
    try:
        conn = weex_sync.connect(db)
        weex_sync.ensure_schema(conn)
        conn.close()
        plain = connect(dbname)
        cur = plain.cursor()
        started = time.monotonic()
        load(cur, 0, args.upgrade_fills, args.fills, now)
        cur.execute("VACUUM ANALYZE trade_fills")
        log(f"{args.upgrade_fills:,} fills loaded in {time.monotonic() - started:.0f} s")

        conn = weex_sync.connect(db)
        started = time.monotonic()
        weex_sync.backfill_analysis_columns(conn)
        backfill = time.monotonic() - started
        started = time.monotonic()
        with conn, conn.cursor() as pinned:
            weex_sync.build_daily_rollup(pinned)
        rollup = time.monotonic() - started
        conn.close()
        rows.append(
            (
                f"upgrade at {args.upgrade_fills:,} fills: analysis columns from raw",
                f"{backfill:.0f} s",
            )
        )
        rows.append(
            (f"upgrade at {args.upgrade_fills:,} fills: trade_fills_daily built", f"{rollup:.0f} s")
        )
        log(f"upgrade: backfill {backfill:.0f} s, rollup {rollup:.0f} s")

        started = time.monotonic()
        load(cur, args.upgrade_fills, args.fills, args.fills, now)
        cur.execute(
            "UPDATE trade_fills SET "
            + weex_sync.ANALYSIS_FROM_RAW.format()
            + " WHERE quote_value IS NULL"
        )
        cur.execute("VACUUM ANALYZE trade_fills")
        log(f"grown to {args.fills:,} fills in {time.monotonic() - started:.0f} s")
        conn = weex_sync.connect(db)
        started = time.monotonic()
        with conn, conn.cursor() as pinned:
            weex_sync.build_daily_rollup(pinned)
        rollup = time.monotonic() - started
        conn.close()
        cur.execute("VACUUM ANALYZE trade_fills_daily")
        cur.execute("SELECT count(*) FROM trade_fills_daily")
        days = cur.fetchone()
        assert days is not None
        rows.append(
            (
                f"trade_fills_daily built from {args.fills:,} fills ({days[0]:,} rows)",
                f"{rollup:.0f} s",
            )
        )

        figures = [
            ("fills, volume and fees per symbol of growth0, over trade_fills", STATISTICS_FILLS),
            ("the same from trade_fills_daily", STATISTICS_ROLLUP),
            ("the same for every account, from trade_fills_daily", STATISTICS_ROLLUP_ALL),
            ("a month's realized PnL and fees of growth0, from trade_fills_daily", MONTH_PNL),
            ("the same for every account", MONTH_PNL_ALL),
        ]
        for name, query in figures:
            rows.append((name, f"{timed_ms(cur, query):,.1f} ms"))

        fills = new_fills(args.insert_fills, now)
        original = weex_sync.INSERT_FILLS_SQL
        seconds: dict[str, list[float]] = {"with": [], "without": []}
        for round_ in range(3):
            for variant in ("without", "with"):
                weex_sync.INSERT_FILLS_SQL = original if variant == "with" else WITHOUT_ROLLUP
                user = f"bench_{variant}_{round_}"
                seconds[variant].append(insert_seconds(db, fills, user))
        weex_sync.INSERT_FILLS_SQL = original
        with_, without = statistics.median(seconds["with"]), statistics.median(seconds["without"])
        rows.append(
            (
                f"save_batch of {args.insert_fills:,} fills, rollup kept (median of 3)",
                f"{with_:.2f} s",
            )
        )
        rows.append(("the same without the rollup", f"{without:.2f} s"))
        rows.append(("ratio with / without", f"{with_ / without:.3f}x"))
        plain.close()
    finally:
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.close()
    print("| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
