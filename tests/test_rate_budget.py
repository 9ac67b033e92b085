"""The exchange's real limits: requests paced, the address's rate learned from refusals and
kept for the next pass, refusals waited out instead of retried at once, users whose
credentials are refused left alone for a while (issue: live within the exchange's limits).

The convergence tests are the bench's strict-exchange scenario (bench/strict_exchange.py) at a
fifth of its window: a 2 s window instead of 10 s, so that two passes take seconds. They
count refusals and penalty boxes; the pass times are the bench's to measure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import weex_sync
from harness import (
    BTC,
    Database,
    Harness,
    make_account,
    stored_fills,
)
from weex_sim import Simulator

WINDOW = 2.0  # seconds: the documented 500 weight per 10 s, at a fifth of the window
BUDGET = 100


def idle_fleet(harness: Harness, sim: Simulator, users: int) -> None:
    """`users` accounts with a few fills in the last hours and nothing else: one request each
    per pass (symbols: all, the start an hour before the first fill)."""
    now = int(time.time() * 1000)
    harness.accounts = [make_account(sim, n, "all") for n in range(1, users + 1)]
    for account in harness.accounts:
        sim.generate_fills(
            account.api_key, BTC, 3, start_ms=now - 7_200_000, end_ms=now - 3_600_000
        )
    del harness.sync["symbols"]
    harness.sync["start_time"] = now - 3 * 3_600_000
    harness.sync["workers"] = 8
    harness.weex["rate_limit"].update(ip_weight=BUDGET, uid_weight=BUDGET, window_seconds=WINDOW)


STRICTNESS = {
    # a burst cap of a tenth of the window per second (at this scale: per 0.2 s)
    "burst cap": {"burst_limit": (BUDGET // 10, WINDOW / 10), "ip_limit": (BUDGET, WINDOW)},
    # a window half the documented one
    "half the window": {"ip_limit": (BUDGET // 2, WINDOW)},
}


def strict(sim: Simulator, case: str, version: int = 3) -> None:
    """The case's limits, refused with v3's -1059 (v2: its 429 in the body); the half window
    with a Retry-After, the burst cap without; an address refused 6 times in a window boxed."""
    for name, value in STRICTNESS[case].items():
        setattr(sim, name, value)
    sim.limit_code = "-1059" if version == 3 else "429"
    sim.limit_retry_after = case == "half the window"
    sim.penalty_box = (6, WINDOW, 3 * WINDOW)


@pytest.mark.parametrize("api", ["v3-newest", "v2"], indirect=True)
@pytest.mark.parametrize("case", list(STRICTNESS))
def test_passes_converge_on_a_stricter_exchange(
    harness: Harness, db: Database, sim: Simulator, case: str
):
    idle_fleet(harness, sim, 40)
    strict(sim, case, harness.api.version)
    assert harness.run() == 0, harness.last_log  # the first pass learns
    first = [r for r in sim.requests if r["path"] == harness.api.fills_path]
    sim.reset_stats()

    assert harness.run() == 0, harness.last_log

    requests = [r for r in sim.requests if r["path"] == harness.api.fills_path]
    refused = sum(r["refused"] for r in requests)
    # the sawtooth's few at this scale: the bench measures 150 accounts (3.1 had 75-96 % of
    # its requests refused there, and here)
    assert refused <= 0.1 * len(requests), (refused, len(requests))
    assert sim.penalty_boxes == 0 and not any(r["boxed"] for r in first)
    for account in harness.accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account)
    assert f"refused={refused}" in harness.last_log


def test_a_refusal_pauses_the_whole_address_for_its_retry_after(
    harness: Harness, db: Database, sim: Simulator
):
    idle_fleet(harness, sim, 12)
    sim.ip_limit = (20, 2.0)  # four requests, then refusals with a Retry-After of 1-2 s
    sim.limit_retry_after = True
    harness.weex["rate_limit"].update(ip_weight=10_000)  # believes the budget is far larger

    assert harness.run() == 0, harness.last_log

    [refused_at, *_] = [r["t"] for r in sim.requests if r["refused"]]
    times = [r["t"] for r in sim.requests if r["path"] == harness.api.fills_path]
    # the requests in flight when it came arrive at once; then no worker sends any
    assert not [t for t in times if refused_at + 0.3 < t < refused_at + 0.95], times
    for account in harness.accounts:
        assert stored_fills(db, account.user_id) == harness.expected(account)


def test_refusals_longer_than_a_pass_fail_the_pair_after_a_few_requests(
    harness: Harness, db: Database, sim: Simulator, monkeypatch
):
    idle_fleet(harness, sim, 2)
    sim.ip_limit = (5, 3600.0)  # one request an hour
    sim.limit_retry_after = False
    monkeypatch.setattr(weex_sync, "THROTTLE_PATIENCE_SECONDS", 3.0)
    harness.sync["interval_seconds"] = 1

    assert harness.run() == 1

    [failed] = [r for r in db.status() if r["status"] == "error"]  # the other got the one
    assert failed["error_kind"] == "rate_limit"
    assert "kept refusing requests as too frequent" in failed["error_message"]
    # paused 1, 2, 4 s between tries: a handful of requests, not max_retries per pair at once
    assert sim.count(path=harness.api.fills_path) <= 8


def test_the_learned_rate_is_kept_for_the_next_pass_and_shown(
    harness: Harness, db: Database, sim: Simulator
):
    idle_fleet(harness, sim, 20)
    strict(sim, "half the window")
    assert harness.run() == 0, harness.last_log

    state = json.loads(Path(harness.weex["rate_limit"]["shared_file"]).read_text())
    [address] = [v for k, v in state.items() if k.startswith("ip ")]
    ceiling = weex_sync.Limit.of(BUDGET, WINDOW + weex_sync.LIMIT_MARGIN).ceiling
    assert 0 < address["rate"] < ceiling and address["refusals"] >= 1

    assert harness.run("--status", "--json") == 0
    [shown] = {json.dumps(row["rate_limit"]) for row in json.loads(harness.out)}
    shown = json.loads(shown)
    assert shown["learned"] and shown["weight_per_second"] < shown["ceiling"]
    assert shown["refusals"] == address["refusals"]


def test_a_user_whose_credentials_are_refused_is_left_alone_for_a_while(
    harness: Harness, db: Database, sim: Simulator
):
    idle_fleet(harness, sim, 2)
    good, bad = harness.accounts
    right = bad.passphrase
    bad.passphrase = "wrong-passphrase"
    harness.sync["interval_seconds"] = 60  # backoff: the next pass, then 3, 7 ... intervals

    def requests_of(account) -> int:
        return sim.count(path=harness.api.fills_path, api_key=account.api_key)

    assert harness.run() == 1
    assert requests_of(bad) == 1
    assert harness.run() == 1  # at once: within the first wait
    assert requests_of(bad) == 1 and requests_of(good) == 2
    latest = {r["user_id"]: r for r in db.status()}
    assert latest["user2"]["error_kind"] == "credentials"
    assert "next try after" in latest["user2"]["error_message"]

    assert 0 < db.scalar("SELECT extract(epoch FROM next_try - now()) FROM sync_backoff") <= 30
    db.rows("UPDATE sync_backoff SET next_try = now() - interval '1 second'")  # the next pass
    assert harness.run() == 1  # due: asked again, refused again
    assert requests_of(bad) == 2
    assert "refused 2 passes in a row" in harness.last_log
    assert 60 < db.scalar("SELECT extract(epoch FROM next_try - now()) FROM sync_backoff") <= 90
    assert harness.run() == 1
    assert requests_of(bad) == 2

    assert harness.run("--check") == 1  # --check always asks
    assert requests_of(bad) == 3

    # the database's clock stepped back a day: the wait is never longer than the longest one
    db.rows("UPDATE sync_backoff SET next_try = now() + interval '1 day'")
    assert harness.run() == 1
    assert requests_of(bad) == 4

    bad.passphrase = right  # new credentials are tried at once
    assert harness.run() == 0, harness.last_log
    assert requests_of(bad) == 5
    assert db.scalar("SELECT count(*) FROM sync_backoff") == 0


def test_a_refused_key_costs_a_handful_of_requests_an_hour():
    tries, at = 0, 0.0
    while at < 3600:
        tries += 1
        wait = weex_sync.backoff_wait(tries, 60)
        at += max(60.0, (wait // 60 + 1) * 60)  # the first cron pass after the wait
    assert tries <= 7


# --- the budget's arithmetic, on an injected clock -----------------------------------------

LIMIT = weex_sync.Limit.of(500, 10.0)


def test_a_refusal_cuts_the_rate_once_per_round_and_pauses_longer_in_a_row():
    budget = weex_sync.Budget()
    budget.refused(100.0, sent_at=99.0, retry_after=None, limit=LIMIT)
    assert budget.rate == pytest.approx(LIMIT.ceiling * weex_sync.RATE_CUT)
    assert budget.paused_until == 101.0
    # a request sent before that cut was sent at the old rate: no news, no second cut
    budget.refused(100.2, sent_at=99.5, retry_after=None, limit=LIMIT)
    assert budget.rate == pytest.approx(LIMIT.ceiling * weex_sync.RATE_CUT)
    budget.refused(101.5, sent_at=101.0, retry_after=None, limit=LIMIT)
    assert budget.rate == pytest.approx(LIMIT.ceiling * weex_sync.RATE_CUT**2)
    assert budget.paused_until == 103.5  # 2 s: the second in a row
    budget.refused(104.0, sent_at=103.6, retry_after=7.0, limit=LIMIT)
    assert budget.paused_until == 111.0  # the exchange's Retry-After
    for n in range(30):
        budget.refused(200.0 + n, sent_at=200.0 + n, retry_after=None, limit=LIMIT)
    assert budget.pace(LIMIT) == pytest.approx(LIMIT.floor)
    assert budget.paused_until - 229.0 == weex_sync.PAUSE_CAP_SECONDS


def test_only_requests_that_waited_their_turn_raise_the_rate_back():
    budget = weex_sync.Budget(rate=LIMIT.ceiling / 2, streak=3, lowered_at=100.0)
    budget.succeeded(weex_sync.Ticket(99.0, 5, paced=True), LIMIT)  # sent before the cut
    assert budget.rate == LIMIT.ceiling / 2 and budget.streak == 3
    budget.succeeded(weex_sync.Ticket(101.0, 5, paced=False), LIMIT)
    assert budget.rate == LIMIT.ceiling / 2 and budget.streak == 0
    for _ in range(100_000):
        budget.succeeded(weex_sync.Ticket(101.0, 5, paced=True), LIMIT)
        if budget.rate is None:
            break
    assert budget.rate is None  # back at the ceiling, nothing learned any more


def test_a_retry_after_of_zero_still_pauses_the_address():
    budget = weex_sync.Budget()
    budget.refused(100.0, sent_at=99.0, retry_after=0.0, limit=LIMIT)
    assert budget.paused_until == 100.0 + weex_sync.PAUSE_FIRST_SECONDS


def test_pacing_never_lets_more_than_half_a_windows_budget_leave_in_a_second():
    budget, now, sent = weex_sync.Budget(), 1000.0, []
    while len(sent) < 100:  # as fast as the budget lets them go
        wait = budget.wait(now, 5, LIMIT)
        if wait > 0:
            now += wait
            continue
        budget.charge(now, 5, LIMIT, weex_sync.RateLimiter.BUCKET)
        sent.append(now)
    in_one_second = max(sum(1 for t in sent if s <= t < s + 1) for s in sent)
    assert in_one_second * 5 <= 500 / 2 + 5  # 5 x the average rate, never a window at once
    in_one_window = max(sum(1 for t in sent if s <= t < s + LIMIT.window) for s in sent)
    assert in_one_window * 5 <= 500


def test_the_budget_file_stays_small_whatever_the_hour_of_traffic():
    """Sixteen busy addresses for an hour: the file holds each one's window, not its hour (3.1
    kept an hour of entries per address: past 1 MB with five, then read as empty)."""
    now, budgets = 1_000_000.0, {f"ip host from 10.0.0.{n}": weex_sync.Budget() for n in range(16)}
    for step in range(7_200):  # a request every half second on each address
        for budget in budgets.values():
            budget.charge(now + step * 0.5, 5, LIMIT, weex_sync.RateLimiter.BUCKET)
    text = json.dumps({key: budget.to_json() for key, budget in budgets.items()}).encode()

    assert len(text) < 32_000, len(text)
    read, discarded = weex_sync.read_budgets(text, now + 3600, weex_sync.RateLimiter.BUCKET)
    assert discarded == 0 and read.keys() == budgets.keys()
    assert all(sum(w for _, w in b.used) <= 5 * 22 for b in read.values())  # a window


# --- rate limiter --------------------------------------------------------------------------


class FakeClock:
    """The limiter's clock, moved only by its waits: a test sees each wait exactly."""

    def __init__(self) -> None:
        self.t = 1_000_000.0
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    def wait(self, seconds: float, stop: weex_sync.Stop | None) -> bool:
        if stop is not None and stop.is_set():
            return True
        self.waits.append(seconds)
        self.t += seconds
        return False

    def waited(self) -> float:
        return sum(self.waits)


