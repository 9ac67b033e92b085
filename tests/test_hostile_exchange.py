"""A hostile exchange: whatever an exchange (or what stands in front of it) answers, weex_sync
keeps its promises. Each test is one promise an outside tester broke at some point, asserting
what a user relies on: rows in PostgreSQL, sync_status rows, exit codes, log lines and bounded
timings.

The exchange here is not weex_sim: it is a bare ThreadingHTTPServer whose answers each test
programs (any status, bytes and headers; trickled, stalled or dropped bodies; redirects; gzip
bombs; huge bodies), answering v2 or v3 by path. weex_sync runs in-process (``Harness.run``) or as
its own process (``Harness.popen``) where a test needs signals, --loop, its peak RSS or races.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import psycopg2
import pytest
import yaml

import weex_sync
from harness import (
    API_MODES,
    BTC,
    DAY_MS,
    ETH,
    START_MS,
    Account,
    Database,
    Harness,
    database_exists,
    finish,
    now_ms,
    spawn_weex_sync,
    wait_for,
)

pytestmark = pytest.mark.faults

API_VERSION = 3  # what a test speaks unless it is parametrized over both versions
both_versions = pytest.mark.parametrize("version", [2, 3], ids=["v2", "v3"])
FILLS_PATHS = {"/capi/v2/order/fills": 2, "/capi/v3/userTrades": 3}
TIME_PATHS = {"/capi/v2/market/time": 2, "/capi/v3/market/time": 3}
FAR_FUTURE = 99_999_999_999_999
LOG_LINE_RE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)
# error codes of each version, by meaning (see docs/weex-api.md)
SYMBOL_CODE = {2: "40034", 3: -1121}
CLOCK_CODE = {2: "40005", 3: -1043}


def dumps(value: Any) -> str:
    """JSON text in which a Decimal is written as the JSON number it is (1E-999999999)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


# --- the hostile exchange -----------------------------------------------------------------------


@dataclass
class Request:
    path: str
    params: dict[str, str]
    headers: dict[str, str]  # names in lower case
    at_ms: int

    @property
    def version(self) -> int:
        return 2 if self.path.startswith("/capi/v2/") else 3

    @property
    def key(self) -> str | None:
        return self.headers.get("access-key")

    @property
    def is_fills(self) -> bool:
        return self.path in FILLS_PATHS


@dataclass
class Reply:
    """What the exchange answers. ``body``: bytes as sent, anything else as JSON. At most one of
    trickle (seconds between the body's bytes), stall (headers, then nothing until the server
    stops) and drop_after (the whole body's Content-Length, this many bytes, then close)."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    trickle: float | None = None
    stall: bool = False
    drop_after: int | None = None
    trickle_head: float | None = None  # seconds between the bytes of the status line and headers

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return dumps(self.body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.exchange.serve(self)  # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (as weex_sync does on a body it refuses) is no error here."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class HostileExchange:
    """An HTTP server on 127.0.0.1 whose answers the test programs: ``app(request)`` first (None:
    go on), then ``fills(request)`` for the fills paths of either version; the time endpoints
    answer the time unless ``app`` says otherwise. Every request is recorded."""

    def __init__(self) -> None:
        self.app: Callable[[Request], Reply | None] = lambda request: None
        self.fills: Callable[[Request], Reply] = lambda request: answer(request, [])
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.exchange = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HostileExchange:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # wakes every trickling or stalled handler
        self.server.shutdown()
        self.server.server_close()

    def fills_requests(self, key: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.is_fills and (key is None or r.key == key)]

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        request = Request(
            url.path,
            dict(parse_qsl(url.query)),
            {k.lower(): v for k, v in handler.headers.items()},
            now_ms(),
        )
        with self._lock:
            self.requests.append(request)
        reply = self.app(request)
        if reply is None:
            if request.path in TIME_PATHS:
                name = "timestamp" if request.version == 2 else "serverTime"
                reply = Reply(body={name: now_ms()})
            elif request.is_fills:
                reply = self.fills(request)
            else:
                reply = Reply(404, {"code": "404", "msg": "no such path"})
        try:
            self._send(handler, reply)
        except OSError:  # the client went away: that is its right
            handler.close_connection = True

    def _send(self, handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        body = reply.payload()
        if reply.trickle_head is not None:
            head = f"HTTP/1.1 {reply.status} OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            for byte in head:
                if self.stopping.wait(reply.trickle_head):
                    break
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            handler.close_connection = True
            return
        handler.send_response(reply.status)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        for name, value in {**headers, **reply.headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if reply.stall:
            self.stopping.wait()
            handler.close_connection = True
        elif reply.trickle is not None:
            for byte in body:
                if self.stopping.wait(reply.trickle):
                    break
                handler.wfile.write(bytes([byte]))
            handler.close_connection = True
        elif reply.drop_after is not None:
            handler.wfile.write(body[: reply.drop_after])
            handler.close_connection = True
        else:
            handler.wfile.write(body)


def fill_time(fill: dict) -> int:
    return int(fill["createdTime"] if "createdTime" in fill else fill["time"])


def same_contract(a: Any, b: str) -> bool:
    return isinstance(a, str) and a.lower().removeprefix("cmt_") == b.lower().removeprefix("cmt_")


def answer(request: Request, fills: list[dict], always: tuple | list = ()) -> Reply:
    """A faithful exchange's answer in the request's version: ``fills`` filtered by symbol,
    orderId, startTime and endTime (no endTime: no upper bound), newest first, at most
    ``limit``; ``always`` fills are in every answer whatever was asked (hostile ones)."""
    params = request.params
    low = int(params.get("startTime", 0))
    high = int(params["endTime"]) if "endTime" in params else None
    matching = [
        f
        for f in fills
        if ("symbol" not in params or same_contract(f["symbol"], params["symbol"]))
        and ("orderId" not in params or str(f["orderId"]) == params["orderId"])
        and low <= fill_time(f)
        and (high is None or fill_time(f) <= high)
    ]
    matching = [*always, *sorted(matching, key=fill_time, reverse=True)]
    limit = int(params.get("limit", 100))
    page = matching[:limit]
    if request.version == 2:
        more = len(matching) > limit
        return Reply(body={"list": page, "nextFlag": more, "totals": len(matching)})
    return Reply(body=page)


def error_reply(request: Request, codes: dict, msg: str, status: int = 400) -> Reply:
    """An exchange error body of the request's version."""
    return Reply(status, {"code": codes[request.version], "msg": msg})


def contract_in(version: int, contract: str) -> str:
    return contract if version == 2 else contract.removeprefix("cmt_").upper()


def make_fill(version: int, trade_id: Any, at: Any, contract: str = BTC, **changes: Any) -> dict:
    """A good fill of either version (the contract's examples); ``changes`` set (or, None, drop)
    fields by their own names."""
    if version == 2:
        fill = {
            "tradeId": trade_id,
            "orderId": 555,
            "symbol": contract_in(2, contract),
            "positionSide": "LONG",
            "orderSide": "BUY",
            "fillSize": "0.002",
            "fillValue": "190.5",
            "fillFee": "0.1143",
            "createdTime": at,
        }
    else:
        fill = {
            "id": trade_id,
            "orderId": 555,
            "symbol": contract_in(3, contract),
            "side": "BUY",
            "price": "95250",
            "qty": "0.002",
            "commission": "0.1143",
            "commissionAsset": "USDT",
            "time": at,
        }
    fill.update(changes)
    return {k: v for k, v in fill.items() if v is not None}


# --- running weex_sync -------------------------------------------------------------------------


def timed_run(runner: Harness, *args: str) -> tuple[int, float]:
    """runner.run's exit code and how many seconds it took."""
    started = time.monotonic()
    code = runner.run(*args)
    return code, time.monotonic() - started


@pytest.fixture(name="version")
def api_version() -> int:
    """The API version a test speaks; ``both_versions`` overrides it."""
    return API_VERSION


