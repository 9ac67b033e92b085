#!/usr/bin/env python3
"""Benchmark weex_sync against the WEEX simulator and the local PostgreSQL (see README.md).

Every scenario measures weex_sync together with its baseline in the same run, so each figure
is a ratio. The simulator runs in its own process (sim_server.py); weex_sync runs the way users
run it (``weex_sync.py --once -c config.yaml``) as a subprocess whose wall time, CPU time and
peak RSS are measured; each measured run writes into its own fresh database, dropped at the end.

usage: run_bench.py [--quick] [--only NAME ...] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
import psycopg2
import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
SYMBOLS = ("cmt_btcusdt", "cmt_ethusdt")
SYMBOL = SYMBOLS[0]
HOUR_MS = 3_600_000
# For every scenario but rate_limit the client's own limiter must not bind (the simulator
# enforces no limit there either): the highest budgets weex_sync's configuration accepts.
HIGH_LIMITS = {"uid_weight": 1_000_000, "ip_weight": 10_000_000, "window_seconds": 10.0}
# Environment variables weex_sync reads as overrides: never inherited by the measured runs.
OVERRIDE_ENV = re.compile(r"^(DB_|POSTGRES_|WEEX_)")


@dataclass(frozen=True)
class Sizes:
    backfill: int  # fills of the backfill scenarios (1, 5, 6)
    backfill_small: int  # the second history size for the memory comparison
    storage: int
    idle_accounts: int
    idle_latency: float
    idle_workers: tuple[int, ...]  # measured besides workers=1
    rate_limit: tuple[int, float]  # (weight, window seconds), simulator and client alike
    rate_windows: int  # the share is measured over this many whole windows
    repeats: int  # runs of the short backfills (weex_sync, fetch-only, dlt); the median counts


FULL = Sizes(200_000, 50_000, 200_000, 1000, 0.05, (8, 32), (500, 10.0), 4, 3)
QUICK = Sizes(10_000, 2_500, 10_000, 40, 0.05, (8, 32), (100, 2.0), 2, 1)
SCENARIOS = ("backfill", "storage", "idle_fleet", "rate_limit", "dlt_peer")


# ---------------------------------------------------------------------------------------------
# Plumbing: databases, the simulator process, measured subprocesses
# ---------------------------------------------------------------------------------------------


class Databases:
    """Fresh databases with unique names, all dropped by close()."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def create(self, label: str) -> str:
        name = f"bench_{label}_{os.getpid()}_{len(self.names)}"
        self._admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return name

    def close(self) -> None:
        for name in self.names:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()

    @staticmethod
    def _admin(*statements: str) -> None:
        conn = psycopg2.connect(dbname="postgres", **PG)
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
        conn.close()


def dsn(dbname: str) -> str:
    return f"host={PG['host']} port={PG['port']} user={PG['user']} dbname={dbname}"


def query_one(dbname: str, statement: str) -> Any:
    conn = psycopg2.connect(dbname=dbname, **PG)
    with conn, conn.cursor() as cur:
        cur.execute(statement)
        value = cur.fetchone()[0]
    conn.close()
    return value


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not OVERRIDE_ENV.match(k)}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class SimProcess:
    """sim_server.py in its own process; ``call`` sends one command and returns the answer."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen(
            [PY, str(BENCH / "sim_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        self._send(spec)
        hello = self._receive()
        self.base_url: str = hello["base_url"]
        self.setup_seconds: float = hello["setup_seconds"]

    def call(self, cmd: str, **args: Any) -> dict:
        self._send({"cmd": cmd, **args})
        return self._receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self._send({"cmd": "quit"})
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process exited; see its stderr above")
        return json.loads(line)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sim_spec(accounts: list[dict], *, latency: float = 0.0, uid_limit=None) -> dict:
    """History of the last 30 days up to an hour ago; weex_sync walks it up to now."""
    end = int(time.time() * 1000) - HOUR_MS
    return {
        "seed": 1,
        "symbols": list(SYMBOLS),
        "accounts": accounts,
        "start_ms": end - 30 * 24 * HOUR_MS,
        "end_ms": end,
        "latency": latency,
        "uid_limit": uid_limit,
        "ip_limit": None,
    }


def account(n: int, fills: dict[str, int]) -> dict:
    return {
        "user_id": f"u{n}",
        "api_key": f"bench-key-{n}",
        "secret_key": f"bench-secret-{n}",
        "passphrase": f"bench-pass-{n}",
        "fills": fills,
    }


@dataclass
class Run:
    """One measured subprocess."""

    label: str
    wall_s: float
    exit_code: int
    peak_rss_mb: float
    cpu_s: float  # user + system of the measured process (and its waited-for children)
    machine_busy: float  # share of all CPUs busy during the run (client + simulator + PostgreSQL)
    pg_cpu_s: float = 0.0  # CPU time of PostgreSQL's processes working for the bench
    sim_cpu_s: float | None = None  # CPU time the simulator process spent meanwhile
    stdout: str = field(default="", repr=False)
    stderr_tail: str = field(default="", repr=False)

    @property
    def others_cpu_s(self) -> float:
        """CPU time the machine spent meanwhile on anything but client, simulator and the
        bench's PostgreSQL work (other users of the machine: a sign of a noisy measurement)."""
        total = self.machine_busy * self.wall_s * (os.cpu_count() or 1)
        return total - self.cpu_s - self.pg_cpu_s - (self.sim_cpu_s or 0.0)

    def summary(self) -> dict:
        data = asdict(self)
        data["others_cpu_s"] = round(self.others_cpu_s, 2)
        data.pop("stdout")
        if self.exit_code == 0:
            data.pop("stderr_tail")
        return data


