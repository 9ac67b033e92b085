"""A new user's first hour: the demo, the cron line with its environment file, the messages a
first mistake earns, and the alerting an operator wires up (--status --max-age, metrics)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import weex_sync
from harness import (
    BTC,
    DAY_MS,
    DEPLOY,
    DEV,
    ETH,
    ROOT,
    START_MS,
    Database,
    Harness,
    create_scratch_database,
    database_exists,
    finish,
    make_account,
    stored_fills,
    wait_for,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess:
    """dev/demo.py (make demo) as a user runs it, in this environment."""
    return subprocess.run(
        [sys.executable, str(DEV / "demo.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_demo_runs_when_db_port_points_where_nothing_answers(tmp_path):
    """DB_PORT=5499 make demo: the demo falls back to a throwaway server, and its weex_sync
    runs do not inherit DB_PORT (which would override the config it wrote)."""
    demo_dir = tmp_path / "demo"
    before = (
        (ROOT / ".demo" / "config.yaml").read_bytes()
        if (ROOT / ".demo" / "config.yaml").exists()
        else None
    )
    env = {**os.environ, "DB_PORT": str(free_port()), "DEMO_DIR": str(demo_dir)}
    result = run_demo(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("(exit code 0)") == 4
    assert "Traceback" not in result.stdout + result.stderr
    assert "throwaway PostgreSQL" in result.stdout
    # the follow-ups it prints run when pasted: the venv's python, not the script's shebang
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert commands
    for command in commands:  # "<venv>/bin/python weex_sync.py --once -c <dir>/config.yaml"
        interpreter, script = command.split()[:2]
        assert Path(interpreter).name.startswith("python") and script == "weex_sync.py", command
    assert (demo_dir / "config.yaml").exists()  # and the user's .demo/ is left alone
    after = (
        (ROOT / ".demo" / "config.yaml").read_bytes()
        if (ROOT / ".demo" / "config.yaml").exists()
        else None
    )
    assert after == before


def test_the_demos_printed_commands_work_when_pasted(tmp_path, pg: dict, scratch_db_names):
    """3.1's demo stopped its simulator, so its "pasteable" --once waited 13 s and failed, and
    --status then showed every pair as error. It now says how to start the simulator again on
    the same port with the same accounts; each printed command then works as pasted."""
    dbname = f"weex_demo_test_{os.getpid()}"
    scratch_db_names.append(dbname)
    env = {**os.environ, "DEMO_DIR": str(tmp_path / "demo"), "DB_NAME": dbname}
    env.update(DB_HOST=pg["host"], DB_PORT=str(pg["port"]), DB_USER=pg["user"])
    demo = run_demo(env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    commands = [line[2:] for line in demo.stdout.splitlines() if line.startswith("$ ")]
    [restart] = re.findall(r"^  (\S+ \S*weex_sim\.py --port \d+)$", demo.stdout, re.MULTILINE)

    sim = subprocess.Popen(
        restart.split(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        port = int(restart.rsplit(" ", 1)[1])
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, timeout=20)
        clean = {k: v for k, v in os.environ.items() if not re.match(r"(DB_|POSTGRES_|WEEX_)", k)}
        for command in commands:
            pasted = subprocess.run(
                command,
                shell=True,
                cwd=ROOT,
                env=clean,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert pasted.returncode == 0, (command, pasted.stdout, pasted.stderr)
            if "--status" in command:  # every pair's latest pass: the pasted --once, a success
                rows = pasted.stdout.strip().splitlines()[1:]
                assert rows and all(row.split()[2] == "success" for row in rows), pasted.stdout
    finally:
        sim.terminate()
        sim.wait(timeout=10)


def test_the_examples_as_shipped_name_only_their_placeholders(tmp_path, capsys):
    """3.1's weex_sync.env.example showed a passphrase with spaces that validation refused. As
    shipped, the examples earn one line naming a placeholder to fill in; with every placeholder
    filled in (mechanically), they validate."""
    config, env = ROOT / "config.yaml.example", DEPLOY / "weex_sync.env.example"
    assert weex_sync.main(["--status", "-c", str(config), "--env-file", str(env)], environ={}) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("still the example's placeholder: fill in the real value"), line

    filled = tmp_path / "weex_sync.env"
    filled.write_text(env.read_text().replace("fill-in-", "filled-"))
    environ = weex_sync.read_env_file(str(filled))
    assert environ and not any(v.startswith(weex_sync.PLACEHOLDER) for v in environ.values())
    loaded = weex_sync.load_config(str(config), environ)
    assert [u.user_id for u in loaded.sync.users] == ["user1", "user2"]
    assert loaded.database.password == "filled-the-database-password"


def test_the_install_steps_work_as_pasted_in_a_throwaway_home(
    harness: Harness, db: Database, sim, tmp_path
):
    """The README's install block, line by line, in a fresh directory standing for /opt/weex_sync
    (3.1's steps cloned into the home useradd had just filled, and copying "the five files"
    flat broke the next `cp deploy/...`). Root's lines (sudo) and crontab -e are what this test
    cannot run; pip is the test's own venv; the user's edits of config.yaml and weex_sync.env
    are made as a user would."""
    account = make_account(sim, 1, [BTC, ETH])
    for symbol in (BTC, ETH):
        sim.generate_fills(account.api_key, symbol, 30, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    harness.accounts = [account]
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Install on a server.*?```bash\n(.*?)```", readme, re.DOTALL)[1]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    assert lines[0].startswith("sudo git clone") and lines[0].endswith("/opt/weex_sync")
    home = tmp_path / "opt" / "weex_sync"
    shutil.copytree(ROOT, home, ignore=shutil.ignore_patterns(".venv", ".git", ".demo", "*.pyc"))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home)}

    def sh(line: str) -> subprocess.CompletedProcess:
        line = line.replace(
            "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt",
            f"ln -s {Path(sys.executable).parent.parent} .venv",
        )
        return subprocess.run(
            ["/bin/bash", "-c", line],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    for line in lines:
        if line.startswith(("sudo ", "crontab ")):
            continue
        if "weex_sync.py" in line:  # the user has edited config.yaml and weex_sync.env by now
            config = yaml.safe_load((home / "config.yaml").read_text())
            config["database"] = {
                "host": harness.pg["host"],
                "port": harness.pg["port"],
                "user": harness.pg["user"],
                "password": "${DB_PASSWORD}",
                "dbname": harness.db_name,
            }
            config["weex"]["base_url"] = sim.base_url
            config["sync"]["users"] = config["sync"]["users"][:1]
            config["sync"]["start_time"] = START_MS - DAY_MS
            (home / "config.yaml").write_text(yaml.safe_dump(config))
            secrets = (home / "weex_sync.env").read_text()
            for name, value in (
                ("DB_PASSWORD", "'-'"),
                ("USER1_API_KEY", account.api_key),
                ("USER1_SECRET_KEY", account.secret_key),
                ("USER1_PASSPHRASE", account.passphrase),
            ):
                secrets = re.sub(f"^{name}=.*$", f"{name}={value}", secrets, flags=re.MULTILINE)
            (home / "weex_sync.env").write_text(secrets)
        done = sh(line)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
    assert stored_fills(db, account.user_id) == harness.expected(account)
    assert (home / "log").is_dir() and oct((home / "weex_sync.env").stat().st_mode)[-3:] == "600"


def test_the_crontab_line_works_with_the_env_file_as_shipped(harness: Harness, db: Database, sim):
    """config.yaml.example and weex_sync.env.example, filled in, under the crontab.example line
    (run by bash with cron's bare environment): the pass runs and logs to log/."""
    users = [make_account(sim, n, [BTC, ETH]) for n in (1, 2)]
    for user in users:
        sim.generate_fills(user.api_key, BTC, 40, start_ms=START_MS, end_ms=START_MS + DAY_MS)
    install = harness.tmp_path / "opt"
    (install / "log").mkdir(parents=True)
    shutil.copy(ROOT / "weex_sync.py", install)
    config = yaml.safe_load((ROOT / "config.yaml.example").read_text())
    config["sync"]["start_time"] = START_MS - DAY_MS  # what a user edits: where history starts
    (install / "config.yaml").write_text(yaml.safe_dump(config))
    env_file = (DEPLOY / "weex_sync.env.example").read_text()
    for n, user in enumerate(users, start=1):
        for field in ("api_key", "secret_key", "passphrase"):
            name = f"USER{n}_{field.upper()}"
            env_file = re.sub(
                f"^{name}=.*$", f"{name}='{getattr(user, field)}'", env_file, flags=re.MULTILINE
            )
    env_file += (
        f"DB_HOST={harness.pg['host']}\nDB_PORT={harness.pg['port']}\nDB_USER={harness.pg['user']}\n"
        f"DB_PASSWORD=''\nDB_NAME={harness.db_name}\nWEEX_BASE_URL={sim.base_url}\n"
    )
    (install / "weex_sync.env").write_text(env_file)
    [line] = [
        line for line in (ROOT / "crontab.example").read_text().splitlines() if line[:1] == "*"
    ]
    command = line.split(None, 5)[5].replace("/opt/weex_sync", str(install))
    command = command.replace(".venv/bin/python", sys.executable)

    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(harness.tmp_path), "SHELL": "/bin/bash"}
    result = subprocess.run(["/bin/bash", "-c", command], env=cron_env, timeout=120, check=False)

    log = (install / "log" / "weex_sync.log").read_text()
    assert result.returncode == 0, log
    assert "pass " in log and "finished" in log and "0 failed" in log
    for user in users:
        assert stored_fills(db, user.user_id) == harness.expected(user, BTC)


