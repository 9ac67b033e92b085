#!/usr/bin/env python3
"""Scenario strict-exchange: an exchange stricter than its docs. 150 idle accounts (symbols:
all, a few fills each, synced beforehand without limits), the client configured with the
documented budget (500 weight / 10 s); the simulator enforces, per case:

- documented: 500 / 10 s per address, nothing more (the control: no refusal expected);
- burst cap: that, and at most a tenth of it in any second (50 weight / 1 s);
- half the window: 250 / 10 s;

each refusing with HTTP 429, code -1059 and no Retry-After, and boxing an address refused 6
times within 10 s for 60 s (penalty_box). Per case, two `--once` passes as cron runs them
(a fresh process each, one budget file): requests, refused, penalty boxes, pass time against
the time the true limit needs for the requests answered (at its sustained rate: the criterion;
and the least time a client bursting into an idle window would need, least_seconds), exit
codes, and the stored set (every fill once). With ``--baseline REV`` the same passes of the
weex_sync.py of git revision REV, in the same run, before weex_sync's.

usage: strict_exchange.py [--accounts 150] [--baseline REV]   (writes bench/results/strict_exchange-*.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import (
    HIGH_LIMITS,
    PY,
    RESULTS,
    SimProcess,
    account,
    child_env,
    fleet_config,
    log,
    programs,
    sql,
)


class Case(TypedDict):
    """The simulator's limits of a case (weight, window in seconds), set as they are."""

    ip_limit: tuple[int, float]
    burst_limit: tuple[int, float] | None


CASES: dict[str, Case] = {
    "documented": {"ip_limit": (500, 10.0), "burst_limit": None},
    "burst cap": {"ip_limit": (500, 10.0), "burst_limit": (50, 1.0)},
    "half the window": {"ip_limit": (250, 10.0), "burst_limit": None},
}
STRICT = {"limit_code": "-1059", "limit_retry_after": False, "penalty_box": [6, 10.0, 60.0]}
FILLS_PER_ACCOUNT = 3


def rate_seconds(case: Case, requests: int) -> float:
    """The time ``requests`` fills requests take at the case's sustained rate: the least any
    paced client needs (a window's budget may not leave at once)."""
    return (
        requests * 5 / min(w / s for w, s in (case["ip_limit"], case["burst_limit"] or (1, 0)) if s)
    )


