"""Where production PostgreSQL is: a database in another encoding, a search_path or a schema
someone else chose, a clock that stepped, a host's addresses, monitoring while the database is
down (issue: runs where production PostgreSQL is)."""

from __future__ import annotations

import json
import random
import time

from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql
from test_hostile_exchange import now_ms

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Database,
    Harness,
    admin_connection,
    finish,
    make_account,
    stored_fills,
    wait_for,
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
    """The documented alert (docs/operations.md: the age of synced_through) must fire exactly when the database is
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
    partition, and the month could never be attached). Then the documented recipe (docs/tables.md) detaches an
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
            made.rows("SET lock_timeout = '5s'")  # docs/tables.md's recipe
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


# --- pgbouncer in transaction pooling mode ---------------------------------------------------


def advisory_locks(db: Database) -> int:
    return db.scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )


def test_passes_through_pgbouncer_in_transaction_mode_skip_nothing_and_leave_no_lock(
    harness: Harness, sim, pg: dict, pgbouncer: dict, scratch_db_names: list[str]
):
    """3.1 behind pgbouncer (transaction pooling) skipped about 40 % of its pair-passes as
    "another weex_sync process is syncing it" (session locks taken and released on different
    server connections stayed held) and failed to start on the ``options`` startup parameter.
    Here: a new database and its schema made through pgbouncer, then passes in a row, each
    with new fills; none skips a pair, every fill is stored once, no lock is left held."""
    name = f"weex_sync_pooled_{random.randrange(10**9)}"
    scratch_db_names.append(name)
    accounts = harness.fleet(6, fills=150)
    harness.database.update(dbname=name, port=pgbouncer["port"])
    harness.sync["workers"] = 3

    for round_ in range(5):
        assert harness.run() == 0, harness.last_log
        assert "skipped, another" not in harness.last_log, harness.last_log
        assert " 0 skipped" in harness.last_log
        for account in accounts:
            sim.generate_fills(
                account.api_key, BTC, 7, start_ms=now_ms() - 60_000, end_ms=now_ms() - 1_000
            )
    assert harness.run() == 0, harness.last_log

    pooled = Database(pg, name)  # read directly, not through the pooler
    try:
        for account in accounts:
            assert stored_fills(pooled, account.user_id) == harness.expected(account, BTC, ETH)
        total = sum(len(harness.served(a, BTC, ETH)) for a in accounts)
        assert pooled.scalar("SELECT sum(records_count) FROM sync_status") == total
        assert pooled.scalar("SELECT count(*) FROM sync_status WHERE status = 'error'") == 0
        assert pooled.scalar("SELECT count(*) FROM sync_status") == 6 * 12
        assert advisory_locks(pooled) == 0
    finally:
        pooled.close()


def test_kill_9_behind_pgbouncer_frees_the_pairs_and_two_passes_at_once_store_each_fill_once(
    harness: Harness, db: Database, sim, pgbouncer: dict
):
    """A pass killed mid-backfill behind pgbouncer: its pair locks end with its transactions
    (pgbouncer drops a server connection whose client vanished inside one), so the next pass
    syncs every pair at once. Then two passes started together through pgbouncer: one syncs a
    pair, the other skips it or finds nothing new; every fill stored once."""
    accounts = harness.fleet(3, fills=3_000)
    sim.latency = 0.003
    harness.database["port"] = pgbouncer["port"]

    process = harness.popen("--once")
    wait_for(lambda: db.scalar("SELECT count(*) FROM trade_fills") >= 1_500)
    process.kill()
    finish(process)
    wait_for(lambda: advisory_locks(db) == 0, timeout=10)

    sim.latency = 0.001
    first, second = harness.popen("--once"), harness.popen("--once")
    results = [finish(first), finish(second)]

    assert [code for code, _ in results] == [0, 0], results
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC, ETH)
    assert db.scalar("SELECT count(*) FROM trade_fills") == 3 * 2 * 3_000
    assert db.scalar("SELECT count(*) FROM sync_status WHERE status = 'error'") == 0
    assert advisory_locks(db) == 0


def test_a_rescan_behind_pgbouncer_waits_for_the_pair_a_pass_holds(
    harness: Harness, db: Database, sim, pgbouncer: dict
):
    """--since --lock-wait through pgbouncer: it waits for the pair a running pass holds
    (the lock is a transaction's, on the pass's server connection), then re-scans."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 4_000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.latency = 0.004
    harness.accounts = [account]
    harness.database["port"] = pgbouncer["port"]

    process = harness.popen("--once")
    wait_for(lambda: db.scalar("SELECT count(*) FROM trade_fills") >= 300)
    assert harness.run("--since", str(START_MS), "--lock-wait", "60") == 0, harness.last_log
    assert "another weex_sync pass is syncing it; waiting up to 60s" in harness.last_log
    assert finish(process)[0] == 0

    assert stored_fills(db) == harness.expected(account, BTC)
    assert advisory_locks(db) == 0


