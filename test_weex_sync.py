"""weex_sync against a real PostgreSQL database and the WEEX simulator over real HTTP."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import yaml

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    DEPLOY,
    ETH,
    ROOT,
    START_MS,
    ApiMode,
    Database,
    Harness,
    all_apis,
    database_exists,
    expected_fills,
    make_account,
    now_ms,
    stored_fills,
    v3_orders,
)


def minimal_requests(times: list[int], start: int, end: int) -> int:
    """The fewest fills requests a walk of [start, end] can make: one per 7-day window, one per
    100 fills in it."""
    windows = weex_sync.windows(start, end, weex_sync.V3.max_span_ms)
    return sum(max(1, math.ceil(sum(lo <= t <= hi for t in times) / 100)) for lo, hi in windows)


# --- signing -------------------------------------------------------------------------------


def test_signature_matches_a_vector_computed_by_hand():
    # printf '%s' '1700000000000GET/capi/v2/order/fills?symbol=cmt_btcusdt&startTime=0&limit=100'
    #   | openssl dgst -sha256 -hmac 'kat-secret' -binary | base64
    signature = weex_sync.sign(
        "kat-secret",
        "1700000000000",
        "GET",
        "/capi/v2/order/fills",
        "symbol=cmt_btcusdt&startTime=0&limit=100",
        "",
    )
    assert signature == "eJMMHzzyY2VgPjiRM/is1ZlkQioXEMIonjo6W1F4e00="


# --- the pass --------------------------------------------------------------------------------


@all_apis
def test_first_pass_stores_exactly_the_simulators_fills(harness: Harness, db: Database, sim, api):
    account = make_account(sim, 1, [BTC, ETH])
    sim.generate_fills(account.api_key, BTC, 1234, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.generate_fills(account.api_key, ETH, 321, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.sync["symbols"] = [BTC, ETH]

    assert harness.run("--once") == 0

    assert stored_fills(db) == harness.expected(account, BTC, ETH)
    assert db.scalar("SELECT count(*) FROM trade_fills") == 1234 + 321
    # the price is exact: fillValue / fillSize on v2, the price field on v3
    value = "fillValue" if api.version == 2 else "quoteQty"
    assert (
        db.scalar(
            f"SELECT count(*) FROM trade_fills WHERE price * size <> (raw->>'{value}')::numeric"
        )
        == 0
    )
    status = {(r["user_id"], r["symbol"]): r for r in db.status()}
    assert status[("user1", BTC)]["status"] == "success"
    assert status[("user1", BTC)]["records_count"] == 1234
    assert status[("user1", ETH)]["records_count"] == 321
    newest = max(row[8] for row in harness.expected(account, BTC))
    assert status[("user1", BTC)]["last_trade_time"] == newest
    assert "user1/cmt_btcusdt: ok fetched=1234 inserted=1234" in harness.log


@all_apis
def test_second_pass_adds_nothing_with_one_request_per_symbol(
    harness: Harness, db: Database, sim, api
):
    harness.fleet(1, fills=450)
    assert harness.run() == 0
    before = stored_fills(db)
    sim.reset_stats()

    assert harness.run() == 0

    assert stored_fills(db) == before
    second = db.status()[-2:]
    assert [r["records_count"] for r in second] == [0, 0]
    # The walk starts at the newest stored fill, within one request span (v3: 7 days; the
    # history is 40 days old). v2 takes any span: it re-reads that millisecond's fills.
    at_newest = [
        db.scalar(
            "SELECT count(*) FROM trade_fills WHERE symbol = %s AND trade_time ="
            " (SELECT max(trade_time) FROM trade_fills WHERE symbol = %s)",
            (s, s),
        )
        for s in (BTC, ETH)
    ]
    assert [r["fetched_count"] for r in second] == (at_newest if api.version == 2 else [0, 0])
    assert [r["requests_count"] for r in second] == [1, 1]
    assert harness.fills_requests() == 2


@all_apis
def test_a_fill_that_appears_late_in_the_newest_stored_millisecond_is_picked_up(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    now = now_ms()
    # the newest stored millisecond is inside the lookback window (the last 120 s of a pass)
    sim.generate_fills(account.api_key, BTC, 300, start_ms=now - 60_000, end_ms=now - 1000)
    harness.accounts = [account]
    assert harness.run() == 0
    last_ms = db.scalar("SELECT max(trade_time) FROM trade_fills")
    time.sleep(0.05)

    late = sim.add_fill(account.api_key, BTC, created_time=last_ms, size="0.5", value="50000")
    after = now_ms()
    newer = [sim.add_fill(account.api_key, BTC, created_time=after + i) for i in range(150)]
    time.sleep(0.2)  # the newer fills are all in the past when the next pass asks
    assert harness.run() == 0

    assert stored_fills(db) == harness.expected(account, BTC)
    row = db.status()[-1]
    assert row["records_count"] == 1 + len(newer)
    assert row["late_count"] == 1  # only the fill dated before the first pass ended
    stored = {r[0] for r in db.rows("SELECT trade_id FROM trade_fills")}
    assert str(late["tradeId"]) in stored


@all_apis
def test_sixty_fills_in_one_millisecond_split_by_a_page_boundary(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    ms = START_MS + 5000
    for i in range(50):  # whichever end a page starts from: these 50 and 50 of the 60
        sim.add_fill(account.api_key, BTC, created_time=ms - 1000 - i)
    sim.add_burst(account.api_key, BTC, ms, 60, orders=4)
    for i in range(50):
        sim.add_fill(account.api_key, BTC, created_time=ms + 1 + i)
    harness.accounts = [account]

    assert harness.run() == 0

    assert stored_fills(db) == harness.expected(account, BTC)
    assert db.scalar("SELECT count(*) FROM trade_fills WHERE trade_time = %s", (ms,)) == 60


@all_apis
def test_burst_larger_than_a_page_in_one_millisecond_is_fetched_order_by_order(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    ms = START_MS + 7000
    sim.generate_fills(account.api_key, BTC, 200, start_ms=START_MS, end_ms=ms - 1)
    sim.add_burst(account.api_key, BTC, ms, 250, orders=3)
    sim.generate_fills(account.api_key, BTC, 120, start_ms=ms + 1, end_ms=ms + DAY_MS, seed=5)
    harness.accounts = [account]

    assert harness.run() == 0

    assert stored_fills(db) == harness.expected(account, BTC)
    assert db.scalar("SELECT count(*) FROM trade_fills WHERE trade_time = %s", (ms,)) == 250
    assert db.status()[-1]["requests_count"] < 25


@all_apis
def test_unreachable_fills_in_one_millisecond_are_an_error_never_a_skip(
    harness: Harness, db: Database, sim, api
):
    account = make_account(sim, 1)
    ms = START_MS + 9000
    older = [sim.add_fill(account.api_key, BTC, created_time=ms - 10 - i) for i in range(5)]
    sim.add_burst(account.api_key, BTC, ms, 150, orders=1)  # one order, 150 fills, one ms
    newer = [sim.add_fill(account.api_key, BTC, created_time=ms + 10 + i) for i in range(5)]
    harness.accounts = [account]

    assert harness.run() == 1
    first = db.status()[-1]
    assert first["status"] == "error"
    assert "fills in millisecond" in first["error_message"]
    assert "cannot page within one millisecond" in first["error_message"]
    stored = {r[0] for r in db.rows("SELECT trade_id FROM trade_fills")}
    # the walk reached the burst from one side and never moved past it
    reached, beyond = (newer, older) if api.order == "newest" else (older, newer)
    assert {str(f["tradeId"]) for f in reached} <= stored
    assert not {str(f["tradeId"]) for f in beyond} & stored

    assert harness.run() == 1  # still reported on the next pass, not forgotten
    assert db.status()[-1]["status"] == "error"


@v3_orders
def test_forty_day_backfill_of_a_fleet_with_a_two_order_burst_is_exact(
    harness: Harness, db: Database, sim
):
    accounts = [make_account(sim, n, [BTC, ETH]) for n in (1, 2, 3)]
    for account in accounts:
        for symbol in (BTC, ETH):
            sim.generate_fills(
                account.api_key,
                symbol,
                3000,
                start_ms=START_MS - 39 * DAY_MS,
                end_ms=now_ms() - 60_000,
            )
    ms = START_MS + 3 * DAY_MS + 123
    sim.add_burst(accounts[1].api_key, ETH, ms, 130, orders=2)  # > 100 fills, 2 orders, 1 ms
    harness.accounts = accounts
    harness.sync.update(symbols=[BTC, ETH], start_time=START_MS - 40 * DAY_MS)

    assert harness.run() == 0

    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC, ETH)
    assert db.scalar("SELECT count(*) FROM trade_fills WHERE trade_time = %s", (ms,)) == 130
    end = now_ms()
    status = {(r["user_id"], r["symbol"]): r for r in db.status()}
    for account in accounts:
        for symbol in (BTC, ETH):
            times = [row[8] for row in harness.expected(account, symbol)]
            minimum = minimal_requests(times, harness.sync["start_time"], end)
            if (account, symbol) == (accounts[1], ETH):
                minimum += 2  # no page can end inside the burst's millisecond: one per order
            used = status[(account.user_id, symbol)]["requests_count"]
            # beyond the minimum: learning which end of a range the exchange selects (one per
            # walk), checking it at each window's last page (one per window), 5 % of slack
            windows = len(list(weex_sync.windows(harness.sync["start_time"], end, 7 * DAY_MS - 1)))
            bound = minimum * 1.05 + 1 + windows + 1
            assert minimum <= used <= bound, (account.user_id, symbol, used, minimum)


def test_switching_from_v2_to_v3_keeps_one_series(harness: Harness, db: Database, sim):
    [account] = harness.fleet(1, fills=400)
    harness.weex["api_version"] = 2
    assert harness.run() == 0
    after_v2 = db.scalar("SELECT count(*) FROM trade_fills")

    for symbol in (BTC, ETH):
        sim.generate_fills(
            account.api_key,
            symbol,
            50,
            start_ms=now_ms() - 50_000,
            end_ms=now_ms() - 1000,
        )
    harness.weex["api_version"] = 3
    harness.sync["symbols"] = ["BTCUSDT", "ETHUSDT"]  # the v3 form is accepted too
    assert harness.run() == 0
    # and a full re-scan on v3 of everything v2 stored: all present, nothing twice
    assert harness.run("--since", str(START_MS - DAY_MS)) == 0

    assert after_v2 == 800
    rows = db.rows("SELECT symbol, count(*), count(DISTINCT trade_id) FROM trade_fills GROUP BY 1")
    assert sorted(rows) == [(BTC, 450, 450), (ETH, 450, 450)]
    v2_served = sim.fills(account.api_key, BTC) + sim.fills(account.api_key, ETH)
    v2_rows = {r[:-1] for r in expected_fills("user1", v2_served)}
    v3_rows = {r[:-1] for r in expected_fills("user1", harness.served(account, BTC, ETH))}
    assert v2_rows == v3_rows == {r[:-1] for r in stored_fills(db)}
    assert db.status()[-1]["records_count"] == 0 and db.status()[-1]["status"] == "success"


def test_v3_history_starts_at_the_exchange_horizon_with_one_info_line(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    now = now_ms()
    sim.generate_fills(
        account.api_key, BTC, 50, start_ms=now - 400 * DAY_MS, end_ms=now - 370 * DAY_MS
    )
    sim.generate_fills(
        account.api_key, BTC, 80, start_ms=now - 360 * DAY_MS, end_ms=now - 300 * DAY_MS
    )
    harness.accounts = [account]
    del harness.sync["start_time"]  # the default: everything the exchange keeps

    assert harness.run() == 0
    assert harness.last_log.count("365-day horizon") == 1
    assert sim.count(status=400) == 0  # never asked beyond it (error -1170)
    kept = {row for row in harness.expected(account, BTC) if row[8] > now - 365 * DAY_MS}
    assert len(kept) == 80 and stored_fills(db) == kept

    assert harness.run() == 0
    assert "horizon" not in harness.last_log  # the cursor is past it now: no line every pass


@all_apis
def test_one_users_bad_credentials_do_not_stop_the_others(harness: Harness, db: Database, sim):
    accounts = harness.fleet(3, fills=120)
    accounts[1].secret_key = "wrong-" + accounts[1].secret_key

    assert harness.run() == 1

    for good in (accounts[0], accounts[2]):
        assert stored_fills(db, good.user_id) == harness.expected(good, BTC, ETH)
    assert stored_fills(db, "user2") == set()
    rows = {(r["user_id"], r["symbol"]): r for r in db.status()}
    assert len(rows) == 6
    for symbol in (BTC, ETH):
        assert rows[("user2", symbol)]["status"] == "error"
        assert "credentials rejected" in rows[("user2", symbol)]["error_message"]
        assert rows[("user1", symbol)]["status"] == "success"
    # not retried, and the second symbol was not even tried
    assert sim.count(api_key=accounts[1].api_key) == 1
    assert "user2/cmt_btcusdt: error" in harness.log


@all_apis
def test_and_5xx_are_retried_until_every_fill_is_stored(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 1500, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.faults = {"429": 0.1, "500": 0.05, "502": 0.05, "503": 0.05}
    sim.retry_after = 0
    harness.accounts = [account]
    harness.weex["max_retries"] = 8

    assert harness.run() == 0

    assert stored_fills(db) == harness.expected(account, BTC)
    assert sim.count(status=429) + sim.count(status=500) + sim.count(status=502) > 0
    assert db.status()[-1]["requests_count"] == harness.fills_requests()


@all_apis
def test_unknown_symbol_fails_only_that_symbol(harness: Harness, db: Database, sim, api):
    account = make_account(sim, 1, [BTC, "cmt_nosuchusdt"])
    sim.generate_fills(account.api_key, BTC, 50, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]

    assert harness.run() == 1

    rows = {r["symbol"]: r for r in db.status()}
    assert rows[BTC]["status"] == "success"
    assert rows["cmt_nosuchusdt"]["status"] == "error"
    assert ("40034" if api.version == 2 else "-1121") in rows["cmt_nosuchusdt"]["error_message"]
    assert rows["cmt_nosuchusdt"]["requests_count"] == 1  # not retried
    assert sim.count(api_key=account.api_key) == rows[BTC]["requests_count"] + 1


@all_apis
def test_ip_not_whitelisted_says_so(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.add_account("blocked-key", "blocked-secret", "blocked-pass", whitelisted=False)
    account.api_key, account.secret_key, account.passphrase = (
        "blocked-key",
        "blocked-secret",
        "blocked-pass",
    )
    harness.accounts = [account]
    harness.weex["max_retries"] = 1  # v2 answers HTTP 521: retried (the CDN's "origin down")

    assert harness.run() == 1
    assert "whitelist" in db.status()[-1]["error_message"]


@all_apis
def test_clock_skew_is_measured_and_corrected(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 10, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.clock_offset_ms = 120_000
    harness.accounts = [account]

    assert harness.run() == 0
    assert db.scalar("SELECT count(*) FROM trade_fills") == 10
    assert "clock skew against the exchange" in harness.log


def raw_fill(api: ApiMode, trade_id, order_id, created: int, size, value, fee) -> dict:
    """A fill object of the API version, built by hand (value = price * size)."""
    if api.version == 2:
        return {
            "symbol": BTC,
            "orderSide": "SELL",
            "marginMode": "SHARED",
            "tradeId": trade_id,
            "orderId": order_id,
            "createdTime": created,
            "fillSize": size,
            "fillValue": value,
            "fillFee": fee,
        }
    price = Decimal(str(value)) / Decimal(str(size))
    return {
        "id": trade_id,
        "orderId": order_id,
        "symbol": "BTCUSDT",
        "side": "SELL",
        "price": str(price) if isinstance(size, str) else price,
        "qty": size,
        "quoteQty": value,
        "commission": fee,
        "commissionAsset": "USDT",
        "time": created,
    }


@all_apis
def test_money_is_exact_decimal_end_to_end(harness: Harness, db: Database, sim, api):
    account = make_account(sim, 1)
    fills = [
        raw_fill(api, 1, 9, START_MS + 1, "0.1", "0.3", "0.1"),
        raw_fill(api, 2, 9, START_MS + 2, Decimal("0.2"), Decimal("0.6"), Decimal("0.2")),
    ]
    big = 12345678901234567890123
    if api.version == 2:  # 1 / 3 does not terminate: v2 stores the quotient to 60 digits
        fills.append(raw_fill(api, big, big, START_MS + 3, "3", "1", "-0.000000000000000001"))
    else:
        fills.append(raw_fill(api, big, big, START_MS + 3, "3", "1.5", "-0.000000000000000001"))
    for fill in fills:
        sim.add_raw_fill(
            account.api_key, BTC, fill, created_time=fill.get("createdTime", fill.get("time"))
        )
    harness.accounts = [account]

    assert harness.run() == 0

    assert db.scalar(
        "SELECT sum(fee::numeric) FROM trade_fills WHERE trade_id IN ('1', '2')"
    ) == Decimal("0.3")
    assert db.scalar(
        "SELECT sum(size::numeric) FROM trade_fills WHERE trade_id IN ('1', '2')"
    ) == Decimal("0.3")
    assert db.scalar("SELECT price FROM trade_fills WHERE trade_id = '2'") == Decimal(3)
    size_field = "fillSize" if api.version == 2 else "qty"
    row = db.rows(
        f"SELECT order_id, fee, raw->'{size_field}' FROM trade_fills WHERE trade_id = %s",
        (str(big),),
    )
    assert row == [(str(big), Decimal("-0.000000000000000001"), "3")]
    assert db.scalar(
        f"SELECT (raw->>'{size_field}')::numeric FROM trade_fills WHERE trade_id = '2'"
    ) == Decimal("0.2")
    price = str(db.scalar("SELECT price FROM trade_fills WHERE trade_id = %s", (str(big),)))
    assert price.startswith("0.3333333333") if api.version == 2 else price == "0.5"


# --- configuration -------------------------------------------------------------------------


def config_error_cases(harness: Harness) -> list[tuple[str, object, str]]:
    good = harness.config()

    def variant(path: str, value: object) -> dict:
        data = yaml.safe_load(yaml.safe_dump(good))
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value
        return data

    return [
        ("unknown key", variant("database.hots", "x"), "database.hots: unknown key"),
        ("wrong type", variant("database.port", "five"), "database.port: expected a number"),
        ("page size", variant("sync.page_size", 500), "sync.page_size: out of range 1..100"),
        (
            "bad symbol",
            variant("sync.symbols", ["BTC-USDT"]),
            "sync.symbols[0]: not a WEEX contract symbol",
        ),
        (
            "missing credential",
            variant("sync.users.0.secret_key", None),
            "sync.users[0].secret_key: missing (user user1)",
        ),
        (
            "duplicate user",
            variant("sync.users", good["sync"]["users"] * 2),
            "sync.users[1].user_id: duplicate user_id user1",
        ),
        (
            "bad start",
            variant("sync.start_time", "yesterday"),
            "sync.start_time: not an ISO date",
        ),
        ("top level", ["a", "list"], "the top level must be a mapping"),
    ]


def test_config_errors_exit_2_with_one_line_and_touch_nothing(
    harness: Harness, sim, scratch_db_names
):
    harness.accounts = [make_account(sim, 1)]
    fresh_db = f"{harness.db_name}_untouched"
    scratch_db_names.append(fresh_db)
    harness.database["dbname"] = fresh_db
    for name, data, message in config_error_cases(harness):
        assert harness.run(config=data) == 2, name
        lines = [line for line in harness.last_log.splitlines() if line.strip()]
        assert len(lines) == 1, (name, lines)
        assert message in lines[0], (name, lines[0])
    assert sim.count() == 0
    assert not database_exists(harness.pg, fresh_db)


def test_unreadable_yaml_is_a_config_error(tmp_path: Path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("database: {host: [unclosed\n")
    assert weex_sync.main(["-c", str(path)], environ={}) == 2
    assert "invalid YAML at line" in capsys.readouterr().err


def test_missing_config_file_named_explicitly_is_a_config_error(tmp_path: Path, capsys):
    assert weex_sync.main(["-c", str(tmp_path / "nope.yaml")], environ={}) == 2
    assert "nope.yaml: cannot read config file" in capsys.readouterr().err


def test_environment_overrides_the_database_section(
    harness: Harness, db: Database, sim, scratch_db_names
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 25, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.database = {"host": "db.invalid", "port": 1, "dbname": "wrong"}
    target = f"{harness.db_name}_env"
    scratch_db_names.append(target)
    env = {
        "DB_HOST": harness.pg["host"],
        "POSTGRES_PORT": str(harness.pg["port"]),
        "POSTGRES_DB": "ignored_because_DB_NAME_wins",
        "DB_NAME": target,
    }

    assert harness.run(env=env) == 0

    other = Database(harness.pg, target)
    assert other.scalar("SELECT count(*) FROM trade_fills") == 25
    other.close()
    assert f"created database {target}" in harness.log


def test_env_var_references_are_expanded_and_missing_ones_named(
    harness: Harness, db: Database, sim
):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 5, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    config = harness.config()
    config["sync"]["users"][0]["secret_key"] = "${U1_SECRET}"
    config["sync"]["users"][0]["passphrase"] = "${U1_PASS}"

    assert harness.run(config=config, env={"U1_PASS": account.passphrase}) == 2
    assert "sync.users[0].secret_key: environment variable U1_SECRET is not set" in harness.last_log

    env = {"U1_SECRET": account.secret_key, "U1_PASS": account.passphrase}
    assert harness.run(config=config, env=env) == 0
    assert db.scalar("SELECT count(*) FROM trade_fills") == 5


def test_single_default_user_from_weex_environment(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 7, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    config = harness.config()
    del config["sync"]["users"]
    env = {
        "WEEX_API_KEY": account.api_key,
        "WEEX_SECRET_KEY": account.secret_key,
        "WEEX_PASSPHRASE": account.passphrase,
    }
    assert harness.run(config=config, env=env) == 0
    assert db.rows("SELECT DISTINCT user_id FROM trade_fills") == [("default",)]


def test_user_and_symbol_options_restrict_the_pass(harness: Harness, db: Database, sim):
    harness.fleet(2, fills=5)

    assert harness.run("--user", "user2", "--symbol", ETH) == 0
    assert db.rows("SELECT DISTINCT user_id, symbol FROM trade_fills") == [("user2", ETH)]
    assert harness.run("--user", "nobody") == 2
    assert "--user: no such user in the configuration (configured: user1, user2)" in harness.log
    assert "nobody" not in harness.last_log  # a value typed on the command line is not echoed
    assert harness.run("--user", "user1", "--symbol", "BTCUSDT") == 0  # the v3 form works too
    assert db.rows("SELECT DISTINCT user_id FROM trade_fills ORDER BY 1") == [
        ("user1",),
        ("user2",),
    ]


# --- secrets, schema, database -------------------------------------------------------------


def test_secrets_never_reach_logs_or_tables(harness: Harness, db: Database, sim):
    good = make_account(sim, 1)
    bad = make_account(sim, 2)
    sim.generate_fills(good.api_key, BTC, 30, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    bad.passphrase = "WRONG-PASSPHRASE-" + bad.passphrase
    harness.accounts = [good, bad]
    harness.database["password"] = "DB-PASSWORD-never-logged"
    sim.faults = {"500": 0.2}
    sim.retry_after = 0

    assert harness.run("--log-level", "DEBUG") == 1

    secrets = [
        good.secret_key,
        good.passphrase,
        bad.secret_key,
        bad.passphrase,
        "DB-PASSWORD-never-logged",
    ]
    everything = harness.log + repr(db.rows("SELECT * FROM sync_status"))
    assert f"GET {harness.api.fills_path}" in harness.log  # urllib3's debug lines were captured
    for secret in secrets:
        assert secret not in everything


def test_print_schema_equals_schema_sql():
    result = subprocess.run(
        [sys.executable, str(ROOT / "weex_sync.py"), "--print-schema"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == (ROOT / "schema.sql").read_text()


def test_database_unreachable_exits_3(harness: Harness, sim):
    harness.accounts = [make_account(sim, 1)]
    harness.database["port"] = 1
    assert harness.run() == 3
    assert "database unreachable" in harness.last_log


def test_readme_example_queries_run_unchanged(harness: Harness, db: Database, sim):
    account = make_account(sim, 1, [BTC, ETH])
    for symbol in (BTC, ETH):
        sim.generate_fills(account.api_key, symbol, 40, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.sync["symbols"] = [BTC, ETH]
    assert harness.run() == 0

    readme = (ROOT / "README.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", readme, re.DOTALL)
    assert len(queries) >= 6
    selects = answered = 0
    for query in queries:  # each runs (an error fails the test)
        for statement in filter(str.strip, query.split(";")):
            with db.conn.cursor() as cur:
                cur.execute(statement)
                if cur.description is not None:
                    selects += 1
                    answered += bool(cur.fetchall())
    assert selects >= 6 and answered >= selects // 2  # rows on this data (time ranges may not)


# --- scale -------------------------------------------------------------------------------------


def comparable_status(db: Database) -> list[tuple]:
    return sorted(
        (
            r["user_id"],
            r["symbol"],
            r["status"],
            r["records_count"],
            r["fetched_count"],
            r["requests_count"],
            r["last_trade_time"],
        )
        for r in db.status()
    )


def test_workers_give_the_same_rows_and_status_as_a_serial_pass(
    harness: Harness, db: Database, sim
):
    accounts = [make_account(sim, n, [BTC, ETH]) for n in range(1, 7)]
    for n, account in enumerate(accounts):
        for symbol in (BTC, ETH):
            sim.generate_fills(
                account.api_key, symbol, 150 * n + 7, start_ms=START_MS, end_ms=START_MS + DAY_MS
            )
    harness.accounts = accounts
    harness.sync["symbols"] = [BTC, ETH]

    harness.sync["workers"] = 1
    assert harness.run() == 0
    serial_fills, serial_status = stored_fills(db), comparable_status(db)
    db.rows("TRUNCATE trade_fills, sync_status, sync_cursor")

    harness.sync["workers"] = 6
    assert harness.run() == 0
    assert stored_fills(db) == serial_fills
    assert comparable_status(db) == serial_status
    assert len(serial_status) == 12


def test_client_rate_limiter_keeps_the_exchange_from_answering_429(
    harness: Harness, db: Database, sim
):
    accounts = [make_account(sim, n) for n in (1, 2, 3)]
    for account in accounts:
        sim.generate_fills(account.api_key, BTC, 2500, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.uid_limit = (100, 1.0)  # 20 fills requests per second per key
    sim.ip_limit = (200, 1.0)  # 40 per second for the whole process
    harness.accounts = accounts
    harness.weex["rate_limit"].update(uid_weight=100, ip_weight=200, window_seconds=1)
    harness.weex["max_retries"] = 0  # a 429 would be fatal, not silently retried

    assert harness.run() == 0

    assert sim.count(status=429) == 0
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC)


def test_weex_sync_works_when_copied_alone(harness: Harness, db: Database, sim, tmp_path: Path):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 42, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    alone = tmp_path / "server"
    alone.mkdir()
    (alone / "weex_sync.py").write_text((ROOT / "weex_sync.py").read_text())
    (alone / "config.yaml").write_text(yaml.safe_dump(harness.config()))

    result = subprocess.run(
        [sys.executable, "weex_sync.py", "--once"],  # config.yaml of the working directory
        cwd=alone,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert stored_fills(db) == harness.expected(account, BTC)


def test_config_example_is_valid():
    names = re.findall(r"\$\{(\w+)\}", (ROOT / "config.yaml.example").read_text())
    env = {name: f"value-of-{name}" for name in names}
    cfg = weex_sync.load_config(str(ROOT / "config.yaml.example"), env)
    assert [u.user_id for u in cfg.sync.users] == ["user1", "user2"]
    assert cfg.sync.users[0].symbols == (weex_sync.ALL_SYMBOLS,)
    assert cfg.sync.users[1].symbols == ("cmt_btcusdt",)
    assert cfg.sync.start_time == 0  # everything the exchange keeps
    assert cfg.weex.api_version == 3 and cfg.weex.rate_limit.ip_weight == 500
    assert cfg.secrets() and all(s.startswith("value-of-") for s in cfg.secrets())
    used = {  # the variables the example's live lines (not its comments) refer to
        name
        for line in (ROOT / "config.yaml.example").read_text().splitlines()
        for name in re.findall(r"\$\{(\w+)\}", line.split("#")[0])
    }
    env_file = (DEPLOY / "weex_sync.env.example").read_text()
    assert used == set(re.findall(r"^(\w+)=", env_file, re.MULTILINE))