@pytest.fixture
def exchange():
    server = HostileExchange().start()
    yield server
    server.stop()


@pytest.fixture
def second():
    """Another host, which records whatever reaches it (the target of redirects)."""
    server = HostileExchange().start()
    yield server
    server.stop()


@pytest.fixture
def runner(tmp_path, exchange, pg, test_db_name, db, capsys, version):
    """The harness against the hostile exchange: user1 (symbols: [BTC]), one retry, a 1 s
    timeout, the start just before START_MS."""
    runner = Harness(
        tmp_path,
        exchange,
        API_MODES["v3-newest" if version == 3 else "v2"],
        pg,
        test_db_name,
        capsys,
    )
    runner.add_user("user1")
    runner.weex.update(timeout_seconds=1, max_retries=1)
    runner.sync = {"start_time": START_MS - 1000, "workers": 4, "min_interval_seconds": 0}
    yield runner
    runner.kill_leftovers()


def clean_lines(log: str) -> list[str]:
    """The log's lines, each asserted to be one whole log line: no traceback, no message that
    spilled over a line break."""
    assert "Traceback" not in log, log
    lines = log.splitlines()
    for line in lines:
        assert LOG_LINE_RE.match(line), f"not a log line of its own: {line!r}\n{log}"
    return lines


def line_with(log: str, text: str) -> str:
    found = [line for line in clean_lines(log) if text in line]
    assert len(found) == 1, (text, log)
    return found[0]


def status_by_user(db: Database) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in db.status():
        rows.setdefault(row["user_id"], []).append(row)
    return rows


def only_status(db: Database, user_id: str = "user1", symbol: str = BTC) -> dict:
    rows = [r for r in db.status() if r["user_id"] == user_id and r["symbol"] == symbol]
    assert len(rows) == 1, rows
    return rows[0]


def stored_ids(db: Database, user_id: str = "user1") -> set[str]:
    return {
        r[0] for r in db.rows("SELECT trade_id FROM trade_fills WHERE user_id = %s", (user_id,))
    }


# --- 1. a fill dated in the far future ---------------------------------------------------------


@both_versions
def test_fill_far_in_the_future_is_quarantined_and_never_moves_the_cursor(
    runner, exchange, db, version
):
    good = make_fill(version, 1, START_MS + 10)
    future = make_fill(version, 2, FAR_FUTURE)
    exchange.fills = lambda request: answer(request, [good], always=[future])  # no filtering

    assert runner.run() == 1
    after = now_ms()

    row = only_status(db)
    assert row["status"] == "error"
    assert "outside the requested range" in row["error_message"]
    assert f"tradeId=2 at {FAR_FUTURE}" in row["error_message"]
    assert stored_ids(db) == {"1"}  # the good fill of that answer is stored
    assert db.rows("SELECT trade_id, trade_time FROM rejected_fills") == [("2", FAR_FUTURE)]
    assert db.scalar("SELECT count(*) FROM trade_fills WHERE trade_time > %s", (after,)) == 0
    for (synced_through,) in db.rows("SELECT synced_through FROM sync_cursor"):
        assert synced_through <= after
    requests = exchange.fills_requests()
    assert requests
    for request in requests:  # every request is bounded by the exchange's now
        assert "endTime" in request.params, request.params
        assert int(request.params["endTime"]) <= request.at_ms + 1000


@both_versions
def test_an_exchange_filtering_by_end_time_never_shows_it_and_later_fills_arrive(
    runner, exchange, db, version
):
    fills = [make_fill(version, 1, START_MS + 10), make_fill(version, 2, FAR_FUTURE)]
    exchange.fills = lambda request: answer(request, fills)

    assert runner.run() == 0, runner.last_log
    assert stored_ids(db) == {"1"}
    assert db.scalar("SELECT synced_through FROM sync_cursor") <= now_ms()

    fills.append(make_fill(version, 3, now_ms() - 2000))  # a real fill, arriving later
    assert runner.run() == 0, runner.last_log
    assert stored_ids(db) == {"1", "3"}
    assert db.scalar("SELECT synced_through FROM sync_cursor") <= now_ms()


# --- 2. one fill key, two contents -------------------------------------------------------------


@both_versions
def test_same_fill_key_in_two_symbols_is_an_error_naming_both(runner, exchange, db, version):
    runner.user.symbols = [BTC, ETH]
    btc = make_fill(version, 7, START_MS + 10, orderId=9)
    eth = make_fill(version, 7, START_MS + 10, contract=ETH, orderId=9)
    exchange.fills = lambda request: answer(request, [btc, eth])

    assert runner.run() == 1

    assert only_status(db, symbol=BTC)["status"] == "success"
    eth_row = only_status(db, symbol=ETH)
    assert eth_row["status"] == "error"
    assert BTC in eth_row["error_message"] and ETH in eth_row["error_message"]
    rows = db.rows("SELECT symbol, side, raw FROM trade_fills")
    assert len(rows) == 1  # no second row, and the first one untouched
    assert rows[0][:2] == (BTC, "1")
    assert rows[0][2] == json.loads(dumps(btc))


@both_versions
def test_a_rescan_meeting_a_stored_key_with_another_fee_is_an_error(runner, exchange, db, version):
    fee = "commission" if version == 3 else "fillFee"
    fills = [make_fill(version, 7, START_MS + 10)]
    exchange.fills = lambda request: answer(request, fills)
    assert runner.run() == 0, runner.last_log

    fills[0] = make_fill(version, 7, START_MS + 10, **{fee: "0.5"})
    assert runner.run("--since", str(START_MS)) == 1

    error = db.status()[-1]
    assert error["status"] == "error"
    assert "other contents" in error["error_message"]
    assert db.rows("SELECT fee FROM trade_fills") == [(Decimal("0.1143"),)]


@both_versions
def test_one_trade_id_twice_in_one_answer_differently_is_quarantined(runner, exchange, db, version):
    size = "qty" if version == 3 else "fillSize"
    twins = [
        make_fill(version, 7, START_MS + 10),
        make_fill(version, 7, START_MS + 10, **{size: "0.003"}),
    ]
    exchange.fills = lambda request: answer(request, twins)

    assert runner.run() == 1

    row = only_status(db)
    assert "2 fills rejected" in row["error_message"]
    assert "was served in 2 versions" in row["error_message"]
    assert stored_ids(db) == set()  # which one is the fill cannot be told
    assert db.scalar("SELECT count(*) FROM rejected_fills WHERE trade_id = '7'") == 2


# --- 3 and 4. wrong data, ids and symbols with a trailing newline --------------------------------


def run_cases(runner, exchange, db, cases: dict[str, tuple[dict, str | None]]) -> dict:
    """One user per case, all in one pass: a good fill, then the case's fill. ``cases``: name ->
    (changes to a good fill, the field the error must name; None: the fill is accepted).
    Returns the users by case name."""
    version = runner.api.version
    runner.accounts = []
    served = {}
    for n, (changes, field_name) in enumerate(cases.values(), start=1):
        user = runner.add_user(f"user{n}")
        good = [make_fill(version, 1, START_MS + 10)]
        case = [make_fill(version, 2, START_MS + 20, **changes)]
        # a case to reject comes in every answer; one to accept is an ordinary fill
        served[user.api_key] = (good, case) if field_name else (good + case, [])
    runner.sync["workers"] = len(cases)

    def fills(request: Request) -> Reply:
        good, hostile = served[request.key]
        return answer(request, good, always=hostile)

    exchange.fills = fills
    runner.run()
    clean_lines(runner.last_log)
    return dict(zip(cases, runner.accounts, strict=True))


def assert_rejected(db: Database, user: Account, name: str, field_name: str) -> None:
    row = only_status(db, user.user_id)
    assert row["status"] == "error", (name, row)
    message = row["error_message"]
    assert "1 fill rejected" in message, (name, message)
    assert f": {field_name} " in message and " is not " in message, (name, message)
    assert "\n" not in message
    # the good fill is stored, the bad one quarantined with its reason; the walk went on
    assert stored_ids(db, user.user_id) == {"1"}, name
    [(reason, raw)] = db.rows(
        "SELECT reason, raw FROM rejected_fills WHERE user_id = %s", (user.user_id,)
    )
    assert f": {field_name} " in reason and "\n" not in raw and "\x00" not in raw, (name, reason)


