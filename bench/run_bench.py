#!/usr/bin/env python3
"""Benchmark weex_sync against the WEEX simulator and the local PostgreSQL (see docs/performance.md and bench/README.md).

The scenarios are data (``scenarios()``): which accounts the simulator generates, which steps
run (weex_sync and its baseline, in the same run), which figures are reported against which
baseline and target. One runner executes them: the simulator in its own process
(sim_server.py), every step a measured subprocess (wall time, CPU and peak RSS from wait4),
every step's rows checked against what the simulator served.

usage: run_bench.py [--quick] [--only NAME ...] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import psutil
import psycopg2
import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH, RESULTS, PY = ROOT / "bench", ROOT / "bench" / "results", sys.executable


class PgParams(TypedDict):
    """Where the bench's PostgreSQL is: psycopg2.connect's keywords (``**PG``)."""

    host: str
    port: int
    user: str


PG: PgParams = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
CONTRACTS = ("cmt_btcusdt", "cmt_ethusdt", "cmt_solusdt", "cmt_xrpusdt", "cmt_dogeusdt")
BTC, ETH, SOL = CONTRACTS[:3]
DAY_MS, MINUTE_MS = 86_400_000, 60_000
# Where the client's own limiter must not bind (and the simulator enforces none): the highest
# budgets weex_sync's configuration accepts.
HIGH_LIMITS = {"uid_weight": 1_000_000, "ip_weight": 10_000_000, "window_seconds": 10.0}
OVERRIDE_ENV = re.compile(r"^(DB_|POSTGRES_|WEEX_)")  # weex_sync's overrides: never inherited
SUMMARY_RE = re.compile(  # the last line of a weex_sync pass
    r"finished in [\d.]+s: (?P<ok>\d+) ok, (?P<failed>\d+) failed, (?P<skipped>\d+) skipped, "
    r"(?P<interrupted>\d+) interrupted(?:; (?P<left>\d+) left[^;]*)?; fetched=(?P<fetched>\d+) "
    r"\w+=(?P<inserted>\d+) late=(?P<late>\d+) requests=(?P<sent>\d+)"
)
LIVE: set[subprocess.Popen] = set()  # measured processes still running (killed on exit)
POSTMASTER = [0]  # the pid of the PostgreSQL server at PG (set by main)
STALEST_SQL = """
SELECT extract(epoch FROM now() - min(last))::float
  FROM (SELECT max(last_sync_time) AS last FROM sync_status WHERE status = 'success'
         GROUP BY user_id) AS per_user
