"""The naive baseline: what most hand-rolled sync scripts do.

Serial: fetch a page, then for every fill one INSERT and one COMMIT, then the next page. Same
signed requests and paging as weex_sync (see peers_common) and the same ``trade_fills`` table
(weex_sync's schema, so indexes and constraints cost the same), same columns and raw JSON.
Prints ``{"fills": n, "inserted": n, "requests": n}`` as JSON on stdout.

usage: naive_sync.py BASE_URL SYMBOL START_MS DSN  (credentials as JSON on stdin)
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal

import psycopg2
import requests
from peers_common import walk_pages

from weex_sync import SCHEMA_SQL

INSERT_SQL = (
    "INSERT INTO trade_fills (user_id, order_id, trade_id, symbol, side, price, size, fee,"
    " fee_coin, trade_time, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)


def row(user_id: str, fill: dict) -> tuple:
    size = Decimal(fill["fillSize"])
    return (
        user_id,
        str(fill["orderId"]),
        str(fill["tradeId"]),
        fill["symbol"],
        "1" if fill["orderSide"] == "BUY" else "2",
        Decimal(fill["fillValue"]) / size,
        size,
        Decimal(fill["fillFee"]),
        fill["symbol"][-4:].upper(),
        int(fill["createdTime"]),
        json.dumps(fill, default=str),
    )


def main() -> int:
    base_url, symbol, start, dsn = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    creds = json.loads(sys.stdin.read())
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(SCHEMA_SQL)
    fills = inserted = pages = 0
    with requests.Session() as session, conn.cursor() as cur:
        for page in walk_pages(session.get, base_url, creds, symbol, start):
            pages += 1
            for fill in page:
                cur.execute(INSERT_SQL, row(creds["user_id"], fill))
                inserted += cur.rowcount
                conn.commit()
                fills += 1
    conn.close()
    print(json.dumps({"fills": fills, "inserted": inserted, "requests": pages}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
