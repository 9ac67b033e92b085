"""Fault injection: whatever happens (kill -9, a dropped database connection, a flaky exchange,
two passes at once, hostile data, SIGTERM), the next pass ends with exactly the fills the
exchange has, none missing and none twice. Real PostgreSQL, simulator over HTTP, weex_sync.py
as its own process where the fault needs one."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from decimal import Decimal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Account,
    Database,
    Harness,
    all_apis,
    assert_rollup_matches,
    expected_fills,
    finish,
    make_account,
    stored_fills,
    v2_only,
    v3_orders,
    wait_for,
    weex_sync_backends,
)

pytestmark = pytest.mark.faults


@all_apis
def test_kill_9_at_random_moments_of_a_backfill_then_one_clean_pass(
    harness: Harness, db: Database, sim, api
):
    account = make_account(sim, 1)
    sim.generate_fills(
        account.api_key, BTC, 20_000, start_ms=START_MS, end_ms=START_MS + 30 * DAY_MS
    )
    sim.latency = 0.002
    harness.accounts = [account]
    rng = random.Random(20261126)  # seeded: a failure names reproducible kill points
    # two kills at start-up moments, then ten at random points of the stored history (six on
    # the other APIs: the same walk code, a shorter suite)
    random_kills = 10 if api.name == "v3-newest" else 6
    thresholds = [None, None] + sorted(rng.sample(range(300, 19_500), random_kills))
    kills, resumed = [], 0

    for threshold in thresholds:
        process = harness.popen("--once")
        if threshold is None:
            time.sleep(rng.uniform(0.05, 0.4))
        else:
            wait_for(lambda t=threshold: db.scalar("SELECT count(*) FROM trade_fills") >= t)
            time.sleep(rng.uniform(0, 0.03))
        if process.poll() is None:
            process.kill()
            kills.append(threshold)
        _, err = finish(process)
        resumed += "resuming an interrupted walk" in err
        wait_for(lambda: weex_sync_backends(db) == 0)  # PostgreSQL noticed the death
        assert_rollup_matches(db)  # whichever batch was the last committed one

    assert len(kills) >= random_kills, kills
    assert resumed >= 1, "no pass resumed an interrupted walk: the kills missed the backfill"
    code, err = finish(harness.popen("--once"))
    assert code == 0, err
    assert stored_fills(db) == harness.expected(account, BTC)
    assert db.rows("SELECT walk_end FROM sync_cursor") == [(None,)]
    assert_rollup_matches(db)


def test_database_connection_dropped_mid_pass(harness: Harness, db: Database, sim):
    accounts = [make_account(sim, n) for n in (1, 2)]
    for account in accounts:
        sim.generate_fills(account.api_key, BTC, 5000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.latency = 0.02  # the pass lasts ~1 s, so it is still running when its backend dies
    harness.accounts = accounts
    harness.sync["workers"] = 2

    process = harness.popen("--once")
    wait_for(lambda: db.scalar("SELECT count(*) FROM trade_fills") > 200)
    terminated = db.scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = 'weex_sync' AND datname = current_database()"
    )
    code, err = finish(process)

    assert terminated >= 1
    assert code == 1, err
    errors = [r for r in db.status() if r["status"] == "error"]
    assert errors and all("database error" in r["error_message"] for r in errors)

    code, err = finish(harness.popen("--once"))
    assert code == 0, err
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC)


@v3_orders
def test_twenty_percent_of_requests_fail_in_every_way(harness: Harness, db: Database, sim):
    accounts = harness.fleet(3, fills=1500)
    sim.faults = {  # 20 % of requests in all
        "429": 0.03,
        "500": 0.03,
        "502": 0.02,
        "503": 0.02,
        "slow": 0.02,
        "malformed": 0.03,
        "error200": 0.02,
        "drop": 0.02,  # the connection drops mid-body
        "stall": 0.01,  # the body stops half way until the timeout
    }
    sim.fault_seed = 11
    sim.retry_after = 0
    sim.slow_seconds = 1.5
    harness.accounts = accounts
    harness.sync["symbols"] = [BTC, ETH]
    harness.weex.update(timeout_seconds=0.5, max_retries=8)

    for attempt in range(4):
        code = harness.run()
        this_pass = db.status()[-6:]
        failed = [r for r in this_pass if r["status"] == "error"]
        assert code == (1 if failed else 0), (code, failed)
        if not failed:
            break
    assert not failed, failed
    assert {f for f, n in sim_faults(sim).items() if n} >= {
        "429",
        "500",
        "slow",
        "malformed",
        "error200",
        "drop",
    }
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC, ETH)


def sim_faults(sim) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in sim.requests:
        if request.get("fault"):
            counts[request["fault"]] = counts.get(request["fault"], 0) + 1
    return counts


def test_two_passes_started_at_once(harness: Harness, db: Database, sim):
    accounts = harness.fleet(3, fills=800)
    sim.latency = 0.02  # each pass lasts ~0.7 s, so the two really overlap
    harness.sync["workers"] = 3

    first, second = harness.popen("--once"), harness.popen("--once")
    results = [finish(first), finish(second)]

    assert [code for code, _ in results] == [0, 0], results
    logs = results[0][1] + results[1][1]
    assert "skipped, another weex_sync process is syncing it" in logs
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC, ETH)
    # no fill was inserted twice: the inserted counts of both passes add up to the history
    assert db.scalar("SELECT sum(records_count) FROM sync_status") == 6 * 800
    assert_rollup_matches(db)
    assert db.scalar("SELECT count(*) FROM sync_status WHERE status = 'error'") == 0


def test_sigterm_during_loop_commits_and_exits_0(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 20_000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.latency = 0.01
    harness.accounts = [account]

    process = harness.popen("--loop", "1")
    wait_for(lambda: db.scalar("SELECT count(*) FROM trade_fills") > 500)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, err = finish(process, timeout=15)

    assert code == 0, err
    assert time.monotonic() - sent < 5
    assert "SIGTERM received" in err
    stored = db.scalar("SELECT count(*) FROM trade_fills")
    assert 0 < stored < 20_000
    walk_end = db.scalar("SELECT walk_end FROM sync_cursor")
    assert walk_end is not None  # the interrupted walk says what it still owes

    sim.latency = 0
    assert harness.run() == 0
    assert stored_fills(db) == harness.expected(account, BTC)


def test_sigterm_during_a_long_retry_after_wait_exits_at_once(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    sim.generate_fills(account.api_key, BTC, 10, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.faults = {"429": 1.0}
    sim.retry_after = 3600  # capped at 60 s by the client; still far longer than we wait
    harness.accounts = [account]

    process = harness.popen("--once")
    wait_for(lambda: sim.count(status=429) >= 1)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, err = finish(process, timeout=15)

    assert code == 0, err
    assert time.monotonic() - sent < 3
    assert "interrupted" in err
    assert sim.count(status=429) == 1  # no second attempt while it waited


# --- hostile data ------------------------------------------------------------------------------


def good_fill(trade_id, created_time: int, **changes) -> dict:
    fill = {
        "tradeId": trade_id,
        "orderId": 555,
        "symbol": BTC,
        "marginMode": "SHARED",
        "separatedMode": "COMBINED",
        "positionSide": "LONG",
        "orderSide": "BUY",
        "fillSize": "0.002",
        "fillValue": "190.5",
        "fillFee": "0.1143",
        "liquidateFee": "0",
        "realizePnl": "0",
        "direction": "OPEN_LONG",
        "liquidateType": "",
        "legacyOrdeDirection": "OPEN_LONG",
        "createdTime": created_time,
    }
    fill.update(changes)
    return {k: v for k, v in fill.items() if v is not None}


ACCEPTED = {
    "ids as numbers": lambda t: good_fill(10**20 + 1, t),
    "ids as strings": lambda t: good_fill("100000000000000000002", t, orderId="77"),
    "time as string": lambda t: good_fill(3, str(t)),
    "huge numbers": lambda t: good_fill(
        4,
        t,
        fillSize="123456789012345678901234567890.123456789",
        fillValue="246913578024691357802469135780.246913578",
    ),
    "negative fee": lambda t: good_fill(5, t, fillFee="-0.0000001"),
    "numbers as JSON numbers": lambda t: good_fill(
        6, t, fillSize=Decimal("0.1"), fillValue=Decimal("0.3"), fillFee=Decimal("-0.02")
    ),
    "unknown extra fields": lambda t: good_fill(7, t, brandNewField={"nested": [1, "x"]}),
    "explicit price": lambda t: good_fill(8, t, price="95250.5", fillValue="190.501"),
}
REJECTED = {
    "missing tradeId": (lambda t: good_fill(None, t), "tradeId missing is not an id"),
    "missing fillSize": (lambda t: good_fill(11, t, fillSize=None), "fillSize missing"),
    "size as boolean": (
        lambda t: good_fill(12, t, fillSize=True),
        "fillSize True is not a decimal",
    ),
    "fee not a number": (
        lambda t: good_fill(13, t, fillFee="abc"),
        "fillFee 'abc' is not a decimal",
    ),
    "NaN size": (lambda t: good_fill(14, t, fillSize="NaN"), "fillSize 'NaN' is not a decimal"),
    "zero size": (lambda t: good_fill(15, t, fillSize="0"), "fillSize '0' is not positive"),
    "unknown side": (lambda t: good_fill(16, t, orderSide="HOLD"), "orderSide 'HOLD'"),
    "id is an object": (lambda t: good_fill({"x": 1}, t), "tradeId {'x': 1} is not an id"),
    "time is a float": (lambda t: good_fill(17, t + 0.5), "is not a time in milliseconds"),
    "other symbol": (lambda t: good_fill(18, t, symbol=ETH), "does not match"),
}


@v2_only  # the objects below are v2 fills; test_hostile_exchange.py covers v3
def test_hostile_fills_are_stored_correctly_or_rejected_with_a_clear_error(
    harness: Harness, db: Database, sim
):
    cases = {**{k: (v, None) for k, v in ACCEPTED.items()}, **REJECTED}
    accounts = {}
    for n, (name, (build, _)) in enumerate(cases.items(), start=1):
        account = make_account(sim, n)
        accounts[name] = account
        sim.add_fill(account.api_key, BTC, created_time=START_MS + 10)
        sim.add_raw_fill(account.api_key, BTC, build(START_MS + 20), created_time=START_MS + 20)
    harness.accounts = list(accounts.values())

    assert harness.run() == 1

    rows = {r["user_id"]: r for r in db.status()}
    for name, account in accounts.items():
        row = rows[account.user_id]
        if name in ACCEPTED:
            assert row["status"] == "success", (name, row["error_message"])
            assert stored_fills(db, account.user_id) == harness.expected(account, BTC), name
        else:
            assert row["status"] == "error", name
            assert "1 fill rejected" in row["error_message"], (name, row["error_message"])
            assert REJECTED[name][1] in row["error_message"], (name, row["error_message"])
            # the good fill is stored, the bad one quarantined with its reason
            good = [f for f in harness.served(account, BTC) if f["createdTime"] == START_MS + 10]
            assert stored_fills(db, account.user_id) == expected_fills(account.user_id, good)
            [(reason, raw)] = db.rows(
                "SELECT reason, raw FROM rejected_fills WHERE user_id = %s", (account.user_id,)
            )
            assert REJECTED[name][1] in reason and raw.startswith("{"), name
    huge = db.rows(
        "SELECT size, price FROM trade_fills WHERE user_id = %s",
        (accounts["huge numbers"].user_id,),
    )
    assert (Decimal("123456789012345678901234567890.123456789"), Decimal(2)) in huge
    explicit = db.scalar("SELECT price FROM trade_fills WHERE trade_id = '8'")
    assert explicit == Decimal("95250.5")


@v2_only  # nextFlag is v2's
def test_empty_page_with_next_flag_is_an_error_not_a_loop(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    other = make_account(sim, 2)
    sim.generate_fills(other.api_key, BTC, 50, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.hostile_pages[account.api_key] = {"list": [], "nextFlag": True, "totals": 3}
    harness.accounts = [account, other]

    assert harness.run() == 1

    rows = {r["user_id"]: r for r in db.status()}
    # not a page of fills at all: retried like a transport fault, never quarantined
    attempts = harness.weex["max_retries"] + 1
    assert "empty page with nextFlag=true" in rows["user1"]["error_message"]
    assert f"gave up after {attempts} attempts" in rows["user1"]["error_message"]
    assert rows["user1"]["requests_count"] == attempts
    assert db.scalar("SELECT count(*) FROM rejected_fills") == 0
    assert rows["user2"]["status"] == "success"


# --- security ----------------------------------------------------------------------------------

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from(["${UNSET_VAR}", "${HOME}", "cmt_btcusdt", "2024-01-01", "0", "-1", "101"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)
config_keys = {
    "database": ["host", "port", "user", "password", "dbname", "sslmode", "typo"],
    "weex": [
        "base_url",
        "api_version",
        "api_key",
        "secret_key",
        "passphrase",
        "timeout_seconds",
        "max_retries",
        "rate_limit",
    ],
    "sync": [
        "interval_seconds",
        "page_size",
        "start_time",
        "workers",
        "symbols",
        "users",
        "lookback_seconds",
        "max_seconds",
    ],
}
user_entries = st.fixed_dictionaries(
    {},
    optional={
        k: yaml_values
        for k in ["user_id", "api_key", "secret_key", "passphrase", "enabled", "symbols", "x"]
    },
)
configs = st.fixed_dictionaries(
    {},
    optional={
        "database": st.fixed_dictionaries(
            {}, optional={k: yaml_values for k in config_keys["database"]}
        ),
        "weex": st.fixed_dictionaries({}, optional={k: yaml_values for k in config_keys["weex"]}),
        "sync": st.fixed_dictionaries(
            {},
            optional={
                **{k: yaml_values for k in config_keys["sync"]},
                "users": st.lists(user_entries, max_size=3) | yaml_values,
            },
        ),
        "extra": yaml_values,
    },
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_fuzzed_configs_load_or_fail_with_one_clear_line(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        weex_sync.load_config(str(path), {"HOME": "/root"})
    except weex_sync.ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert "Traceback" not in message


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    argv=st.lists(
        st.sampled_from(
            [
                "--once",
                "--loop",
                "--loop",
                "5",
                "-1",
                "--user",
                "--symbol",
                "x",
                "cmt_btcusdt",
                "--log-level",
                "debug",
                "LOUD",
                "-c",
                "--print-schema",
                "--bogus",
                "--",
                "user1",
            ]
        ),
        max_size=6,
    )
)
def test_fuzzed_command_lines_never_raise_a_traceback(argv, harness: Harness, capsys):
    """Each line through main(), as a user would type it after `-c config.yaml`."""
    code, err = run_main_briefly(harness, capsys, argv)
    assert "Traceback" not in err, err
    assert code in (0, 1, 2, 3), (code, err)


def run_main_briefly(harness: Harness, capsys, argv: list[str]) -> tuple[int, str]:
    """main(["-c", config, *argv]) against a database that refuses connections (every command
    ends quickly), a --loop stopped by SIGTERM after 0.2 s: (exit code, log)."""
    harness.accounts = [Account.new("user1")]
    harness.database["port"] = 1
    config = harness.write_config()
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late timer hits this one
    timer = threading.Timer(0.2, signal.raise_signal, (signal.SIGTERM,))
    timer.start()
    try:
        code = weex_sync.main(["-c", str(config), *argv], environ={})
    except SystemExit as exc:  # argparse: a usage error (2)
        code = int(exc.code or 0)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    return code, capsys.readouterr().err


MODES = [[], ["--once"], ["--loop"], ["--loop", "5"], ["--check"], ["--status"]]
MODES += [["--status", "--json"], ["--status", "--max-age", "10m"], ["--print-schema"]]
COMMON = [["-q"], ["--log-level", "DEBUG"], ["--log-format", "json"], ["--user", "user1"]]
PASS_ONLY = [["--max-seconds", "5"], ["--dry-run"], ["--min-interval", "0"]]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_documented_command_lines_are_never_usage_errors(data, harness: Harness, capsys):
    """Every combination docs/command-line.md documents parses and runs (2.0's `--loop` without N was
    a usage error, which the fuzzing above counts as a fine outcome)."""
    mode = data.draw(st.sampled_from(MODES))
    extras = COMMON + (PASS_ONLY if mode in ([], ["--once"], ["--loop"], ["--loop", "5"]) else [])
    options = data.draw(st.lists(st.sampled_from(extras), unique_by=lambda o: o[0], max_size=3))
    argv = [*mode, *(word for option in options for word in option)]
    code, err = run_main_briefly(harness, capsys, argv)
    assert "Traceback" not in err, err
    assert code != 2, (argv, err)


def test_secret_values_with_regex_characters_are_scrubbed(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    account.secret_key = "s3cr.t+(x)*" + account.secret_key
    account.passphrase = "pass\\word$" + account.passphrase
    sim.add_account(account.api_key, account.secret_key, account.passphrase)
    sim.generate_fills(account.api_key, BTC, 10, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    harness.database["password"] = "pw-%s-{0}"  # trust authentication ignores it
    assert harness.run("--log-level", "DEBUG") == 0  # the pass reaches the exchange, signed
    assert stored_fills(db) == harness.expected(account, BTC)
    sim.add_account(account.api_key, account.secret_key, "another")
    assert harness.run("--log-level", "DEBUG") == 1  # and the exchange rejects the passphrase
    assert "credentials rejected" in harness.last_log
    stored = json.dumps(db.status(), default=str)
    redact = weex_sync.Redactor([account.secret_key, account.passphrase, "pw-%s-{0}"])
    assert (
        redact(f"a {account.secret_key} b {account.passphrase} c pw-%s-{{0}}")
        == "a *** b *** c ***"
    )
    for secret in (account.secret_key, account.passphrase, "pw-%s-{0}"):
        assert secret not in harness.log and secret not in stored
