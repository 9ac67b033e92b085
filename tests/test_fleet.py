"""A fleet on one machine: every contract of an account in one walk (``sync.symbols: all``, the
default), one rate budget for every weex_sync process of the machine, the stalest accounts
first and a time limit per pass."""

from __future__ import annotations

import json
import random
import time

import pytest

from harness import (
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Account,
    Database,
    Harness,
    all_apis,
    finish,
    make_account,
    stored_fills,
    wait_for,
    weex_sync_backends,
)
from weex_sim import Simulator

SOL = "cmt_solusdt"
pytestmark = pytest.mark.faults


@pytest.fixture
def sim(api) -> Simulator:
    """The exchange lists three contracts; an account trades whichever it has fills in."""
    simulator = Simulator(symbols=(BTC, ETH, SOL), seed=11)
    simulator.order = api.order
    simulator.start()
    yield simulator
    simulator.stop()


def every_contract(harness: Harness) -> None:
    del harness.sync["symbols"]  # the default: all


def trader(harness: Harness, fills: int, symbols: tuple[str, ...], days: int = 1) -> Account:
    """user1, synced with symbols: all, with `fills` fills in each contract over `days`."""
    account = make_account(harness.sim, 1, "all")
    for symbol in symbols:
        harness.sim.generate_fills(
            account.api_key, symbol, fills, start_ms=START_MS, end_ms=START_MS + days * DAY_MS
        )
    harness.accounts = [account]
    every_contract(harness)
    return account


@all_apis
def test_all_contracts_in_one_walk_and_a_new_contract_needs_no_config_change(
    harness: Harness, db: Database, sim
):
    account = trader(harness, 700, (BTC, ETH))

    assert harness.run() == 0
    assert stored_fills(db) == harness.expected(account)
    [row] = db.status()
    assert (row["symbol"], row["records_count"], row["status"]) == ("*", 1400, "success")
    newest = max(r[8] for r in harness.expected(account))
    assert row["last_trade_time"] == newest

    sim.reset_stats()
    assert harness.run() == 0  # idle: one request for the whole account
    assert harness.fills_requests() == 1
    assert "symbol" not in sim.requests[-1]["params"]

    now = int(time.time() * 1000)  # the trader opens a contract nobody listed
    sim.generate_fills(account.api_key, SOL, 30, start_ms=now - 20_000, end_ms=now - 1000)
    assert harness.run() == 0
    assert stored_fills(db) == harness.expected(account)
    assert db.rows("SELECT symbol, count(*) FROM trade_fills GROUP BY 1 ORDER BY 1") == [
        (BTC, 700),
        (ETH, 700),
        (SOL, 30),
    ]
    assert db.rows("SELECT DISTINCT fee_coin FROM trade_fills") == [("USDT",)]


def test_status_since_and_symbol_in_all_mode(harness: Harness, db: Database, sim):
    account = trader(harness, 300, (BTC, ETH))
    assert harness.run() == 0
    lost = db.scalar(
        "WITH d AS (DELETE FROM trade_fills WHERE symbol = %s RETURNING 1) SELECT count(*) FROM d",
        (ETH,),
    )

    # one walk covers every contract of this user: --symbol alone does not narrow it, and says so
    assert harness.run("--symbol", ETH) == 0
    assert (
        "--symbol: user1 syncs every contract in one walk (symbols: all) and is not narrowed"
        in (harness.last_log)
    )
    assert db.status()[-1]["symbol"] == "*"
    assert harness.run("--since", str(START_MS - DAY_MS), "--symbol", "ETHUSDT") == 0
    assert stored_fills(db) == harness.expected(account)
    assert db.status()[-1]["symbol"] == ETH and db.status()[-1]["records_count"] == lost

    assert harness.run("--status", "--json") == 0
    [status] = json.loads(harness.out)  # the configured pair: the whole account
    assert (status["user_id"], status["symbol"], status["status"]) == ("user1", "*", "success")


def test_kill_9_during_an_all_contracts_walk(harness: Harness, db: Database, sim):
    account = trader(harness, 4000, (BTC, ETH, SOL), days=20)
    sim.latency = 0.002
    rng = random.Random(20261127)
    kills = 0
    for threshold in sorted(rng.sample(range(500, 11_000), 5)):
        process = harness.popen("--once")
        wait_for(lambda t=threshold: db.scalar("SELECT count(*) FROM trade_fills") >= t)
        if process.poll() is None:
            process.kill()
            kills += 1
        finish(process)
        wait_for(lambda: weex_sync_backends(db) == 0)

    assert kills >= 4
    code, err = finish(harness.popen("--once"))
    assert code == 0, err
    assert stored_fills(db) == harness.expected(account)
    assert db.rows("SELECT symbol, walk_end FROM sync_cursor") == [("*", None)]


def test_overlapping_passes_share_one_ip_budget(harness: Harness, db: Database, sim):
    accounts = [make_account(sim, n, "all") for n in (1, 2, 3, 4)]
    for account in accounts:
        sim.generate_fills(account.api_key, BTC, 1000, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    sim.ip_limit = (100, 1.0)  # 20 fills requests per second for the whole machine
    harness.weex["rate_limit"].update(ip_weight=100, window_seconds=1)
    harness.weex["max_retries"] = 0  # a 429 would fail a pair
    every_contract(harness)
    harness.accounts = accounts
    first = harness.popen("--once", "--user", "user1", "--user", "user2")
    second = harness.popen("--once", "--user", "user3", "--user", "user4")
    results = [finish(first), finish(second)]

    assert [code for code, _ in results] == [0, 0], results
    assert sim.count(status=429) == 0
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account)
    # they really ran at the same time
    spans = [
        [r["t"] for r in sim.requests if r["api_key"] in {a.api_key for a in pair}]
        for pair in (accounts[:2], accounts[2:])
    ]
    assert min(spans[1]) < max(spans[0]) and min(spans[0]) < max(spans[1])


def test_the_stalest_accounts_go_first_and_a_time_limit_leaves_the_rest(
    harness: Harness, db: Database, sim
):
    accounts = [make_account(sim, n, "all") for n in range(1, 7)]
    for account in accounts:
        sim.generate_fills(account.api_key, BTC, 3, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = accounts
    harness.sync["workers"] = 1
    every_contract(harness)
    sim.latency = 0.05  # a user costs 6 requests (6 weeks of history): ~0.3 s

    assert harness.run("--max-seconds", "1") == 0
    done = {r["user_id"] for r in db.status()}
    left = {a.user_id for a in accounts} - done
    assert done and left
    assert f"{len(left)} left for the next pass (time limit)" in harness.last_log
    sim.reset_stats()

    assert harness.run("--max-seconds", "1") == 0
    by_key = {a.api_key: a.user_id for a in accounts}
    order = list(dict.fromkeys(by_key[r["api_key"]] for r in sim.requests if r["api_key"]))
    assert order and set(order[: len(left)]) <= left  # those left last time go first
    sim.latency = 0
    assert harness.run() == 0
    for account in accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account)
