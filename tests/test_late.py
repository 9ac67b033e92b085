"""Late fills: a fill the exchange shows a little after its time is stored by the next pass.

The simulator makes a fill visible ``visible_after_ms`` after its time. To test 60 s or 110 s
of lateness without waiting that long, a fill is dated ``lateness`` before the moment it
becomes visible, and that moment is just after the first pass.
"""

from __future__ import annotations

import signal
import time

from harness import (
    BTC,
    DAY_MS,
    START_MS,
    Database,
    Harness,
    all_apis,
    finish,
    make_account,
    now_ms,
    stored_fills,
    wait_for,
    weex_sync_backends,
)

LATENESS_S = (5, 60, 110)  # all within the default lookback of 120 s


def add_late_fills(sim, account, lateness_s=LATENESS_S, visible_in_ms: int = 400) -> list[dict]:
    """One fill per lateness, each dated that long before it becomes visible, visible_in_ms
    from now. Returns them as served on v2 (ids are the same on v3)."""
    visible_at = now_ms() + visible_in_ms
    return [
        sim.add_fill(
            account.api_key,
            BTC,
            created_time=visible_at - late * 1000,
            visible_after_ms=late * 1000,
            size="0.25",
            value="25000",
        )
        for late in lateness_s
    ]


def trade_ids(db: Database, user_id: str) -> set[str]:
    return {
        r[0] for r in db.rows("SELECT trade_id FROM trade_fills WHERE user_id = %s", (user_id,))
    }


@all_apis
def test_fills_5_60_and_110_seconds_late_are_stored_by_the_next_pass(
    harness: Harness, db: Database, sim
):
    busy = make_account(sim, 1)  # many fills before and after the late ones
    quiet = make_account(sim, 2)  # nothing else in the last hours
    now = now_ms()
    sim.generate_fills(busy.api_key, BTC, 600, start_ms=now - 150_000, end_ms=now - 1000)
    sim.add_fill(busy.api_key, BTC, created_time=now - 1000)  # newer than every late fill
    sim.generate_fills(quiet.api_key, BTC, 20, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [busy, quiet]
    late = {a.user_id: add_late_fills(sim, a, visible_in_ms=1500) for a in (busy, quiet)}
    visible_at = now_ms() + 1500

    assert harness.run() == 0  # the late fills are not visible yet
    for account in (busy, quiet):
        assert not {str(f["tradeId"]) for f in late[account.user_id]} & trade_ids(
            db, account.user_id
        )
    newest_before = db.scalar("SELECT max(trade_time) FROM trade_fills WHERE user_id = 'user1'")
    assert all(f["createdTime"] < newest_before for f in late["user1"])  # older than stored ones
    time.sleep(max(0, visible_at - now_ms()) / 1000 + 0.2)
    now = now_ms()
    sim.generate_fills(busy.api_key, BTC, 200, start_ms=now - 300, end_ms=now - 100, seed=9)

    assert harness.run() == 0

    for account in (busy, quiet):
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC)
    rows = {r["user_id"]: r for r in db.status()[-2:]}
    assert rows["user1"]["late_count"] == 3 and rows["user2"]["late_count"] == 3
    assert rows["user1"]["records_count"] == 200 + 3
    assert "user1/cmt_btcusdt: ok" in harness.last_log and "late=3" in harness.last_log

    assert harness.run() == 0  # exactly once
    assert [r["records_count"] for r in db.status()[-2:]] == [0, 0]