BAD_ENV_LINES = {
    "USER1_API_KEY = spaced-around-equals": "not KEY=value",
    "USER1_PASSPHRASE=a value with spaces": "has spaces, quotes or shell characters",
    "export USER1_SECRET_KEY=x": "no 'export'",
}


def test_a_bad_env_file_line_is_one_error_in_the_log_through_the_crontab_line(
    harness: Harness, tmp_path
):
    """With 2.0's crontab line the shell failed on such lines ('command not found'), weex_sync
    never ran and the log stayed empty: now each bad line is an error naming file and line."""
    install = tmp_path / "opt"
    (install / "log").mkdir(parents=True)
    shutil.copy(ROOT / "weex_sync.py", install)
    shutil.copy(ROOT / "config.yaml.example", install / "config.yaml")
    lines = ["# secrets", "DB_PASSWORD=''", *BAD_ENV_LINES]
    (install / "weex_sync.env").write_text("\n".join(lines) + "\n")
    [line] = [
        line for line in (ROOT / "crontab.example").read_text().splitlines() if line[:1] == "*"
    ]
    command = line.split(None, 5)[5].replace("/opt/weex_sync", str(install))
    command = command.replace(".venv/bin/python", sys.executable)

    cron_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHELL": "/bin/sh"}
    result = subprocess.run(["/bin/sh", "-c", command], env=cron_env, timeout=60, check=False)

    assert result.returncode == 2
    log = (install / "log" / "weex_sync.log").read_text().splitlines()
    assert len(log) == 3, log
    for number, (_, reason) in enumerate(BAD_ENV_LINES.items(), start=3):
        assert f"configuration error: weex_sync.env:{number}: " in log[number - 3]
        assert reason in log[number - 3]
    assert "spaces" not in " ".join(log).split("configuration error")[0]  # no values shown
    assert "a value with" not in "\n".join(log)