WRONG_DATA = {
    2: {
        "fillSize 0 beside a price": ({"fillSize": "0", "price": "95250"}, "fillSize"),
        "fillSize -1 beside fillPrice": ({"fillSize": "-1", "fillPrice": "95250"}, "fillSize"),
        "negative fillValue": ({"fillValue": "-190.5"}, "fillValue"),
        "fillSize 1_000": ({"fillSize": "1_000"}, "fillSize"),
        "fillSize with spaces": ({"fillSize": " 0.002 "}, "fillSize"),
        "negative fee is a rebate": ({"fillFee": "-0.05"}, None),
    },
    3: {
        "qty 0": ({"qty": "0"}, "qty"),
        "price -1": ({"price": "-1"}, "price"),
        "qty 1_000": ({"qty": "1_000"}, "qty"),
        "qty with spaces": ({"qty": " 0.002 "}, "qty"),
        "negative commission is a rebate": ({"commission": "-0.05"}, None),
    },
}


@both_versions
def test_wrong_amounts_are_rejected_naming_the_field_and_rebates_kept(
    runner, exchange, db, version
):
    cases = WRONG_DATA[version]
    users = run_cases(runner, exchange, db, cases)

    for name, (_, field_name) in cases.items():
        user = users[name]
        if field_name is None:
            assert only_status(db, user.user_id)["status"] == "success", name
            fees = db.rows(
                "SELECT trade_id, fee FROM trade_fills WHERE user_id = %s", (user.user_id,)
            )
            assert sorted(fees) == [("1", Decimal("0.1143")), ("2", Decimal("-0.05"))]
        else:
            assert_rejected(db, user, name, field_name)


NEWLINES = {
    2: {
        "tradeId": ({"tradeId": "123\n"}, "tradeId"),
        "orderId": ({"orderId": "123\n"}, "orderId"),
        "symbol": ({"symbol": "cmt_btcusdt\n"}, "symbol"),
    },
    3: {
        "id": ({"id": "123\n"}, "id"),
        "orderId": ({"orderId": "123\n"}, "orderId"),
        "symbol": ({"symbol": "BTCUSDT\n"}, "symbol"),
    },
}


@both_versions
def test_ids_and_symbols_with_a_trailing_newline_are_rejected(runner, exchange, db, version):
    cases = NEWLINES[version]
    users = run_cases(runner, exchange, db, cases)

    for name, (_, field_name) in cases.items():
        assert_rejected(db, users[name], name, field_name)


def test_a_user_id_with_a_newline_is_exit_2_before_anything_is_touched(
    runner, exchange, pg, scratch_db_names
):
    runner.user.user_id = "evil\n"
    runner.database["dbname"] = f"weex_hostile_{secrets.token_hex(4)}"
    scratch_db_names.append(runner.database["dbname"])

    assert runner.run() == 2

    assert "sync.users[0].user_id" in line_with(runner.last_log, "configuration error")
    assert exchange.requests == []
    assert not database_exists(pg, runner.database["dbname"])


# --- 5. NUL and lone surrogates in an exchange message ----------------------------------------


def test_nul_and_lone_surrogate_in_a_message_do_not_kill_a_loop(runner, exchange, db, version):
    hostile = runner.user
    runner.add_user("user2")
    fill = make_fill(version, 1, START_MS + 10)
    # JSON escapes: the parsed msg holds a NUL and an unpaired surrogate
    body = b'{"code": CODE, "msg": "bad\\u0000thing \\ud800"}'
    body = body.replace(b"CODE", json.dumps(SYMBOL_CODE[version]).encode())

    def fills(request: Request) -> Reply:
        return Reply(400, body) if request.key == hostile.api_key else answer(request, [fill])

    exchange.fills = fills
    process = runner.popen("--loop", "1")

    def two_passes() -> bool:
        assert process.poll() is None, process.communicate()[1]
        return len(status_by_user(db).get("user1", [])) >= 2

    wait_for(two_passes)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    exit_code, err = finish(process, timeout=15)

    assert exit_code == 0, err
    assert time.monotonic() - sent < 8
    clean_lines(err)
    rows = status_by_user(db)
    for row in rows["user1"]:
        assert row["status"] == "error"
        message = row["error_message"]
        assert "\x00" not in message and "\n" not in message
        assert "bad\\x00thing \\ud800" in message, message
    # user2 is never hurt by user1's messages (a pass the SIGTERM cut short says interrupted)
    assert any(r["status"] == "success" for r in rows["user2"])
    assert all(r["status"] == "success" or r["error_kind"] == "interrupted" for r in rows["user2"])
    assert stored_ids(db, "user2") == {"1"}


# --- 6. named one-line errors instead of tracebacks ---------------------------------------------


TRACEBACK_VALUES = {
    2: {
        "createdTime superscript two": ({"createdTime": "²"}, "createdTime"),
        "fillSize 1e-999999999 as a string": ({"fillSize": "1e-999999999"}, "fillSize"),
        "fillSize 1e-999999999 as a number": ({"fillSize": Decimal("1e-999999999")}, "fillSize"),
    },
    3: {
        "time superscript two": ({"time": "²"}, "time"),
        "qty 1e-999999999 as a string": ({"qty": "1e-999999999"}, "qty"),
        "qty 1e-999999999 as a number": ({"qty": Decimal("1e-999999999")}, "qty"),
    },
}


@both_versions
def test_values_that_raised_tracebacks_are_named_one_line_errors(runner, exchange, db, version):
    cases = TRACEBACK_VALUES[version]
    users = run_cases(runner, exchange, db, cases)  # asserts: no traceback, one line each

    for name, (_, field_name) in cases.items():
        assert_rejected(db, users[name], name, field_name)
        line_with(runner.last_log, f"{users[name].user_id}/{BTC}: error")


def test_json_nested_100000_deep_is_a_malformed_body_retried_then_an_error(runner, exchange, db):
    exchange.fills = lambda request: Reply(body=b"[" * 100_000 + b"]" * 100_000)

    assert runner.run() == 1

    row = only_status(db)
    assert "not JSON" in row["error_message"], row["error_message"]
    assert "gave up after 2 attempts" in row["error_message"]
    assert row["requests_count"] == 2 == len(exchange.fills_requests())
    line_with(runner.last_log, "user1/cmt_btcusdt: error")


def test_an_unreadable_exchange_clock_is_a_named_error(runner, exchange, db, version):
    def app(request: Request) -> Reply | None:
        if request.path in TIME_PATHS:
            name = "timestamp" if request.version == 2 else "serverTime"
            return Reply(body=f'{{"{name}": Infinity}}'.encode())
        if request.is_fills:
            return error_reply(request, CLOCK_CODE, "invalid ACCESS_TIMESTAMP")
        return None

    exchange.app = app

    assert runner.run() == 1

    row = only_status(db)
    assert "cannot read the exchange's clock" in row["error_message"], row["error_message"]
    assert f"/capi/v{version}/market/time" in row["error_message"]
    clean_lines(runner.last_log)


