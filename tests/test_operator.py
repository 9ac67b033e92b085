"""The operator's flags: --check, --dry-run, --status, --since/--until, --log-format json, -q."""

from __future__ import annotations

import datetime as dt
import json
import time

from harness import (
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Database,
    Harness,
    all_apis,
    make_account,
    stored_fills,
)


def test_check_reports_credentials_and_last_sync_per_user(harness: Harness, db: Database, sim):
    accounts = harness.fleet(2, fills=120)
    assert harness.run("--user", "user1") == 0
    sim.reset_stats()

    assert harness.run("--check") == 0
    out = harness.out
    assert "database: ok" in out
    lines = {tuple(line.split()[:3]): line for line in out.splitlines()[2:]}
    assert ("user1", BTC, "ok") in lines and ("user2", ETH, "ok") in lines
    newest = max(row[8] for row in harness.expected(accounts[0], BTC))
    newest_utc = dt.datetime.fromtimestamp(newest / 1000, dt.UTC).isoformat(timespec="milliseconds")
    assert newest_utc.replace("+00:00", "Z") in lines[("user1", BTC, "ok")]
    assert lines[("user1", BTC, "ok")].rstrip().endswith("success")
    assert lines[("user2", BTC, "ok")].rstrip().endswith("never synced")
    assert harness.fills_requests() == 4  # one cheap request per configured symbol
    assert db.scalar("SELECT count(*) FROM sync_status") == 2  # --check writes no status

    accounts[1].passphrase = "wrong"
    assert harness.run("--check") == 1
    assert "FAILED (below)" in harness.out
    assert "user2: credentials rejected (HTTP 401" in harness.out  # in full, below the table


def test_check_probes_every_symbol_and_names_what_failed(harness: Harness, db: Database, sim):
    """A symbol the exchange rejects is named, first or second, and the valid one is ok."""
    first, second = (
        make_account(sim, 1, [BTC, "NOSUCHUSDT"]),
        make_account(sim, 2, ["NOSUCHUSDT", BTC]),
    )
    harness.accounts = [first, second]

    assert harness.run("--check") == 1

    verdicts = {
        tuple(line.split()[:2]): line.split()[2:4] for line in harness.out.splitlines()[2:4]
    }
    verdicts.update(
        {tuple(line.split()[:2]): line.split()[2:4] for line in harness.out.splitlines()[4:6]}
    )
    assert verdicts[("user1", BTC)][0] == "ok" and verdicts[("user2", BTC)][0] == "ok"
    assert verdicts[("user1", "cmt_nosuchusdt")] == ["SYMBOL", "REJECTED"]
    assert verdicts[("user2", "cmt_nosuchusdt")] == ["SYMBOL", "REJECTED"]
    problems = [line for line in harness.out.splitlines() if line.startswith("user")][4:]
    assert len(problems) == 2
    assert all("/cmt_nosuchusdt: symbol rejected" in p for p in problems)


def test_check_of_five_users_against_a_dead_exchange_takes_one_users_retries(
    harness: Harness, db: Database, sim
):
    harness.accounts = [make_account(sim, n) for n in range(1, 6)]
    harness.weex.update(base_url="http://127.0.0.1:9", max_retries=2)  # nothing listens
    harness.sync["workers"] = 5

    began = time.monotonic()
    assert harness.run("--check") == 1
    took = time.monotonic() - began

    assert took < 3 * 1.0 + 2  # one user's backoff (0.5 s, 1 s) and the others at once
    assert harness.out.count("UNREACHABLE") == 5
    assert "cannot reach the exchange" in harness.out


