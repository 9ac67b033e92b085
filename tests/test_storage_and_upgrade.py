"""A year of data: sync_status partitioned by day with retention, the latest state of each pair
kept apart (sync_latest), the upgrade of a version-3 database, a monthly-partitioned
trade_fills, and one transaction per pair. Each test works in a database of its own, since it
changes the tables' shape."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import psycopg2
import pytest

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    START_MS,
    Account,
    Database,
    Harness,
    create_scratch_database,
    make_account,
    stored_fills,
    v2_only,
)

DATA = Path(__file__).resolve().parent / "data"  # the schema of weex_sync 3.0


@pytest.fixture
def own_db(harness: Harness, pg: dict, scratch_db_names: list[str]) -> Database:
    """A database of this test's own, created empty; the harness points at it."""
    name = create_scratch_database(pg, scratch_db_names, "weex_history")
    harness.database["dbname"] = name
    database = Database(pg, name)
    yield database
    database.close()


def partitions(db: Database, table: str) -> list[str]:
    return sorted(
        r[0]
        for r in db.rows(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass",
            (table,),
        )
    )


def day_name(days_from_today: int) -> str:
    day = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=days_from_today)
    return f"sync_status_p{day:%Y%m%d}"


def add_old_status_day(db: Database, days_ago: int, user_id: str, status: str) -> None:
    """The partition of the day ``days_ago`` back (and the two after it), holding one status
    row of ``user_id``, as a pass of that day left it."""
    conn = psycopg2.connect(db.conn.dsn)
    weex_sync.status_days_ahead(conn, time.time() - days_ago * 86_400)
    conn.close()
    moment = dt.datetime.now(dt.UTC) - dt.timedelta(days=days_ago)
    db.rows(
        "INSERT INTO sync_status (pass_id, user_id, symbol, last_sync_time, records_count,"
        " fetched_count, requests_count, duration_ms, status) VALUES ('old', %s, %s, %s, 0, 0,"
        " 1, 1, %s)",
        (user_id, BTC, moment, status),
    )