def test_the_env_file_grammar_is_what_systemd_and_a_shell_read_alike(tmp_path):
    path = tmp_path / "weex_sync.env"
    path.write_text(
        '# comment\n\nA=plain-value_1.2\nB=\'with spaces $x \\ "q"\'\nC="double"\nD=\n  E=x\n'
    )
    assert weex_sync.read_env_file(str(path)) == {
        "A": "plain-value_1.2",
        "B": 'with spaces $x \\ "q"',
        "C": "double",
        "D": "",
        "E": "x",
    }
    for bad in ("A=$HOME", 'A="$x"', "A=a'b", "A=x;y", "1A=x", "A =x", "A=x \\"):
        path.write_text(bad + "\n")
        with pytest.raises(weex_sync.ConfigError, match="weex_sync.env:1: "):
            weex_sync.read_env_file(str(path))


def test_variables_already_set_win_over_the_env_file(harness: Harness, db: Database, sim, tmp_path):
    harness.accounts = [make_account(sim, 1)]
    env_file = tmp_path / "weex_sync.env"
    env_file.write_text("DB_NAME=not_this_one\n")
    assert harness.run("--env-file", str(env_file), env={"DB_NAME": harness.db_name}) == 0
    assert db.status()[-1]["status"] == "success"


@pytest.mark.parametrize("flags", ["--status", "--status --max-age 10m", "--status --json"])
def test_status_on_a_missing_database_is_exit_3_and_creates_nothing(
    harness: Harness, sim, pg, scratch_db_names, flags
):
    harness.accounts = [make_account(sim, 1)]
    name = f"weex_missing_{os.getpid()}"
    scratch_db_names.append(name)
    harness.database["dbname"] = name

    assert harness.run(*flags.split()) == 3

    line = [line for line in harness.last_log.splitlines() if "ERROR" in line]
    assert len(line) == 1 and f'database "{name}" does not exist (nothing was created)' in line[0]
    assert not database_exists(pg, name)
    assert "created database" not in harness.last_log


