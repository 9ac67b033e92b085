"""Exact on every history, over HTTP against the simulator and PostgreSQL: a first page of one
millisecond, fills shown late (newer and older than the newest stored one), the reconcile,
a malformed fill, corrections, a wrong clock, an exchange whose selection and page order
differ. test_paging.py holds the same properties over random histories, without HTTP."""

from __future__ import annotations

import time
from decimal import Decimal

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Database,
    Harness,
    all_apis,
    expected_fills,
    make_account,
    now_ms,
    stored_fills,
)

MINUTE_MS = 60_000


def late_fill(sim, account, *, dated_ms_ago: int, visible_in_ms: int = 300, symbol=BTC) -> dict:
    """A fill dated ``dated_ms_ago`` that the exchange shows only ``visible_in_ms`` from now."""
    now = now_ms()
    created = now - dated_ms_ago
    return sim.add_fill(
        account.api_key,
        symbol,
        created_time=created,
        visible_after_ms=now + visible_in_ms - created,
        size="0.25",
        value="25000",
    )


def trade_ids(db: Database, user_id: str = "user1") -> set[str]:
    return {
        r[0] for r in db.rows("SELECT trade_id FROM trade_fills WHERE user_id = %s", (user_id,))
    }


@all_apis
def test_a_first_page_that_is_one_millisecond_syncs_exactly(harness: Harness, db: Database, sim):
    """130 fills of 2 orders in one millisecond, nothing newer in that window: the walk's first
    full page is that millisecond (2.0: "'FillsClient' object has no attribute 'newest_first'"
    on every pass)."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 300, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    ms = START_MS + 2 * DAY_MS
    sim.add_burst(account.api_key, BTC, ms, 130, orders=2)
    harness.accounts = [account]

    assert harness.run() == 0, harness.log
    assert stored_fills(db) == harness.expected(account, BTC)
    assert db.scalar("SELECT count(*) FROM trade_fills WHERE trade_time = %s", (ms,)) == 130
    assert harness.run() == 0  # and every pass after it
    assert db.status()[-1]["status"] == "success"


@all_apis
def test_fills_newer_than_every_stored_one_shown_10_minutes_or_3_days_late_arrive_next_pass(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)  # its stored history is 40 days old
    sim.generate_fills(account.api_key, BTC, 200, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    assert harness.run() == 0
    late = [
        late_fill(sim, account, dated_ms_ago=10 * MINUTE_MS),
        late_fill(sim, account, dated_ms_ago=3 * DAY_MS),
    ]
    time.sleep(0.4)  # visible now: 10 minutes and 3 days after their time
    sim.reset_stats()

    assert harness.run() == 0

    assert {str(f["tradeId"]) for f in late} <= trade_ids(db)
    assert stored_fills(db) == harness.expected(account, BTC)
    row = db.status()[-1]
    assert row["records_count"] == 2 and row["late_count"] == 2
    assert row["requests_count"] == 1  # a quiet account: still one request
    assert harness.run() == 0
    assert db.status()[-1]["requests_count"] == 1 and db.status()[-1]["records_count"] == 0


@all_apis
def test_a_fill_older_than_the_newest_stored_shown_20_hours_late_is_stored_by_the_reconcile(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    sim.add_fill(account.api_key, BTC, created_time=now_ms() - MINUTE_MS)  # the newest
    harness.accounts = [account]
    harness.sync.update(reconcile_every_seconds=3, reconcile_window_seconds=86_400)
    assert harness.run() == 0
    late = late_fill(sim, account, dated_ms_ago=20 * 3_600_000)
    time.sleep(0.4)

    assert harness.run() == 0  # the reconcile is not due yet: lookback only
    assert str(late["tradeId"]) not in trade_ids(db)
    time.sleep(3)
    assert harness.run() == 0  # due: re-reads the last 24 h

    assert str(late["tradeId"]) in trade_ids(db)
    assert db.status()[-1]["late_count"] == 1
    assert "user1/cmt_btcusdt: reconcile: re-reading from" in harness.last_log


@all_apis
def test_a_malformed_fill_is_quarantined_and_every_other_fill_stored(
    harness: Harness, db: Database, sim, api
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 500, start_ms=START_MS, end_ms=START_MS + 2 * DAY_MS)
    bad = {"fillSize": "-0.5"} if api.version == 2 else {"qty": "-0.5"}
    sim.add_fill(account.api_key, BTC, created_time=START_MS + DAY_MS, trade_id=42, **bad)
    harness.accounts = [account]

    assert harness.run() == 1  # loud: the pass fails ...

    good = [f for f in harness.served(account, BTC) if str(f.get("tradeId", f.get("id"))) != "42"]
    assert stored_fills(db) == expected_fills("user1", good)  # ... and stores all 500 others
    [(trade_id, reason, resolved)] = db.rows(
        "SELECT trade_id, reason, resolved_at FROM rejected_fills"
    )
    assert trade_id == "42" and "is not positive" in reason and resolved is None
    row = db.status()[-1]
    assert row["status"] == "error" and row["rejected_count"] == 1
    assert row["error_message"].startswith("1 fill rejected")
    assert "fill rejected: fill" in harness.last_log
    assert harness.run("--status") == 0
    assert "REJECTED" in harness.out.splitlines()[0]

    sim.generate_fills(account.api_key, BTC, 50, start_ms=now_ms() - 5000, end_ms=now_ms() - 10)
    assert harness.run() == 0  # not stuck: later fills arrive, the bad one stays quarantined
    assert stored_fills(db) == expected_fills(
        "user1",
        [f for f in harness.served(account, BTC) if str(f.get("tradeId", f.get("id"))) != "42"],
    )


@all_apis
def test_a_corrected_fill_keeps_the_stored_row_and_is_quarantined(
    harness: Harness, db: Database, sim, api
):
    """The exchange corrects a stored fill's fee, and another one's time by 1 ms: the stored
    rows stay (one row per fill, never two), the corrections go to the quarantine, and the
    fills after them are stored."""
    account = make_account(sim, 1)
    now = now_ms()
    fee = sim.add_fill(account.api_key, BTC, created_time=now - 30_000, trade_id=7, order_id=70)
    moved = sim.add_fill(account.api_key, BTC, created_time=now - 20_000, trade_id=8, order_id=80)
    harness.accounts = [account]
    assert harness.run() == 0
    sim.remove_fill(account.api_key, BTC, 7)
    sim.add_fill(
        account.api_key, BTC, created_time=now - 30_000, trade_id=7, order_id=70, fee="0.5"
    )
    sim.remove_fill(account.api_key, BTC, 8)
    sim.add_fill(account.api_key, BTC, created_time=now - 19_999, trade_id=8, order_id=80)
    later = sim.add_fill(account.api_key, BTC, created_time=now_ms() - 10)

    assert harness.run() == 1

    rows = db.rows("SELECT trade_id, fee, trade_time FROM trade_fills ORDER BY trade_time")
    assert rows == [
        ("7", fee_of(fee), fee["createdTime"]),
        ("8", fee_of(moved), moved["createdTime"]),
        (str(later["tradeId"]), fee_of(later), later["createdTime"]),
    ]
    reasons = dict(db.rows("SELECT trade_id, reason FROM rejected_fills"))
    assert set(reasons) == {"7", "8"}
    assert "correction" in reasons["7"] and "fee 0.06 -> 0.5" in reasons["7"]
    assert "correction" in reasons["8"] and "trade_time" in reasons["8"]
    assert db.status()[-1]["error_message"].startswith("2 fills rejected")


def fee_of(fill: dict) -> Decimal:
    return Decimal(str(fill["fillFee"]))


def test_one_trade_served_in_two_contracts_of_an_all_walk_is_one_row(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1, "all")
    now = now_ms()
    sim.add_fill(account.api_key, BTC, created_time=now - 30_000, trade_id=5, order_id=50)
    harness.accounts = [account]
    harness.sync["symbols"] = "all"
    assert harness.run() == 0
    sim.add_fill(account.api_key, ETH, created_time=now - 30_000, trade_id=5, order_id=50)
    sim.add_fill(account.api_key, ETH, created_time=now - 10, trade_id=6, order_id=60)

    assert harness.run() == 1

    assert db.rows("SELECT trade_id, symbol FROM trade_fills ORDER BY trade_id") == [
        ("5", BTC),
        ("6", ETH),
    ]
    [(symbol, reason)] = db.rows("SELECT symbol, reason FROM rejected_fills")
    assert symbol == ETH and "symbol cmt_btcusdt -> cmt_ethusdt" in reason


@all_apis
def test_an_exchange_clock_a_day_ahead_moves_no_cursor_past_unseen_fills(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 100, start_ms=START_MS, end_ms=now_ms() - 3600_000)
    harness.accounts = [account]
    sim.clock_offset_ms = DAY_MS  # its time endpoint (and everything it checks) a day ahead
    assert harness.run() == 0
    sim.clock_offset_ms = 0
    now = now_ms()
    sim.generate_fills(account.api_key, BTC, 30, start_ms=now - 20_000, end_ms=now - 10, seed=3)

    assert harness.run() == 0

    assert stored_fills(db) == harness.expected(account, BTC)


@all_apis
def test_selection_and_page_order_that_differ_lose_nothing(
    harness: Harness, db: Database, sim, api
):
    """The newest 100 fills of a range listed oldest first, and the oldest 100 listed newest
    first (2.0 read the selection off the listing: it lost 90 % of 1,000 fills)."""
    for n, (selects, listing) in enumerate((("newest", "oldest"), ("oldest", "newest")), start=1):
        account = make_account(sim, n)
        sim.generate_fills(account.api_key, BTC, 1000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
        harness.accounts = [account]
        sim.order = sim.v2_order = selects
        sim.listing = listing

        assert harness.run() == 0, harness.log
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC)
        span = weex_sync.APIS[api.version].max_span_ms
        windows = len(list(weex_sync.windows(harness.sync["start_time"], now_ms(), span)))
        assert db.status()[-1]["requests_count"] <= windows + 10 + 2  # pages + learning


def test_v2_served_oldest_first_is_walked_exactly(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 1000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.weex["api_version"] = 2
    sim.v2_order = "oldest"

    assert harness.run() == 0, harness.log
    assert stored_fills(db) == expected_fills("user1", sim.fills(account.api_key, BTC, version=2))


def _store(pg: dict, db: Database) -> weex_sync.Store:
    return weex_sync.Store(
        weex_sync.DatabaseConfig(
            pg["host"], pg["port"], pg["user"], pg["password"], db.name, "disable"
        )
    )


def _fill(trade_id: str, order_id: str, ms: int, **changes) -> weex_sync.Fill:
    obj = {
        "id": trade_id,
        "orderId": order_id,
        "symbol": "BTCUSDT",
        "side": "BUY",
        "price": "100",
        "qty": "0.5",
        "commission": "0.01",
        "commissionAsset": "USDT",
        "time": ms,
        **changes,
    }
    return weex_sync.parse_fill(weex_sync.V3, obj, weex_sync.ALL_SYMBOLS)


def test_a_quarantine_row_is_resolved_by_its_own_fill_only(pg, db: Database):
    """Resolved by a valid version of the same (order, trade), in the same batch too; another
    order's fill with the same trade id leaves it open."""
    store = _store(pg, db)
    bad = weex_sync.fill_rejected(_fill("5", "111", START_MS), "qty is not positive")
    cursor = weex_sync.Cursor(START_MS)
    store.save_batch("u", "*", weex_sync.Batch([], [bad], cursor, False), cursor, None)
    other = _fill("5", "222", START_MS + 1)
    store.save_batch("u", "*", weex_sync.Batch([other], [], cursor, False), cursor, None)
    assert db.rows("SELECT order_id, resolved_at IS NULL FROM rejected_fills") == [("111", True)]

    bad2 = weex_sync.Rejected(BTC, "333", "6", START_MS, "qty is not positive", '{"qty": "-1"}')
    good2 = _fill("6", "333", START_MS)
    saved = store.save_batch(
        "u", "*", weex_sync.Batch([good2], [bad2], cursor, False), cursor, None
    )
    assert saved.rejected == 0  # resolved by the valid version stored in the same batch
    assert db.scalar("SELECT resolved_at IS NOT NULL FROM rejected_fills WHERE order_id = '333'")
    store.close()
