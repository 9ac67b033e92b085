"""The operator's flags: --check, --dry-run, --status, --since/--until, --log-format json, -q."""

from __future__ import annotations

import datetime as dt
import json

import weex_sync
from conftest import DAY_MS, START_MS, Database, Harness, expected_fills, make_account, stored_fills

BTC, ETH = "cmt_btcusdt", "cmt_ethusdt"


def run(harness: Harness, *args: str) -> tuple[int, str, str]:
    path = harness.write_config()
    code = weex_sync.main(["-c", str(path), *args], environ={})
    captured = harness.capsys.readouterr()
    return code, captured.out, captured.err


def test_check_reports_credentials_and_last_sync_per_user(harness: Harness, db: Database, sim):
    accounts = harness.fleet(2, fills=120)
    assert harness.run("--user", "user1") == 0
    sim.reset_stats()

    code, out, _ = run(harness, "--check")
    assert code == 0
    assert "database: ok" in out
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()[2:]}
    assert ("user1", BTC, "ok") in lines and ("user2", ETH, "ok") in lines
    newest = max(int(f["createdTime"]) for f in sim.fills(accounts[0].api_key, BTC))
    newest_utc = dt.datetime.fromtimestamp(newest / 1000, dt.UTC).isoformat(timespec="milliseconds")
    assert newest_utc.replace("+00:00", "Z") in lines[("user1", BTC, "ok")]
    assert lines[("user1", BTC, "ok")].rstrip().endswith("success")
    assert lines[("user2", BTC, "ok")].rstrip().endswith("never synced")
    assert sim.count(path="/capi/v2/order/fills") == 2  # one cheap request per user
    assert db.scalar("SELECT count(*) FROM sync_status") == 2  # --check writes no status

    accounts[1].passphrase = "wrong"
    code, out, _ = run(harness, "--check")
    assert code == 1
    assert "FAILED: credentials rejected" in out


def test_dry_run_fetches_and_counts_but_writes_nothing(harness: Harness, db: Database, sim):
    accounts = harness.fleet(2, fills=150)
    code, _, err = run(harness, "--dry-run")
    assert code == 0
    assert db.scalar("SELECT count(*) FROM trade_fills") == 0
    assert db.scalar("SELECT count(*) FROM sync_status") == 0
    assert db.scalar("SELECT count(*) FROM sync_cursor") == 0
    assert "user1/cmt_btcusdt: ok fetched=150 new=150" in err
    assert "(dry run: nothing written)" in err

    assert harness.run() == 0
    for n in range(30):
        sim.add_fill(accounts[0].api_key, BTC, created_time=START_MS + 2 * DAY_MS + n)
    before = (stored_fills(db), db.status(), db.rows("SELECT * FROM sync_cursor"))
    at_cursor = db.scalar(  # the pass re-reads the newest stored millisecond on purpose
        "SELECT count(*) FROM trade_fills WHERE user_id = 'user1' AND symbol = %s AND trade_time ="
        " (SELECT synced_through FROM sync_cursor WHERE user_id = 'user1' AND symbol = %s)",
        (BTC, BTC),
    )
    code, _, err = run(harness, "--dry-run")
    assert code == 0
    assert f"user1/cmt_btcusdt: ok fetched={30 + at_cursor} new=30" in err
    assert (stored_fills(db), db.status(), db.rows("SELECT * FROM sync_cursor")) == before