CONFIG_ERRORS = {
    "euro sign in a passphrase": ("passphrase", "pass€word-1", "sync.users[0].passphrase"),
    "cyrillic api_key": ("api_key", "ключ-123", "sync.users[0].api_key"),
    "start_time of 5,000 digits": ("start_time", "1" * 5000, "configuration error"),
    "--since of 5,000 digits": ("--since", "1" * 5000, "--since"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_values_that_raised_tracebacks_are_exit_2(runner, exchange, case):
    key, value, named = CONFIG_ERRORS[case]
    args: list[str] = []
    path = None
    if key == "--since":
        args = ["--since", value]
    elif key == "start_time":  # an integer yaml.safe_dump itself refuses to write
        runner.sync["start_time"] = "START_TIME_HERE"
        text = yaml.safe_dump(runner.config()).replace("START_TIME_HERE", value)
        path = runner.tmp_path / "config.yaml"
        path.write_text(text, encoding="utf-8")
    else:
        setattr(runner.user, key, value)

    assert runner.run(*args, config=path) == 2

    line = line_with(runner.last_log, "configuration error")
    assert named in line
    assert value not in runner.last_log
    assert exchange.requests == []


def test_a_missing_ca_bundle_is_exit_2_naming_the_variable(runner, exchange):
    process = runner.popen("--once", env={"REQUESTS_CA_BUNDLE": "/nonexistent"})
    code, err = finish(process)

    assert code == 2, err
    assert "REQUESTS_CA_BUNDLE" in line_with(err, "configuration error")
    assert exchange.requests == []


# --- 7. hangs --------------------------------------------------------------------------------


def test_a_trickled_body_fails_within_about_the_timeout(runner, exchange, db):
    # 20 bytes, one every 0.5 s: 10 s per answer, while weex.timeout_seconds is 1
    exchange.fills = lambda request: Reply(body=b"[" + b" " * 18 + b"]", trickle=0.5)

    code, elapsed = timed_run(runner)

    assert code == 1, runner.last_log
    assert elapsed < 6, elapsed  # two attempts of ~1 s, one backoff
    row = only_status(db)
    assert "did not arrive within" in row["error_message"], row["error_message"]
    assert row["requests_count"] == 2


def test_a_connection_dropped_mid_body_is_retried(runner, exchange, db, version):
    runner.sync["start_time"] = now_ms() - DAY_MS  # one window: one request when all goes well
    fill = make_fill(version, 1, now_ms() - 3_600_000)

    def fills(request: Request) -> Reply:
        reply = answer(request, [fill])
        if len(exchange.fills_requests()) == 1:
            reply.drop_after = len(reply.payload()) // 2
        return reply

    exchange.fills = fills

    assert runner.run() == 0, runner.last_log

    assert stored_ids(db) == {"1"}
    assert only_status(db)["requests_count"] == 2 == len(exchange.fills_requests())


@both_versions
def test_every_retry_is_signed_afresh_and_charged_to_the_budget(runner, exchange, db, version):
    """A retry never resends an old timestamp (after a long backoff it would be expired), and
    each attempt counts against the machine's rate budget."""
    runner.sync["start_time"] = now_ms() - DAY_MS
    fill = make_fill(version, 1, now_ms() - 3_600_000)

    def fills(request: Request) -> Reply:
        if len(exchange.fills_requests()) <= 2:
            return Reply(503, b"<html>busy</html>")
        return answer(request, [fill])

    exchange.fills = fills
    runner.weex["max_retries"] = 3

    assert runner.run() == 0, runner.last_log

    attempts = exchange.fills_requests()
    assert len(attempts) == 3 == only_status(db)["requests_count"]
    stamps = [r.headers["access-timestamp"] for r in attempts]
    assert len(set(stamps)) == 3
    for request in attempts:
        query = urlencode(request.params)
        expected = weex_sync.sign(
            runner.user.secret_key,
            request.headers["access-timestamp"],
            "GET",
            request.path,
            query,
            "",
        )
        assert request.headers["access-sign"] == expected
    machine = json.loads(Path(runner.weex["rate_limit"]["shared_file"]).read_text())
    [ip_budget] = machine.values()  # the machine's IP budget: 3 attempts x 5, the time 1
    assert sum(weight for _, weight in ip_budget["used"]) == 15 + 1


def test_sigterm_ends_the_process_within_seconds_in_every_waiting_state(runner, exchange, db):
    """Three processes, one in each state; weex_sync gives requests in flight
    STOP_GRACE_SECONDS (5), then exits at once."""
    states = {
        "trickle": Reply(body=b"[" + b" " * 998 + b"]", trickle=0.5),
        "stall": Reply(body=b"[" + b" " * 98 + b"]", stall=True),
        "retry_after": Reply(429, b"", {"Retry-After": "3600"}),
    }
    runner.weex["timeout_seconds"] = 30  # only the stop can end the first two
    users = {state: Account.new(f"user_{state}") for state in states}
    by_key = {users[state].api_key: reply for state, reply in states.items()}
    exchange.fills = lambda request: by_key[request.key]
    processes = {}
    budget = Path(runner.weex["rate_limit"]["shared_file"])
    for state, user in users.items():
        runner.accounts = [user]
        # a budget file each: the Retry-After would pause the others' shared address too
        runner.weex["rate_limit"]["shared_file"] = str(budget.with_name(f"{state}.budget"))
        processes[state] = runner.popen("--once", name=f"{state}.yaml")

    for user in users.values():
        wait_for(lambda user=user: exchange.fills_requests(user.api_key))
    time.sleep(0.5)
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    took = {}
    while len(took) < len(processes) and time.monotonic() - sent < 20:
        for state, process in processes.items():
            if state not in took and process.poll() is not None:
                took[state] = time.monotonic() - sent
        time.sleep(0.02)
    results = {state: (*finish(p, timeout=5), took.get(state)) for state, p in processes.items()}

    for state, (code, err, seconds) in results.items():
        assert code == 0, (state, err)
        assert seconds is not None and seconds < 8, (state, seconds, err)
        assert "SIGTERM received" in err, (state, err)
        clean_lines(err)
    assert results["retry_after"][2] < 3  # nothing in flight: no grace needed
    assert len(exchange.fills_requests(users["retry_after"].api_key)) == 1


@both_versions
def test_a_bad_fill_served_with_its_keys_in_another_order_is_one_quarantine_row(
    runner, exchange, db, version
):
    """The quarantine keys a fill by its content, not by how an answer happened to serialise
    it (two versions of one fill stay two rows: see the twins above)."""
    bad = make_fill(
        version, 7, now_ms() - 3_600_000, **{"price" if version == 3 else "fillSize": "x"}
    )
    shuffler = random.Random(5)

    def shuffled(request: Request) -> Reply:
        items = list(bad.items())
        shuffler.shuffle(items)
        return answer(request, [dict(items)])

    exchange.fills = shuffled
    runner.sync["start_time"] = now_ms() - DAY_MS
    for _ in range(3):
        assert runner.run() == 1, runner.last_log  # the pair fails on its quarantined fill

    assert db.rows("SELECT seen_count, resolved_at FROM rejected_fills") == [(3, None)]


# --- 8. an analyst's open transaction ---------------------------------------------------------


@contextlib.contextmanager
def analyst(pg: dict, db_name: str, statement: str, release_after: float = 8.0):
    """Another session that ran ``statement`` in a transaction it keeps open; it gives up after
    ``release_after`` seconds, so a weex_sync that waits for it cannot hang the suite."""
    conn = psycopg2.connect(dbname=db_name, **pg)
    conn.cursor().execute(statement)
    timer = threading.Timer(release_after, conn.rollback)
    timer.start()
    try:
        yield conn
    finally:
        timer.cancel()
        conn.rollback()
        conn.close()


def test_an_open_transaction_on_the_view_does_not_block_a_pass(runner, exchange, db, pg, version):
    fill = make_fill(version, 1, START_MS + 10)
    exchange.fills = lambda request: answer(request, [fill])

    with analyst(pg, db.name, "SELECT * FROM trade_fills_readable"):
        code, elapsed = timed_run(runner)

    assert code == 0, runner.last_log
    assert elapsed < 5, elapsed  # it did not wait for the analyst
    assert stored_ids(db) == {"1"}


def test_an_upgrade_blocked_by_an_analyst_fails_with_exit_3_not_a_hang(
    runner, exchange, db, pg, monkeypatch
):
    monkeypatch.setattr(weex_sync, "LOCK_TIMEOUT", "1s")  # read by each connect()
    db.rows("DELETE FROM weex_sync_schema")  # an old schema: DDL must run

    with analyst(pg, db.name, "SELECT * FROM trade_fills_readable"):
        code, elapsed = timed_run(runner)

    assert code == 3, runner.last_log
    assert elapsed < 5, elapsed
    line = line_with(runner.last_log, "ERROR")
    assert "lock" in line, line
    assert exchange.fills_requests() == []
    assert runner.run() == 0, runner.last_log  # the analyst is gone: the upgrade runs
    assert db.scalar("SELECT max(version) FROM weex_sync_schema") >= 2


def test_a_lock_held_on_trade_fills_fails_the_pair_with_a_lock_timeout(
    runner, exchange, db, pg, monkeypatch, version
):
    monkeypatch.setattr(weex_sync, "LOCK_TIMEOUT", "1s")  # read by each connect()
    fill = make_fill(version, 1, START_MS + 10)
    exchange.fills = lambda request: answer(request, [fill])

    with analyst(pg, db.name, "LOCK TABLE trade_fills IN EXCLUSIVE MODE"):
        code, elapsed = timed_run(runner)

    assert code == 1, runner.last_log
    assert elapsed < 5, elapsed
    row = only_status(db)
    assert "lock timeout" in row["error_message"], row["error_message"]
    clean_lines(runner.last_log)
    assert stored_ids(db) == set()


# --- 9. log forging ---------------------------------------------------------------------------

FORGED = "2026-01-01T00:00:00.000Z INFO weex_sync: user9/cmt_btcusdt: ok fetched=100"


def test_a_newline_in_an_exchange_message_cannot_forge_a_log_line(runner, exchange, db):
    exchange.fills = lambda request: error_reply(request, SYMBOL_CODE, f"x\n{FORGED}")

    assert runner.run() == 1
    log = runner.last_log
    assert runner.run("--status") == 0

    assert not [line for line in log.splitlines() if line.startswith(FORGED[:40])], log
    clean_lines(log)
    message = only_status(db)["error_message"]
    assert "\n" not in message and FORGED in message  # kept, escaped
    assert not [line for line in runner.out.splitlines() if line.startswith(FORGED[:24])]


# --- 10. secrets ------------------------------------------------------------------------------


def leaked(secret: str, text: str, size: int = 6) -> list[str]:
    return [
        secret[i : i + size] for i in range(len(secret) - size + 1) if secret[i : i + size] in text
    ]


def test_10a_a_secret_near_the_cut_of_an_exchange_message_is_scrubbed(runner, exchange, db):
    offsets = (180, 186, 190, 194, 197, 199)
    runner.accounts = [Account.new(f"user{offset}") for offset in offsets]
    offset_of = {u.api_key: o for u, o in zip(runner.accounts, offsets, strict=True)}

    def fills(request: Request) -> Reply:
        msg = "A" * offset_of[request.key] + request.headers["access-passphrase"] + " tail"
        return error_reply(request, SYMBOL_CODE, msg)

    exchange.fills = fills

    assert runner.run("--log-level", "DEBUG") == 1
    log = runner.last_log
    assert runner.run("--status") == 0
    seen = log + runner.out + repr(db.status())

    for user in runner.accounts:
        assert leaked(user.passphrase, seen) == [], user.user_id
    assert len(exchange.fills_requests()) == len(offsets)


def secret_in_code(request: Request) -> Reply:
    return Reply(400, {"code": request.headers["access-passphrase"], "msg": "x"})


def secret_in_a_fill(request: Request) -> Reply:
    qty = "A" * 40 + request.headers["access-passphrase"]
    return answer(request, [], always=[make_fill(request.version, 1, START_MS + 10, qty=qty)])


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(secret_in_code, id="in the code field"),
        pytest.param(secret_in_a_fill, id="near the cut of a fill value"),
    ],
)
def test_10a_a_secret_anywhere_in_an_exchange_answer_is_scrubbed(runner, exchange, db, hostile):
    exchange.fills = hostile

    assert runner.run("--log-level", "DEBUG") == 1

    seen = runner.last_log + repr(db.status())
    assert leaked(runner.user.passphrase, seen) == []