def measure(
    label: str,
    cmd: list[str],
    *,
    stdin: str = "",
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stop_after: float | None = None,
    timeout: float = 1800,
) -> Run:
    """Runs ``cmd`` to completion; ``stop_after`` seconds sends SIGTERM. Peak RSS and CPU come
    from wait4() on exactly this child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pg_cpu = PostgresCpu()
        cpu_before = psutil.cpu_times()
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            text=True,
            env=env or child_env(),
            cwd=cwd,
        )
        proc.stdin.write(stdin)
        proc.stdin.close()
        timers = [threading.Timer(timeout, proc.kill)]
        if stop_after is not None:
            timers.append(threading.Timer(stop_after, proc.send_signal, (signal.SIGTERM,)))
        for timer in timers:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        cpu_after = psutil.cpu_times()
        pg_cpu_s = pg_cpu.stop()
        for timer in timers:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stderr_tail = "".join(err.readlines()[-15:])
        run = Run(
            label=label,
            wall_s=round(wall, 3),
            exit_code=proc.returncode,
            peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
            cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
            machine_busy=round(busy_share(cpu_before, cpu_after), 3),
            pg_cpu_s=round(pg_cpu_s, 2),
            stdout=out.read(),
            stderr_tail=stderr_tail,
        )
    log(
        f"  {label}: {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU, {run.peak_rss_mb} MB peak "
        f"RSS, PostgreSQL {run.pg_cpu_s:.2f} s CPU, machine {run.machine_busy:.0%} busy, "
        f"exit {run.exit_code}"
    )
    return run


def measure_with_sim(
    sim: SimProcess, label: str, cmd: list[str], **kwargs: Any
) -> tuple[Run, dict]:
    """measure() with the simulator's request stats reset first; returns them with the run."""
    cpu_before = sim.call("reset_stats")["cpu_seconds"]
    run = measure(label, cmd, **kwargs)
    stats = sim.call("stats")
    run.sim_cpu_s = round(stats["cpu_seconds"] - cpu_before, 2)
    log(f"    simulator CPU meanwhile: {run.sim_cpu_s:.2f} s")
    return run, stats


class PostgresCpu:
    """CPU seconds used from now until stop() by the PostgreSQL processes that work for the
    bench: backends of bench_* databases and the server's background processes (WAL writer,
    checkpointer, ...), not backends serving anyone else. Polled every 0.1 s, so a backend that
    exits meanwhile loses at most its last 0.1 s."""

    CLIENT_BACKEND = re.compile(r"\d+\.\d+\.\d+\.\d+\(\d+\)|\[local\]")

    def __init__(self) -> None:
        self.first = self._sample()
        self.last = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())
        return sum(used - self.first.get(pid, 0.0) for pid, used in self.last.items())

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.last.update(self._sample())

    @classmethod
    def _sample(cls) -> dict[int, float]:
        used = {}
        for proc in psutil.process_iter(["ppid", "cpu_times", "cmdline"]):
            times, title = proc.info["cpu_times"], " ".join(proc.info["cmdline"] or ())
            ours = " bench_" in title or not cls.CLIENT_BACKEND.search(title)
            if postmaster_pid() in (proc.pid, proc.info["ppid"]) and times and ours:
                used[proc.pid] = times.user + times.system
        return used


@functools.cache
def postmaster_pid() -> int:
    """The pid of the PostgreSQL server at PG (other clusters on the machine are not ours)."""
    conn = psycopg2.connect(dbname="postgres", **PG)
    try:
        return psutil.Process(conn.get_backend_pid()).ppid()
    finally:
        conn.close()


def busy_share(before: Any, after: Any) -> float:
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    total = sum(after) - sum(before)
    return 1 - idle / total if total > 0 else 0.0


def require(run: Run, ok_codes: tuple[int, ...] = (0,)) -> None:
    if run.exit_code not in ok_codes:
        raise RuntimeError(f"{run.label} exited {run.exit_code}:\n{run.stderr_tail}")


