"""The bench's baselines, and the contract's signing and paging rule they share (dlt_peer.py
too). Each prints its result as one JSON object on stdout; credentials come as JSON on stdin.

    peers.py fetch BASE_URL API_VERSION START_MS
        the bare fetch-only loop: one keep-alive session, JSON parsed exactly as the contract
        requires, no fill parsing, no database: the practical limit of a backfill
    peers.py naive BASE_URL API_VERSION START_MS DSN
        what most hand-rolled sync scripts do: serial, one INSERT and one COMMIT per fill, into
        weex_sync's own schema (same indexes, same columns, same raw JSON)
    peers.py storage N HOST PORT USER SAVE_BATCH_DB NAIVE_DB
        storage alone, no HTTP: N generated fills parsed once by weex_sync.parse_fill, then
        stored by Store.save_batch as a backfill stores them (1,000 per batch, each with its
        cursor) and, into the other database, one INSERT and one COMMIT per fill; timed

Every client walks the fills the way weex_sync does (docs/weex-api.md): v3 in windows
of at most 7 days, oldest window first, v2 in one range; a full page means "there may be more"
(v2: nextFlag) and the next request keeps the page's far end inclusive -- endTime = its oldest
time when pages come newest first, startTime = its newest when oldest first (read off the page)
-- dropping the fills already seen at that boundary. A full page within one millisecond is not
handled (the generated histories have none): the walk raises rather than loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

PATHS = {2: "/capi/v2/order/fills", 3: "/capi/v3/userTrades"}
ID, TIME = {2: "tradeId", 3: "id"}, {2: "createdTime", 3: "time"}
WINDOW_MS = 7 * 86_400_000  # v3: one request spans at most 7 days
INSERT_SQL = (
    "INSERT INTO trade_fills (user_id, order_id, trade_id, symbol, side, price, size, fee,"
    " fee_coin, trade_time, raw) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)


def signed_headers(creds: dict, path: str, query: str) -> dict[str, str]:
    """The contract's headers: ACCESS-SIGN = base64(HMAC_SHA256(secret, prehash))."""
    timestamp = str(int(time.time() * 1000))
    prehash = timestamp + "GET" + path + (f"?{query}" if query else "")
    digest = hmac.new(creds["secret_key"].encode(), prehash.encode(), hashlib.sha256).digest()
    return {
        "ACCESS-KEY": creds["api_key"],
        "ACCESS-SIGN": base64.b64encode(digest).decode(),
        "ACCESS-TIMESTAMP": timestamp,
        "ACCESS-PASSPHRASE": creds["passphrase"],
        "Content-Type": "application/json",
        "locale": "en-US",
    }


def walk_pages(
    get: Callable[..., Any], base_url: str, creds: dict, version: int, start: int
) -> Iterator[list[dict]]:
    """The new fills of each page (parsed JSON objects) of every contract of the account (no
    ``symbol``: weex_sync's default ``sync.symbols: all``), up to now. ``get`` is
    ``requests.get`` or a session's ``get``."""
    path, end = PATHS[version], int(time.time() * 1000)
    lo = start
    while lo <= end:
        hi = end if version == 2 else min(end, lo + WINDOW_MS - 1)
        a, b, seen = lo, hi, set()
        while True:
            query = urlencode({"startTime": a, "endTime": b, "limit": 100})
            headers = signed_headers(creds, path, query)
            response = get(f"{base_url}{path}?{query}", headers=headers, timeout=30)
            response.raise_for_status()
            body = json.loads(response.content, parse_float=Decimal)
            fills = body["list"] if version == 2 else body
            ids = [str(f[ID[version]]) for f in fills]
            yield [f for f, i in zip(fills, ids) if i not in seen]
            if not (body["nextFlag"] if version == 2 else len(fills) >= 100):
                break
            times = [int(f[TIME[version]]) for f in fills]
            if min(times) == max(times):
                raise RuntimeError(f"a full page within millisecond {times[0]}: not handled")
            newest_first = times[0] > times[-1]
            edge = min(times) if newest_first else max(times)
            seen = {i for i, t in zip(ids, times) if t == edge}
            a, b = (a, edge) if newest_first else (edge, b)
        lo = hi + 1