def test_10b_config_errors_never_echo_a_value_that_could_be_a_secret(runner, exchange):
    password = f"pw-{secrets.token_hex(8)}"
    runner.database["password"] = password

    assert runner.run(env={"DB_PORT": password}) == 2
    assert "database.port" in line_with(runner.last_log, "configuration error")
    assert password not in runner.last_log + runner.out

    assert runner.run("--user", runner.user.passphrase) == 2
    assert "--user" in line_with(runner.last_log, "configuration error")
    assert leaked(runner.user.passphrase, runner.last_log + runner.out) == []
    assert exchange.requests == []


def test_10c_a_redirect_to_another_host_is_not_followed(runner, exchange, second, db):
    runner.accounts = [Account.new("user302"), Account.new("user307")]
    status_of = {runner.accounts[0].api_key: 302, runner.accounts[1].api_key: 307}

    def fills(request: Request) -> Reply:
        location = f"{second.base_url}{request.path}?{urlencode(request.params)}"
        return Reply(status_of[request.key], b"", {"Location": location})

    exchange.fills = fills

    assert runner.run() == 1

    assert second.requests == []  # no ACCESS-KEY, no ACCESS-PASSPHRASE went there
    for user in runner.accounts:
        message = only_status(db, user.user_id)["error_message"]
        assert "redirect" in message and "not followed" in message, message
    clean_lines(runner.last_log)


def test_10d_plain_http_to_a_remote_host_is_one_warning(runner, exchange, db):
    assert runner.run("--status") == 0
    assert "WARNING" not in runner.last_log  # 127.0.0.1 is this machine

    runner.weex["base_url"] = "http://weex.example"
    assert runner.run("--status") == 0

    warnings = [line for line in clean_lines(runner.last_log) if " WARNING " in line]
    assert len(warnings) == 1, runner.last_log
    assert "plain http" in warnings[0] and "weex.example" in warnings[0]


# --- 11. size limits ---------------------------------------------------------------------------

HUGE_BODY = 40 << 20
BOMB_INFLATED = 256 << 20