def write_weex_config(
    path: Path,
    *,
    dbname: str,
    base_url: str,
    users: list[dict],
    start_ms: int,
    workers: int = 8,
    limits: dict | None = None,
    symbols: tuple[str, ...] = (SYMBOL,),
) -> str:
    config = {
        "database": {**PG, "password": "", "dbname": dbname, "sslmode": "disable"},
        "weex": {
            "base_url": base_url,
            "timeout_seconds": 30,
            "max_retries": 5,
            "rate_limit": limits or HIGH_LIMITS,
        },
        "sync": {
            "page_size": 100,
            "start_time": start_ms,
            "workers": workers,
            "symbols": list(symbols),
            "users": [
                {k: u[k] for k in ("user_id", "api_key", "secret_key", "passphrase")} for u in users
            ],
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def weex_sync_cmd(config_path: str) -> list[str]:
    return [PY, str(ROOT / "weex_sync.py"), "--once", "-c", config_path]


def creds_json(user: dict) -> str:
    return json.dumps({k: user[k] for k in ("user_id", "api_key", "secret_key", "passphrase")})


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table; ``met`` is None where the issue sets no target."""

    scenario: str
    measure: str
    value: str
    baseline: str
    ratio: str
    target: str = "-"
    met: bool | None = None
    miss: str = ""  # by how much, when missed


@dataclass
class Bench:
    sizes: Sizes
    workdir: Path
    profile: bool
    databases: Databases = field(default_factory=Databases)
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)

    def run_weex_sync(
        self, label: str, sim: SimProcess, users: list[dict], start_ms: int, **config: Any
    ) -> tuple[Run, str, dict]:
        """weex_sync --once into a fresh database; returns the run, the database and the
        simulator's request stats for the run."""
        dbname = self.databases.create(label)
        path = write_weex_config(
            self.workdir / f"{label}.yaml",
            dbname=dbname,
            base_url=sim.base_url,
            users=users,
            start_ms=start_ms,
            **config,
        )
        run, stats = measure_with_sim(
            sim, f"weex_sync {label}", weex_sync_cmd(path), cwd=str(self.workdir)
        )
        return run, dbname, stats

    def target(self, row: Row, value: float, goal: float, higher_is_better: bool = True) -> None:
        """Records ``row`` judged by value against goal; a miss says by how much."""
        met = value >= goal if higher_is_better else value <= goal
        if higher_is_better:
            miss = f"{(goal - value) / goal:.1%} below the target ({goal / value:.2f}x needed)"
        else:
            miss = f"{(value - goal) / goal:.1%} above the target"
        self.judge(row, "" if met else miss)

    def judge(self, row: Row, miss: str) -> None:
        """Records ``row``; an empty ``miss`` means the target is met."""
        row.met, row.miss = not miss, miss
        self.rows.append(row)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def fmt(x: float, unit: str = "") -> str:
    text = f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"
    return f"{text} {unit}".strip()


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def scenario_backfill(bench: Bench) -> None:
    """1 (backfill vs naive and vs the fetch-only loop), 5 (request efficiency), memory."""
    n, small = bench.sizes.backfill, bench.sizes.backfill_small
    big_user, small_user = account(1, {SYMBOL: n}), account(2, {SYMBOL: small})
    log(f"backfill: {n:,} fills (and {small:,} for memory), simulator setting up ...")
    with SimProcess(sim_spec([big_user, small_user])) as sim:
        start_ms = sim_spec([])["start_ms"] - 24 * HOUR_MS
        fetch_runs = []
        for _ in range(bench.sizes.repeats):
            fetch, _ = measure_with_sim(
                sim,
                "fetch-only loop",
                [PY, str(BENCH / "fetch_only.py"), sim.base_url, SYMBOL, str(start_ms)],
                stdin=creds_json(big_user),
            )
            require(fetch)
            fetched = json.loads(fetch.stdout)
            check(fetched["fills"] == n, f"fetch-only loop got {fetched['fills']} fills, not {n}")
            fetch_runs.append(fetch)

        weex_runs, requests = [], []
        for i in range(bench.sizes.repeats):
            run, dbname, stats = bench.run_weex_sync(f"backfill{i}", sim, [big_user], start_ms)
            require(run)
            check_rows(dbname, n, "weex_sync backfill")
            weex_runs.append(run)
            requests.append(stats["fills_requests"])
        fills_requests = max(requests)

        run_small, dbname_small, _ = bench.run_weex_sync(
            "backfill_small", sim, [small_user], start_ms
        )
        require(run_small)
        check_rows(dbname_small, small, "weex_sync small backfill")

        naive_db = bench.databases.create("backfill_naive")
        naive, _ = measure_with_sim(
            sim,
            "naive baseline",
            [PY, str(BENCH / "naive_sync.py"), sim.base_url, SYMBOL, str(start_ms)]
            + [dsn(naive_db)],
            stdin=creds_json(big_user),
        )
        require(naive)
        check_rows(naive_db, n, "naive baseline")

    run, fetch = median_run(weex_runs), median_run(fetch_runs)
    weex_rate, naive_rate, fetch_rate = (rate(n, r.wall_s) for r in (run, naive, fetch))
    bench.rows.append(
        Row(
            "1 backfill",
            f"fills/s, {n:,} fills, 1 account",
            fmt(weex_rate),
            f"naive {fmt(naive_rate)}",
            f"{weex_rate / naive_rate:.1f}x",
        )
    )
    bench.target(
        Row(
            "1 backfill",
            "fills/s vs bare fetch-only loop",
            fmt(weex_rate),
            f"fetch-only {fmt(fetch_rate)}",
            f"{weex_rate / fetch_rate:.0%}",
            ">= 50%",
        ),
        weex_rate / fetch_rate,
        0.5,
    )
    minimal = math.ceil(n / 100)
    bench.target(
        Row(
            "5 request efficiency",
            "fills requests / ceil(N/100)",
            f"{fills_requests:,}",
            f"minimal {minimal:,}",
            f"{fills_requests / minimal:.3f}",
            "<= 1.05",
        ),
        fills_requests / minimal,
        1.05,
        higher_is_better=False,
    )
    big_rss = max(r.peak_rss_mb for r in weex_runs)
    growth = big_rss / run_small.peak_rss_mb - 1
    peak = max(big_rss, run_small.peak_rss_mb)
    misses = []
    if peak >= 100:
        misses.append(f"peak {peak:.0f} MB")
    if growth > 0.10:
        misses.append(f"grows {growth:.0%} with history")
    bench.judge(
        Row(
            "1 memory",
            f"peak RSS {n:,} vs {small:,} fills",
            f"{big_rss:.1f} MB",
            f"{run_small.peak_rss_mb:.1f} MB",
            f"{growth:+.1%}",
            "< 100 MB, growth <= 10%",
        ),
        "; ".join(misses),
    )
    bench.rows.append(
        Row(
            "1 memory",
            f"peak RSS of the naive baseline, {n:,} fills",
            f"{run.peak_rss_mb:.1f} MB",
            f"naive {naive.peak_rss_mb:.1f} MB",
            f"{run.peak_rss_mb / naive.peak_rss_mb:.2f}x",
        )
    )
    bench.details["backfill"] = {
        "fills": n,
        "small_fills": small,
        "simulator_setup_s": sim.setup_seconds,
        "fills_per_s": {"weex_sync": weex_rate, "naive": naive_rate, "fetch_only": fetch_rate},
        "wall_s": {
            "weex_sync": [r.wall_s for r in weex_runs],
            "fetch_only": [r.wall_s for r in fetch_runs],
        },
        "fills_requests": requests,
        "minimal_requests": minimal,
        "request_efficiency": fills_requests / minimal,
        "rss_growth": growth,
        "runs": [r.summary() for r in (*fetch_runs, *weex_runs, run_small, naive)],
    }


def scenario_storage(bench: Bench) -> None:
    """2: weex_sync.save_page in pages of 100 vs one INSERT + COMMIT per row."""
    n = bench.sizes.storage
    log(f"storage: {n:,} parsed fills, save_page vs row-by-row insert+commit ...")
    fast, naive = bench.databases.create("storage"), bench.databases.create("storage_naive")
    run = measure("storage_run", [PY, str(BENCH / "storage_run.py"), str(n), dsn(fast), dsn(naive)])
    require(run)
    result = json.loads(run.stdout)
    for method, dbname in (("save_page", fast), ("naive", naive)):
        check(result[method]["rows"] == n, f"{method} inserted {result[method]['rows']} rows")
        check_rows(dbname, n, f"storage {method}")
    fast_rate = rate(n, result["save_page"]["seconds"])
    naive_rate = rate(n, result["naive"]["seconds"])
    bench.target(
        Row(
            "2 storage",
            f"rows/s, {n:,} parsed fills, pages of 100",
            fmt(fast_rate),
            f"naive {fmt(naive_rate)}",
            f"{fast_rate / naive_rate:.1f}x",
            ">= 10x",
        ),
        fast_rate / naive_rate,
        10,
    )
    bench.details["storage"] = {"rows": n, **result, "run": run.summary()}


def scenario_idle_fleet(bench: Bench) -> None:
    """3: many accounts with nothing new, 50 ms per response: workers vs workers=1."""
    sizes = bench.sizes
    users = [account(i, {s: 3 for s in SYMBOLS}) for i in range(1, sizes.idle_accounts + 1)]
    pairs = len(users) * len(SYMBOLS)
    log(f"idle_fleet: {len(users)} accounts x {len(SYMBOLS)} symbols, {sizes.idle_latency}s ...")
    with SimProcess(sim_spec(users)) as sim:
        start_ms = sim_spec([])["start_ms"] - 24 * HOUR_MS
        dbname = bench.databases.create("idle_fleet")
        config = {"dbname": dbname, "base_url": sim.base_url, "users": users}
        config |= {"start_ms": start_ms, "symbols": SYMBOLS}
        warm = write_weex_config(bench.workdir / "idle_warm.yaml", workers=32, **config)
        require(measure("weex_sync first pass (no latency, not timed)", weex_sync_cmd(warm)))
        check_rows(dbname, pairs * 3, "idle fleet first pass")
        sim.call("set", latency=sizes.idle_latency)
        runs: dict[int, Run] = {}
        requests: dict[int, int] = {}
        for workers in (1, *sizes.idle_workers):
            path = write_weex_config(
                bench.workdir / f"idle_{workers}.yaml", workers=workers, **config
            )
            runs[workers], stats = measure_with_sim(
                sim, f"weex_sync idle pass workers={workers}", weex_sync_cmd(path)
            )
            require(runs[workers])
            requests[workers] = stats["fills_requests"]
    serial = runs[1].wall_s
    for workers in sizes.idle_workers:
        speedup = serial / runs[workers].wall_s
        row = Row(
            "3 idle fleet",
            f"pass time, {len(users):,} accts x {len(SYMBOLS)} symbols, workers={workers}",
            f"{runs[workers].wall_s:.1f} s",
            f"workers=1 {serial:.1f} s",
            f"{speedup:.1f}x",
            ">= 8x",
        )
        bench.target(row, speedup, 8)
        if workers <= 8 and not row.met:
            row.miss += f"; {workers} workers cap the speedup at {workers}x"
    bench.details["idle_fleet"] = {
        "accounts": len(users),
        "pairs": pairs,
        "latency_s": sizes.idle_latency,
        "fills_requests_per_pass": requests,
        "pass_seconds": {w: r.wall_s for w, r in runs.items()},
        "ideal_serial_s": pairs * sizes.idle_latency,
        "runs": [r.summary() for r in runs.values()],
    }


def scenario_rate_limit(bench: Bench) -> None:
    """4: the simulator enforces a UID weight limit; weex_sync is configured with the same."""
    weight, window = bench.sizes.rate_limit
    windows = bench.sizes.rate_windows
    # More history than the limit lets through in the run, so the limit binds throughout.
    n = int(windows * weight / 5 * 100 * 1.5) + 10_000
    user = account(1, {SYMBOL: n})
    log(f"rate_limit: simulator uid_limit {weight}/{window:g}s, {windows} windows ...")
    with SimProcess(sim_spec([user], uid_limit=[weight, window])) as sim:
        start_ms = sim_spec([])["start_ms"] - 24 * HOUR_MS
        dbname = bench.databases.create("rate_limit")
        limits = {"uid_weight": weight, "ip_weight": 10_000_000, "window_seconds": window}
        path = write_weex_config(
            bench.workdir / "rate_limit.yaml",
            dbname=dbname,
            base_url=sim.base_url,
            users=[user],
            start_ms=start_ms,
            limits=limits,
        )
        run, stats = measure_with_sim(
            sim,
            "weex_sync under the rate limit (SIGTERM at the end)",
            weex_sync_cmd(path),
            stop_after=windows * window + 2,
        )
        require(run, (0, 1))
    times = sorted(stats["fills_ok_times"])
    check(bool(times), "no fills request was accepted")
    t0 = times[0]
    in_windows = sum(t < t0 + windows * window for t in times)
    share = in_windows * 5 / (weight * windows)
    whole_run = times[-1] - t0
    peak = max_window_weight(times, window)
    row = Row(
        "4 rate limit",
        f"share of {weight}/{window:g}s used over {windows} windows; 429s",
        f"{share:.1%}; {stats['status_429']} x 429",
        f"limit {weight * windows:,} weight",
        f"{share:.2f}",
        ">= 90%, 0 x 429",
    )
    misses = []
    if share < 0.9:
        misses.append(f"{0.9 - share:.1%} short of 90%")
    if stats["status_429"]:
        misses.append(f"{stats['status_429']} x 429")
    bench.judge(row, "; ".join(misses))
    bench.details["rate_limit"] = {
        "limit": [weight, window],
        "windows_measured": windows,
        "accepted_requests_in_windows": in_windows,
        "share_of_limit": share,
        "status_429": stats["status_429"],
        "by_status": stats["by_status"],
        "max_weight_in_any_window": peak,
        "accepted_requests_total": len(times),
        "accepted_span_s": whole_run,
        "share_formula_whole_run": len(times) * 5 / (weight * whole_run / window)
        if whole_run
        else None,
        "rows_stored": query_one(dbname, "SELECT count(*) FROM trade_fills"),
        "run": run.summary(),
    }


def max_window_weight(times: list[float], window: float) -> int:
    """Largest weight the simulator accepted within any (t - window, t] span."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best * 5


def scenario_dlt_peer(bench: Bench) -> None:
    """6: the same backfill by weex_sync and by a dlt pipeline written the docs' way, the
    repetitions interleaved so that background noise hits both alike."""
    n = bench.sizes.backfill
    user = account(1, {SYMBOL: n})
    log(f"dlt_peer: {n:,} fills, weex_sync vs dlt ...")
    weex_runs, dlt_runs = [], []
    with SimProcess(sim_spec([user])) as sim:
        start_ms = sim_spec([])["start_ms"] - 24 * HOUR_MS
        for i in range(bench.sizes.repeats):
            run, dbname, _ = bench.run_weex_sync(f"dlt_peer_weex{i}", sim, [user], start_ms)
            require(run)
            check_rows(dbname, n, "weex_sync backfill")
            weex_runs.append(run)
            dlt_runs.append(run_dlt(bench, sim, user, start_ms, i))
    run, dlt_run = median_run(weex_runs), median_run(dlt_runs)
    weex_rate, dlt_rate = rate(n, run.wall_s), rate(n, dlt_run.wall_s)
    bench.target(
        Row(
            "6 dlt peer",
            f"fills/s, {n:,} fills, 1 account",
            fmt(weex_rate),
            f"dlt {fmt(dlt_rate)}",
            f"{weex_rate / dlt_rate:.1f}x",
            ">= 3x",
        ),
        weex_rate / dlt_rate,
        3,
    )
    bench.rows.append(
        Row(
            "6 dlt peer",
            "peak RSS",
            f"{run.peak_rss_mb:.1f} MB",
            f"dlt {dlt_run.peak_rss_mb:.1f} MB",
            f"{run.peak_rss_mb / dlt_run.peak_rss_mb:.2f}x",
        )
    )
    bench.details["dlt_peer"] = {
        "fills": n,
        "fills_per_s": {"weex_sync": weex_rate, "dlt": dlt_rate},
        "wall_s": {
            "weex_sync": [r.wall_s for r in weex_runs],
            "dlt": [r.wall_s for r in dlt_runs],
        },
        "runs": [r.summary() for r in (*weex_runs, *dlt_runs)],
    }


def run_dlt(bench: Bench, sim: SimProcess, user: dict, start_ms: int, i: int) -> Run:
    """dlt_peer.py with a fresh database and a fresh pipelines directory (no prior state)."""
    dbname = bench.databases.create(f"dlt_peer_dlt{i}")
    dlt_dir = bench.workdir / f"dlt{i}"
    dlt_dir.mkdir()
    env = child_env(
        DESTINATION__POSTGRES__CREDENTIALS=(
            f"postgresql://{PG['user']}:unused@{PG['host']}:{PG['port']}/{dbname}"
        ),
        RUNTIME__DLTHUB_TELEMETRY="false",
        DLT_DATA_DIR=str(dlt_dir / "data"),
    )
    run, _ = measure_with_sim(
        sim,
        "dlt pipeline",
        [PY, str(BENCH / "dlt_peer.py"), sim.base_url, SYMBOL, str(start_ms)]
        + [str(dlt_dir / "pipelines")],
        stdin=creds_json(user),
        env=env,
        cwd=str(dlt_dir),
    )
    require(run)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    n = sum(user["fills"].values())
    check(result["fills"] == n and result["load_ok"], f"dlt loaded {result}, expected {n}")
    return run


def check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"result check failed: {message}")


def check_rows(dbname: str, expected: int, what: str) -> None:
    rows = query_one(dbname, "SELECT count(*) FROM trade_fills")
    check(rows == expected, f"{what}: {rows} rows in trade_fills, expected {expected}")


# ---------------------------------------------------------------------------------------------
# Profiles (py-spy, all threads, on-CPU samples)
# ---------------------------------------------------------------------------------------------


def run_profiles(bench: Bench) -> None:
    """Profiles weex_sync where a CPU-bound target was missed (or always with --profile)."""
    missed = {r.scenario for r in bench.rows if r.met is False}
    ran = set(bench.details)
    if ran & {"backfill", "dlt_peer"} and (
        bench.profile or missed & {"1 backfill", "1 memory", "6 dlt peer"}
    ):
        bench.profiles["backfill"] = profile_backfill(bench, bench.sizes.backfill)
    if "storage" in ran and (bench.profile or "2 storage" in missed):

        def storage_cmd() -> list[str]:
            dbname = bench.databases.create("storage_profile")
            return [PY, str(BENCH / "storage_run.py"), str(bench.sizes.storage), dsn(dbname), "-"]

        bench.profiles["storage save_page"] = py_spy(bench, "storage", storage_cmd)


def profile_backfill(bench: Bench, n: int) -> str:
    user = account(1, {SYMBOL: n})
    log("profiling the weex_sync backfill with py-spy ...")
    with SimProcess(sim_spec([user])) as sim:
        start_ms = sim_spec([])["start_ms"] - 24 * HOUR_MS

        def backfill_cmd() -> list[str]:
            path = write_weex_config(
                bench.workdir / "profile.yaml",
                dbname=bench.databases.create("profile"),
                base_url=sim.base_url,
                users=[user],
                start_ms=start_ms,
            )
            return weex_sync_cmd(path)

        return py_spy(bench, "backfill", backfill_cmd)


def py_spy(bench: Bench, name: str, make_cmd: Callable[[], list[str]]) -> str:
    """Two py-spy recordings (all threads) of a command ``make_cmd`` sets up afresh for each:
    samples of the thread holding the GIL (where the process's Python CPU goes) and every
    thread's samples, idle ones included (where each thread's wall time goes: working, waiting
    on PostgreSQL, on HTTP, on a queue)."""
    py_spy_bin = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if py_spy_bin is None:
        return "py-spy is not installed (pip install -r bench/requirements.txt)"
    parts = []
    for mode, flags in (("gil", ["--gil"]), ("wall", ["--idle", "--threads"])):
        raw = bench.workdir / f"{name}.{mode}.pyspy.txt"
        record = [py_spy_bin, "record", "--format", "raw", "--rate", "250", *flags, "-o", str(raw)]
        cmd = [*record, "--", *make_cmd()]
        run = measure(f"py-spy --{mode} {name}", cmd, cwd=str(bench.workdir))
        if run.exit_code != 0 or not raw.exists():
            return f"py-spy failed (exit {run.exit_code}): {run.stderr_tail}"
        text = raw.read_text()
        parts.append(
            summarize_gil(text, run.wall_s, top=15)
            if mode == "gil"
            else summarize_threads(text, top=6)
        )
    return "\n\n".join(parts)


FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")
RATE_HZ = 250


def raw_samples(raw: str) -> list[tuple[list[str], int]]:
    """(frames root first, sample count) for each line of py-spy's raw output."""
    samples = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples.append((stack.split(";"), int(count)))
    return samples


def summarize_gil(raw: str, wall_s: float, top: int) -> str:
    """Functions by own and inclusive samples while holding the GIL."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for stack, count in raw_samples(raw):
        frames = [frame_name(f) for f in stack]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "(no samples)"
    held = total / RATE_HZ / wall_s
    lines = [
        f"GIL held {held:.0%} of the run ({total} samples at {RATE_HZ} Hz, {wall_s:.1f} s wall)",
        "own %   function (of the GIL-holding samples)",
    ]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["incl %  function"]
    lines += [f"{100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(lines)


def summarize_threads(raw: str, top: int) -> str:
    """Each thread's wall time by activity: its innermost weex_sync.py function and, if that
    is not the leaf, the leaf it is in (a lock wait, a socket read, a libpq call)."""
    threads: dict[str, Counter[str]] = {}
    for stack, count in raw_samples(raw):
        thread = re.sub(r"^thread \(\d+\):?\s*", "", stack[0]) or "unnamed"
        frames = [frame_name(f) for f in stack[1:]] or ["(no Python frame)"]
        mine = [f for f in frames if f.endswith("(weex_sync.py)") and "<module>" not in f]
        activity = (
            frames[-1] if not mine or mine[-1] == frames[-1] else f"{mine[-1]} > {frames[-1]}"
        )
        threads.setdefault(thread, Counter())[activity] += count
    lines = ["wall time per thread (idle samples included)"]
    for thread, activities in sorted(threads.items(), key=lambda kv: -kv[1].total()):
        total = activities.total()
        lines.append(f"thread {thread} ({total / RATE_HZ:.1f} s sampled)")
        lines += [f"  {100 * c / total:5.1f}%  {a}" for a, c in activities.most_common(top)]
    return "\n".join(lines)


def frame_name(frame: str) -> str:
    match = FRAME_RE.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    short = "/".join(Path(path).parts[-2:]) if "site-packages" in path else Path(path).name
    return f"{match['func']} ({short})"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Bench], None]] = {
    "backfill": scenario_backfill,
    "storage": scenario_storage,
    "idle_fleet": scenario_idle_fleet,
    "rate_limit": scenario_rate_limit,
    "dlt_peer": scenario_dlt_peer,
}


def code_hashes() -> dict[str, str]:
    """Short SHA-256 of the measured code, to tell which version a result belongs to."""
    return {
        name: hashlib.sha256((ROOT / f"{name}.py").read_bytes()).hexdigest()[:12]
        for name in ("weex_sync", "weex_sim")
    }


def environment() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], check=False, cwd=ROOT, capture_output=True, text=True
        )
        return result.stdout.strip()

    try:
        import dlt

        dlt_version = dlt.__version__
    except ImportError:
        dlt_version = None
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": query_one("postgres", "SHOW server_version"),
        "postgresql_fsync": query_one("postgres", "SHOW fsync"),
        "postgresql_synchronous_commit": query_one("postgres", "SHOW synchronous_commit"),
        "dlt": dlt_version,
        "git_head": git("rev-parse", "--short", "HEAD"),
        **{f"{name}_sha256": digest for name, digest in code_hashes().items()},
        "uncommitted_changes": git("status", "--porcelain", "weex_sync.py", "weex_sim.py"),
        "client_rate_limits_outside_rate_limit_scenario": HIGH_LIMITS,
    }


def analyse(details: dict) -> list[str]:
    """Plain-language notes on what bounds the figures, from the measured CPU times."""
    notes = []
    for key in ("backfill", "dlt_peer", "idle_fleet"):
        for run in details.get(key, {}).get("runs", []):
            sim = f", simulator {run['sim_cpu_s']:.1f}" if run.get("sim_cpu_s") is not None else ""
            notes.append(
                f"{run['label']}: {run['wall_s']:.1f} s wall; CPU s: client {run['cpu_s']:.1f}, "
                f"PostgreSQL {run['pg_cpu_s']:.1f}{sim}, anything else {run['others_cpu_s']:.1f}; "
                f"machine {run['machine_busy']:.0%} busy ({os.cpu_count()} CPUs)"
            )
    if "backfill" in details and "storage" in details:
        rates = details["backfill"]["fills_per_s"]
        storage = details["storage"]
        alone = storage["rows"] / storage["save_page"]["seconds"]
        verdict = (
            "storing is slower than the target needs, so storage (save_page: PostgreSQL's "
            "INSERT and COMMIT per page, serial on one connection) bounds the backfill, not "
            "fetching or the overlap of fetch and store"
            if alone < rates["fetch_only"] / 2
            else "storing alone is fast enough, so a miss lies elsewhere (see the profile)"
        )
        notes.append(
            f"save_page alone (storage scenario, no HTTP) stores {alone:,.0f} rows/s; the "
            f"backfill reaches {rates['weex_sync']:,.0f} fills/s; the target needs "
            f"{rates['fetch_only'] / 2:,.0f} fills/s: {verdict}."
        )
    idle = details.get("idle_fleet")
    if idle:
        notes.append(
            f"idle fleet: {idle['pairs']} (user, symbol) pairs x {idle['latency_s'] * 1000:.0f} ms "
            f"= {idle['ideal_serial_s']:.0f} s of pure latency serially; workers=N can at best "
            "divide it by N."
        )
    return notes


def markdown(rows: list[Row], meta: dict, notes: list[str], profiles: dict[str, str]) -> str:
    head = "| scenario | measure | weex_sync | baseline | ratio | target | met |"
    lines = [
        f"# weex_sync benchmark {meta['started']}{' (--quick)' if meta['quick'] else ''}",
        "",
        (
            f"Total runtime {meta['runtime_s']:.0f} s. Client rate limits set high (uid "
            f"{HIGH_LIMITS['uid_weight']:,}, ip {HIGH_LIMITS['ip_weight']:,} per 10 s) and no "
            "simulator limit, except in scenario 4."
        ),
        "",
        head,
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else f"**no**: {r.miss}")
        lines.append(
            f"| {r.scenario} | {r.measure} | {r.value} | {r.baseline} | {r.ratio} "
            f"| {r.target} | {met} |"
        )
    if notes:
        lines += ["", "## Where the time goes", ""] + [f"- {note}" for note in notes]
    for name, text in profiles.items():
        lines += ["", f"## py-spy profile: {name}", "", "```", text, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=SCENARIOS, metavar="NAME", help=", ".join(SCENARIOS)
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile with py-spy even if targets are met"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    code_before = code_hashes()
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="weex_bench_") as tmp:
        bench = Bench(sizes=sizes, workdir=Path(tmp), profile=args.profile)
        errors: dict[str, str] = {}
        try:
            for name in args.only or SCENARIOS:
                try:
                    RUNNERS[name](bench)
                except Exception as exc:  # noqa: BLE001 - one failure must not hide the others
                    log(f"{name} FAILED: {exc}")
                    errors[name] = str(exc)
            run_profiles(bench)
        finally:
            bench.databases.close()
    meta = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "runtime_s": round(time.monotonic() - t0, 1),
    }
    notes = analyse(bench.details)
    if code_hashes() != code_before:
        errors["code"] = "weex_sync.py or weex_sim.py changed during the run: measure again"
    report = {
        **meta,
        "sizes": asdict(sizes),
        "environment": environment(),
        "rows": [asdict(r) for r in bench.rows],
        "details": bench.details,
        "notes": notes,
        "profiles": bench.profiles,
        "errors": errors,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    text = json.dumps(report, indent=2, default=str) + "\n"
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    table = markdown(bench.rows, meta, notes, bench.profiles)
    (RESULTS / f"{stamp}.md").write_text(table)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    for name, error in errors.items():
        print(f"{name} FAILED: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