def test_dry_run_fetches_and_counts_but_writes_nothing(harness: Harness, db: Database, sim):
    accounts = harness.fleet(2, fills=150)
    assert harness.run("--dry-run") == 0
    assert db.scalar("SELECT count(*) FROM trade_fills") == 0
    assert db.scalar("SELECT count(*) FROM sync_status") == 0
    assert db.scalar("SELECT count(*) FROM sync_cursor") == 0
    assert "user1/cmt_btcusdt: ok fetched=150 new=150" in harness.last_log
    assert "(dry run: nothing written)" in harness.last_log

    assert harness.run() == 0
    now = int(time.time() * 1000)
    for n in range(30):
        sim.add_fill(accounts[0].api_key, BTC, created_time=now - 1000 - n)
    before = (stored_fills(db), db.status(), db.rows("SELECT * FROM sync_cursor"))
    in_lookback = db.scalar(  # the pass re-reads the lookback window on purpose
        "SELECT count(*) FROM trade_fills WHERE user_id = 'user1' AND symbol = %s AND trade_time >="
        " (SELECT synced_through FROM sync_cursor WHERE user_id = 'user1' AND symbol = %s)",
        (BTC, BTC),
    )
    assert harness.run("--dry-run") == 0
    assert f"user1/cmt_btcusdt: ok fetched={30 + in_lookback} new=30" in harness.last_log
    assert (stored_fills(db), db.status(), db.rows("SELECT * FROM sync_cursor")) == before


def test_dry_run_counts_what_a_real_pass_inserts_when_a_stored_fill_moved(
    harness: Harness, db: Database, sim
):
    """A stored fill served again 1 ms later (a correction) and two new fills: --dry-run says 2
    new, as many as the real pass then inserts (3.2 counted the moved fill as new: it compared
    (order, trade, time), the INSERT compares (order, trade))."""
    account = make_account(sim, 1)
    now = int(time.time() * 1000)
    sim.add_fill(account.api_key, BTC, created_time=now - 20_000, trade_id=8, order_id=80)
    harness.accounts = [account]
    assert harness.run() == 0
    sim.remove_fill(account.api_key, BTC, 8)
    sim.add_fill(account.api_key, BTC, created_time=now - 19_999, trade_id=8, order_id=80)
    for n in (1, 2):
        sim.add_fill(account.api_key, BTC, created_time=now - 1_000 * n)

    assert harness.run("--dry-run") == 0
    [dry] = [x for x in harness.last_log.splitlines() if "user1/cmt_btcusdt: ok" in x]
    assert harness.run() == 1  # the correction is quarantined: the pair fails, loudly

    [real] = [x for x in harness.last_log.splitlines() if "user1/cmt_btcusdt: error" in x]
    assert " new=2 " in dry and " inserted=2 " in real, (dry, real)
    assert db.scalar("SELECT count(*) FROM trade_fills") == 3


def test_status_prints_latest_row_per_pair_as_table_and_json(harness: Harness, db: Database, sim):
    accounts = harness.fleet(2, fills=120)
    assert harness.run() == 0
    accounts[1].secret_key = "wrong"
    assert harness.run() == 1

    assert harness.run("--status") == 0
    header, *rows = harness.out.strip().splitlines()
    assert header.split()[:4] == ["USER", "SYMBOL", "STATUS", "LAST"]
    assert len(rows) == 4
    by_pair = {tuple(r.split()[:2]): r for r in rows}
    assert by_pair[("user1", BTC)].split()[2] == "success"
    assert by_pair[("user2", ETH)].split()[2] == "error"
    assert "credentials rejected" in by_pair[("user2", ETH)]

    assert harness.run("--status", "--json") == 0
    data = json.loads(harness.out)
    assert {(d["user_id"], d["symbol"], d["status"]) for d in data} == {
        ("user1", BTC, "success"),
        ("user1", ETH, "success"),
        ("user2", BTC, "error"),
        ("user2", ETH, "error"),
    }
    user1 = next(d for d in data if d["user_id"] == "user1" and d["symbol"] == BTC)
    assert user1["records_count"] == 0 and user1["age_seconds"] >= 0
    assert user1["last_sync_time"].endswith("+00:00")


