"""Where production PostgreSQL is: a database in another encoding, a search_path or a schema
someone else chose, a clock that stepped, a host's addresses, monitoring while the database is
down (issue: runs where production PostgreSQL is)."""

from __future__ import annotations

import json
import random

from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql
from test_hostile import now_ms

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    START_MS,
    Database,
    Harness,
    admin_connection,
    finish,
    make_account,
    stored_fills,
)


def test_a_database_in_another_encoding_is_refused_before_anything_is_written(
    harness: Harness, sim, pg: dict, scratch_db_names: list[str]
):
    name = f"weex_sync_latin1_{random.randrange(10**9)}"
    scratch_db_names.append(name)
    conn = admin_connection(pg)
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' "
                "LC_CTYPE 'C'"
            ).format(sql.Identifier(name))
        )
    conn.close()
    harness.accounts = [make_account(sim, 1)]
    harness.database["dbname"] = name

    assert harness.run() == 3
    assert harness.run("--check") == 3

    [line] = [x for x in harness.last_log.splitlines() if "encoded LATIN1" in x]
    assert "weex_sync needs UTF8" in line and "TEMPLATE template0" in line
    latin1 = Database(pg, name)
    try:
        assert latin1.scalar("SELECT to_regclass('trade_fills')") is None  # nothing created
    finally:
        latin1.close()
    assert sim.count() == 0


def test_the_database_weex_sync_creates_is_utf8_from_template0(
    harness: Harness, sim, pg: dict, scratch_db_names: list[str]
):
    name = f"weex_sync_created_{random.randrange(10**9)}"
    scratch_db_names.append(name)
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 5, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.database["dbname"] = name

    assert harness.run() == 0, harness.last_log

    conn = admin_connection(pg)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = %s", (name,)
        )
        assert cur.fetchone()[0] == "UTF8"
    conn.close()


def test_a_claim_dated_in_the_future_has_expired(harness: Harness, db: Database, sim):
    """The database's clock stepped back an hour after a pass claimed the account: the next
    pass syncs it, instead of counting it fresh for an hour."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 5, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.sync["min_interval_seconds"] = 50  # claims on
    assert harness.run() == 0, harness.last_log
    db.rows("UPDATE sync_claims SET claimed_at = now() + interval '1 hour'")
    sim.generate_fills(account.api_key, BTC, 5, start_ms=now_ms() - 60_000, end_ms=now_ms())

    assert harness.run() == 0, harness.last_log

    assert "fresh" not in harness.last_log.split("finished")[-1]
    assert stored_fills(db) == harness.expected(account, BTC)
    assert db.scalar("SELECT claimed_at <= now() FROM sync_claims") is True


def test_a_source_address_not_on_this_host_is_a_configuration_error(harness: Harness, sim, db):
    harness.accounts = [make_account(sim, 1)]
    harness.weex["source_address"] = ["127.0.0.1", "192.0.2.1"]  # TEST-NET-1: nobody's

    assert harness.run() == 2

    [line] = [x for x in harness.last_log.splitlines() if "configuration error" in x]
    assert "weex.source_address[1]: 192.0.2.1 is not an address of this host" in line
    assert sim.count() == 0 and db.scalar("SELECT count(*) FROM sync_status") == 0


def test_the_source_address_check_accepts_this_hosts_addresses():
    assert weex_sync._unbindable(weex_sync.ipaddress.ip_address("127.0.0.1")) is None
    assert weex_sync._unbindable(weex_sync.ipaddress.ip_address("192.0.2.1"))


def test_a_search_path_someone_else_chose_cannot_send_a_write_elsewhere(
    harness: Harness, db: Database, sim
):
    """The analysts' snapshot reporting.trade_fills comes first in the database's search_path:
    weex_sync still writes to its own schema's tables, and reads them."""
    db.rows("CREATE SCHEMA reporting")
    db.rows("CREATE TABLE reporting.trade_fills (LIKE public.trade_fills INCLUDING ALL)")
    db.rows("CREATE TABLE reporting.sync_status (LIKE public.sync_latest)")
    db.rows(
        sql.SQL("ALTER DATABASE {} SET search_path = reporting, public")
        .format(sql.Identifier(db.name))
        .as_string(db.conn)
    )
    try:
        account = make_account(sim, 1)
        sim.generate_fills(account.api_key, BTC, 50, start_ms=START_MS, end_ms=START_MS + DAY_MS)
        harness.accounts = [account]

        assert harness.run() == 0, harness.last_log
        assert harness.run("--status") == 0
        assert "user1" in harness.out and "success" in harness.out
    finally:
        db.rows(
            sql.SQL("ALTER DATABASE {} RESET search_path")
            .format(sql.Identifier(db.name))
            .as_string(db.conn)
        )
        stored = stored_fills(db)
        snapshot = db.scalar("SELECT count(*) FROM reporting.trade_fills")
        db.rows("DROP SCHEMA reporting CASCADE")
    assert stored == harness.expected(account, BTC)
    assert snapshot == 0


def test_database_schema_puts_every_table_there(harness: Harness, sim, pg, scratch_db_names):
    name = f"weex_sync_schema_{random.randrange(10**9)}"
    scratch_db_names.append(name)
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 30, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.database.update(dbname=name, schema="weex_data")

    assert harness.run() == 0, harness.last_log
    assert harness.run() == 0, harness.last_log  # the schema is current: nothing to create
    assert harness.run("--status") == 0

    created = Database(pg, name)
    try:
        tables = created.rows(
            "SELECT table_schema, count(*) FROM information_schema.tables"
            " WHERE table_name IN ('trade_fills', 'sync_status', 'sync_cursor', 'sync_latest')"
            " GROUP BY 1"
        )
        assert tables == [("weex_data", 4)]
        assert created.scalar("SELECT count(*) FROM weex_data.trade_fills") == 30
    finally:
        created.close()