def row(version: int, user_id: str, f: dict) -> tuple:
    """The trade_fills row of a fill, as the contract maps it."""
    if version == 3:
        symbol, coin = "cmt_" + f["symbol"].lower(), f["commissionAsset"]
        trade_id, side, fee, at = f["id"], f["side"], f["commission"], f["time"]
        size, price = Decimal(f["qty"]), Decimal(f["price"])
    else:
        symbol, coin = f["symbol"], f["symbol"][-4:].upper()
        trade_id, side, fee, at = f["tradeId"], f["orderSide"], f["fillFee"], f["createdTime"]
        size = Decimal(f["fillSize"])
        price = Decimal(f["fillValue"]) / size
    side, raw = {"BUY": "1", "SELL": "2"}[side], json.dumps(f, default=str)
    ids = (str(f["orderId"]), str(trade_id))
    return (user_id, *ids, symbol, side, price, size, Decimal(fee), coin, int(at), raw)


def fetch(base_url: str, version: str, start: str) -> dict:
    import requests

    creds, fills, pages = json.loads(sys.stdin.read()), 0, 0
    with requests.Session() as session:
        for page in walk_pages(session.get, base_url, creds, int(version), int(start)):
            fills, pages = fills + len(page), pages + 1
    return {"fills": fills, "requests": pages}


def naive(base_url: str, version: str, start: str, dsn: str) -> dict:
    import psycopg2
    import requests

    from weex_sync import SCHEMA_SQL

    creds, inserted = json.loads(sys.stdin.read()), 0
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(SCHEMA_SQL)
    with requests.Session() as session, conn.cursor() as cur:
        for page in walk_pages(session.get, base_url, creds, int(version), int(start)):
            for fill in page:
                cur.execute(INSERT_SQL, row(int(version), creds["user_id"], fill))
                inserted += cur.rowcount
                conn.commit()
    conn.close()
    return {"fills": inserted}


def storage(count: str, host: str, port: str, user: str, *dbnames: str) -> dict:
    from weex_sim import Simulator
    from weex_sync import (
        ALL_SYMBOLS,
        V3,
        Batch,
        Cursor,
        DatabaseConfig,
        Store,
        connect,
        ensure_schema,
        maintain_partitions,
        parse_fill,
    )

    sim = Simulator(symbols=["cmt_btcusdt"], seed=7)
    sim.add_account("k", "s", "p")
    end = int(time.time() * 1000) - 3_600_000
    sim.generate_fills("k", "cmt_btcusdt", int(count), start_ms=end - 30 * 86_400_000, end_ms=end)
    fills = [parse_fill(V3, obj, ALL_SYMBOLS) for obj in sim.fills("k", version=3)]  # newest first
    results = {}
    for method, dbname in zip(("save_batch", "naive"), dbnames, strict=True):
        db = DatabaseConfig(host, int(port), user, "", dbname, "disable")
        conn = connect(db)
        ensure_schema(conn)
        maintain_partitions(conn)
        conn.close()
        store, rows, started = Store(db), 0, time.perf_counter()
        if method == "save_batch":
            for i in range(0, len(fills), 1000):
                batch = fills[i : i + 1000]
                cursor = Cursor(0, batch[-1].trade_time, fills[0].trade_time + 1)  # mid-walk
                saved = store.save_batch(
                    "bench", ALL_SYMBOLS, Batch(batch, [], cursor, False), cursor, None
                )
                rows += saved.inserted
        else:
            for f in fills:
                with store.transaction() as cur:  # one INSERT, one COMMIT
                    cur.execute(INSERT_SQL, ("bench", f.order_id, f.trade_id, *f[2:]))
                    rows += cur.rowcount
        results[method] = {"rows": rows, "seconds": time.perf_counter() - started}
        store.close()
    return results


if __name__ == "__main__":
    commands: dict[str, Callable[..., dict]] = {"fetch": fetch, "naive": naive, "storage": storage}
    command = commands[sys.argv[1]]
    print(json.dumps(command(*sys.argv[2:])))
