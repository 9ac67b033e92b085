"""The demo behind `make demo`: a WEEX simulator with three accounts and two symbols, one
weex_sync pass into a local database, the README's example queries, then a second pass that
picks up only the fills that arrived in between, and the --check and --status reports.

PostgreSQL: the server at DB_HOST:DB_PORT (default 127.0.0.1:5432, user postgres); when nothing
answers there, a throwaway server from a pip wheel (dev/pg_fallback.py). The demo database is
weex_demo (DB_NAME overrides); it is dropped and recreated on each run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import yaml
from psycopg2 import sql

from pg_fallback import ensure_postgres
from weex_sim import Simulator

ROOT = Path(__file__).resolve().parents[1]  # the repository: README.md, weex_sync.py
DEV = ROOT / "dev"
SYMBOLS = ["cmt_btcusdt", "cmt_ethusdt"]
DAY_MS = 86_400_000


def readme_query(title: str) -> str:
    """The README's example query under the comment line `-- <title>`."""
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sql\n(.*?)```", readme, re.DOTALL):
        if block.startswith(f"-- {title}"):
            return block
    raise SystemExit(f"README.md has no example query titled {title!r}")


def show(conn: psycopg2.extensions.connection, title: str) -> None:
    query = readme_query(title)
    with conn.cursor() as cur:
        cur.execute(query)
        names = [d.name for d in cur.description]
        rows = [[str(v) for v in row] for row in cur.fetchall()]
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    print(f"\n{query.strip()}")
    print("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def fresh_database(pg: dict, name: str) -> None:
    conn = psycopg2.connect(dbname="postgres", **pg)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


# The config file written below has the database and exchange settings; variables that
# weex_sync reads as overrides (DB_PORT=5499 make demo) must not override it in the child.
OVERRIDES = re.compile(r"^(DB_|POSTGRES_|WEEX_)")


def shown(path: str | Path) -> str:
    """A path as a user pastes it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def run_cli(config_path: Path, *args: str) -> int:
    command = [sys.executable, str(ROOT / "weex_sync.py"), *args, "-c", str(config_path)]
    env = {k: v for k, v in os.environ.items() if not OVERRIDES.match(k)}
    pasteable = [
        shown(sys.executable),
        shown(ROOT / "weex_sync.py"),
        *args,
        "-c",
        shown(config_path),
    ]
    print(f"\n$ {' '.join(pasteable)}", flush=True)
    code = subprocess.run(command, check=False, env=env).returncode
    print(f"(exit code {code})")
    return code


def main() -> None:
    pg = ensure_postgres(
        os.environ.get("DB_HOST", "127.0.0.1"),
        int(os.environ.get("DB_PORT", "5432")),
        os.environ.get("DB_USER", "postgres"),
        os.environ.get("DB_PASSWORD", ""),
    )
    dbname = os.environ.get("DB_NAME", "weex_demo")
    fresh_database(pg, dbname)

    sim = Simulator(seed=1)
    start_ms = int(time.time() * 1000) - 30 * DAY_MS
    users = []
    for n in (1, 2, 3):
        key, secret, passphrase = f"demo-key-{n}", f"demo-secret-{n}", f"demo-pass-{n}"
        sim.add_account(key, secret, passphrase)
        for i, symbol in enumerate(SYMBOLS):
            count = 400 * n + 150 * i
            sim.generate_fills(key, symbol, count, start_ms=start_ms, end_ms=start_ms + 29 * DAY_MS)
        users.append(
            {"user_id": f"user{n}", "api_key": key, "secret_key": secret, "passphrase": passphrase}
        )
    base_url = sim.start()
    print(f"WEEX simulator at {base_url}: 3 accounts x 2 symbols")

    workdir = Path(os.environ.get("DEMO_DIR") or ROOT / ".demo")  # the tests use their own
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config = {
        "database": {**pg, "dbname": dbname, "sslmode": "disable"},
        "weex": {"base_url": base_url},
        # symbols: all (the default); passes follow one another at once, not once a minute
        "sync": {"start_time": start_ms, "min_interval_seconds": 0, "users": users},
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"config written to {shown(config_path)}")

    try:
        if run_cli(config_path, "--once") != 0:
            raise SystemExit("the first pass failed: see its log above")
        conn = psycopg2.connect(dbname=dbname, **pg)
        show(conn, "Fills, volume and fees per user and symbol")
        show(conn, "The latest sync status per user and symbol")

        # Dated after the first pass: fills dated before its end would be (correctly) counted
        # as late, shown by the exchange after a pass had covered their time.
        now_ms = int(time.time() * 1000)
        for i in range(25):
            sim.add_fill("demo-key-2", "cmt_btcusdt", created_time=now_ms + i)
        time.sleep(0.1)  # the simulator serves a fill once its clock reaches the fill's time
        print("\n25 new fills for user2 / cmt_btcusdt arrived; the next pass fetches only those:")
        run_cli(config_path, "--once")
        conn.close()
        run_cli(config_path, "--check")
        run_cli(config_path, "--status")
    finally:
        sim.stop()
    if pg["port"] != int(os.environ.get("DB_PORT", "5432")):
        print("\nThe demo ran on a throwaway PostgreSQL, which stops now with the demo.")
        return
    where = f"-h {pg['host']} -p {pg['port']} -U {pg['user']} {dbname}"
    print(
        f"\nThe demo database {dbname} is left for you to explore (psql {where}); the next"
        f" make demo recreates it. Drop it with: dropdb {where}"
    )
    port = urlsplit(base_url).port
    print(
        "The simulator stopped with the demo. To paste the commands above, start one on the"
        " same port with the same accounts first (in another terminal; its fills differ):"
        f"\n  {shown(sys.executable)} {shown(DEV / 'weex_sim.py')} --port {port}"
    )


if __name__ == "__main__":
    main()