def limiter(tmp_path=None, ip=50, uid=20, clock: FakeClock | None = None) -> weex_sync.RateLimiter:
    """A limiter of 0.2 s windows, on ``clock`` (a FakeClock of its own if none is given)."""
    cfg = weex_sync.RateLimitConfig(
        uid_weight=uid,
        ip_weight=ip,
        window_seconds=0.2,
        shared_file=str(tmp_path / "budget") if tmp_path else "",
    )
    return weex_sync.RateLimiter(cfg, "host", margin=0.0, clock=clock or FakeClock())


@pytest.mark.unit
def test_two_keys_of_one_account_share_its_budget():
    """WEEX counts the UID budget per account, not per API key (sync.users[].account)."""
    clock = FakeClock()
    budget = limiter(uid=10, clock=clock)
    stop = weex_sync.Stop()
    first = weex_sync.UserConfig("a", "key-a", "s", "p", account="acct-1")
    second = weex_sync.UserConfig("b", "key-b", "s", "p", account="acct-1")
    other = weex_sync.UserConfig("c", "key-c", "s", "p")
    budget.acquire(first.budget_key, 5, stop)
    budget.acquire(other.budget_key, 5, stop)
    budget.acquire(second.budget_key, 5, stop)
    assert clock.waited() < 0.1  # 10 of 10 for acct-1: paced only
    budget.acquire(second.budget_key, 5, stop)
    assert clock.waited() >= 0.2 - 1e-6  # the account's window had to roll