def metric_values(path) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_the_metrics_keep_the_pairs_series_when_the_database_is_down(
    harness: Harness, db: Database, sim, tmp_path
):
    """The README's alert (the age of synced_through) must fire exactly when the database is
    down: the last known series stay, database_up says 0, and no temp file is left."""
    harness.fleet(2, fills=20, symbols=(BTC,))
    metrics = tmp_path / "textfile" / "weex_sync.prom"
    metrics.parent.mkdir()
    assert harness.run("--metrics-file", str(metrics)) == 0
    before = metric_values(metrics)
    through = ("weex_sync_synced_through_timestamp_seconds", (("symbol", BTC), ("user", "user1")))
    assert before[through] > 0 and before[("weex_sync_database_up", ())] == 1

    harness.database["port"] = 1  # the database is down
    assert harness.run("--metrics-file", str(metrics)) == 3

    after = metric_values(metrics)
    assert after[through] == before[through]  # carried: its age grows, the alert fires
    assert after[("weex_sync_database_up", ())] == 0
    assert after[("weex_sync_pass_exit_code", ())] == 3
    success = ("weex_sync_last_pass_success_timestamp_seconds", ())
    assert after[success] == before[success]  # the last pass that exited 0
    assert after[("weex_sync_passes_total", ())] == 2
    assert not list(metrics.parent.glob(".weex_sync_metrics.*"))


def test_a_metrics_file_that_cannot_be_written_leaves_no_temp_file(
    harness: Harness, db: Database, sim, tmp_path
):
    harness.fleet(1, fills=5, symbols=(BTC,))
    metrics = tmp_path / "textfile" / "weex_sync.prom"
    metrics.mkdir(parents=True)  # a directory in the way: the rename fails, as on a full disk

    assert harness.run("--metrics-file", str(metrics)) == 0

    assert "cannot write the metrics file" in harness.last_log
    assert not list(metrics.parent.glob(".weex_sync_metrics.*"))


def test_four_first_runs_of_a_monthly_table_put_no_fill_in_the_default_partition(
    harness: Harness, sim, pg, scratch_db_names
):
    """Its months are made with the table, under the schema's lock: no pass inserts a fill
    before its month exists (3.1: about half the time this month's fills went to the default
    partition, and the month could never be attached). Then the README's recipe detaches an
    old month from the table weex_sync made."""
    accounts = [make_account(sim, n, "all") for n in (1, 2, 3, 4)]
    for account in accounts:
        sim.generate_fills(account.api_key, BTC, 20, start_ms=now_ms() - 3_600_000, end_ms=now_ms())
    harness.sync["start_time"] = now_ms() - 2 * 3_600_000
    del harness.sync["symbols"]
    harness.database["partition_fills"] = "monthly"
    for trial in range(3):
        name = f"weex_sync_monthly_{trial}_{random.randrange(10**9)}"
        scratch_db_names.append(name)
        harness.database["dbname"] = name
        processes = []
        for account in accounts:
            harness.accounts = [account]
            processes.append(harness.popen("--once", name=f"m{trial}{account.user_id}.yaml"))
        results = [finish(process) for process in processes]
        assert [code for code, _ in results] == [0, 0, 0, 0], results
        assert not [r for _, r in results if "partition maintenance" in r], results

        made = Database(pg, name)
        try:
            assert made.scalar("SELECT count(*) FROM trade_fills_default") == 0
            assert made.scalar("SELECT count(*) FROM trade_fills") == 80
            old = made.scalar(
                "SELECT min(c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'trade_fills'::regclass AND c.relname <> 'trade_fills_default'"
            )
            made.rows("SET lock_timeout = '5s'")  # the README's recipe
            made.rows(f"ALTER TABLE trade_fills DETACH PARTITION {old}")
            made.rows(f"DROP TABLE {old}")
        finally:
            made.close()


def test_monthly_on_a_plain_table_from_before_is_a_warning_not_a_failed_upgrade(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 10, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    assert harness.run() == 0, harness.last_log  # a plain trade_fills
    db.rows("UPDATE weex_sync_schema SET version = 4")  # the upgrade runs again
    harness.database["partition_fills"] = "monthly"

    assert harness.run() == 0, harness.last_log

    assert "trade_fills is not partitioned" in harness.last_log
    assert stored_fills(db) == harness.expected(account, BTC)


def test_a_counter_the_metrics_file_does_not_know_is_dropped(
    harness: Harness, db: Database, sim, tmp_path
):
    """Left by another version of weex_sync: never a crash of every pass."""
    harness.fleet(1, fills=5, symbols=(BTC,))
    metrics = tmp_path / "weex_sync.prom"
    metrics.write_text("weex_sync_something_new_total 3\nweex_sync_passes_total 4\n")

    assert harness.run("--metrics-file", str(metrics)) == 0

    values = metric_values(metrics)
    assert values[("weex_sync_passes_total", ())] == 5
    assert not any(name.startswith("weex_sync_something_new") for name, _ in values)


def test_the_json_log_carries_refused_and_unstored(harness: Harness, db: Database, sim):
    harness.fleet(1, fills=5, symbols=(BTC,))

    assert harness.run("--log-format", "json") == 0

    done = [json.loads(x) for x in harness.last_log.splitlines() if '"pass_done"' in x]
    assert done and done[0]["refused"] == 0
    synced = [json.loads(x) for x in harness.last_log.splitlines() if '"synced"' in x]
    assert synced and synced[0]["unstored"] == 0
