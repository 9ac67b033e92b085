#!/usr/bin/env python3
"""Scenario idle-cpu: the CPU an idle pass costs per account as the fleet grows. Fleets of 100,
1,000 and 10,000 accounts (symbols: all, one fill each, synced once beforehand), each user with
random secrets of realistic length (every log line is scrubbed of every user's secrets), no rate
limit on either side; the idle pass's CPU (wait4) per account, and its ratio to 100 accounts'.
With ``--baseline REV`` the same passes of that revision's weex_sync.py, in the same run.

usage: idle_cpu.py [--baseline REV] [--sizes 100,1000,10000] [--info]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import (
    HIGH_LIMITS,
    PY,
    Measured,
    SimProcess,
    fleet_config,
    log,
    measure,
    programs,
    sql,
)


def users(n: int) -> list[dict]:
    return [
        {
            "user_id": f"idle{i}",
            "api_key": f"key-idle-{i}",
            "secret_key": secrets.token_urlsafe(24),
            "passphrase": secrets.token_hex(8),
        }
        for i in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a git revision whose weex_sync.py runs too")
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument(
        "--info", action="store_true", help="log at INFO (a line per account) instead of -q"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    fleet = users(max(sizes))
    now = int(time.time() * 1000)
    spec = {
        "seed": 1,
        "symbols": ["cmt_btcusdt"],
        "accounts": [
            u | {"fills": {"cmt_btcusdt": 1}, "start_ms": now - 86_400_000, "end_ms": now - 1000}
            for u in fleet
        ],
    }
    sim = SimProcess(spec)
    rows: list[tuple[str, int, int, Measured]] = []  # (client, accounts, warm exit, idle pass)
    try:
        with tempfile.TemporaryDirectory(prefix="weex_idle_") as tmp:
            work = Path(tmp)
            for program, label in programs(args.baseline, work):
                for n in sizes:
                    dbname = f"bench_idle_{os.getpid()}_{len(rows)}"
                    sql(f'CREATE DATABASE "{dbname}"')
                    try:
                        cfg = fleet_config(
                            work / f"{dbname}.yaml", dbname, sim.base_url, fleet[:n], HIGH_LIMITS
                        )
                        quiet = [] if args.info else ["-q"]
                        cmd = [PY, program, "--once", *quiet, "-c", str(cfg)]
                        log(f"{label}, {n} accounts")
                        warm = measure(f"warm {n}", cmd)
                        idle = measure(f"idle {n}", cmd)
                        rows.append((label, n, warm.exit_code, idle))
                    finally:
                        sql(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    finally:
        sim.close()
    print("| client | accounts | idle pass s | CPU s | CPU ms per account | per account / 100's |")
    print("|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for label, n, _, idle in rows:
        per = idle.cpu_s / n * 1000
        base.setdefault(label, per)
        print(
            f"| {label} | {n:,} | {idle.wall_s:.1f} | {idle.cpu_s:.2f} | {per:.2f} "
            f"| {per / base[label]:.2f} |"
        )
    return 0 if all(code == 0 and idle.exit_code == 0 for _, _, code, idle in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