def test_status_on_a_database_without_tables_is_exit_3_and_creates_nothing(
    harness: Harness, sim, pg, scratch_db_names
):
    harness.accounts = [make_account(sim, 1)]
    name = create_scratch_database(pg, scratch_db_names, "weex_empty")
    harness.database["dbname"] = name

    assert harness.run("--status") == 3

    assert "has no weex_sync tables (nothing was created): run a pass first" in harness.last_log
    conn = psycopg2.connect(dbname=name, **pg)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert cur.fetchone()[0] == 0
    conn.close()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ("--check --dry-run", "--dry-run: not with --check"),
        ("--check --since 2026-01-01", "--since: not with --check"),
        ("--status --since 2026-01-01", "--since: not with --status"),
        ("--status --dry-run", "--dry-run: not with --status"),
        ("--status --metrics-file m.prom", "--metrics-file: not with --status"),
        ("--check --max-seconds 5", "--max-seconds: not with --check"),
        ("--status --lock-wait 5", "--lock-wait: not with --status"),
    ],
)
def test_flags_that_make_no_sense_together_are_exit_2(harness: Harness, sim, flags, named):
    harness.accounts = [make_account(sim, 1)]
    assert harness.run(*flags.split()) == 2
    assert named in harness.last_log and len(harness.last_log.strip().splitlines()) == 1
    assert sim.requests == []


def test_without_a_config_file_it_says_where_it_looked(tmp_path, capsys, monkeypatch):
    """In the working directory, then beside weex_sync.py (here a directory of its own, so that
    a developer's config.yaml beside the checkout's weex_sync.py cannot make the test pass)."""
    work, app = tmp_path / "work", tmp_path / "app"
    work.mkdir()
    app.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(weex_sync, "__file__", str(app / "weex_sync.py"))
    assert weex_sync.main(["--once"], environ={}) == 2
    err = capsys.readouterr().err
    assert f"no config file: looked for {work / 'config.yaml'} and {app / 'config.yaml'}" in err
    assert "weex.api_key" not in err


def test_an_unreachable_exchange_is_one_line_per_pair_and_fails_fast(
    harness: Harness, db: Database, sim
):
    harness.fleet(3, fills=1, symbols=(BTC,))
    harness.weex.update(base_url=f"http://127.0.0.1:{free_port()}", max_retries=3)
    harness.sync["workers"] = 1
    config = harness.config()
    config["weex"]["base_url"] = harness.weex["base_url"]

    began = time.monotonic()
    assert harness.run("-q", config=config) == 1
    took = time.monotonic() - began

    lines = harness.last_log.strip().splitlines()
    assert len(lines) == 4, lines  # three pairs and the summary
    assert all("cannot reach the exchange: connection to 127.0.0.1" in line for line in lines[:3])
    assert "Retrying" not in harness.last_log and "urllib3" not in harness.last_log
    assert took < 6  # the first pair's retries (0.5 + 1 + 2 s at most), then at once
    assert [r["requests_count"] for r in db.status()] == [0, 0, 0]  # nothing went out


def test_the_smaller_things_a_new_user_meets(harness: Harness, db: Database, sim):
    harness.accounts = [make_account(sim, 1, [BTC, ETH])]
    assert harness.run() == 0
    assert "1 user, 2 (user, symbol) pairs" in harness.last_log  # not "1 users"

    assert harness.run("--symbol", "SOLUSDT") == 2  # the v3 form is understood, and explained
    assert "--symbol cmt_solusdt: not configured" in harness.last_log
    assert "listed: cmt_btcusdt, cmt_ethusdt" in harness.last_log

    harness.database["port"] = free_port()
    assert harness.run() == 3
    [line] = harness.last_log.strip().splitlines()
    assert "Connection refused; Is the server running" in line  # the line break kept as "; "


def test_sigterm_between_loop_passes_says_what_happens(harness: Harness, db: Database, sim):
    harness.accounts = [make_account(sim, 1)]
    process = harness.popen("--loop", "60")
    wait_for(lambda: db.scalar("SELECT count(*) FROM sync_status") == 1)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    code, err = finish(process, timeout=10)
    assert code == 0
    assert "SIGTERM received: stopping" in err
    assert "finishing the current" not in err
    assert err.strip().splitlines()[-1].endswith("stopped after 1 pass")