"""


# ---------------------------------------------------------------------------------------------
# Scenarios as data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    backfill: int  # fills of the backfill, storage and dlt scenarios
    backfill_small: int  # the second history size of the memory comparison
    repeats: int  # runs of each backfill program; the median counts
    idle_accounts: int
    budget: tuple[int, float]  # the documented budget, per IP and per UID: weight, window (s)
    rate_windows: int  # the share of the budget is measured over this many whole windows
    late_accounts: int  # per group (busy, idle)
    late_minutes: int
    fleet_accounts: int
    cron_gap: float  # seconds between the two cron passes
    cron_max_seconds: int


FULL = Sizes(200_000, 50_000, 3, 1000, (500, 10.0), 4, 200, 5, 1000, 60, 55)
QUICK = Sizes(5_000, 1_250, 1, 40, (100, 1.0), 2, 20, 3, 30, 3, 2)


@dataclass(frozen=True)
class Group:
    """``count`` accounts, each with ``fills`` per contract over ``days`` (days ago, from-to)."""

    name: str
    count: int
    fills: dict[str, int]
    days: tuple[float, float] = (31, 1 / 24)


@dataclass(frozen=True)
class Step:
    """One program run against a group's accounts. ``run``: weex_sync, fetch, naive, storage
    (peers.py), dlt (dlt_peer.py), or tick (the late-fills scenario's next minute: the clock moves, new fills)."""

    label: str
    run: str = "weex_sync"
    group: str = ""
    db: str = ""  # steps naming the same database share it; "" is a fresh one per run
    config: dict = field(default_factory=dict)  # merged into weex_sync's config.yaml
    args: tuple[str, ...] = ()
    sim: dict = field(default_factory=dict)  # simulator settings applied before the step
    repeat: int = 1
    stop_after: float | None = None  # SIGTERM after this many seconds (rows not checked then)
    start_at: float | None = None  # runs beside the step before, started this much later


@dataclass(frozen=True)
class Figure:
    """A row of the table: ``value`` and ``baseline`` computed from the runner's results, their
    ratio, and a target on the ratio (on the value where there is no ratio)."""

    measure: str
    value: Callable[[Runner], float]
    unit: str = ""
    baseline: Callable[[Runner], float] | None = None
    base_label: str = ""
    ratio: str = "x"  # value / baseline as 1.23x or as 45 % ("%"); "speedup": baseline / value
    target: tuple[str, float] | None = None  # (">=" | "<=" | "<", goal)
    extra: Callable[[Runner], str] | None = None  # shown after the value


@dataclass(frozen=True)
class Scenario:
    name: str
    groups: tuple[Group, ...]
    steps: tuple[Step, ...]
    figures: tuple[Figure, ...]
    start_days: float = 32  # sync.start_time, days ago
    sim: dict = field(default_factory=dict)
    notes: Callable[[Runner], list[str]] | None = None  # Markdown below the table


def med(label: str, key: str = "wall_s") -> Callable[[Runner], float]:
    return lambda r: getattr(r.median(label), key)


def mean(label: str, key: str) -> Callable[[Runner], float]:
    return lambda r: statistics.fmean(r.all(label, key))


def rate(label: str, n: int) -> Callable[[Runner], float]:
    return lambda r: n / r.median(label).wall_s


def scenarios(s: Sizes) -> list[Scenario]:
    n, small, reps, v2 = s.backfill, s.backfill_small, s.repeats, {"weex": {"api_version": 2}}
    weight, window = s.budget
    limits = {"uid_weight": weight, "ip_weight": weight, "window_seconds": window}
    budget = {"weex": {"rate_limit": limits}}
    sim_budget = {"uid_limit": [weight, window], "ip_limit": [weight, window]}
    rate_n = int(s.rate_windows * weight / 5 * 100 * 1.5) + 10_000  # more than the run fetches
    sym2, sym5, fleet_n = [BTC, ETH], list(CONTRACTS), s.fleet_accounts
    cron = shared(merge(budget, {"sync": {"workers": 8}}), "cron")
    cron_max = (shared(cron, "cron-max"), ("--max-seconds", str(s.cron_max_seconds)))
    late_dbs = [(g, lb) for g in ("busy", "idle") for lb in (120, 0)]
    minutes = [
        step
        for k in range(1, s.late_minutes + 1)
        for step in (
            Step(f"minute {k}", "tick", "busy", config={"minute": k, "late": k < s.late_minutes}),
            *(Step(f"{g} lookback {lb}", group=g, db=f"{g}{lb}", config=lookback(lb))
              for g, lb in late_dbs),
        )
    ]  # fmt: skip
    # fmt: off
    return [
        Scenario(
            "backfill",
            (Group("big", 1, {BTC: n}), Group("small", 1, {BTC: small})),
            (
                Step("fetch-only", "fetch", "big", repeat=reps),
                Step("weex_sync", group="big", repeat=reps),
                Step("fetch-only v2", "fetch", "big", config=v2, repeat=reps),
                Step("weex_sync v2", group="big", config=v2, repeat=reps),
                Step("weex_sync small", group="small"),
                Step("naive", "naive", "big"),
            ),
            (
                Figure(f"fills/s, {n:,} fills, 1 account", rate("weex_sync", n), "fills/s",
                       rate("naive", n), "naive"),
                Figure("fills/s vs the fetch-only loop (same requests, no database)",
                       rate("weex_sync", n), "fills/s", rate("fetch-only", n), "fetch-only",
                       "%", (">=", 0.5)),
                Figure("fills/s on v3 vs on v2 (weex.api_version: 2)", rate("weex_sync", n),
                       "fills/s", rate("weex_sync v2", n), "v2", "%"),
                Figure("fetch-only loop on v3 vs on v2", rate("fetch-only", n), "fills/s",
                       rate("fetch-only v2", n), "v2", "%"),
                Figure("fills requests / minimum (per 7-day window: 1 + fills // 100)",
                       lambda r: max(r.all("weex_sync", "requests")), "requests",
                       lambda r: r.min_requests("big"), "minimum", "x", ("<=", 1.05)),
                Figure(f"peak RSS, {n:,} vs {small:,} fills", med("weex_sync", "rss_mb"), "MB",
                       med("weex_sync small", "rss_mb"), f"{small:,} fills", "x", ("<=", 1.1)),
                Figure("peak RSS (largest run)", lambda r: max(r.all("weex_sync", "rss_mb")),
                       "MB", target=("<", 100)),
                Figure("peak RSS vs the naive baseline", med("weex_sync", "rss_mb"), "MB",
                       med("naive", "rss_mb"), "naive"),
            ),
            notes=lambda r: cpu_notes(r, ("fetch-only", "weex_sync", "weex_sync v2", "naive")),
        ),
        Scenario(
            "storage",
            (),
            (Step("storage", "storage", config={"fills": n}),),
            (
                Figure(f"rows/s, {n:,} parsed fills, batches of 1,000 (Store.save_batch)",
                       lambda r: n / r.median("storage").result["save_batch"]["seconds"],
                       "rows/s", lambda r: n / r.median("storage").result["naive"]["seconds"],
                       "row by row", "x", (">=", 10)),
            ),
        ),
        Scenario(
            "idle_fleet",
            (Group("idle", s.idle_accounts, {BTC: 3, ETH: 3}),),
            (
                Step("warm", group="idle", db="fleet", config={"sync": {"workers": 32}}),
                *(Step(f"workers={w}", group="idle", db="fleet", config={"sync": {"workers": w}},
                       sim={"latency": 0.05}) for w in (1, 8, 32)),
            ),
            tuple(
                Figure(f"idle pass, {s.idle_accounts:,} accounts (symbols: all), 50 ms per "
                       f"response, workers={w}", med(f"workers={w}"), "s", med("workers=1"),
                       "workers=1", "speedup", (">=", 8),
                       extra=requests_of(f"workers={w}"))
                for w in (8, 32)
            ),
        ),
        Scenario(
            "rate_limit",
            (Group("big", 1, {BTC: rate_n}),),
            (
                Step("limited", group="big", db="rl", config=budget, sim=sim_budget,
                     stop_after=s.rate_windows * window + 2),
                Step("finish", group="big", db="rl", sim={"uid_limit": None, "ip_limit": None}),
            ),
            (
                Figure(f"share of {weight} weight / {window:g} s used over {s.rate_windows} "
                       "whole windows", lambda r: budget_share(r, "limited", s), "%",
                       target=(">=", 90)),
                Figure("HTTP 429 answers", med("limited", "status_429"), "x 429",
                       target=("<=", 0)),
            ),
        ),
        Scenario(
            "dlt_peer",
            (Group("big", 1, {BTC: n}),),
            tuple(step for _ in range(reps)  # interleaved: background noise hits both alike
                  for step in (Step("weex_sync", group="big"), Step("dlt", "dlt", "big"))),
            (
                Figure(f"fills/s, {n:,} fills, 1 account", rate("weex_sync", n), "fills/s",
                       rate("dlt", n), "dlt", "x", (">=", 3)),
                Figure("peak RSS", med("weex_sync", "rss_mb"), "MB", med("dlt", "rss_mb"), "dlt"),
            ),
            notes=lambda r: cpu_notes(r, ("weex_sync", "dlt")),
        ),
        Scenario(
            "late",
            (
                Group("busy", s.late_accounts, {BTC: 50, ETH: 50}, days=(5, 1)),
                Group("idle", s.late_accounts, {BTC: 50, ETH: 50}, days=(5, 1)),
            ),
            (
                *(Step(f"warm {g} {lb}", group=g, db=f"{g}{lb}", config=lookback(lb))
                  for g, lb in late_dbs),
                *minutes,
            ),
            tuple(
                Figure(f"{what} per pass, {g} ({s.late_accounts} accounts), lookback 120 s",
                       mean(f"{g} lookback 120", key), unit, mean(f"{g} lookback 0", key),
                       "lookback 0")
                for g in ("busy", "idle")
                for what, key, unit in (("requests", "requests", ""),
                                        ("fills re-read", "reread", ""),
                                        ("pass time", "wall_s", "s"))
            ) + (
                Figure("late fills (5-110 s) not stored at the end, lookback 120 s",
                       lambda r: r.all("busy lookback 120", "late_missed")[-1], "missed",
                       lambda r: r.all("busy lookback 0", "late_missed")[-1], "lookback 0", "",
                       ("<=", 0), extra=lambda r: f"of {len(r.late['busy'])} late fills"),
            ),
            start_days=6,
            sim={"latency": 0.05},
            notes=late_notes,
        ),
        Scenario(
            "fleet",
            (Group("fleet", fleet_n, {BTC: 5, ETH: 5, SOL: 5}, days=(2, 1 / 24)),),
            (
                Step("warm all", group="fleet", db="all", config={"sync": {"workers": 32}}),
                Step("warm 2", group="fleet", db="sym2", config=symbols(sym2, 32)),
                Step("warm 5", group="fleet", db="sym5", config=symbols(sym5, 32)),
                Step("idle all", group="fleet", db="all", config=budget,
                     sim={"latency": 0.05, **sim_budget}),
                Step("cron A", group="fleet", db="all", config=cron),
                Step("cron B", group="fleet", db="all", config=cron, start_at=s.cron_gap),
                Step("cron-max A", group="fleet", db="all", config=cron_max[0], args=cron_max[1]),
                Step("cron-max B", group="fleet", db="all", config=cron_max[0], args=cron_max[1],
                     start_at=s.cron_gap),
                Step("idle 2", group="fleet", db="sym2", config=merge(budget, symbols(sym2))),
                Step("idle 5", group="fleet", db="sym5", config=merge(budget, symbols(sym5))),
            ),
            (
                Figure(f"idle pass, {fleet_n:,} accounts x 3 contracts, symbols: all",
                       med("idle all"), "s", lambda r: budget_floor(r, "idle all", s),
                       "budget floor", extra=lambda r: requests(r, "idle all")),
                *(Figure(f"idle pass, {k} listed symbols", med(f"idle {k}"), "s",
                         med("idle all"), "symbols: all",
                         extra=requests_of(f"idle {k}")) for k in (2, 5)),
                *(Figure(f"two cron passes {s.cron_gap:g} s apart{how}, one budget file: 429s",
                         med(f"{label} A", "status_429"), "x 429", target=("<=", 0),
                         extra=cron_extra_of(label))
                  for label, how in (("cron", ""),
                                     ("cron-max", f", --max-seconds {s.cron_max_seconds}"))),
                Figure("oldest account's staleness at the end (from sync_status), "
                       f"--max-seconds {s.cron_max_seconds}", med("cron-max B", "stale_s"), "s",
                       med("cron B", "stale_s"), "no limit"),
            ),
            start_days=3,
            sim={"symbols": CONTRACTS},
            notes=lambda r: capacity_notes(r, s),
        ),
    ]
    # fmt: on


def lookback(seconds: int) -> dict:
    return {"sync": {"lookback_seconds": seconds}}


def symbols(listed: list[str], workers: int = 8) -> dict:
    return {"sync": {"symbols": listed, "workers": workers}}


def shared(config: dict, name: str) -> dict:
    """``config`` with the rate-budget file ``name``, shared by the steps naming it (every other
    run has its own)."""
    return merge(config, {"weex": {"rate_limit": {"shared_file": name}}})


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


# ---------------------------------------------------------------------------------------------
# Figures and notes that need more than one number
# ---------------------------------------------------------------------------------------------


def requests(r: Runner, label: str) -> str:
    m = r.median(label)
    return f"{m.requests:,} requests, {m.status_429} x 429"


def requests_of(label: str) -> Callable[[Runner], str]:
    return lambda r: requests(r, label)


def budget_share(r: Runner, label: str, s: Sizes) -> float:
    """Accepted weight in the first whole windows from the first accepted request, as a
    percentage of what the budget allows in them."""
    times = sorted(r.median(label).ok_times)
    used = sum(t < times[0] + s.rate_windows * s.budget[1] for t in times) * 5
    return 100 * used / (s.budget[0] * s.rate_windows)


def budget_floor(r: Runner, label: str, s: Sizes) -> float:
    """The shortest pass the budget allows for the requests made: one window's worth at once,
    the rest at the budget's rate."""
    per_window = s.budget[0] // 5
    return max(0, r.median(label).requests - per_window) / per_window * s.budget[1]


def cron_extra(r: Runner, label: str) -> str:
    a, b = r.median(f"{label} A"), r.median(f"{label} B")
    ok, skipped = (a.summary.get(k, 0) + b.summary.get(k, 0) for k in ("ok", "skipped"))
    return (
        f"{a.requests:,} requests, {ok:,} accounts synced, {skipped:,} skipped; passes of "
        f"{a.wall_s:.0f} s and {b.wall_s:.0f} s, both done after {a.group_wall_s:.0f} s"
    )


def cron_extra_of(label: str) -> Callable[[Runner], str]:
    return lambda r: cron_extra(r, label)


def capacity_notes(r: Runner, s: Sizes) -> list[str]:
    lines = [
        (f"Accounts one machine keeps synced within 1, 5 and 15 minutes at {s.budget[0]} weight / "
        f"{s.budget[1]:g} s per IP, from the measured idle passes: sustained requests/s (after "
        "the first window, which a fresh budget lets through at once) / requests per account."),
        "",
        "| mode | requests per account | sustained requests/s | 1 min | 5 min | 15 min |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, mode in (("idle all", "symbols: all"), ("idle 2", "2 listed symbols")):
        m = r.median(label)
        times = sorted(m.ok_times)
        first = sum(t < times[0] + s.budget[1] for t in times)
        rps = (len(times) - first) / max(times[-1] - times[0], 1e-9)
        per_account = m.requests / s.fleet_accounts
        cells = " | ".join(f"{int(rps / per_account * 60 * k):,}" for k in (1, 5, 15))
        lines.append(f"| {mode} | {per_account:.2f} | {rps:.2f} | {cells} |")
    return lines + ["", "Idle accounts: each 100 new fills in an account costs one more request."]


def late_notes(r: Runner) -> list[str]:
    lines = ["| pass | requests | fetched | inserted | re-read | late (weex_sync) | s |"]
    lines.append("|---|---|---|---|---|---|---|")
    for label in ("busy lookback 120", "busy lookback 0", "idle lookback 120", "idle lookback 0"):
        for k, m in enumerate(r.results[label], 1):
            t = m.summary
            lines.append(f"| {label}, minute {k} | {m.requests} | {t['fetched']} "
                         f"| {t['inserted']} | {m.reread} | {t['late']} | {m.wall_s:.1f} |")  # fmt: skip
    return lines


def cpu_notes(r: Runner, labels: tuple[str, ...]) -> list[str]:
    return [
        f"{label} (median run): {m.wall_s:.1f} s wall; CPU s: client {m.cpu_s:.1f}, PostgreSQL "
        f"{m.pg_cpu_s:.1f}, simulator {m.sim_cpu_s:.1f}, anyone else {m.others_cpu_s:.1f} (of "
        f"{os.cpu_count()} CPUs x wall = {(os.cpu_count() or 1) * m.wall_s:.1f})"
        for label, m in ((label, r.median(label)) for label in labels)
    ]


# ---------------------------------------------------------------------------------------------
# Plumbing: PostgreSQL, the simulator process, measured subprocesses
# ---------------------------------------------------------------------------------------------


def sql(statement: str, params: tuple = (), dbname: str = "postgres") -> list:
    conn = psycopg2.connect(dbname=dbname, **PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall() if cur.description else []
    conn.close()
    return rows


def fleet_config(path: Path, dbname: str, base_url: str, users: list, limits: dict) -> Path:
    """A one-process fleet's config.yaml at ``path`` (its budget file beside it): the
    scenarios that run weex_sync by hand (strict_exchange.py, idle_cpu.py)."""
    data = {
        "database": {**PG, "password": "", "dbname": dbname, "sslmode": "disable"},
        "weex": {
            "base_url": base_url,
            "timeout_seconds": 30,
            "rate_limit": {**limits, "shared_file": str(path.with_suffix(".budget"))},
        },
        "sync": {
            "start_time": int(time.time() * 1000) - 3 * 86_400_000,
            "workers": 8,
            "min_interval_seconds": 0,
            "users": users,
        },
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def programs(baseline: str | None, work: Path) -> list[tuple[str, str]]:
    """(path, label) of this weex_sync.py and, with ``baseline``, that git revision's first
    (written into ``work``)."""
    found = [(str(ROOT / "weex_sync.py"), "weex_sync")]
    if baseline:
        old = work / "baseline_weex_sync.py"
        shown = ["git", "-C", str(ROOT), "show", f"{baseline}:weex_sync.py"]
        old.write_bytes(subprocess.run(shown, check=True, capture_output=True).stdout)
        found.insert(0, (str(old), f"weex_sync {baseline}"))
    return found


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not OVERRIDE_ENV.match(k)}
    return env | {"PYTHONPATH": f"{ROOT}:{ROOT / 'dev'}", **extra}


class SimProcess:
    """sim_server.py in its own process; ``call`` sends one command and returns the answer."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen([PY, str(BENCH / "sim_server.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())  # fmt: skip
        self.base_url: str = self.call(spec)["base_url"]

    def call(self, command: dict) -> dict:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None:  # never: __init__ opens both as pipes
            raise RuntimeError("simulator: no pipe to talk through")
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        answer = json.loads(stdout.readline() or '{"error": "the simulator exited"}')
        if "error" in answer:
            raise RuntimeError(f"simulator: {answer['error']}")
        return answer

    def close(self) -> None:
        try:
            self.proc.communicate('{"cmd": "quit"}\n', timeout=10)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            self.proc.kill()
            self.proc.wait()


class StepArgs(TypedDict, total=False):
    """measure()'s keyword arguments for a step, besides its command line (Runner.prepare)."""

    stdin: str
    env: dict[str, str]
    cwd: str


@dataclass
class Measured:
    """One measured subprocess, and what the simulator and the database say about it."""

    label: str
    wall_s: float
    cpu_s: float  # user + system of the process (wait4)
    rss_mb: float  # peak RSS (wait4)
    exit_code: int
    summary: dict  # weex_sync's pass summary line
    result: dict  # what a baseline printed (JSON)
    stderr_tail: str
    sim_cpu_s: float = 0.0  # the simulator's CPU time meanwhile; for steps run side by side
    pg_cpu_s: float = 0.0  # ... PostgreSQL's for the bench's databases, and
    others_cpu_s: float = 0.0  # ... the rest of the machine's: anyone else's, a sign of noise
    requests: int = 0  # fills requests the simulator saw (with those of steps running beside)
    status_429: int = 0
    group_wall_s: float = 0.0  # until every step running beside it was done
    rows: int | None = None
    late_missed: int = 0  # late fills visible before the run started but not stored
    stale_s: float | None = None  # seconds since the stalest account's last successful sync
    ok_times: list[float] = field(default_factory=list, repr=False)

    @property
    def reread(self) -> int:
        return self.summary.get("fetched", 0) - self.summary.get("inserted", 0)


def measure(label: str, cmd: list[str], stdin: str = "", stop_after: float | None = None,
            **popen: Any) -> Measured:  # fmt: skip
    """Runs ``cmd`` to completion (SIGTERM after ``stop_after`` s); CPU and peak RSS come from
    wait4() on exactly this child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.monotonic()
        popen.setdefault("env", child_env())
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, **popen)
        LIVE.add(proc)
        if proc.stdin is None:  # never: stdin=PIPE
            raise RuntimeError(f"{label}: no pipe to its stdin")
        proc.stdin.write(stdin.encode())
        proc.stdin.close()
        timers = [threading.Timer(3600, proc.kill)]
        if stop_after is not None:
            timers.append(threading.Timer(stop_after, proc.send_signal, (signal.SIGTERM,)))
        for timer in timers:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        for timer in timers:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        LIVE.discard(proc)
        out.seek(0)
        err.seek(0)
        stderr, stdout = err.read(), out.read().strip()
    summary = list(SUMMARY_RE.finditer(stderr))
    run = Measured(
        label=label,
        wall_s=round(wall, 3),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        rss_mb=round(usage.ru_maxrss / 1024, 1),
        exit_code=proc.returncode,
        summary={k: int(v or 0) for k, v in summary[-1].groupdict().items()} if summary else {},
        result=json.loads(stdout.splitlines()[-1]) if stdout.startswith("{") else {},
        stderr_tail="".join(stderr.splitlines(keepends=True)[-15:]),
    )
    log(f"  {label}: {run.wall_s:.2f} s, {run.cpu_s:.2f} s CPU, {run.rss_mb} MB, "
        f"exit {run.exit_code}")  # fmt: skip
    return run


def busy_cpu() -> float:
    """CPU seconds the machine has spent on anything but idling, since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def wait_quiet(patience: float = 600) -> None:
    """Waits (up to ``patience`` s) until nobody else keeps the machine busy: less than 15 % of
    its CPUs used over 2 s while the bench itself is idle. Noise that starts later shows in the
    runs' others_cpu_s."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        before = busy_cpu()
        time.sleep(2)
        used = (busy_cpu() - before) / 2 / (os.cpu_count() or 1)
        if used < 0.15:
            return
        log(f"  the machine is {used:.0%} busy with something else: waiting")


class PostgresCpu(threading.Thread):
    """CPU seconds of the PostgreSQL processes working for the bench (backends of bench_*
    databases, the server's background processes), polled every 0.5 s until stop() (a process
    that exits meanwhile loses at most its last 0.5 s); whether a process is ours is decided
    once per pid."""

    CLIENT = re.compile(r"\d+\.\d+\.\d+\.\d+\(\d+\)|\[local\]")
    ours: ClassVar[dict[int, bool]] = {}

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.first, self.done = self.sample(), threading.Event()
        self.last = dict(self.first)
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.last.update(self.sample())

    def stop(self) -> float:
        self.done.set()
        self.join()
        self.last.update(self.sample())
        return sum(used - self.first.get(pid, 0.0) for pid, used in self.last.items())

    @classmethod
    def sample(cls) -> dict[int, float]:
        used = {}
        for p in psutil.process_iter(["ppid", "cpu_times"]):
            t = p.info["cpu_times"]
            if t is None or POSTMASTER[0] not in (p.pid, p.info["ppid"]):
                continue
            if p.pid not in cls.ours:
                with contextlib.suppress(psutil.Error):
                    title = " ".join(p.cmdline())
                    cls.ours[p.pid] = " bench_" in title or not cls.CLIENT.search(title)
            if cls.ours.get(p.pid):
                used[p.pid] = t.user + t.system
        return used


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"check failed: {message}")


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


class Runner:
    """Runs one scenario: its simulator, its databases, its steps; then its figures, which read
    the results through median() and all() (the simulator still runs then)."""

    def __init__(self, sc: Scenario, workdir: Path, profile: bool) -> None:
        self.sc, self.workdir, self.profile = sc, workdir / sc.name, profile
        self.workdir.mkdir()
        self.accounts = {g.name: [account(g.name, i) for i in range(g.count)] for g in sc.groups}
        self.served = {  # fills visible per group and contract, but the late ones
            g.name: Counter({c: k * g.count for c, k in g.fills.items()}) for g in sc.groups
        }
        self.late: dict[str, list[tuple[str, int]]] = {}  # group -> [(trade id, visible at)]
        self.dbs: dict[str, str] = {}
        self.results: dict[str, list[Measured]] = {}
        self.profiles: dict[str, str] = {}
        self.sim: SimProcess | None = None
        self.budget_window = 0.0  # > 0 while the simulator enforces a rate budget
        self.t0 = self.minute = int(time.time() * 1000)  # now; the late scenario's minute 0

    @property
    def simulator(self) -> SimProcess:
        """The scenario's simulator (one without accounts has none)."""
        if self.sim is None:
            raise RuntimeError(f"{self.sc.name}: no simulator (the scenario has no accounts)")
        return self.sim

    def median(self, label: str) -> Measured:
        runs = sorted(self.results[label], key=lambda m: m.wall_s)
        return runs[len(runs) // 2]

    def all(self, label: str, key: str) -> list:
        return [getattr(m, key) for m in self.results[label]]

    def days_ago(self, days: float) -> int:
        return self.t0 - int(days * DAY_MS)

    def run(self) -> list[FigureRow]:
        accounts = []
        for g in self.sc.groups:
            span = {"start_ms": self.days_ago(g.days[0]), "end_ms": self.days_ago(g.days[1])}
            accounts += [a | {"fills": g.fills} | span for a in self.accounts[g.name]]
        if accounts:
            spec = {"seed": 1, "symbols": CONTRACTS[:2], "accounts": accounts}
            self.sim = SimProcess(spec | self.sc.sim)
        try:
            steps = list(self.sc.steps)
            while steps:
                together = [steps.pop(0)]
                while steps and steps[0].start_at is not None:
                    together.append(steps.pop(0))
                self.run_steps(together)
            return [figure_row(self.sc.name, f, self) for f in self.sc.figures]
        finally:
            for proc in list(LIVE):  # only after an error or a signal
                proc.kill()
            if self.sim:
                self.sim.close()
            for name in self.dbs.values():
                sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def database(self, key: str) -> str:
        if key not in self.dbs:
            name = f"bench_{self.sc.name}_{os.getpid()}_{len(self.dbs)}"
            sql(f'DROP DATABASE IF EXISTS "{name}"')
            sql(f'CREATE DATABASE "{name}"')
            self.dbs[key or name] = name
            return name
        return self.dbs[key]

    def run_steps(self, together: list[Step]) -> None:
        first = together[0]
        if first.sim:
            self.simulator.call({"cmd": "set", **first.sim})
            limits = [first.sim.get(k) for k in ("uid_limit", "ip_limit") if k in first.sim]
            if limits:
                self.budget_window = max((w for _, w in filter(None, limits)), default=0.0)
        if first.run == "tick":
            return self.tick(first)
        for i in range(first.repeat):
            log(f"{self.sc.name}: {', '.join(s.label for s in together)} ({i + 1}/{first.repeat})")
            if self.budget_window:  # start with an empty budget, in the client and the exchange
                time.sleep(self.budget_window + 0.5)
            wait_quiet()
            self.run_together(together)

    def run_together(self, together: list[Step]) -> None:
        """The steps side by side, each started ``start_at`` after the one before."""
        prepared = [self.prepare(step) for step in together]
        before = self.sim.call({"cmd": "reset_stats"}) if self.sim else {}
        cpu = (busy_cpu(), sum(psutil.Process().cpu_times()[:2]), PostgresCpu())
        started = time.monotonic()
        runs: list[Measured] = []

        def go(i: int) -> None:
            time.sleep(sum(s.start_at or 0 for s in together[1 : i + 1]))
            cmd, kwargs, _ = prepared[i]
            runs.append(
                measure(together[i].label, cmd, stop_after=together[i].stop_after, **kwargs)
            )

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(together))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = self.sim.call({"cmd": "stats"}) if self.sim else {}
        sim_cpu = round(stats.get("cpu_seconds", 0) - before.get("cpu_seconds", 0), 2)
        pg_cpu, own_cpu = cpu[2].stop(), sum(psutil.Process().cpu_times()[:2]) - cpu[1]
        others = busy_cpu() - cpu[0] - own_cpu - pg_cpu - sim_cpu - sum(m.cpu_s for m in runs)
        for step, (_, _, db) in zip(together, prepared):
            run = next(m for m in runs if m.label == step.label)
            run.group_wall_s = round(time.monotonic() - started, 1)
            run.requests, run.status_429 = (
                stats.get("fills_requests", 0),
                stats.get("status_429", 0),
            )
            run.ok_times = stats.get("fills_ok_times", [])
            run.sim_cpu_s, run.pg_cpu_s, run.others_cpu_s = (
                sim_cpu,
                round(pg_cpu, 2),
                round(others, 2),
            )
            self.results.setdefault(step.label, []).append(run)
            self.verify(step, run, db, before.get("now_ms", 0))
            if self.profile and step.run == "weex_sync" and not step.db and not self.profiles:
                self.profiles[f"{self.sc.name}: {step.label}"] = py_spy(*self.prepare(step)[:2])

    def prepare(self, step: Step) -> tuple[list[str], StepArgs, str]:
        """The command line of a step, measure()'s other arguments, and the step's database."""
        db = self.database(step.db) if step.run in ("weex_sync", "naive", "dlt") else ""
        if step.run == "weex_sync":
            cmd = [PY, str(ROOT / "weex_sync.py"), "--once", "-c", self.config(step, db)]
            return [*cmd, *step.args], {"cwd": str(self.workdir)}, db
        if step.run == "storage":
            dbs = [self.database(""), self.database("")]
            pg = [str(PG[k]) for k in ("host", "port", "user")]
            return (
                [PY, str(BENCH / "peers.py"), "storage", str(step.config["fills"]), *pg, *dbs],
                {},
                "",
            )
        version = str(step.config.get("weex", {}).get("api_version", 3))
        args = [self.simulator.base_url, version, str(self.days_ago(self.sc.start_days))]
        kwargs: StepArgs = {"stdin": json.dumps(self.accounts[step.group][0])}
        if step.run == "naive":
            args.append(f"host={PG['host']} port={PG['port']} user={PG['user']} dbname={db}")
        if step.run == "dlt":
            where = Path(tempfile.mkdtemp(dir=self.workdir))
            url = f"postgresql://{PG['user']}:unused@{PG['host']}:{PG['port']}/{db}"
            env = child_env(DESTINATION__POSTGRES__CREDENTIALS=url, DLT_DATA_DIR=str(where))
            kwargs |= {"env": env | {"RUNTIME__DLTHUB_TELEMETRY": "false"}, "cwd": str(where)}
            args.append(str(where / "pipelines"))
        script = ["dlt_peer.py"] if step.run == "dlt" else ["peers.py", step.run]
        return [PY, str(BENCH / script[0]), *script[1:], *args], kwargs, db

    def config(self, step: Step, dbname: str) -> str:
        """weex_sync's config.yaml for a step (its own rate-budget file unless the step names a
        shared one)."""
        base = {
            "database": {**PG, "password": "", "dbname": dbname, "sslmode": "disable"},
            "weex": {"base_url": self.simulator.base_url, "timeout_seconds": 30},
            # runs follow one another at once: no claims, unless a step's config sets them
            "sync": {"start_time": self.days_ago(self.sc.start_days), "min_interval_seconds": 0},
        }
        config = merge(merge(base, {"weex": {"rate_limit": HIGH_LIMITS}}), step.config)
        limits = config["weex"]["rate_limit"]
        limits["shared_file"] = str(self.workdir / limits.get("shared_file", f"rl{time.time()}"))
        config["sync"]["users"] = self.accounts[step.group]
        path = Path(tempfile.mkstemp(suffix=".yaml", dir=self.workdir)[1])
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    def verify(self, step: Step, run: Measured, db: str, started_ms: int) -> None:
        """The exit code, and the rows against what the simulator served."""
        ok = (0, 1) if step.stop_after else (0,)
        check(run.exit_code in ok, f"{step.label} exited {run.exit_code}:\n{run.stderr_tail}")
        served = sum(self.served.get(step.group, Counter()).values())
        if step.run in ("fetch", "dlt", "naive"):
            check(run.result.get("fills") == served, f"{step.label}: {run.result}, not {served}")
            check(run.result.get("load_ok", True), f"{step.label}: dlt reports failed jobs")
        elif step.run == "storage":
            for method, result in run.result.items():
                check(result["rows"] == step.config["fills"], f"{method}: {result['rows']} rows")
        elif step.run == "weex_sync" and not step.stop_after:
            self.verify_weex_sync(step, run, db, started_ms)

    def verify_weex_sync(self, step: Step, run: Measured, db: str, started_ms: int) -> None:
        """Every fill served in the pass's scope is stored, and nothing else; late fills visible
        before the pass are all stored, unless the lookback is 0 (counted as missed)."""
        listed = step.config.get("sync", {}).get("symbols", "all")
        served = self.served[step.group]
        expected = sum(k for c, k in served.items() if listed == "all" or c in listed)
        late = self.late.get(step.group, [])
        query = "SELECT trade_id FROM trade_fills WHERE trade_id = ANY(%s)"
        stored_late = {r[0] for r in sql(query, ([i for i, _ in late],), db)}
        run.rows = sql("SELECT count(*) FROM trade_fills", dbname=db)[0][0]
        counts = f"{run.rows} rows, served {expected} + {len(stored_late)} late"
        check(run.rows == expected + len(stored_late), f"{step.label}: {counts}")
        run.late_missed = len({i for i, at in late if at <= started_ms} - stored_late)
        lookback = step.config.get("sync", {}).get("lookback_seconds", 120)
        check(lookback == 0 or not run.late_missed, f"{step.label}: {run.late_missed} late missed")
        run.stale_s = sql(STALEST_SQL, dbname=db)[0][0]

    def tick(self, step: Step) -> None:
        """The late-fills scenario's next minute: the simulator's clock moves a minute on from
        the last (without waiting for it; further if the last minute's passes took more than
        30 s), every busy account gets 1-60 new fills in the last 30 s and, but in the last
        minute, a quarter of them one fill that shows 5-110 s late, at a moment between this
        minute's passes and the next minute's."""
        k, group = step.config["minute"], step.group
        now = self.simulator.call({"cmd": "stats"})["now_ms"]
        minute = self.minute = max(self.minute + MINUTE_MS, now + 30_000)
        self.simulator.call({"cmd": "set", "clock_offset_ms": minute - int(time.time() * 1000)})
        rng, fills, late = random.Random(k), [], []
        for i, a in enumerate(self.accounts[group]):
            symbol, count = (BTC, ETH)[i % 2], 1 + (7 * i + k) % 60
            fills.append([a["api_key"], symbol, count, minute - 30_000, minute - 1000])
            self.served[group][symbol] += count
            if step.config["late"] and i % 4 == k % 4:
                visible, lateness = minute + rng.randint(30_000, 59_000), rng.randint(5, 110)
                late.append([a["api_key"], symbol, visible - lateness * 1000, lateness * 1000])
        self.simulator.call({"cmd": "generate", "fills": fills})
        ids = self.simulator.call({"cmd": "add_fills", "fills": late})["trade_ids"]
        self.late.setdefault(group, []).extend((i, f[2] + f[3]) for i, f in zip(ids, late))

    def min_requests(self, group: str) -> int:
        """The fewest fills requests a v3 walk of the group's first account can make: per
        7-day window from sync.start_time, one plus one per 100 fills in it."""
        key, start = self.accounts[group][0]["api_key"], self.days_ago(self.sc.start_days)
        ask = {"cmd": "window_counts", "api_key": key, "start_ms": start, "span_ms": 7 * DAY_MS}
        return sum(1 + count // 100 for count in self.simulator.call(ask)["counts"])


def account(group: str, i: int) -> dict:
    keys = ("api_key", "secret_key", "passphrase")
    return {"user_id": f"{group}{i}"} | {k: f"{k[:6]}-{group}-{i}" for k in keys}


# ---------------------------------------------------------------------------------------------
# The report, and the optional profile
# ---------------------------------------------------------------------------------------------


def fmt(x: float, unit: str = "") -> str:
    text = f"{x:,.0f}" if abs(x) >= 100 or x == int(x) else f"{x:,.2f}"
    return f"{text} {unit}".strip()


class FigureRow(TypedDict):
    """A row of the table (figure_row), as the report's JSON holds it."""

    scenario: str
    measure: str
    value: float
    baseline: float | None
    ratio: float | None  # None: no baseline, or a baseline of 0
    target: str
    met: bool | None
    shown: list[str]  # the table's cells: weex_sync, baseline, ratio


def figure_row(scenario: str, f: Figure, r: Runner) -> FigureRow:
    value = f.value(r)
    base = f.baseline(r) if f.baseline else None
    ratio = None if not base else base / value if f.ratio == "speedup" else value / base
    shown = [
        fmt(value, f.unit) + (f" ({f.extra(r)})" if f.extra else ""),
        "-" if base is None else f"{f.base_label} {fmt(base, f.unit)}",
        "-" if ratio is None or not f.ratio else f"{ratio:.0%}" if f.ratio == "%" else f"{ratio:.2f}x",
    ]  # fmt: skip
    row: FigureRow = {"scenario": scenario, "measure": f.measure, "value": value, "baseline": base,
                      "ratio": ratio, "target": "-", "met": None, "shown": shown}  # fmt: skip
    if f.target:
        op, goal = f.target
        on_ratio = bool(f.baseline and f.ratio)
        judged = ratio if on_ratio else value
        if judged is None:  # a target on the ratio, and a baseline of 0: no ratio to judge
            raise RuntimeError(f"{f.measure}: the baseline is {base}, the ratio has no value")
        row["met"] = {">=": judged >= goal, "<=": judged <= goal, "<": judged < goal}[op]
        text = (
            (f"{goal:.0%}" if f.ratio == "%" else f"{goal:g}x") if on_ratio else fmt(goal, f.unit)
        )
        row["target"] = f"{op} {text}"
    return row


def py_spy(cmd: list[str], popen: StepArgs) -> str:
    """One extra run under py-spy, sampling the thread that holds the GIL: the functions with
    the most own and inclusive samples. Not a measured run."""
    binary = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if binary is None:
        return "py-spy is not installed (pip install -r bench/requirements.txt)"
    raw = Path(tempfile.mkstemp(suffix=".txt")[1])
    record = [binary, "record", "--format", "raw", "--rate", "250", "--gil", "-o", str(raw)]
    run = measure("py-spy", [*record, "--", *cmd], **popen)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r" \((?:.*/)?([^/]+?)(?::\d+)?\)$", r" (\1)", f) for f in stack.split(";")]
        total, own[frames[-1]] = total + int(count), own[frames[-1]] + int(count)
        inclusive.update(dict.fromkeys(set(frames[1:]), int(count)))
    raw.unlink()
    lines = [f"exit {run.exit_code}; GIL held {total / 250 / run.wall_s:.0%} of {run.wall_s:.1f} s"]
    for title, counts in (("own", own), ("inclusive", inclusive)):
        lines += [f"{title} %:"] + [
            f"{100 * c / total:5.1f}  {f}" for f, c in counts.most_common(15)
        ]
    return "\n".join(lines)


def code_hashes() -> dict[str, str]:
    return {
        f"{path.stem}_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in (ROOT / "weex_sync.py", ROOT / "dev" / "weex_sim.py")
    }


def environment() -> dict:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": sql("SHOW server_version")[0][0],
        "git_head": git.stdout.strip(),
        **code_hashes(),
    }


def markdown(
    rows: list[FigureRow], meta: dict, notes: dict[str, list[str]], profiles: dict[str, str]
) -> str:
    lines = [
        f"# weex_sync benchmark {meta['started']}{' (--quick)' if meta['quick'] else ''}",
        "",
        (f"{meta['runtime_s']:.0f} s on {os.cpu_count()} CPUs. weex_sync {meta['weex_sync_sha256']}"
        ", v3 unless said otherwise. Client rate limits out of the way and no simulator limit, "
        "except in rate_limit and the fleet's measured passes."),
        "",
        "| scenario | measure | weex_sync | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        cells = [r["scenario"], r["measure"], *r["shown"], r["target"], met]
        lines.append("| " + " | ".join(cells) + " |")
    for name, text in notes.items():
        lines += ["", f"## {name}", "", *text]
    for name, profile in profiles.items():
        lines += ["", f"## py-spy profile: {name}", "", "```", profile, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    names = [sc.name for sc in scenarios(FULL)]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", action="append", choices=names, help="this scenario only")
    parser.add_argument("--profile", action="store_true", help="one extra run under py-spy")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally: clean up, then exit
    conn = psycopg2.connect(dbname="postgres", **PG)
    POSTMASTER[0] = psutil.Process(conn.get_backend_pid()).ppid()
    conn.close()
    code_before, t0, started = code_hashes(), time.monotonic(), dt.datetime.now(dt.UTC)
    rows: list[FigureRow] = []
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}  # scenario -> label -> runs (asdict)
    notes: dict[str, list[str]] = {}
    profiles: dict[str, str] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="weex_bench_") as tmp:
        for sc in scenarios(sizes):
            if args.only and sc.name not in args.only:
                continue
            log(f"== {sc.name}")
            runner = Runner(sc, Path(tmp), args.profile)
            try:
                rows += runner.run()
                notes[sc.name] = sc.notes(runner) if sc.notes else []
            except Exception as exc:  # noqa: BLE001 - one failure must not hide the others
                log(f"{sc.name} FAILED: {exc}")
                errors[sc.name] = str(exc)
            runs[sc.name] = {
                label: [{k: v for k, v in asdict(m).items() if k != "ok_times"} for m in ms]
                for label, ms in runner.results.items()
            }
            profiles |= runner.profiles
    if code_hashes() != code_before:
        errors["code"] = "weex_sync.py or weex_sim.py changed during the run: measure again"
    meta = {"started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick}
    meta |= {"runtime_s": round(time.monotonic() - t0, 1), **code_before}
    report = {**meta, "sizes": asdict(sizes), "environment": environment(), "errors": errors}
    report |= {"rows": rows, "notes": notes, "profiles": profiles, "runs": runs}
    table = markdown(rows, meta, {k: v for k, v in notes.items() if v}, profiles)
    stamp = started.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if args.quick else "")
    RESULTS.mkdir(exist_ok=True)
    for name in (stamp, "latest"):
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (RESULTS / f"{name}.md").write_text(table)
    print(table)
    for name, error in errors.items():
        print(f"{name} FAILED: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
