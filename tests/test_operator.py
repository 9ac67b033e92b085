"""The operator's flags: --check, --dry-run, --status, --since/--until, --log-format json, -q."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest
import yaml

from harness import (
    BTC,
    DAY_MS,
    ETH,
    ROOT,
    START_MS,
    Database,
    Harness,
    all_apis,
    make_account,
    now_ms,
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


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (INFO|WARNING|ERROR) weex_sync: ")


@pytest.mark.parametrize("password", ["2", "weex", "postgres"])
def test_a_short_or_common_database_password_garbles_nothing(
    harness: Harness, db: Database, sim, password
):
    """3.2 replaced the database password everywhere in every line: with "2", each timestamp
    read ***0***6-1***-07; with "weex", the program's name read ***_sync; with "postgres", the
    role in PostgreSQL's messages read ***. The password cannot enter a message (it goes to
    libpq as a keyword; PostgreSQL never echoes it), so no line is scrubbed of it."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 5, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.database["password"] = password  # trust authentication ignores it

    assert harness.run() == 0
    assert harness.run("--check") == 0
    lines = harness.log.splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    assert "user1/cmt_btcusdt: ok" in harness.log
    assert f"database: ok (127.0.0.1:{harness.pg['port']}/{db.name})" in harness.out
    harness.database["dbname"] = "postgres_weex_2_missing"
    assert harness.run("--status") == 3
    assert 'database "postgres_weex_2_missing" does not exist' in harness.last_log
    assert "***" not in harness.log + harness.out


def test_check_changes_no_schema_and_creates_no_database(
    harness: Harness, db: Database, sim, pg: dict
):
    """3.1's --check upgraded the schema (3 -> 4, indexes built) and created a missing database:
    a check must not change what it checks. It says what the next pass will do instead."""
    harness.accounts = [make_account(sim, 1)]
    assert harness.run() == 0
    db.rows("DROP TABLE sync_status_default")
    db.rows("UPDATE weex_sync_schema SET version = 5")  # 3.2's
    try:
        assert harness.run("--check") == 0, harness.out + harness.last_log
        [line] = [x for x in harness.out.splitlines() if x.startswith("database:")]
        assert "schema version 5: the next pass upgrades it" in line
        assert "sync_status_default" in line and "trade_fills_daily" in line  # 5 -> 6 -> 7
        assert db.scalar("SELECT max(version) FROM weex_sync_schema") == 5
        assert db.scalar("SELECT to_regclass('sync_status_default')") is None
    finally:
        assert harness.run() == 0  # the pass upgrades it back

    missing = f"weex_sync_check_missing_{time.time_ns()}"
    harness.database["dbname"] = missing
    assert harness.run("--check") == 0, harness.out + harness.last_log
    assert f"database: missing (127.0.0.1:{pg['port']}/{missing} does not exist" in harness.out
    admin = psycopg2.connect(dbname="postgres", **pg)
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (missing,))
        assert cur.fetchone()[0] == 0
    admin.close()


def test_a_max_age_no_pass_can_meet_says_what_to_choose(harness: Harness, db: Database, sim):
    """3.1: --max-age 2m was STALE 4 s after a successful pass, without a word of why."""
    harness.accounts = [make_account(sim, 1)]
    assert harness.run() == 0

    assert harness.run("--status", "--max-age", "2m") == 1
    note = harness.out.strip().splitlines()[-1]
    assert note.startswith("NOTE: --max-age 120 s cannot be met"), harness.out
    assert "sync.lookback_seconds (120 s)" in note and "choose at least 180 s" in note
    assert harness.run("--status", "--max-age", "6m") == 0
    assert "NOTE" not in harness.out


def test_a_manual_pass_right_after_one_says_how_to_sync_now(harness: Harness, db: Database, sim):
    """3.1: "0 ok ... 1 fresh (another pass claimed them within the last 50 s)", no hint."""
    account = make_account(sim, 1)
    harness.accounts = [account]
    harness.sync["min_interval_seconds"] = 50
    assert harness.run() == 0
    first = re.search(r"pass (\w+) started", harness.last_log)[1]
    sim.generate_fills(account.api_key, BTC, 3, start_ms=now_ms() - 30_000, end_ms=now_ms())

    assert harness.run() == 0
    summary = harness.last_log.strip().splitlines()[-1]
    assert "1 fresh (claimed by another pass within the last 50 s" in summary, summary
    assert re.search(f"the latest by pass {first} at \\d\\d:\\d\\d:\\d\\d UTC", summary), summary
    assert "--min-interval 0 syncs them now" in summary
    assert harness.run("--min-interval", "0") == 0
    assert "1 ok" in harness.last_log
    assert stored_fills(db) == harness.expected(account, BTC)


# --- alerting rules (deploy/prometheus/weex_sync.rules.yml), checked by Prometheus's own promtool ----------


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("no promtool for the tests: apt-get install prometheus (.ci/run does)")
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def samples(path: Path) -> dict[str, list[tuple[str, float]]]:
    """The metrics file's samples: name -> [(labels as PromQL's {…}, value)]."""
    found: dict[str, list[tuple[str, float]]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            found.setdefault(name, []).append(("{" + labels if labels else "", float(value)))
    return found


def test_the_shipped_alerts_are_valid_and_fire_on_what_weex_sync_writes(
    harness: Harness, db: Database, sim, tmp_path
):
    """The README's alert was prose: now deploy/prometheus/weex_sync.rules.yml, which promtool accepts, on
    a metrics file promtool accepts; its alerts fire on the series of a pass whose pair failed
    and of one that could not reach the database, and stay quiet on a good pass's."""
    rules = ROOT / "deploy" / "prometheus" / "weex_sync.rules.yml"
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    good, bad = make_account(sim, 1), make_account(sim, 2)
    harness.accounts = [good, bad]
    bad.secret_key = "wrong-secret-key"
    metrics = tmp_path / "weex_sync.prom"
    assert harness.run("--metrics-file", str(metrics)) == 1
    linted = promtool("check", "metrics", stdin=metrics.read_text())
    assert linted.returncode == 0, linted.stdout + linted.stderr
    failed = samples(metrics)
    harness.database["port"] = 1  # the database is down
    assert harness.run("--metrics-file", str(metrics)) == 3
    down = samples(metrics)

    def series(found: dict, name: str) -> list[dict]:
        return [
            {"series": name + labels, "values": f"{value:g}x30"} for labels, value in found[name]
        ]

    failing = {"alertname": "WeexSyncPairFailing", "severity": "warning"}
    unit = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series(failed, "weex_sync_last_sync_success")
                + series(down, "weex_sync_database_up"),
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "WeexSyncPairFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **failing,
                                    "user": "user2",
                                    "symbol": BTC,
                                },
                                "exp_annotations": {
                                    "summary": f"weex_sync: the latest passes of user2/{BTC} failed",
                                    "description": "`weex_sync.py --status` shows the error; "
                                    "docs/troubleshooting.md says what it means.",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "WeexSyncDatabaseDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical"},
                                "exp_annotations": {
                                    "summary": "weex_sync cannot reach its database",
                                    "description": "Passes exit 3. The per-pair series are "
                                    "carried over from the last pass that could read them.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "10m", "alertname": "WeexSyncRateLimited", "exp_alerts": []},
                ],
            }
        ],
    }
    tests = tmp_path / "weex_sync.rules.test.yml"
    tests.write_text(yaml.safe_dump(unit))
    tested = promtool("test", "rules", str(tests))
    assert tested.returncode == 0, tested.stdout + tested.stderr  # user1's pair: no alert
