"""What analysts query: the typed analysis columns (quote_value, realized_pnl, maker,
position_side) filled for both API versions, and trade_fills_daily, which always equals the
same aggregate over trade_fills (kills: tests/test_faults.py)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Database,
    Harness,
    all_apis,
    assert_rollup_matches,
    create_scratch_database,
    finish,
    make_account,
    now_ms,
    stored_fills,
)

V3_NAMES = {"quote_value": "quoteQty", "realized_pnl": "realizedPnl"}
V2_NAMES = {"quote_value": "fillValue", "realized_pnl": "realizePnl"}


def analysis_rows(db: Database) -> list[tuple]:
    return db.rows(
        "SELECT raw::text, quote_value, realized_pnl, maker, position_side FROM trade_fills"
    )


@all_apis
def test_the_analysis_columns_are_what_each_version_sends(harness: Harness, db: Database, sim, api):
    harness.fleet(2, fills=60)
    assert harness.run() == 0

    rows = analysis_rows(db)
    assert len(rows) == 2 * 2 * 60
    names = V2_NAMES if api.version == 2 else V3_NAMES
    for raw_text, quote_value, realized_pnl, maker, position_side in rows:
        raw = json.loads(raw_text)
        assert quote_value == Decimal(str(raw[names["quote_value"]]))
        assert realized_pnl == Decimal(str(raw[names["realized_pnl"]]))
        assert maker == (raw["maker"] if api.version == 3 else None)
        assert position_side == raw["positionSide"] and position_side in ("LONG", "SHORT")
    assert db.scalar("SELECT count(*) FROM trade_fills WHERE maker") == (
        0 if api.version == 2 else db.scalar("SELECT count(*) FROM trade_fills WHERE fee < 0")
    )
    readable = db.rows(
        "SELECT quote_value, realized_pnl, maker, position_side FROM trade_fills_readable"
    )
    assert sorted(map(str, readable)) == sorted(map(str, (r[1:] for r in rows)))
    assert_rollup_matches(db)


def test_a_bad_analysis_value_sends_its_fill_to_the_quarantine(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    now = now_ms()
    good = sim.add_fill(account.api_key, BTC, created_time=now - 30_000)
    sim.add_fill(account.api_key, BTC, created_time=now - 20_000, realizedPnl="12,5")
    sim.add_fill(account.api_key, BTC, created_time=now - 10_000, maker="yes")
    harness.accounts = [account]

    assert harness.run() == 1  # quarantined fills fail the pair, loudly

    assert {row[0] for row in db.rows("SELECT trade_id FROM trade_fills")} == {str(good["tradeId"])}
    reasons = [row[0] for row in db.rows("SELECT reason FROM rejected_fills ORDER BY reason")]
    assert len(reasons) == 2
    assert any("maker 'yes' is not true or false" in r for r in reasons), reasons
    assert any("realizedPnl '12,5' is not a decimal number" in r for r in reasons), reasons
    assert_rollup_matches(db)


def test_the_rollup_equals_the_aggregate_through_overlaps_repairs_and_resolutions(
    harness: Harness, db: Database, sim
):
    """Two passes at once; fills shown too late for the lookback, then a --since repair; a
    quarantined fill resolved by its valid version: trade_fills_daily equals the aggregate over
    trade_fills after each (it counts what the INSERT inserted, never what was fetched)."""
    accounts = harness.fleet(3, fills=400)
    sim.latency = 0.01
    harness.sync["workers"] = 3
    first, second = harness.popen("--once"), harness.popen("--once")
    assert [finish(first)[0], finish(second)[0]] == [0, 0]
    assert_rollup_matches(db)
    assert db.scalar("SELECT sum(fills) FROM trade_fills_daily") == 3 * 2 * 400

    sim.latency = 0
    late = now_ms() - 3_600_000  # an hour ago: older than the lookback re-reads
    for n in range(5):
        sim.add_fill(accounts[0].api_key, BTC, created_time=late + n, fee="-0.01")
    assert harness.run() == 0
    assert_rollup_matches(db)
    assert harness.run("--since", str(late - 1000), "--user", "user1") == 0
    assert stored_fills(db, "user1") == harness.expected(accounts[0], BTC, ETH)
    assert_rollup_matches(db)

    bad = sim.add_fill(
        accounts[1].api_key, ETH, created_time=now_ms() - 5_000, fillFee="x", commission="x"
    )
    assert harness.run() == 1
    sim.remove_fill(accounts[1].api_key, ETH, bad["tradeId"])
    sim.add_fill(
        accounts[1].api_key,
        ETH,
        created_time=bad["createdTime"],
        trade_id=bad["tradeId"],
        order_id=bad["orderId"],
    )
    assert harness.run("--since", str(bad["createdTime"] - 1000), "--user", "user2") == 0
    assert db.scalar("SELECT count(*) FROM rejected_fills WHERE resolved_at IS NULL") == 0
    assert_rollup_matches(db)


def test_the_rollup_of_a_monthly_partitioned_table(harness: Harness, sim, pg, scratch_db_names):
    name = create_scratch_database(pg, scratch_db_names, "weex_analysis_monthly")
    harness.database.update(dbname=name, partition_fills="monthly")
    harness.fleet(2, fills=300)
    assert harness.run() == 0
    own = Database(pg, name)
    try:
        assert own.scalar("SELECT relkind FROM pg_class WHERE relname = 'trade_fills'") == "p"
        assert own.scalar("SELECT sum(fills) FROM trade_fills_daily") == 2 * 2 * 300
        assert_rollup_matches(own)
    finally:
        own.close()


@pytest.mark.parametrize("old_version", [6, 0])
def test_an_upgrade_fills_the_columns_of_stored_fills_and_builds_the_rollup(
    harness: Harness, sim, pg, scratch_db_names, old_version
):
    """A schema-6 database (3.3), or one of 1.x (fills, but no weex_sync_schema: version 0):
    its fills have no analysis columns and there is no rollup. The upgrade fills the columns
    from raw, in batches of pages, exactly as a pass would have, and builds trade_fills_daily
    from the stored fills."""
    name = create_scratch_database(pg, scratch_db_names, "weex_analysis_upgrade")
    harness.database["dbname"] = name
    for n, version in ((1, 2), (2, 3)):  # fills of both versions in one table
        account = make_account(sim, n, [BTC, ETH])
        for symbol in (BTC, ETH):
            sim.generate_fills(
                account.api_key, symbol, 250, start_ms=START_MS, end_ms=START_MS + 9 * DAY_MS
            )
        harness.accounts = [account]
        harness.weex["api_version"] = version
        assert harness.run() == 0
    own = Database(pg, name)
    try:
        before = sorted(map(str, analysis_rows(own)))
        own.rows(
            "UPDATE trade_fills SET quote_value = NULL, realized_pnl = NULL, maker = NULL,"
            " position_side = NULL"
        )
        own.rows("DROP TABLE trade_fills_daily")
        own.rows("UPDATE weex_sync_schema SET version = %s", (old_version,))
        if old_version == 0:
            own.rows("DROP TABLE weex_sync_schema")
        blocks = own.scalar("SELECT pg_relation_size('trade_fills') / 8192")
        original = weex_sync.BACKFILL_BLOCKS
        weex_sync.BACKFILL_BLOCKS = max(1, blocks // 5)  # several batches
        try:
            assert harness.run() == 0, harness.last_log
        finally:
            weex_sync.BACKFILL_BLOCKS = original

        assert "upgrade: filling the analysis columns" in harness.last_log
        assert sorted(map(str, analysis_rows(own))) == before
        assert own.scalar("SELECT max(version) FROM weex_sync_schema") == weex_sync.SCHEMA_VERSION
        assert own.scalar("SELECT sum(fills) FROM trade_fills_daily") == 2 * 2 * 250
        assert_rollup_matches(own)
    finally:
        own.close()