def test_the_simulator_tells_how_to_use_it():
    result = subprocess.run(
        [sys.executable, str(DEV / "weex_sim.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo-key-1" in result.stdout and "demo-pass-1" in result.stdout
    assert "base_url" in result.stdout


def test_check_prints_a_credential_problem_in_full(harness: Harness, db: Database, sim):
    account = make_account(sim, 1)
    account.passphrase = "wrong-passphrase"
    harness.accounts = [account]
    assert harness.run("--check") == 1
    table, problem = harness.out.split("\n")[1:3], harness.out.strip().splitlines()[-1]
    assert "FAILED (below)" in table[1]
    assert problem.startswith("user1: credentials rejected (HTTP 401")
    assert problem.endswith("check this user's api_key, secret_key and passphrase; not retried")
    assert "wrong-passphrase" not in harness.out


# --- alerting ----------------------------------------------------------------------------


def test_status_max_age_is_a_healthcheck(harness: Harness, db: Database, sim):
    accounts = harness.fleet(3, fills=30, symbols=(BTC,))
    assert harness.run() == 0
    assert harness.run("--status", "--max-age", "10m") == 0
    assert harness.out.strip() == "OK: all 3 pairs synced through less than 600 s ago"

    # user2: its cursor two hours behind (a pass that has not run since); user3: credentials
    # now rejected, however recent its last success; user4: never synced
    db.rows(
        "UPDATE sync_cursor SET last_end = last_end - 7200000,"
        " synced_through = synced_through - 7200000 WHERE user_id = 'user2'"
    )
    accounts[2].secret_key = "wrong"
    harness.accounts.append(make_account(sim, 4))
    harness.run("--user", "user3")

    assert harness.run("--status", "--max-age", "10m") == 1
    lines = harness.out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(
        "FAILING user3/cmt_btcusdt: latest pass failed: credentials rejected"
    )
    assert re.fullmatch(
        r"STALE user2/cmt_btcusdt: synced through \S+Z, 73\d\d s ago \(limit 600 s\)", lines[1]
    ), lines[1]
    assert lines[2] == "STALE user4/cmt_btcusdt: never synced"

    assert harness.run("--status", "--max-age", "10m", "--json") == 1
    rows = {row["user_id"]: row for row in yaml.safe_load(harness.out)}
    assert {u: r["stale"] for u, r in rows.items()} == {
        "user1": False,
        "user2": True,
        "user3": True,
        "user4": True,
    }
    assert [u for u, r in rows.items() if r["failing"]] == ["user3"]
    assert 7200 < rows["user2"]["behind_seconds"] < 7400
    assert harness.run("--status", "--max-age", "soon") == 2


def test_metrics_file_is_prometheus_text_and_counters_carry_on(
    harness: Harness, db: Database, sim, tmp_path
):
    accounts = harness.fleet(2, fills=120, symbols=(BTC,))
    metrics = tmp_path / "textfile" / "weex_sync.prom"
    metrics.parent.mkdir()
    assert harness.run("--metrics-file", str(metrics)) == 0
    sim.add_fill(accounts[0].api_key, BTC, created_time=int(time.time() * 1000) - 500)
    accounts[1].secret_key = "wrong"
    assert harness.run("--metrics-file", str(metrics)) == 1

    families = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}

    def value(name: str, **labels) -> float:
        family = families[name.removesuffix("_total")]
        [sample] = [
            s
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sample.value

    assert families["weex_sync_fills_inserted"].type == "counter"  # weex_sync_..._total
    assert value("weex_sync_fills_inserted_total", user="user1", symbol=BTC) == 121
    assert value("weex_sync_fills_inserted_total", user="user2", symbol=BTC) == 120
    assert value("weex_sync_passes_total") == 2
    assert value("weex_sync_pair_errors_total", user="user2", symbol=BTC) == 1
    assert value("weex_sync_last_sync_success", user="user1", symbol=BTC) == 1
    assert value("weex_sync_last_sync_success", user="user2", symbol=BTC) == 0
    success = value("weex_sync_last_success_timestamp_seconds", user="user2", symbol=BTC)
    assert time.time() - 60 < success < time.time()
    assert value("weex_sync_pass_exit_code") == 1
    assert value("weex_sync_pass_pairs", outcome="error") == 1
    assert value("weex_sync_requests_total", user="user1", symbol=BTC) >= 2
    assert not list(metrics.parent.glob(".weex_sync_metrics.*"))  # written atomically