def test_status_prints_latest_row_per_pair_as_table_and_json(harness: Harness, db: Database, sim):
    accounts = harness.fleet(2, fills=120)
    assert harness.run() == 0
    accounts[1].secret_key = "wrong"
    assert harness.run() == 1

    code, out, _ = run(harness, "--status")
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:4] == ["USER", "SYMBOL", "STATUS", "LAST"]
    assert len(rows) == 4
    by_pair = {tuple(r.split()[:2]): r for r in rows}
    assert by_pair[("user1", BTC)].split()[2] == "success"
    assert by_pair[("user2", ETH)].split()[2] == "error"
    assert "credentials rejected" in by_pair[("user2", ETH)]

    code, out, _ = run(harness, "--status", "--json")
    assert code == 0
    data = json.loads(out)
    assert {(d["user_id"], d["symbol"], d["status"]) for d in data} == {
        ("user1", BTC, "success"),
        ("user1", ETH, "success"),
        ("user2", BTC, "error"),
        ("user2", ETH, "error"),
    }
    user1 = next(d for d in data if d["user_id"] == "user1" and d["symbol"] == BTC)
    assert user1["records_count"] == 0 and user1["age_seconds"] >= 0
    assert user1["last_sync_time"].endswith("+00:00")


def test_since_until_rescan_repairs_a_range_without_moving_the_cursor(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 600, start_ms=START_MS, end_ms=START_MS + 10 * DAY_MS)
    harness.accounts = [account]
    assert harness.run() == 0
    everything = stored_fills(db)
    cursor = db.rows("SELECT synced_through, walk_end FROM sync_cursor")
    lost = db.scalar(
        "WITH d AS (DELETE FROM trade_fills WHERE trade_time >= %s AND trade_time < %s RETURNING 1)"
        " SELECT count(*) FROM d",
        (START_MS + 2 * DAY_MS, START_MS + 4 * DAY_MS),
    )
    assert lost > 0
    assert harness.run() == 0  # a normal pass does not look back
    assert len(stored_fills(db)) == 600 - lost
    sim.reset_stats()

    since = dt.datetime.fromtimestamp((START_MS + 2 * DAY_MS) / 1000, dt.UTC).strftime("%Y-%m-%d")
    until = str(START_MS + 4 * DAY_MS)
    assert harness.run("--since", since, "--until", until, "--user", "user1") == 0

    assert (
        stored_fills(db) == everything == expected_fills("user1", sim.fills(account.api_key, BTC))
    )
    assert db.status()[-1]["records_count"] == lost
    assert db.rows("SELECT synced_through, walk_end FROM sync_cursor") == cursor
    starts = {r["params"].get("startTime") for r in sim.requests}
    assert starts == {str(START_MS + 2 * DAY_MS)}

    assert harness.run("--until", until) == 2
    assert "--until: needs --since" in harness.last_log


def test_json_log_lines_parse_and_carry_counts(harness: Harness, db: Database, sim):
    harness.fleet(2, fills=120)
    code, _, err = run(harness, "--log-format", "json")
    assert code == 0
    entries = [json.loads(line) for line in err.splitlines()]
    assert all({"ts", "level", "event", "message"} <= e.keys() for e in entries)
    synced = [e for e in entries if e["event"] == "synced"]
    assert {(e["user"], e["symbol"]) for e in synced} == {
        ("user1", BTC),
        ("user1", ETH),
        ("user2", BTC),
        ("user2", ETH),
    }
    assert all(e["fetched"] == 120 and e["inserted"] == 120 for e in synced)
    done = [e for e in entries if e["event"] == "pass_done"]
    assert len(done) == 1 and done[0]["inserted"] == 480 and done[0]["success_count"] == 4


def test_quiet_prints_only_the_summary_unless_something_is_wrong(
    harness: Harness, db: Database, sim
):
    accounts = harness.fleet(2, fills=120)
    code, _, err = run(harness, "-q")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "finished" in lines[0] and "4 ok" in lines[0]

    accounts[0].secret_key = "wrong"
    code, _, err = run(harness, "-q")
    assert code == 1
    assert "user1/cmt_btcusdt: error" in err
    assert "user2/cmt_btcusdt: ok" not in err


def test_readable_view_for_analysts(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.add_fill(account.api_key, BTC, created_time=START_MS + 1500, side="SELL")
    harness.accounts = [account]
    assert harness.run() == 0
    side, moment = db.rows("SELECT side, trade_time FROM trade_fills_readable")[0]
    assert side == "sell"
    assert moment == dt.datetime(2025, 1, 1, 0, 0, 1, 500000, tzinfo=dt.UTC)