@functools.cache
def gzip_bomb() -> bytes:
    """BOMB_INFLATED bytes of zeros, gzip-compressed to about 1/1000 of that."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)  # gzip, quick on zeros
    zeros = bytes(1 << 20)
    parts = [compressor.compress(zeros) for _ in range(BOMB_INFLATED >> 20)]
    return b"".join([*parts, compressor.flush()])


# A process started straight from pytest would report pytest's own peak as its ru_maxrss:
# subprocess starts it with vfork, and Linux keeps the high-water mark across exec. So a small
# wrapper starts weex_sync, reaps it with os.wait4 and writes its ru_maxrss (KB) to a file.


def test_a_huge_body_and_a_gzip_bomb_fail_the_request_and_memory_stays_low(runner, exchange, db):
    huge = Reply(body=b"[" + b" " * HUGE_BODY + b"]")
    bomb = Reply(body=gzip_bomb(), headers={"Content-Encoding": "gzip"})
    users = {"huge": Account.new("user_huge"), "bomb": Account.new("user_bomb")}
    replies = {users["huge"].api_key: huge, users["bomb"].api_key: bomb}
    exchange.fills = lambda request: replies[request.key]
    processes = {}
    for name, user in users.items():
        runner.accounts = [user]
        rss_file = runner.tmp_path / f"{name}.maxrss"
        processes[name] = (runner.popen("--once", name=f"{name}.yaml", rss_file=rss_file), rss_file)

    results = {name: (*finish(p), int(f.read_text()) / 1024) for name, (p, f) in processes.items()}
    peaks = {name: round(rss) for name, (_, _, rss) in results.items()}

    for name, (code, err, rss) in results.items():
        assert code == 1, (name, err)
        message = only_status(db, f"user_{name}")["error_message"]
        assert "larger than 8 MB" in message, (name, message)
        assert rss < 100, f"peak RSS in MB: {peaks}"
        clean_lines(err)


# --- 12. races ---------------------------------------------------------------------------------


def test_four_first_runs_at_once_against_a_missing_database_all_succeed(
    runner, exchange, pg, scratch_db_names
):
    runner.sync["start_time"] = now_ms() - DAY_MS  # one request each: the race is the point
    for trial in range(5):
        config = runner.config()
        config["database"]["dbname"] = f"weex_hostile_race_{secrets.token_hex(4)}"
        scratch_db_names.append(config["database"]["dbname"])
        processes = [
            runner.popen("--once", config=config, name=f"race{trial}.yaml") for _ in range(4)
        ]
        results = [finish(process) for process in processes]
        assert [code for code, _ in results] == [0, 0, 0, 0], (trial, results)
        assert database_exists(pg, config["database"]["dbname"])


# --- 13. a --since repair meeting a pass that holds the pair ------------------------------------


def test_a_rescan_waits_for_a_held_pair_then_fails_or_runs(runner, exchange, db, pg, version):
    fills = [make_fill(version, n, START_MS + 10 * n) for n in (1, 2, 3)]
    exchange.fills = lambda request: answer(request, fills)
    holder = psycopg2.connect(dbname=db.name, **pg)
    holder.autocommit = True
    key = weex_sync.lock_key("user1", BTC)
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (key,))
    try:
        code, elapsed = timed_run(runner, "--since", str(START_MS), "--lock-wait", "1")
        assert code == 1, runner.last_log
        assert elapsed < 5, elapsed

        assert "another weex_sync pass" in line_with(runner.last_log, "waiting up to 1s")
        row = only_status(db)
        assert row["status"] == "error" and "not re-scanned" in row["error_message"]
        assert stored_ids(db) == set()

        release = threading.Timer(
            1.0, holder.cursor().execute, ("SELECT pg_advisory_unlock_all()",)
        )
        release.start()
        code, elapsed = timed_run(runner, "--since", str(START_MS), "--lock-wait", "10")
        assert code == 0, runner.last_log
        assert 0.9 < elapsed < 8, elapsed
        release.join()
    finally:
        holder.close()

    assert stored_ids(db) == {"1", "2", "3"}
    assert db.status()[-1]["status"] == "success"


# --- round 3 (issue 18) -------------------------------------------------------------------------
# 1. the deadline covers connecting, the status line, the headers and the body


@pytest.mark.parametrize("endpoint", ["fills", "time"])
def test_trickled_headers_end_a_pass_within_the_retries(runner, exchange, db, endpoint):
    """An exchange (or proxy) that trickles its status line and headers at 1 byte/s: each
    attempt ends at timeout_seconds, the pass within timeout x (max_retries + 1) plus seconds."""
    slow = Reply(body=b"[]", trickle_head=1.0)
    if endpoint == "fills":
        exchange.fills = lambda request: slow
    else:
        exchange.app = lambda request: slow if request.path in TIME_PATHS else None
    runner.weex.update(timeout_seconds=2, max_retries=1)

    code, elapsed = timed_run(runner)

    assert elapsed < 2 * 2 + 4, elapsed
    if endpoint == "fills":
        assert code == 1
        row = only_status(db)
        assert "did not arrive within weex.timeout_seconds" in row["error_message"]
        assert row["requests_count"] == 2
    else:  # the pass goes on with this machine's clock
        assert code == 0, runner.last_log
        assert "cannot read the exchange's clock" in runner.last_log


@pytest.mark.parametrize("endpoint", ["fills", "time"])
def test_one_sigterm_stops_a_pass_stuck_on_trickled_headers_within_5_s(
    runner, exchange, db, endpoint
):
    slow = Reply(body=b"[]", trickle_head=1.0)
    if endpoint == "fills":
        exchange.fills = lambda request: slow
    else:
        exchange.app = lambda request: slow if request.path in TIME_PATHS else None
    runner.weex.update(timeout_seconds=60, max_retries=5)
    process = runner.popen("--once")
    wait_for(lambda: exchange.requests)
    time.sleep(1.0)

    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, err = finish(process, timeout=20)

    assert time.monotonic() - sent < 5, err
    assert code == 0, err
    assert "SIGTERM received" in err
    clean_lines(err)


# 2. the shared budget file: this user's, validated, never a hang, a crash or no budget


def test_the_default_budget_file_is_private_to_the_user(runner, exchange, db, tmp_path):
    del runner.weex["rate_limit"]["shared_file"]
    cache = tmp_path / "cache"

    assert runner.run(env={"XDG_CACHE_HOME": str(cache)}) == 0, runner.last_log

    path = cache / "weex_sync" / "ratelimit"
    assert path.is_file() and not path.is_symlink()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert json.loads(path.read_text())  # the request is charged there


def ip_key(exchange: HostileExchange) -> str:
    return "ip " + urlsplit(exchange.base_url).netloc


HOSTILE_BUDGETS = {
    "a window that never ends": lambda key: json.dumps({key: [[1e18, 1e9]]}),
    "a list, not a mapping": lambda key: json.dumps([[1e18, 1e9]]),
    "a string": lambda key: json.dumps("x"),
    "not JSON at all": lambda key: "\x00\xff{{{",
    "weights of the wrong type": lambda key: json.dumps({key: [[time.time(), "5"], ["x", 5]]}),
    "an hour ahead (a clock that was)": lambda key: json.dumps({key: [[time.time() + 3600, 10]]}),
    "NaN and infinity": lambda key: json.dumps(
        {key: [[math.nan, 5], [math.inf, 5], [1, -math.inf]]}
    ),
    "a pause and a pacing slot an hour ahead": lambda key: json.dumps(
        {key: {"used": [], "pause": time.time() + 3600, "next": time.time() + 3600}}
    ),
    "a streak and a span past any limit": lambda key: json.dumps(
        {key: {"used": [], "streak": 10**6, "span": 10**9, "lowered": time.time() + 3600}}
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_BUDGETS))
def test_any_content_of_the_budget_file_is_discarded_with_one_warning(runner, exchange, db, case):
    path = Path(runner.weex["rate_limit"]["shared_file"])
    path.write_text(HOSTILE_BUDGETS[case](ip_key(exchange)), encoding="latin-1")
    path.chmod(0o600)
    runner.weex["rate_limit"].update(ip_weight=10, window_seconds=1)
    runner.sync["start_time"] = now_ms() - DAY_MS  # one window: the time and one fills request
    fill = make_fill(3, 1, now_ms() - 3_600_000)
    exchange.fills = lambda request: answer(request, [fill])

    code, elapsed = timed_run(runner)

    assert code == 0, runner.last_log
    assert elapsed < 4, elapsed  # never waits for what the file claims
    clean_lines(runner.last_log)
    warnings = [line for line in runner.last_log.splitlines() if "WARNING" in line]
    assert len(warnings) <= 1, warnings
    assert stored_ids(db) == {"1"}


def test_a_negative_weight_does_not_switch_the_budget_off(runner, exchange, db):
    path = Path(runner.weex["rate_limit"]["shared_file"])
    path.write_text(json.dumps({ip_key(exchange): [[time.time(), -(10**9)]]}))
    path.chmod(0o600)
    runner.weex["rate_limit"].update(ip_weight=5, window_seconds=1)  # one request per 1.5 s
    runner.sync["start_time"] = now_ms() - DAY_MS  # one window
    fills = [make_fill(3, n, now_ms() - 3_600_000 + n) for n in range(120)]
    exchange.fills = lambda request: answer(request, fills)

    assert runner.run() == 0, runner.last_log

    times = [r.at_ms for r in exchange.fills_requests()]
    assert len(times) >= 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 1000, gaps  # the budget held: one request per window
    assert "discarded" in line_with(runner.last_log, "WARNING")


@pytest.mark.parametrize(
    "kind", ["fifo", "symlink", "other user's, world-writable", "other user's"]
)
def test_a_budget_file_that_is_not_ours_alone_is_refused(runner, exchange, db, tmp_path, kind):
    path = Path(runner.weex["rate_limit"]["shared_file"])
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(target)
    else:
        path.write_text("{}")
        os.chown(path, 65534, 65534)  # nobody
        path.chmod(0o666 if "world" in kind else 0o644)
    exchange.fills = lambda request: answer(request, [make_fill(3, 1, START_MS + 10)])

    code, elapsed = timed_run(runner)

    assert code == 0, runner.last_log
    assert elapsed < 4
    line = line_with(runner.last_log, "cannot share the rate budget")
    assert "this process keeps its own" in line
    assert target.read_text() == "keep me"
    assert stored_ids(db) == {"1"}


# 3. a secret is scrubbed in every form it can take on its way out


def escaped_account(user_id: str) -> Account:
    """Secrets with a backslash and a quote (and a control character in the secret key): once
    an exchange echoes them, repr() and JSON encoding spell them differently."""
    tag = secrets.token_hex(6)
    return Account(
        user_id,
        api_key=f"key-{user_id}-{secrets.token_hex(4)}",
        secret_key=f'SEC\\ret"\x01{tag}s',
        passphrase=f'PA\\ss"{tag}p',
    )


def mixed_quotes_account(user_id: str) -> Account:
    """A passphrase with a single quote, a double quote and a backslash; a secret key with a
    single quote and a backslash only (so repr() quotes it with " on its own, but with ' and
    an escaped \\' inside a text that holds a double quote). Both share a random tag."""
    tag = secrets.token_hex(6)
    return Account(
        user_id,
        api_key=f"key-{user_id}-{secrets.token_hex(4)}",
        secret_key=f"SE'c\\ret{tag}s",
        passphrase=f"PA'ss\"w\\d{tag}p",
    )


ECHOES = {  # each echoes the secrets as they are, and after a double quote
    "msg as text": lambda r, u: error_reply(r, SYMBOL_CODE, f"bad {u.passphrase} {u.secret_key}"),
    "msg as an object": lambda r, u: error_reply(
        r,
        SYMBOL_CODE,
        {"echo": [u.passphrase, u.secret_key, f'"{u.passphrase}', f'"{u.secret_key}']},  # type: ignore[arg-type]
    ),
    "code": lambda r, u: Reply(400, {"code": u.passphrase, "msg": u.secret_key}),
    "a fill's field": lambda r, u: answer(
        r,
        [],
        always=[
            make_fill(r.version, 1, START_MS + 10, side=u.passphrase, orderId=f'"{u.secret_key}')
        ],
    ),
}
ESCAPED_ACCOUNTS = {"escaped": escaped_account, "mixed quotes": mixed_quotes_account}


@pytest.mark.parametrize(
    ("kind", "log_format"), [("escaped", "text"), ("escaped", "json"), ("mixed quotes", "text")]
)
def test_an_escaped_secret_never_reaches_a_log_a_table_or_the_metrics(
    runner, exchange, db, tmp_path, kind, log_format
):
    make = ESCAPED_ACCOUNTS[kind]
    runner.accounts = [make(f"user{n}") for n in range(1, len(ECHOES) + 1)]
    echo_of = {
        u.api_key: (echo, u) for u, echo in zip(runner.accounts, ECHOES.values(), strict=True)
    }
    exchange.fills = lambda request: echo_of[request.key][0](request, echo_of[request.key][1])
    metrics = tmp_path / "weex_sync.prom"

    assert (
        runner.run(
            "--log-format", log_format, "--log-level", "DEBUG", "--metrics-file", str(metrics)
        )
        == 1
    )
    seen = runner.last_log
    assert runner.run("--status", "--json") == 0
    seen += runner.out + repr(db.status()) + repr(db.rows("SELECT * FROM rejected_fills"))
    seen += metrics.read_text()

    assert db.scalar("SELECT count(*) FROM rejected_fills") == 1  # the fill's echo is stored
    assert len(exchange.fills_requests()) >= len(ECHOES)
    for user in runner.accounts:
        tag = user.passphrase[-13:-1]  # the random part both secrets share
        assert tag not in seen, (user.user_id, [line for line in seen.splitlines() if tag in line])


# 5. freshness that tells the truth


def test_a_stale_exchange_clock_shows_as_stale_and_in_every_pass_summary(
    runner, exchange, db, tmp_path
):
    """The time endpoint an hour behind, the fills endpoint fine: the walk ends an hour ago,
    so the pair is synced through an hour ago, and --max-age says so."""

    def app(request: Request) -> Reply | None:
        if request.path in TIME_PATHS:
            return Reply(body={"serverTime": now_ms() - 3_600_000})
        return None

    exchange.app = app
    now = now_ms()
    exchange.fills = lambda request: answer(request, [make_fill(3, 1, now - 60_000)])
    metrics = tmp_path / "weex_sync.prom"

    assert runner.run("--metrics-file", str(metrics)) == 0
    warning = line_with(runner.last_log, "the exchange's clock is")
    assert "-3600." in warning and "WARNING" in warning
    assert runner.run("--status", "--max-age", "5m") == 1
    assert re.fullmatch(
        r"STALE user1/cmt_btcusdt: synced through \S+, 3[67]\d\d s ago \(limit 300 s\)",
        runner.out.strip(),
    ), runner.out
    offset = re.search(r"^weex_sync_clock_offset_seconds (\S+)$", metrics.read_text(), re.MULTILINE)
    assert offset and abs(float(offset[1]) + 3600) < 5
    assert db.status()[-1]["synced_through"] < now - 3_600_000


# 6. smaller ones


def test_a_nul_in_the_database_password_is_exit_2_in_one_line(runner, exchange):
    runner.database["password"] = "pass\x00word"

    assert runner.run() == 2

    line = line_with(runner.last_log, "configuration error")
    assert "database.password: contains a NUL character" in line
    assert "Traceback" not in runner.last_log and exchange.requests == []


def test_fills_in_the_first_seconds_of_the_horizon_are_stored(runner, exchange, db):
    """The walk starts 1 s inside v3's 365-day horizon (2.0: 60 s, and the fills of those 60 s
    were never stored); an exchange refusing that start (-1170) is asked again 5 s inside."""
    horizon = weex_sync.V3.horizon_ms
    runner.sync["start_time"] = 0
    edge = now_ms() - horizon
    fills = [make_fill(3, 1, edge + 30_000), make_fill(3, 2, edge + 8 * DAY_MS)]
    strict = []

    def fills_of(request: Request) -> Reply:
        if strict and int(request.params["startTime"]) < now_ms() - horizon + 2_000:
            return Reply(400, {"code": -1170, "msg": "startTime too old"})
        return answer(request, fills)

    exchange.fills = fills_of
    assert runner.run() == 0, runner.last_log
    assert stored_ids(db) == {"1", "2"}

    db.rows("TRUNCATE trade_fills, sync_cursor")
    strict.append(True)
    assert runner.run() == 0, runner.last_log
    assert stored_ids(db) == {"1", "2"}


@pytest.mark.parametrize("form", ["${A:-x}", "${A-x}", "${A", "${}", "${1A}"])
def test_an_unsupported_dollar_brace_form_is_exit_2(runner, exchange, form):
    runner.database["password"] = f"pw{form}"

    assert runner.run(env={"A": "value"}) == 2

    line = line_with(runner.last_log, "configuration error")
    assert "database.password: only ${NAME} is replaced" in line
    assert exchange.requests == []


def test_a_literal_dollar_brace_is_written_twice(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "database": {"password": "a$${b}"},
                "weex": {"api_key": "k", "secret_key": "s", "passphrase": "p"},
            }
        )
    )
    assert weex_sync.load_config(str(path), {}).database.password == "a${b}"