def test_a_fill_newer_than_every_stored_one_is_stored_however_late(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    harness.accounts = [account]
    assert harness.run() == 0
    [too_late] = add_late_fills(sim, account, lateness_s=(600,))  # 10 minutes late
    time.sleep(0.5)

    assert harness.run() == 0  # the walk starts at the newest stored fill: none yet
    assert str(too_late["tradeId"]) in trade_ids(db, "user1")
    assert db.status()[-1]["late_count"] == 1


def test_an_older_fill_later_than_the_lookback_waits_for_the_reconcile(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    harness.accounts = [account]
    now = now_ms()
    sim.add_fill(account.api_key, BTC, created_time=now - 1000)  # newer than the late one
    assert harness.run() == 0
    [too_late] = add_late_fills(sim, account, lateness_s=(180,))
    time.sleep(0.5)

    assert harness.run() == 0
    assert str(too_late["tradeId"]) not in trade_ids(db, "user1")  # 180 s > 120 s of lookback
    assert harness.run("--since", str(too_late["createdTime"] - 1000)) == 0
    assert str(too_late["tradeId"]) in trade_ids(db, "user1")  # a re-scan finds it

    [also_late] = add_late_fills(sim, account, lateness_s=(180,))
    time.sleep(0.5)
    harness.sync["reconcile_every_seconds"] = 1  # the reconcile is due: it re-reads 2 days
    assert harness.run() == 0
    assert str(also_late["tradeId"]) in trade_ids(db, "user1")
    assert db.status()[-1]["late_count"] == 1
    assert "reconcile: re-reading from" in harness.last_log


def test_lookback_and_reconcile_zero_turn_them_off(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    harness.accounts = [account]
    harness.sync.update(lookback_seconds=0, reconcile_every_seconds=0)
    sim.add_fill(account.api_key, BTC, created_time=now_ms() - 1000)
    assert harness.run() == 0
    [late] = add_late_fills(sim, account, lateness_s=(5,))
    time.sleep(0.5)
    assert harness.run() == 0
    assert str(late["tradeId"]) not in trade_ids(db, "user1")


@all_apis
def test_an_idle_pair_costs_one_request_and_rereads_only_the_window(
    harness: Harness, db: Database, sim, api
):
    old, recent = make_account(sim, 1), make_account(sim, 2)
    sim.generate_fills(old.api_key, BTC, 300, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    now = now_ms()
    sim.generate_fills(recent.api_key, BTC, 40, start_ms=now - 30_000, end_ms=now - 1000)
    harness.accounts = [old, recent]
    assert harness.run() == 0
    sim.reset_stats()

    assert harness.run() == 0

    rows = {r["user_id"]: r for r in db.status()[-2:]}
    # v3 reaches back one request span (7 days: the old history is 40 days old); v2 re-reads
    # the newest stored millisecond
    newest = db.scalar("SELECT max(trade_time) FROM trade_fills WHERE user_id = 'user1'")
    at_newest = db.scalar("SELECT count(*) FROM trade_fills WHERE trade_time = %s", (newest,))
    assert rows["user1"]["requests_count"] == 1
    assert rows["user1"]["fetched_count"] == (at_newest if api.version == 2 else 0)
    assert rows["user2"]["requests_count"] == 1 and rows["user2"]["fetched_count"] == 40
    assert harness.fills_requests() == 2


def test_late_fills_on_loop_passes(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    harness.accounts = [account]
    process = harness.popen("--loop", "1")
    wait_for(lambda: db.scalar("SELECT count(*) FROM sync_status") >= 1)
    late = add_late_fills(sim, account, visible_in_ms=200)
    passes = db.scalar("SELECT count(*) FROM sync_status")
    wait_for(lambda: db.scalar("SELECT count(*) FROM sync_status") >= passes + 2)
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)

    assert code == 0, err
    assert {str(f["tradeId"]) for f in late} <= trade_ids(db, "user1")
    assert db.scalar("SELECT sum(late_count) FROM sync_status") == 3
    assert "late=3" in err


def test_kill_9_during_a_reread_loses_nothing(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    now = now_ms()
    sim.generate_fills(account.api_key, BTC, 3000, start_ms=now - 100_000, end_ms=now - 1000)
    harness.accounts = [account]
    assert harness.run() == 0
    late = add_late_fills(sim, account, visible_in_ms=100)
    time.sleep(0.2)
    sim.latency = 0.03  # the re-read of 3,000 fills takes ~30 requests: about a second
    sim.reset_stats()

    process = harness.popen("--once")
    wait_for(lambda: harness.fills_requests() >= 8)
    process.kill()
    finish(process)
    wait_for(lambda: weex_sync_backends(db) == 0)
    assert harness.fills_requests() < 25  # killed mid-way, not after the re-read
    sim.latency = 0

    assert harness.run() == 0
    assert stored_fills(db) == harness.expected(account, BTC)
    assert {str(f["tradeId"]) for f in late} <= trade_ids(db, "user1")
    assert db.scalar("SELECT count(*) FROM trade_fills") == 3003