# --- a role with only the documented grants --------------------------------------------------

# docs/postgres.md, "A role with least privilege": what the DBA runs, word for word (the
# schema weex is the deployment's database.schema).
DOCUMENTED_GRANTS = """
GRANT USAGE ON SCHEMA weex TO weex_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA weex TO weex_app;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA weex TO weex_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA weex GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO weex_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA weex GRANT USAGE ON SEQUENCES TO weex_app;
"""


def least_privilege_database(pg: dict, scratch_db_names: list[str]) -> Database:
    """A database whose schema ``weex`` the owner (postgres) made with --print-schema, and the
    role weex_app (LOGIN, nothing else) granted DOCUMENTED_GRANTS."""
    conn = admin_connection(pg)
    with conn.cursor() as cur:
        cur.execute(
            "DO $$ BEGIN CREATE ROLE weex_app LOGIN; EXCEPTION"
            " WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )
    conn.close()
    name = f"weex_sync_app_{random.randrange(10**9)}"
    scratch_db_names.append(name)
    conn = admin_connection(pg)
    weex_sync.create_utf8_database(conn, name)
    conn.close()
    owner = Database(pg, name)
    owner.rows("CREATE SCHEMA weex")
    owner.rows("SET search_path = weex")  # for the owner's queries of the test too
    owner.rows(weex_sync.SCHEMA_SQL)  # what --print-schema prints
    owner.rows(DOCUMENTED_GRANTS)
    return owner


def test_a_role_with_only_the_documented_grants_syncs_and_keeps_its_status_rows(
    harness: Harness, sim, pg: dict, scratch_db_names: list[str]
):
    """3.1 as such a role failed every pass once the owner's day partitions ran out ("no
    partition of relation sync_status found for row"), storing nothing. Here its status rows
    go to sync_status_default, retention deletes the old ones in batches, --check passes,
    and a missing grant is named (with the GRANT) before anything is synced."""
    owner = least_privilege_database(pg, scratch_db_names)
    try:
        account = make_account(sim, 1)
        sim.generate_fills(account.api_key, BTC, 40, start_ms=START_MS, end_ms=START_MS + DAY_MS)
        harness.accounts = [account]
        harness.database.update(dbname=owner.name, schema="weex", user="weex_app")
        owner.rows(
            "INSERT INTO weex.sync_status (pass_id, user_id, symbol, last_sync_time,"
            " records_count, fetched_count, requests_count, duration_ms, status)"
            " SELECT 'old', 'user1', 'x', now() - interval '100 days', 0, 0, 0, 0, 'success'"
            " FROM generate_series(1, 12000)"
        )

        for _ in range(2):
            assert harness.run() == 0, harness.last_log
            assert "WARNING" not in harness.last_log, harness.last_log
        assert harness.run("--check") == 0, harness.out + harness.last_log
        assert harness.run("--status") == 0 and "success" in harness.out

        assert stored_fills(owner) == harness.expected(account, BTC)
        assert owner.scalar("SELECT count(*) FROM weex.sync_status_default") == 2
        assert owner.scalar("SELECT count(*) FROM weex.sync_status WHERE pass_id = 'old'") == 0

        owner.rows("REVOKE UPDATE ON weex.sync_cursor FROM weex_app")
        sim.generate_fills(account.api_key, BTC, 5, start_ms=now_ms() - 60_000, end_ms=now_ms())
        assert harness.run("--check") == 3
        [line] = [x for x in harness.last_log.splitlines() if "lacks" in x]
        assert "role weex_app lacks UPDATE on weex.sync_cursor" in line
        assert "GRANT UPDATE ON TABLE weex.sync_cursor TO weex_app" in line
        assert harness.run() == 3
        assert "lacks UPDATE on weex.sync_cursor" in harness.last_log
        assert owner.scalar("SELECT count(*) FROM weex.trade_fills") == 40  # nothing half-done
        owner.rows("GRANT UPDATE ON weex.sync_cursor TO weex_app")

        harness.database["user"] = pg["user"]  # the owner's pass makes the days ahead
        assert harness.run() == 0, harness.last_log
        assert "WARNING" not in harness.last_log, harness.last_log
        days = {
            row[0]
            for row in owner.rows(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'weex.sync_status'::regclass"
            )
        }
        today = weex_sync.utc_day(weex_sync.time.time())
        tomorrow = today + weex_sync.dt.timedelta(days=1)
        assert f"sync_status_p{tomorrow:%Y%m%d}" in days
        assert f"sync_status_p{today:%Y%m%d}" not in days  # today's rows are in the default

        # An upgrade by the owner (schema 5 had no default partition): the role's grants
        # cover the new table (ALTER DEFAULT PRIVILEGES), its passes go on.
        owner.rows("DROP TABLE sync_status_default")
        owner.rows("UPDATE weex_sync_schema SET version = 5")
        harness.database["user"] = "weex_app"
        assert harness.run() == 3
        assert "its owner creates or upgrades it" in harness.last_log
        harness.database["user"] = pg["user"]
        assert harness.run() == 0, harness.last_log
        harness.database["user"] = "weex_app"
        assert harness.run() == 0, harness.last_log
        assert harness.run("--check") == 0, harness.out + harness.last_log
    finally:
        owner.close()


def test_a_pairs_lock_outlasts_a_dbas_idle_in_transaction_timeout(
    harness: Harness, db: Database, sim
):
    """The transaction that holds a pair's lock sits idle while the walk commits on another
    connection: a database's idle_in_transaction_session_timeout must not end it (the lock
    would go, and a second pass would sync the pair at the same time)."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 3_000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.latency = 0.05  # 30 pages of 100: a walk of 2 s or more
    harness.sync["page_size"] = 100
    harness.accounts = [account]
    setting = sql.SQL("ALTER DATABASE {} SET idle_in_transaction_session_timeout = {}")
    db.rows(setting.format(sql.Identifier(db.name), sql.Literal("300ms")).as_string(db.conn))
    try:
        process = harness.popen("--once")
        wait_for(lambda: db.scalar("SELECT count(*) FROM trade_fills") >= 100)
        time.sleep(0.6)  # twice the timeout into the walk
        assert harness.run() == 0, harness.last_log
        assert "skipped, another weex_sync process is syncing it" in harness.last_log
        code, err = finish(process)
    finally:
        db.rows(
            sql.SQL("ALTER DATABASE {} RESET idle_in_transaction_session_timeout")
            .format(sql.Identifier(db.name))
            .as_string(db.conn)
        )
    assert code == 0, err
    assert stored_fills(db) == harness.expected(account, BTC)


def test_a_repeatable_read_default_leaves_no_snapshot_in_an_idle_lock_transaction(
    harness: Harness, db: Database, sim
):
    """A database whose default isolation is REPEATABLE READ: weex_sync's transactions run READ
    COMMITTED all the same, so the transaction holding a pair's lock keeps no snapshot while
    it waits (VACUUM and an upgrade's CREATE INDEX CONCURRENTLY would wait for it)."""
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 2_000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.latency = 0.05
    harness.sync["page_size"] = 100
    harness.accounts = [account]
    setting = sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'")
    db.rows(setting.format(sql.Identifier(db.name)).as_string(db.conn))
    try:
        process = harness.popen("--once")
        wait_for(lambda: db.scalar("SELECT count(*) FROM trade_fills") >= 100)
        idle = db.rows(
            "SELECT backend_xmin IS NULL FROM pg_stat_activity WHERE application_name ="
            " 'weex_sync' AND state = 'idle in transaction' AND datname = current_database()"
        )
        code, err = finish(process)
    finally:
        db.rows(
            sql.SQL("ALTER DATABASE {} RESET default_transaction_isolation")
            .format(sql.Identifier(db.name))
            .as_string(db.conn)
        )
    assert idle and all(row[0] for row in idle), idle  # the lock's transaction, no snapshot
    assert code == 0, err
    assert stored_fills(db) == harness.expected(account, BTC)