def test_a_pass_makes_the_days_ahead_and_drops_those_past_retention_keeping_the_latest_state(
    harness: Harness, own_db: Database, sim
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 20, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.sync["status_retention_days"] = 30
    assert harness.run("--once") == 0
    success = own_db.scalar("SELECT last_success_time FROM sync_latest")
    for days_ago in (45, 31, 29):
        add_old_status_day(own_db, days_ago, "user1", "success")

    assert harness.run("--once") == 0

    names = partitions(own_db, "sync_status")
    assert day_name(-45) not in names and day_name(-31) not in names  # past 30 days: dropped
    assert day_name(-29) in names  # within: kept
    assert {day_name(0), day_name(1), day_name(2)} <= set(names)  # today and two days ahead
    assert f"dropped {day_name(-45)}: status rows older than 30 days" in harness.log
    latest = own_db.rows("SELECT status, last_success_time FROM sync_latest")
    assert len(latest) == 1 and latest[0][0] == "success" and latest[0][1] > success
    assert stored_fills(own_db) == harness.expected(account, BTC)


def test_the_last_success_stays_known_after_retention_dropped_its_row(
    harness: Harness, own_db: Database, sim
):
    account = make_account(sim, 1)
    harness.accounts = [account]
    harness.sync["status_retention_days"] = 3
    assert harness.run("--once") == 0
    own_db.rows("UPDATE sync_latest SET last_success_time = now() - interval '10 days'")
    add_old_status_day(own_db, 10, "user1", "success")
    account.passphrase = "changed"  # every later pass fails on the credentials
    assert harness.run("--once") == 1
    assert day_name(-10) not in partitions(own_db, "sync_status")

    assert harness.run("--status") == 0
    row = [line for line in harness.out.splitlines() if line.startswith("user1")]
    assert "10d" in row[0]  # the last success, 10 days ago, though its row is gone
    assert own_db.scalar("SELECT status FROM sync_latest") == "error"


def test_status_retention_never_blocks_a_reader_and_finishes_on_a_later_pass(
    harness: Harness, own_db: Database, sim, pg
):
    """An analyst's transaction that read sync_status is open while a pass drops an old day:
    --status and the pass's own status rows do not wait for it; the drop is finished by the
    first pass after the analyst is gone."""
    account = make_account(sim, 1)
    harness.accounts = [account]
    harness.sync["status_retention_days"] = 5
    assert harness.run("--once") == 0
    add_old_status_day(own_db, 20, "user1", "success")
    analyst = psycopg2.connect(dbname=own_db.name, **pg)
    analyst.cursor().execute("SELECT count(*) FROM sync_status")  # its lock stays until commit
    statuses: list[float] = []

    def status_meanwhile() -> None:
        time.sleep(0.5)
        started = time.monotonic()
        weex_sync.main(["-c", str(harness.write_config(name="status.yaml")), "--status", "-q"])
        statuses.append(time.monotonic() - started)

    reader = threading.Thread(target=status_meanwhile)
    reader.start()
    started = time.monotonic()
    assert harness.run("--once") == 0
    took = time.monotonic() - started
    reader.join()

    assert statuses and statuses[0] < 3, statuses  # --status did not wait for the drop
    assert took < 8, took  # the drop gave up quickly; the pass went on
    assert "partition maintenance" in harness.log  # a WARNING: it will be finished later
    assert own_db.scalar("SELECT count(*) FROM sync_status WHERE pass_id <> 'old'") == 2
    analyst.rollback()
    analyst.close()
    assert harness.run("--once") == 0
    assert day_name(-20) not in partitions(own_db, "sync_status"), harness.last_log
    assert own_db.scalar("SELECT count(*) FROM sync_status WHERE pass_id = 'old'") == 0


def test_a_version_4_database_gains_the_backoff_table_and_keeps_its_fills(
    harness: Harness, own_db: Database, sim
):
    """weex_sync 3.1's schema (version 4: this one without sync_backoff) with fills in it."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 30, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    assert harness.run("--once") == 0
    own_db.rows("DROP TABLE sync_backoff")
    own_db.rows("UPDATE weex_sync_schema SET version = 4")
    stored = stored_fills(own_db)

    assert harness.run("--status") == 3  # a pass upgrades it, --status does not
    assert harness.run("--once") == 0, harness.last_log

    assert own_db.scalar("SELECT max(version) FROM weex_sync_schema") == weex_sync.SCHEMA_VERSION
    assert own_db.scalar("SELECT count(*) FROM sync_backoff") == 0
    assert stored_fills(own_db) == stored == harness.expected(account, BTC)


def test_a_version_3_database_is_upgraded_in_place_keeping_every_status_row(
    harness: Harness, own_db: Database, sim
):
    """The schema of weex_sync 2.x (version 3, an unpartitioned sync_status) with a history:
    the pass makes that table the first partition (no copy), builds the new indexes and the
    latest state from the history, and goes on."""
    own_db.conn.cursor().execute((DATA / "schema_v3.sql").read_text())
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 30, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    history = [("success", 3), ("error", 2), ("error", 1)]  # days ago; failing for two days
    for status, days_ago in history:
        own_db.rows(
            "INSERT INTO sync_status (pass_id, user_id, symbol, last_sync_time, records_count,"
            " fetched_count, requests_count, duration_ms, status, error_message) VALUES"
            " ('v3', 'user1', %s, now() - %s * interval '1 day', 0, 0, 1, 1, %s, %s)",
            (BTC, days_ago, status, None if status == "success" else "credentials rejected"),
        )
    last_success = own_db.scalar(
        "SELECT max(last_sync_time) FROM sync_status WHERE status = 'success'"
    )

    assert harness.run("--status") == 3  # version 3: a pass upgrades it, --status does not
    assert "holds weex_sync's schema version 3" in harness.last_log
    assert harness.run("--once") == 0

    assert own_db.scalar("SELECT relkind FROM pg_class WHERE relname = 'sync_status'") == "p"
    until = [n for n in partitions(own_db, "sync_status") if n.startswith("sync_status_until_")]
    assert len(until) == 1
    assert own_db.scalar("SELECT count(*) FROM sync_status WHERE pass_id = 'v3'") == 3
    assert own_db.scalar("SELECT max(version) FROM weex_sync_schema") == weex_sync.SCHEMA_VERSION
    for name in weex_sync.FILLS_INDEXES:
        assert own_db.scalar(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (name,)
        ), name
    latest = own_db.rows(
        "SELECT status, last_success_time FROM sync_latest WHERE symbol = %s", (BTC,)
    )
    assert latest[0][0] == "success" and latest[0][1] > last_success  # this pass's
    assert stored_fills(own_db) == harness.expected(account, BTC)
    new_ids = own_db.rows("SELECT id FROM sync_status WHERE pass_id <> 'v3'")
    assert new_ids and min(r[0] for r in new_ids) > 3  # the old sequence goes on


def test_the_latest_state_of_an_upgraded_history_names_the_last_success_of_a_failing_pair(
    harness: Harness, own_db: Database, sim
):
    own_db.conn.cursor().execute((DATA / "schema_v3.sql").read_text())
    account = make_account(sim, 1)
    harness.accounts = [account]
    for status, days_ago in [("success", 5), ("error", 4), ("error", 0)]:
        own_db.rows(
            "INSERT INTO sync_status (pass_id, user_id, symbol, last_sync_time, records_count,"
            " fetched_count, requests_count, duration_ms, status, error_message, error_kind)"
            " VALUES ('v3', 'user1', %s, now() - %s * interval '1 day' - interval '1 minute',"
            " 0, 0, 1, 1, %s, %s, %s)",
            (
                BTC,
                days_ago,
                status,
                *((None, None) if status == "success" else ("bad key", "credentials")),
            ),
        )
    account.passphrase = "changed"

    assert harness.run("--once") == 1  # upgrades, then fails on the credentials

    latest = own_db.rows("SELECT status, now() - last_success_time FROM sync_latest")
    assert latest[0][0] == "error"
    assert dt.timedelta(days=5) <= latest[0][1] < dt.timedelta(days=5, minutes=5)
    assert harness.run("--status", "--max-age", "10m") == 1
    assert "FAILING user1/cmt_btcusdt" in harness.out


@v2_only  # v2 reaches back beyond v3's 365 days
def test_monthly_partitioned_fills_are_made_ahead_and_synced_exactly(
    harness: Harness, own_db: Database, sim
):
    harness.database["partition_fills"] = "monthly"
    account = make_account(sim, 1)
    now = int(time.time() * 1000)
    sim.generate_fills(account.api_key, BTC, 200, start_ms=START_MS, end_ms=now - 60_000)
    sim.generate_fills(
        account.api_key, BTC, 5, start_ms=now - 500 * DAY_MS, end_ms=now - 450 * DAY_MS
    )
    harness.accounts = [account]
    harness.sync["start_time"] = now - 600 * DAY_MS
    assert harness.run("--once") == 0

    assert own_db.scalar("SELECT relkind FROM pg_class WHERE relname = 'trade_fills'") == "p"
    months = partitions(own_db, "trade_fills")
    today = dt.datetime.now(dt.UTC)
    ahead = weex_sync.month_start(today.year, today.month + 2)
    assert f"trade_fills_p{ahead:%Y%m}" in months and "trade_fills_default" in months
    assert len(months) == 1 + weex_sync.FILLS_MONTHS_BACK + 1 + weex_sync.FILLS_MONTHS_AHEAD
    expected = harness.expected(account, BTC)
    assert stored_fills(own_db) == expected
    assert own_db.scalar("SELECT count(*) FROM trade_fills_default") == 5  # older than 13 months

    nxt = weex_sync.month_start(today.year, today.month + 1)
    own_db.rows(f"ALTER TABLE trade_fills DETACH PARTITION trade_fills_p{nxt:%Y%m}")
    own_db.rows(f"DROP TABLE trade_fills_p{nxt:%Y%m}")
    assert harness.run("--once") == 0  # a missing month ahead is made again
    assert f"trade_fills_p{nxt:%Y%m}" in partitions(own_db, "trade_fills")

    assert harness.run("--once", "--since", str(START_MS)) == 0  # a re-scan
    assert stored_fills(own_db) == expected
    assert harness.run("--status", "--max-age", "10m") == 0


def test_a_fill_that_cannot_be_stored_is_never_counted_present(
    harness: Harness, own_db: Database, sim
):
    """A month without a partition and no default partition: the insert fails; the pair is an
    error that counts nothing stored or present, and the next pass, with the month made again,
    stores every fill."""
    harness.database["partition_fills"] = "monthly"
    account = make_account(sim, 1)
    harness.accounts = [account]
    assert harness.run("--once") == 0
    now = int(time.time() * 1000)
    sim.generate_fills(account.api_key, BTC, 40, start_ms=now - 50_000, end_ms=now - 40_000)
    today = dt.datetime.now(dt.UTC)
    month = f"trade_fills_p{today:%Y%m}"
    for table in (month, "trade_fills_default"):
        own_db.rows(f"ALTER TABLE trade_fills DETACH PARTITION {table}")
        own_db.rows(f"DROP TABLE {table}")
    own_db.rows("SELECT pg_advisory_lock(%s)", (weex_sync.PARTITION_LOCK_KEY,))  # no remaking

    assert harness.run("--once") == 1

    line = [line for line in harness.last_log.splitlines() if "user1/cmt_btcusdt: error" in line]
    assert len(line) == 1 and "inserted=0 present=0" in line[0], harness.last_log
    assert " ok " not in harness.last_log
    own_db.rows("SELECT pg_advisory_unlock(%s)", (weex_sync.PARTITION_LOCK_KEY,))
    assert harness.run("--once") == 0
    assert stored_fills(own_db) == harness.expected(account, BTC)


def test_an_idle_pass_commits_once_per_pair(harness: Harness, own_db: Database, sim):
    """The walk's last batch (its cursor) and the pair's status row are one transaction: an
    idle fleet pass uses about one transaction id per pair, not two."""
    harness.accounts = [make_account(sim, n) for n in range(1, 21)]
    harness.sync["workers"] = 4
    assert harness.run("--once") == 0
    before = own_db.scalar("SELECT pg_current_xact_id()::text::bigint")
    assert harness.run("--once") == 0
    used = own_db.scalar("SELECT pg_current_xact_id()::text::bigint") - before - 1

    assert own_db.scalar("SELECT count(*) FROM sync_status") == 40
    assert 20 <= used <= 20 + 20 // 4 + 2, used  # a commit per pair, a claim per 4 users


def two_accounts_and_empty_tables(harness: Harness, own_db: Database, sim) -> list[Account]:
    """user1 and user2 with 30 fills each, configured; the tables made by a pass, then emptied."""
    accounts = [make_account(sim, 1), make_account(sim, 2)]
    harness.accounts = accounts
    for account in accounts:
        sim.generate_fills(account.api_key, BTC, 30, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    assert harness.run("--once") == 0
    own_db.rows("TRUNCATE trade_fills, sync_status, sync_latest, sync_cursor, trade_fills_daily")
    return accounts


def test_a_status_row_that_cannot_be_written_fails_its_pair_and_stores_nothing_of_its_last_batch(
    harness: Harness, own_db: Database, sim
):
    one, two = two_accounts_and_empty_tables(harness, own_db, sim)
    own_db.rows("ALTER TABLE sync_latest ADD CONSTRAINT no_user1 CHECK (user_id <> 'user1')")

    assert harness.run("--once") == 1

    assert "user1/cmt_btcusdt: error" in harness.last_log
    assert "cannot record sync_status" in harness.last_log
    [line] = [x for x in harness.last_log.splitlines() if "user1/cmt_btcusdt: error" in x]
    assert "fetched=30 inserted=0 present=0 unstored=30" in line  # none is stored
    assert stored_fills(own_db, "user1") == set()  # its one batch went with the status row
    assert own_db.scalar("SELECT count(*) FROM sync_cursor WHERE user_id = 'user1'") == 0
    assert stored_fills(own_db, "user2") == harness.expected(two, BTC)
    own_db.rows("ALTER TABLE sync_latest DROP CONSTRAINT no_user1")
    assert harness.run("--once") == 0
    assert stored_fills(own_db, "user1") == harness.expected(one, BTC)


def test_the_status_tables_columns_are_the_status_rows_fields(db: Database):
    """sync_status and sync_latest are made from StatusRow: one field, one column in each."""

    def columns(table: str) -> set[str]:
        return {
            row[0]
            for row in db.rows(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                " AND table_schema = 'public'",
                (table,),
            )
        }

    fields = set(weex_sync.STATUS_FIELDS)
    assert columns("sync_status") == fields | {"id", "last_sync_time"}
    assert columns("sync_latest") == fields | {"status_id", "last_sync_time", "last_success_time"}


def test_a_database_a_newer_weex_sync_upgraded_is_neither_written_nor_read(
    harness: Harness, own_db: Database, sim
):
    """3.1 on a database whose weex_sync_schema said 5 ran its pass and stored fills and status
    rows (exit 0), which the newer version's --status never showed."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 10, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    assert harness.run() == 0
    own_db.rows("TRUNCATE trade_fills, sync_status, sync_latest, sync_cursor")
    own_db.rows("UPDATE weex_sync_schema SET version = %s", (weex_sync.SCHEMA_VERSION + 1,))
    sim.reset_stats()

    assert harness.run() == 3
    [line] = [x for x in harness.last_log.splitlines() if "newer than this weex_sync" in x]
    assert (
        f"schema version {weex_sync.SCHEMA_VERSION + 1}" in line and "nothing was written" in line
    )
    assert harness.run("--status") == 3
    assert "newer than this weex_sync" in harness.last_log
    assert own_db.scalar("SELECT count(*) FROM trade_fills") == 0
    assert own_db.scalar("SELECT count(*) FROM sync_status") == 0
    assert sim.count() == 0  # not even the exchange was asked


def test_a_database_weex_sync_creates_is_a_warning_seen_under_quiet(
    harness: Harness, sim, pg: dict, scratch_db_names: list[str]
):
    """-q hid "created database X": a mistyped dbname under cron silently made a new one."""
    name = f"weex_sync_typo_{os.getpid()}"
    scratch_db_names.append(name)
    harness.accounts = [make_account(sim, 1)]
    harness.database["dbname"] = name

    assert harness.run("-q") == 0

    [line] = [x for x in harness.last_log.splitlines() if "created database" in x]
    assert " WARNING " in line and f"{name} on {pg['host']}:{pg['port']}" in line
    assert "typo in database.dbname" in line


def test_a_last_batch_that_cannot_be_written_fails_its_pair_whose_status_row_says_why(
    harness: Harness, own_db: Database, sim
):
    """The walk's last batch and the status row are one transaction: when the batch itself
    fails (here a constraint rejects user1's fills), the pair fails with that error, its status
    row is written alone, nothing of the batch is stored, the cursor stays; the next pass
    stores it all."""
    one, two = two_accounts_and_empty_tables(harness, own_db, sim)
    own_db.rows("ALTER TABLE trade_fills ADD CONSTRAINT no_user1 CHECK (user_id <> 'user1')")
    try:
        assert harness.run("--once") == 1
    finally:
        own_db.rows("ALTER TABLE trade_fills DROP CONSTRAINT no_user1")

    [line] = [x for x in harness.last_log.splitlines() if "user1/cmt_btcusdt: error" in x]
    assert "no_user1" in line and "fetched=0 inserted=0" in line, line
    row = own_db.rows(
        "SELECT status, error_kind, records_count FROM sync_status WHERE user_id = 'user1'"
    )
    assert row == [("error", "database", 0)]
    assert stored_fills(own_db, "user1") == set()
    assert own_db.scalar("SELECT count(*) FROM sync_cursor WHERE user_id = 'user1'") == 0
    assert stored_fills(own_db, "user2") == harness.expected(two, BTC)
    assert harness.run("--once") == 0
    assert stored_fills(own_db, "user1") == harness.expected(one, BTC)