def test_the_loop_counts_passes_in_english():
    assert weex_sync.plural(22, "pass") == "22 passes"
    assert weex_sync.plural(1, "pass") == "1 pass"
    assert weex_sync.plural(2, "user") == "2 users"


# --- review of round 4 (the fixes of 9d9411e) ---------------------------------------------------


def budget_entries(path: Path) -> dict[str, list[list[float]]]:
    """The budget file's windows; {} while it is missing or being rewritten."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {key: budget["used"] for key, budget in data.items()} if isinstance(data, dict) else {}


def test_a_400_digit_number_in_the_budget_file_is_discarded_with_one_warning(runner, exchange, db):
    path = Path(runner.weex["rate_limit"]["shared_file"])
    key = ip_key(exchange)
    path.write_text(json.dumps({key: [[10**400, 1], [time.time(), 10**400]]}))
    path.chmod(0o600)
    runner.sync["start_time"] = now_ms() - DAY_MS  # one window
    exchange.fills = lambda request: answer(request, [make_fill(3, 1, now_ms() - 3_600_000)])

    code, elapsed = timed_run(runner)

    assert code == 0, runner.last_log
    assert elapsed < 4, elapsed
    assert "discarded" in line_with(runner.last_log, "WARNING")  # clean_lines: no traceback
    assert stored_ids(db) == {"1"}
    assert all(w < 10**7 for _, w in budget_entries(path)[key])  # the file is ours again


def test_a_budget_file_unlinked_or_replaced_under_a_loop_is_reopened(runner, exchange, db):
    """Two processes keep sharing one file: a --loop process that had the file open before it
    was unlinked (or replaced) charges its requests to the file the path names now."""
    path = Path(runner.weex["rate_limit"]["shared_file"])
    exchange.fills = lambda request: answer(request, [])
    looping = runner.popen("--loop", "1", name="loop.yaml")
    mine = ip_key(exchange)
    wait_for(lambda: mine in budget_entries(path), timeout=15)

    path.unlink()  # another process of this user now creates a new file at the path
    other = runner.config()
    other["weex"]["base_url"] = exchange.base_url.replace("127.0.0.1", "localhost")
    other["sync"]["users"] = [Account.new("user2").as_config()]
    assert runner.run(config=other) == 0, runner.last_log
    theirs = "ip " + urlsplit(other["weex"]["base_url"]).netloc
    wait_for(lambda: {mine, theirs} <= budget_entries(path).keys(), timeout=10)

    fresh = path.with_name("fresh")  # replaced (a rename over it), not unlinked
    fresh.write_text("{}")
    fresh.chmod(0o600)
    os.replace(fresh, path)
    wait_for(lambda: mine in budget_entries(path), timeout=10)

    looping.send_signal(signal.SIGTERM)
    code, err = finish(looping, timeout=15)
    assert code == 0, err
    assert "Traceback" not in err


def test_a_shorter_window_does_not_drop_a_longer_windows_entries(runner, exchange, db):
    """Processes of two configurations share the file: one with a 1 s window must keep what
    one with a 60 s window charged 2 s ago (it still counts against that one's budget)."""
    path = Path(runner.weex["rate_limit"]["shared_file"])
    runner.sync["start_time"] = now_ms() - DAY_MS  # one window: the time and one fills request
    exchange.fills = lambda request: answer(request, [])
    key = ip_key(exchange)

    runner.weex["rate_limit"]["window_seconds"] = 60
    assert runner.run() == 0, runner.last_log
    charged = sum(w for _, w in budget_entries(path)[key])
    assert charged == 1 + 5  # the time, one fills request
    time.sleep(2.0)  # older than the short window (1 s plus its 0.5 s margin)

    short_started = time.time()
    runner.weex["rate_limit"]["window_seconds"] = 1
    assert runner.run() == 0, runner.last_log

    entries = budget_entries(path)[key]
    kept = sum(w for at, w in entries if at < short_started - 1)
    assert kept == charged, entries


YAML_LEAKS = {
    "a tag and a value": "passphrase: !secret Hunter2xyz",
    "a passphrase starting with !": "passphrase: !Hunter2xyz",
    "a missing colon": "{secret_key Hunter2xyz}",
}


@pytest.mark.parametrize("case", list(YAML_LEAKS))
def test_yaml_tags_and_keys_that_are_not_words_are_not_echoed(runner, exchange, case):
    if case == "a missing colon":  # in a flow mapping, the line becomes a key of weex
        text = json.dumps(runner.config()).replace('"weex": {', '"weex": {secret_key Hunter2xyz, ')
    else:
        runner.user.passphrase = "PASSPHRASE_HERE"
        text = yaml.safe_dump(runner.config()).replace(
            "passphrase: PASSPHRASE_HERE", YAML_LEAKS[case]
        )
    assert "Hunter2xyz" in text
    path = runner.tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")

    assert runner.run(config=path) == 2

    line_with(runner.last_log, "configuration error")
    assert "Hunter2" not in runner.last_log + runner.out, runner.last_log
    assert exchange.requests == []


def alias_bomb(levels: int = 10, width: int = 10) -> str:
    """A few hundred bytes of YAML that name 10**levels strings through nested aliases."""
    lines = [f"  l0: &l0 [{', '.join(['lol'] * width)}]"]
    for n in range(1, levels):
        lines.append(f"  l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * width)}]")
    return "bomb:\n" + "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_fails_within_seconds(runner, exchange, tmp_path):
    path = runner.write_config()
    path.write_text(path.read_text() + alias_bomb(), encoding="utf-8")

    began = time.monotonic()
    code, err = finish(spawn_weex_sync("-c", str(path), "--once"), timeout=10)
    took = time.monotonic() - began

    assert took < 4, took
    assert code == 2, err
    assert "bomb" in line_with(err, "configuration error")
    assert exchange.requests == []


def syn_sent_to(port: int) -> int:
    """Sockets of this machine still connecting (SYN_SENT) to 127.0.0.1:port."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        return sum(
            1
            for line in fh.readlines()[1:]
            if line.split()[2] == wanted and line.split()[3] == "02"
        )


@contextlib.contextmanager
def listener_with_a_full_backlog():
    """127.0.0.1:port that accepts no connection: its backlog (listen(0)) is full, so a new
    connection stays in SYN_SENT (the kernel drops its SYNs) until the client gives up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        wait_for(lambda: syn_sent_to(port) >= 1, timeout=5)
        yield port
    finally:
        for sock in [*fillers, server]:
            sock.close()


def test_sigterm_while_connecting_to_the_time_endpoint_exits_within_5_s(runner, db):
    with listener_with_a_full_backlog() as port:
        runner.weex.update(base_url=f"http://127.0.0.1:{port}", timeout_seconds=60)
        before = syn_sent_to(port)
        process = runner.popen("--once")
        wait_for(lambda: syn_sent_to(port) > before, timeout=15)  # it is connecting
        time.sleep(0.5)

        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code, err = finish(process, timeout=12)
        took = time.monotonic() - sent

    assert took < 5, (took, err)
    assert code == 0, err
    assert "SIGTERM received" in err
    clean_lines(err)


@contextlib.contextmanager
def silent_exchange():
    """127.0.0.1:port that accepts every connection and never answers (nor reads)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.settimeout(0.1)
    held = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        for sock in [*held, server]:
            sock.close()


def test_check_of_16_users_against_a_stalled_exchange_takes_one_timeout(runner, db):
    """The first users to time out tell the rest: 16 users on 2 workers take about two
    timeouts (the clock, then the first two users), not 9."""
    runner.accounts = [Account.new(f"user{n}") for n in range(1, 17)]
    runner.sync["workers"] = 2
    with silent_exchange() as url:
        runner.weex.update(base_url=url, timeout_seconds=1, max_retries=0)
        code, took = timed_run(runner, "--check")

    assert code == 1, runner.out
    assert took < 5, (took, runner.out)
    rows = [line.split() for line in runner.out.splitlines() if line.startswith("user")]
    verdicts = [r[2] for r in rows if len(r) > 2 and r[1] == BTC]
    assert len(verdicts) == 16 and "ok" not in verdicts, runner.out