@all_apis
def test_since_until_rescan_repairs_a_range_without_moving_the_cursor(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 600, start_ms=START_MS, end_ms=START_MS + 10 * DAY_MS)
    harness.accounts = [account]
    assert harness.run() == 0
    everything = stored_fills(db)
    lost = db.scalar(
        "WITH d AS (DELETE FROM trade_fills WHERE trade_time >= %s AND trade_time < %s RETURNING 1)"
        " SELECT count(*) FROM d",
        (START_MS + 2 * DAY_MS, START_MS + 4 * DAY_MS),
    )
    assert lost > 0
    assert harness.run() == 0  # a normal pass does not look back that far
    assert len(stored_fills(db)) == 600 - lost
    cursor = db.rows("SELECT synced_through, walk_end FROM sync_cursor")
    sim.reset_stats()

    since = dt.datetime.fromtimestamp((START_MS + 2 * DAY_MS) / 1000, dt.UTC).strftime("%Y-%m-%d")
    until = str(START_MS + 4 * DAY_MS)
    assert harness.run("--since", since, "--until", until, "--user", "user1") == 0

    assert stored_fills(db) == everything == harness.expected(account, BTC)
    assert db.status()[-1]["records_count"] == lost
    assert db.rows("SELECT synced_through, walk_end FROM sync_cursor") == cursor
    fills_requests = [r["params"] for r in sim.requests if r["path"] == harness.api.fills_path]
    starts = [int(params["startTime"]) for params in fills_requests]
    ends = [int(params["endTime"]) for params in fills_requests]
    assert min(starts) == START_MS + 2 * DAY_MS and max(ends) == START_MS + 4 * DAY_MS

    assert harness.run("--until", until) == 2
    assert "--until: needs --since" in harness.last_log


def test_json_log_lines_parse_and_carry_counts(harness: Harness, db: Database, sim):
    harness.fleet(2, fills=120)
    assert harness.run("--log-format", "json") == 0
    entries = [json.loads(line) for line in harness.last_log.splitlines()]
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
    assert harness.run("-q") == 0
    lines = harness.last_log.strip().splitlines()
    assert len(lines) == 1 and "finished" in lines[0] and "4 ok" in lines[0]

    accounts[0].secret_key = "wrong"
    assert harness.run("-q") == 1
    assert "user1/cmt_btcusdt: error" in harness.last_log
    assert "user2/cmt_btcusdt: ok" not in harness.last_log


def test_readable_view_for_analysts(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.add_fill(account.api_key, BTC, created_time=START_MS + 1500, side="SELL")
    harness.accounts = [account]
    assert harness.run() == 0
    side, moment = db.rows("SELECT side, trade_time FROM trade_fills_readable")[0]
    assert side == "sell"
    assert moment == dt.datetime.fromtimestamp(START_MS / 1000 + 1.5, dt.UTC)


def test_check_fails_when_the_exchange_clock_is_eight_days_off(harness: Harness, db: Database, sim):
    """Beyond one request span (7 days) every pass would fail: --check says so, exit 1."""
    harness.accounts = [make_account(sim, 1), make_account(sim, 2)]
    sim.clock_offset_ms = 8 * DAY_MS

    assert harness.run("--check") == 1

    assert "differ by 8.0 days" in harness.out, harness.out
    rows = [line.split() for line in harness.out.splitlines() if line.startswith("user")]
    verdicts = {tuple(r[:2]): r[2] for r in rows if len(r) > 2 and r[1] == BTC}
    assert set(verdicts) == {("user1", BTC), ("user2", BTC)}, harness.out
    assert "ok" not in verdicts.values(), harness.out


def test_status_max_age_0_reports_a_failing_pair(harness: Harness, db: Database, sim):
    """--max-age 0 is a max age of 0 s, not "no max age"."""
    account = make_account(sim, 1)
    harness.accounts = [account]
    account.secret_key = "wrong"
    assert harness.run() == 1

    assert harness.run("--status", "--max-age", "0") == 1

    assert harness.out.startswith(f"FAILING user1/{BTC}: latest pass failed: "), harness.out


def test_no_enabled_user_is_a_configuration_error(harness: Harness, db: Database, sim):
    harness.accounts = [make_account(sim, 1), make_account(sim, 2)]
    for account in harness.accounts:
        account.enabled = False

    assert harness.run() == 2

    errors = [line for line in harness.last_log.splitlines() if "configuration error" in line]
    assert len(errors) == 1 and "sync.users" in errors[0], harness.last_log
    assert sim.requests == []
    assert db.scalar("SELECT count(*) FROM sync_status") == 0