@pytest.mark.unit
def test_the_limiter_admits_the_budget_then_waits_for_the_window():
    clock = FakeClock()
    budget = limiter(uid=20, clock=clock)
    stop = weex_sync.Stop()
    for _ in range(4):
        budget.acquire("key", 5, stop)
    paced = clock.waited()
    assert 0 < paced < 0.15  # 20 of 20: paced (at most 5x the window's rate), no window wait
    assert all(w <= 0.2 / 4 / 5 * 1.5 for w in clock.waits)  # small steps: the pace
    budget.acquire("key", 5, stop)
    assert clock.waited() >= 0.2 - 1e-6  # the 5th waited for the first request's window to end


@pytest.mark.unit
def test_the_ip_budget_is_shared_by_limiters_of_one_file(tmp_path):
    clock = FakeClock()
    first = limiter(tmp_path, ip=20, uid=100, clock=clock)
    second = limiter(tmp_path, ip=20, uid=100, clock=clock)
    stop = weex_sync.Stop()
    for n in range(4):
        (first if n % 2 else second).acquire(f"key{n}", 5, stop)
    assert clock.waited() < 0.15  # paced, no window wait
    second.acquire("other", 5, stop)  # the file knows the first limiter's requests
    assert clock.waited() >= 0.2 - 1e-6


@pytest.mark.unit
def test_a_stop_interrupts_a_limiter_wait():
    budget = limiter(uid=5)
    stop = weex_sync.Stop()
    budget.acquire("key", 5, stop)
    stop.set()
    with pytest.raises(weex_sync.Interrupted):
        budget.acquire("key", 5, stop)
