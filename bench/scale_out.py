#!/usr/bin/env python3
"""Scenario scale-out: a fleet split over several "machines" (processes leaving from their own
loopback address, 127.0.0.2, .3, .4, each with its own budget file), cron-style: every 60 s
each machine starts `weex_sync.py --once --max-seconds 55`; the simulator enforces WEEX's budget
per client address. Rounds with 1, 2 and 3 machines, then 3 with one killed -9 mid-pass.

usage: scale_out.py [--accounts 1500] [--quick]   (writes bench/results/scale_out-*.md)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psutil
import psycopg2
from run_bench import (
    PG,
    POSTMASTER,
    PY,
    RESULTS,
    ROOT,
    PostgresCpu,
    SimProcess,
    account,
    child_env,
    log,
    sql,
)

ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SCHEDULE = [(1, None), (2, None), (3, None), (3, None), (3, "kill"), (3, None)]


def config(
    dbname: str,
    sim: SimProcess,
    users: list,
    workdir: Path,
    address: str | None,
    limits: dict,
    min_interval: int,
    workers: int,
) -> str:
    name = address or "warm"
    (workdir / name).mkdir(exist_ok=True)
    weex = {
        "base_url": sim.base_url,
        "timeout_seconds": 30,
        "rate_limit": {**limits, "shared_file": str(workdir / name / "ratelimit")},
    }
    if address:
        weex["source_address"] = address
    data = {
        "database": {**PG, "password": "", "dbname": dbname, "sslmode": "disable"},
        "weex": weex,
        "sync": {
            "start_time": int(time.time() * 1000) - 3 * 86_400_000,
            "workers": workers,
            "min_interval_seconds": min_interval,
            "users": users,
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def run_round(configs: list[str], max_seconds: int, kill_after: float | None) -> list[tuple]:
    procs = [
        subprocess.Popen(
            [
                PY,
                str(ROOT / "weex_sync.py"),
                "--once",
                "-q",
                "-c",
                c,
                "--max-seconds",
                str(max_seconds),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for c in configs
    ]
    if kill_after is not None:
        time.sleep(kill_after)
        procs[0].send_signal(signal.SIGKILL)
    return [(p, *p.communicate()) for p in procs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="90 accounts, a 10 s cron")
    args = parser.parse_args(argv)
    conn = psycopg2.connect(dbname="postgres", **PG)
    POSTMASTER[0] = psutil.Process(conn.get_backend_pid()).ppid()
    conn.close()
    n = 90 if args.quick else args.accounts
    minute, max_seconds = (10, 8) if args.quick else (60, 55)
    budget = (100, 2.0) if args.quick else (500, 10.0)
    now = int(time.time() * 1000)
    users = [account("scale", i) for i in range(n)]
    spec = {
        "seed": 1,
        "symbols": ["cmt_btcusdt", "cmt_ethusdt"],
        "accounts": [
            u
            | {
                "fills": {"cmt_btcusdt": 3},
                "start_ms": now - 2 * 86_400_000,
                "end_ms": now - 86_400_000,
            }
            for u in users
        ],
    }
    sim = SimProcess(spec)
    dbname = f"bench_scale_{os.getpid()}"
    sql(f'CREATE DATABASE "{dbname}"')
    rows, lines = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="weex_scale_") as tmp:
            work = Path(tmp)
            high = {"uid_weight": 1_000_000, "ip_weight": 10_000_000, "window_seconds": 10}
            warm = config(dbname, sim, users, work, None, high, 0, 32)
            log(f"warm pass over {n} accounts")
            subprocess.run(
                [PY, str(ROOT / "weex_sync.py"), "--once", "-q", "-c", warm],
                check=True,
                env=child_env(),
            )
            sim.call({"cmd": "set", "ip_limit": list(budget)})
            limits = {"ip_weight": budget[0], "window_seconds": budget[1], "uid_weight": budget[0]}
            min_interval = minute * 5 // 6
            configs = [
                config(dbname, sim, users, work, a, limits, min_interval, 8) for a in ADDRESSES
            ]
            time.sleep(minute)  # the warm pass's claims expire; an empty budget
            for k, (machines, event) in enumerate(SCHEDULE, 1):
                sim.call({"cmd": "reset_stats"})
                since = sql("SELECT now()", dbname=dbname)[0][0]
                started, pg = time.monotonic(), PostgresCpu()
                log(f"round {k}: {machines} machine(s){', one killed -9' if event else ''}")
                results = run_round(
                    configs[:machines], max_seconds, minute / 3 if event == "kill" else None
                )
                stats, took = sim.call({"cmd": "stats"}), time.monotonic() - started
                pg_cpu = pg.stop()
                synced = sql(
                    "SELECT count(DISTINCT user_id), count(*) FROM sync_status"
                    " WHERE last_sync_time >= %s",
                    (since,),
                    dbname,
                )[0]
                codes = [p.returncode for p, *_ in results]
                rows.append(
                    {
                        "round": k,
                        "machines": machines,
                        "event": event or "",
                        "accounts": synced[0],
                        "syncs": synced[1],
                        "requests": stats["fills_requests"],
                        "429": stats["status_429"],
                        "by_address": stats.get("fills_by_client", {}),
                        "seconds": round(took, 1),
                        "pg_cpu_s": round(pg_cpu, 1),
                        "exit": codes,
                    }
                )
                log(f"  {rows[-1]}")
                time.sleep(max(0, minute - (time.monotonic() - started)))
            gaps = sql(
                "SELECT max(gap) FROM (SELECT extract(epoch FROM last_sync_time - lag("
                "last_sync_time) OVER (PARTITION BY user_id ORDER BY last_sync_time))"
                " AS gap FROM sync_status WHERE last_sync_time >= %s) g",
                (since,),
                dbname,
            )[0][0]
    finally:
        sim.close()
        sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    lines += [
        (
            f"# scale-out {dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}: {n} idle accounts, "
            f"a pass per machine every {minute} s with --max-seconds {max_seconds}, "
            f"{budget[0]} weight / {budget[1]:g} s per address"
        ),
        "",
        (
            "| round | machines | accounts synced | syncs | fills requests | per address | 429 "
            "| longest pass, s | PostgreSQL CPU s | exit codes |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{v}" for _, v in sorted(r["by_address"].items()))
        label = f"{r['machines']}{' (one killed -9)' if r['event'] else ''}"
        lines.append(
            f"| {r['round']} | {label} | {r['accounts']:,} | {r['syncs']:,} | "
            f"{r['requests']:,} | {per} | {r['429']} | {r['seconds']} | {r['pg_cpu_s']} "
            f"| {r['exit']} |"
        )
    lines += ["", f"Longest gap between two syncs of one account in the last round: {gaps} s"]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"scale_out-{stamp}{'-quick' if args.quick else ''}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
