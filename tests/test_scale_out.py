"""Growing past one IP: several processes ("machines", each leaving from its own loopback
address, 127.0.0.2, .3, .4) split a fleet through PostgreSQL claims. The simulator keeps a
rate budget per client address, as WEEX does per IP."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    Database,
    Harness,
    finish,
    make_account,
    stored_fills,
    wait_for,
)

pytestmark = pytest.mark.faults
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def machines(harness: Harness, accounts: int, min_interval: int) -> list[dict]:
    """A fleet of idle accounts (one fill each, a minute old: one request per account), and
    one config per machine: its own address and its own budget file (no machine sees
    another's), the same database and claims."""
    now = int(time.time() * 1000)
    harness.accounts = [make_account(harness.sim, n) for n in range(1, accounts + 1)]
    for account in harness.accounts:
        harness.sim.add_fill(account.api_key, BTC, created_time=now - 60_000)
    harness.sync.update(min_interval_seconds=min_interval, workers=8, start_time=now - DAY_MS)
    configs = []
    for n, address in enumerate(ADDRESSES):
        config = harness.config()
        config["weex"]["source_address"] = address
        (harness.tmp_path / f"machine{n}").mkdir(exist_ok=True)
        config["weex"]["rate_limit"] = {
            "ip_weight": 100,
            "window_seconds": 2,
            "shared_file": str(harness.tmp_path / f"machine{n}" / "ratelimit"),
        }
        configs.append(config)
    return configs


def fills_requests_by_address(sim) -> Counter:
    return Counter(r["client"] for r in sim.requests if r["path"] == weex_sync.V3.fills_path)


def fresh(log: str) -> int:
    """How many pairs a pass found fresh (claimed by another pass a moment ago)."""
    return sum(int(n) for n in re.findall(r"; (\d+) fresh \(", log))


def test_three_machines_split_a_fleet_with_no_account_synced_twice(
    harness: Harness, db: Database, sim
):
    sim.ip_limit = (100, 2.0)  # 20 fills requests per 2 s per address: strict
    configs = machines(harness, 90, min_interval=60)

    processes = [harness.popen("--once", config=config) for config in configs]
    results = [finish(p, timeout=120) for p in processes]

    for code, err in results:
        assert code == 0, err
    synced = Counter(r["user_id"] for r in db.status())
    assert set(synced) == {a.user_id for a in harness.accounts}
    assert max(synced.values()) == 1  # no account synced twice
    assert sum(r["status"] == 429 for r in sim.requests) == 0
    by_address = fills_requests_by_address(sim)
    assert set(by_address) == set(ADDRESSES)  # every machine did its share
    assert sum(by_address.values()) == 90  # one request per account: no double work
    assert sum(fresh(err) for _, err in results) == 3 * 90 - 90  # the others' share
    for account in harness.accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account, BTC)

    # the next cron minute comes early: every account is fresh, none is synced again
    again = [finish(harness.popen("--once", config=c), timeout=60) for c in configs]
    assert all(code == 0 for code, _ in again)
    assert sum(fresh(err) for _, err in again) == 3 * 90
    assert len(db.status()) == 90


def test_a_machine_killed_mid_pass_leaves_claims_that_expire(harness: Harness, db: Database, sim):
    interval = 8  # long enough for the next machine to start on a busy box before expiry
    configs = machines(harness, 30, min_interval=interval)
    for config in configs:
        config["sync"]["workers"] = 1
    sim.latency = 0.1  # a pass over 30 accounts takes seconds: time to kill it
    doomed = harness.popen("--once", config=configs[0])
    wait_for(  # killed while it holds a claim it has not synced yet (between two users'
        # commits it holds none: then the test would prove nothing)
        lambda: db.scalar(
            "SELECT count(DISTINCT user_id) >= 3 AND count(DISTINCT user_id)"
            " < (SELECT count(*) FROM sync_claims) FROM sync_status"
        )
    )
    doomed.kill()
    killed = time.monotonic()  # its claims were made or renewed before this
    finish(doomed)
    done_before = db.scalar("SELECT count(DISTINCT user_id) FROM sync_status")
    claimed = db.scalar("SELECT count(*) FROM sync_claims")
    assert done_before < 30 and claimed > done_before  # it held claims it never got to

    sim.latency = 0
    code, err = finish(harness.popen("--once", config=configs[1]), timeout=60)
    assert code == 0, err
    assert db.scalar("SELECT count(DISTINCT user_id) FROM sync_status") < 30  # still claimed
    time.sleep(max(0.0, killed + interval + 0.5 - time.monotonic()))  # the claims expire
    code, err = finish(harness.popen("--once", config=configs[2]), timeout=60)
    assert code == 0, err

    synced = Counter(r["user_id"] for r in db.status())
    assert set(synced) == {a.user_id for a in harness.accounts}


def test_a_process_takes_a_source_address_no_other_process_holds(harness: Harness, tmp_path):
    cfg = weex_sync.WeexConfig(
        source_addresses=ADDRESSES,
        rate_limit=weex_sync.RateLimitConfig(shared_file=str(tmp_path / "ratelimit")),
    )
    with (
        weex_sync.taking_source_address(cfg) as first,
        weex_sync.taking_source_address(cfg) as second,
    ):
        assert first.source_addresses == (ADDRESSES[0],)
        assert second.source_addresses == (ADDRESSES[1],)
        with weex_sync.taking_source_address(cfg) as third:
            assert third.source_addresses == (ADDRESSES[2],)
    with weex_sync.taking_source_address(cfg) as again:  # released when the process is done
        assert again.source_addresses == (ADDRESSES[0],)


def test_keys_of_one_account_are_claimed_together(harness: Harness, db: Database, sim):
    """Two users whose keys belong to one WEEX account share its UID budget: the account is
    claimed by one pass, which syncs both; the other process leaves them alone."""
    configs = machines(harness, 6, min_interval=60)
    for config in configs:
        for user in config["sync"]["users"][:2]:
            user["account"] = "desk-main"

    results = [
        finish(p, timeout=60) for p in [harness.popen("--once", config=c) for c in configs[:2]]
    ]

    assert all(code == 0 for code, _ in results), results
    passes = {r["user_id"]: r["pass_id"] for r in db.status()}
    assert len(passes) == 6 and passes["user1"] == passes["user2"]
    assert db.scalar("SELECT count(*) FROM sync_claims WHERE claim_key = 'account desk-main'") == 1


def test_a_pass_never_claims_what_another_claimed_after_it_started(db: Database, pg: dict):
    """min_interval_seconds shorter than a pass: an account another pass claimed after this
    one began is not stale for it, however long ago that is by the time it gets there (a cron
    pass running 55 s of a minute would otherwise re-sync, at its end, the accounts the other
    machines synced at their start). A pass that starts later may claim it."""
    store = weex_sync.Store(weex_sync.DatabaseConfig(dbname=db.name, **pg, sslmode="disable"))
    started_a = db.scalar("SELECT now()")
    started_b = db.scalar("SELECT now()")
    try:
        assert store.claim(["user x"], "pass-b", 1, started_b) == {"user x"}
        time.sleep(1.2)  # older than min_interval now
        assert store.claim(["user x"], "pass-a", 1, started_a) == set()
        started_c = db.scalar("SELECT now()")
        assert store.claim(["user x"], "pass-c", 1, started_c) == {"user x"}
        assert db.scalar("SELECT claimed_by FROM sync_claims") == "pass-c"
    finally:
        store.close()