def least_seconds(case: Case, requests: int) -> float:
    """The time the case's true limits need for ``requests`` fills requests: each sent at the
    first moment every window of the simulator admits it (no latency, no margin)."""
    windows = [w for w in (case["ip_limit"], case["burst_limit"]) if w]
    sent: list[float] = []
    for _ in range(requests):
        at = sent[-1] if sent else 0.0
        while True:
            waits = []
            for weight, seconds in windows:
                inside = [t for t in sent if t > at - seconds]
                if (len(inside) + 1) * 5 > weight:
                    waits.append(inside[len(inside) + 1 - weight // 5 - 1] + seconds)
            if not waits:
                break
            at = max(waits)
        sent.append(at)
    return sent[-1] if sent else 0.0


def one_pass(program: str, cfg: Path) -> tuple[int, float]:
    started = time.monotonic()
    done = subprocess.run(
        [PY, program, "--once", "-q", "-c", str(cfg)],
        check=False,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=900,
    )
    return done.returncode, time.monotonic() - started


def run_case(
    name: str, program: str, label: str, sim: SimProcess, users: list, work: Path
) -> list[dict]:
    """Two passes of ``program`` against the case, in a database of their own."""
    dbname = f"bench_strict_{os.getpid()}_{len(list(work.iterdir()))}"
    sql(f'CREATE DATABASE "{dbname}"')
    rows = []
    try:
        sim.call({"cmd": "set", "ip_limit": None, "burst_limit": None, "penalty_box": None})
        warm = fleet_config(work / f"{dbname}-warm.yaml", dbname, sim.base_url, users, HIGH_LIMITS)
        subprocess.run([PY, program, "--once", "-q", "-c", str(warm)], check=True, env=child_env())
        time.sleep(11)  # the warm pass's window is over
        sim.call({"cmd": "set", **CASES[name], **STRICT})
        limits = {"ip_weight": 500, "uid_weight": 500, "window_seconds": 10}
        cfg = fleet_config(work / f"{dbname}.yaml", dbname, sim.base_url, users, limits)
        for n in (1, 2):
            sim.call({"cmd": "reset_stats"})
            code, seconds = one_pass(program, cfg)
            stats = sim.call({"cmd": "stats"})
            stored, distinct = sql(
                "SELECT count(*), count(DISTINCT (user_id, order_id, trade_id)) FROM trade_fills",
                dbname=dbname,
            )[0]
            requests = stats["fills_requests"]
            answered = requests - stats["refused"]
            rows.append(
                {
                    "case": name,
                    "client": label,
                    "pass": n,
                    "requests": requests,
                    "refused": stats["refused"],
                    "penalty_boxes": stats["penalty_boxes"],
                    "seconds": round(seconds, 1),
                    "rate_seconds": round(rate_seconds(CASES[name], answered), 1),
                    "least_seconds": round(least_seconds(CASES[name], answered), 1),
                    "exit": code,
                    "stored": stored,
                    "exact": stored == distinct == len(users) * FILLS_PER_ACCOUNT,
                }
            )
            log(f"  {rows[-1]}")
            if n == 1:
                time.sleep(10)  # cron's gap: the next pass a little later
    finally:
        sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=150)
    parser.add_argument("--baseline", help="a git revision whose weex_sync.py runs first")
    parser.add_argument("--case", action="append", choices=list(CASES), help="(default: all)")
    args = parser.parse_args(argv)
    now = int(time.time() * 1000)
    users = [account("strict", i) for i in range(args.accounts)]
    spec = {
        "seed": 1,
        "symbols": ["cmt_btcusdt", "cmt_ethusdt"],
        "accounts": [
            u
            | {
                "fills": {"cmt_btcusdt": FILLS_PER_ACCOUNT},
                "start_ms": now - 2 * 86_400_000,
                "end_ms": now - 86_400_000,
            }
            for u in users
        ],
    }
    rows: list[dict] = []
    sim = SimProcess(spec)
    try:
        with tempfile.TemporaryDirectory(prefix="weex_strict_") as tmp:
            work = Path(tmp)
            for name in args.case or list(CASES):
                for program, label in programs(args.baseline, work):
                    log(f"{name}: {label}")
                    rows += run_case(name, program, label, sim, users, work)
    finally:
        sim.close()
    lines = [
        (
            f"# strict-exchange {dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}: {args.accounts} "
            "idle accounts, client configured 500 weight / 10 s; refusals 429 -1059 without "
            "Retry-After, penalty box 60 s after 6 refusals in 10 s"
        ),
        "",
        (
            "| case | client | pass | requests | refused | refused share | penalty boxes "
            "| pass s | at the limit's rate s | ratio | least s (bursting) | ratio | exit | stored "
            "| exact |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["refused"] / r["requests"] if r["requests"] else 0
        ratio = r["seconds"] / r["rate_seconds"] if r["rate_seconds"] else 0
        least = r["seconds"] / r["least_seconds"] if r["least_seconds"] else 0
        lines.append(
            f"| {r['case']} | {r['client']} | {r['pass']} | {r['requests']} | {r['refused']} | "
            f"{share:.1%} | {r['penalty_boxes']} | {r['seconds']} | {r['rate_seconds']} | "
            f"{ratio:.2f} | {r['least_seconds']} | {least:.2f} | {r['exit']} | {r['stored']} "
            f"| {r['exact']} |"
        )
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"strict_exchange-{stamp}.md").write_text(text)
    print(text)
    return 0 if all(r["exact"] for r in rows if r["client"] == "weex_sync") else 1


if __name__ == "__main__":
    sys.exit(main())
