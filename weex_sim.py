"""Local simulator of the WEEX futures "trade fills" REST API.

It follows /work/shared/weex-api.md over real HTTP: HMAC-signed ``GET /capi/v2/order/fills``,
public ``GET /capi/v2/market/time``, the documented error bodies, weighted rolling-window rate
limits and injectable faults.  Used in-process by the test-suite and benchmarks, and standalone
(see ``main``) by the demo.  Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import itemgetter
from typing import Any, Self
from urllib.parse import parse_qsl

FILLS_PATH = "/capi/v2/order/fills"
TIME_PATH = "/capi/v2/market/time"
FILLS_WEIGHT = 5
MAX_CLOCK_DRIFT_MS = 30_000
FAULT_KINDS = ("429", "500", "502", "503", "slow", "malformed", "error200")
ID_BASE = 10**18  # every generated id is ID_BASE + n, far above 2**53
QUERY_PARAMS = frozenset({"symbol", "orderId", "startTime", "endTime", "limit"})

_INTEGER = re.compile(r"-?[0-9]+")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# Stands in for Decimal values while serializing (see _to_json); random so data cannot forge it.
_DECIMAL_MARK = f"decimal-{os.urandom(8).hex()}-"
_DECIMAL_MARKER = re.compile(f'"{_DECIMAL_MARK}([0-9]+)"')
_HTML_ERRORS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
}
# Price ranges (in whole quote units) used by generate_fills; other symbols get a generic range.
_PRICE_RANGES = {"cmt_btcusdt": (60_000, 110_000), "cmt_ethusdt": (1_500, 4_500)}
_DEFAULT_PRICE_RANGE = (1, 500)
# (orderSide, positionSide, direction) combinations a generated order can have.
_ORDER_KINDS = (
    ("BUY", "LONG", "OPEN_LONG"),
    ("SELL", "LONG", "CLOSE_LONG"),
    ("SELL", "SHORT", "OPEN_SHORT"),
    ("BUY", "SHORT", "CLOSE_SHORT"),
)

# Ids are kept in int64 arrays (int objects would cost ~16 MB more per 200k fills).  A missing,
# non-integer or out-of-range id is stored as NO_ID: it sorts first and matches no orderId query.
NO_ID = -(2**63)
INT64_MAX = 2**63 - 1

# A stored fill: (createdTime, tradeId, orderId, JSON text); ids as int64 keys (see NO_ID).
_Entry = tuple[int, int, int, bytes]
_Columns = tuple[array, array, array, list[bytes]]


# --------------------------------------------------------------------------- storage


def _id_key(value: Any) -> int:
    """The int64 a (possibly hostile) id field stands for, or NO_ID if it is not one."""
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and NO_ID < value <= INT64_MAX:
        return value
    return NO_ID


def _to_json(obj: Any) -> bytes:
    """Compact JSON text; Decimal values are written as exact JSON numbers.

    The json module cannot emit a Decimal as a number, so each one is serialized as a marker
    string first and the quoted markers are then replaced by the Decimal's text.
    """
    decimals: list[str] = []

    def stash(value: Any) -> str:
        if not isinstance(value, Decimal):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        decimals.append(str(value))
        return f"{_DECIMAL_MARK}{len(decimals) - 1}"

    text = json.dumps(obj, separators=(",", ":"), default=stash)
    if decimals:
        text = _DECIMAL_MARKER.sub(lambda m: decimals[int(m[1])], text)
    return text.encode()


def _served(text: bytes) -> Any:
    """A JSON text parsed the way a careful client does: big ints and decimals kept exact."""
    return json.loads(text, parse_float=Decimal)


def _entry(fill: Mapping[str, Any], created_time: int) -> _Entry:
    return (
        created_time,
        _id_key(fill.get("tradeId")),
        _id_key(fill.get("orderId")),
        _to_json(fill),
    )


def _empty_columns() -> _Columns:
    return array("q"), array("q"), array("q"), []


class _Book:
    """The fills of one (account, symbol), sorted ascending by (createdTime, tradeId).

    Parallel columns keep bisecting on createdTime cheap and a page is a slice of pre-serialized
    JSON texts, so serving a page costs O(log n + limit) whatever the history size.
    """

    __slots__ = ("order_ids", "texts", "times", "trade_ids")

    # Above this many new fills one sort of everything beats inserting them one by one.
    BULK_THRESHOLD = 256

    def __init__(self) -> None:
        self.times, self.trade_ids, self.order_ids, self.texts = _empty_columns()

    def insert(self, created: int, trade_id: int, order_id: int, text: bytes) -> None:
        lo = bisect_left(self.times, created)
        hi = bisect_right(self.times, created, lo)
        pos = bisect_right(self.trade_ids, trade_id, lo, hi)
        self.times.insert(pos, created)
        self.trade_ids.insert(pos, trade_id)
        self.order_ids.insert(pos, order_id)
        self.texts.insert(pos, text)

    def extend(self, columns: _Columns) -> None:
        """Adds many fills given as parallel columns (createdTime, tradeId, orderId, text).

        Columns rather than one tuple per fill: 200k short-lived tuples allocated between the
        long-lived texts would fragment the heap and cost ~15 MB of RSS.
        """
        times, trade_ids, order_ids, texts = columns
        if len(times) <= self.BULK_THRESHOLD:
            for entry in zip(times, trade_ids, order_ids, texts):
                self.insert(*entry)
            return
        times = self.times + times
        trade_ids = self.trade_ids + trade_ids
        order_ids = self.order_ids + order_ids
        texts = self.texts + texts
        order = sorted(range(len(times)), key=trade_ids.__getitem__)
        order.sort(key=times.__getitem__)  # stable, so equal times stay in tradeId order
        self.times = array("q", [times[i] for i in order])
        self.trade_ids = array("q", [trade_ids[i] for i in order])
        self.order_ids = array("q", [order_ids[i] for i in order])
        self.texts = [texts[i] for i in order]

    def query(
        self, start: int | None, end: int | None, order_id: int | None, limit: int
    ) -> tuple[int, list[_Entry]]:
        """(number of matching fills, the newest `limit` of them newest first)."""
        lo = 0 if start is None else bisect_left(self.times, start)
        hi = len(self.times) if end is None else bisect_right(self.times, end)
        if order_id is None:
            total = max(0, hi - lo)
            indices: Iterable[int] = range(hi - 1, max(lo, hi - limit) - 1, -1)
        else:
            ids = self.order_ids[lo:hi]
            matched = [i for i, oid in enumerate(ids, lo) if oid == order_id]
            total = len(matched)
            indices = reversed(matched[-limit:])
        page = [
            (self.times[i], self.trade_ids[i], self.order_ids[i], self.texts[i]) for i in indices
        ]
        return total, page


@dataclass
class _Account:
    secret_key: str
    passphrase: str
    whitelisted: bool
    books: dict[str, _Book]


# --------------------------------------------------------------------------- fill generation


def _decimal_text(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros, as the exchange sends amounts."""
    return format(value.normalize(), "f")


def _fill_dict(
    *,
    trade_id: int | str,
    order_id: int | str,
    symbol: str,
    side: str,
    position_side: str,
    direction: str,
    size: str,
    value: str,
    fee: str,
    realize_pnl: str,
    created_time: int | str,
    margin_mode: str = "SHARED",
    separated_mode: str = "COMBINED",
) -> dict[str, Any]:
    """A fill with every field of the contract's example object, in the same order."""
    return {
        "tradeId": trade_id,
        "orderId": order_id,
        "symbol": symbol,
        "marginMode": margin_mode,
        "separatedMode": separated_mode,
        "positionSide": position_side,
        "orderSide": side,
        "fillSize": size,
        "fillValue": value,
        "fillFee": fee,
        "liquidateFee": "0",
        "realizePnl": realize_pnl,
        "direction": direction,
        "liquidateType": "",
        "legacyOrdeDirection": direction,
        "createdTime": created_time,
    }


def _maybe_text(rng: random.Random, value: int, probability: float) -> int | str:
    """Sends `value` as a JSON string with the given probability, as a JSON number otherwise."""
    return str(value) if rng.random() < probability else value


def _order_fills(
    rng: random.Random,
    symbol: str,
    order_id: int,
    trade_ids: Iterable[int],
    start_ms: int,
    end_ms: int,
) -> list[tuple[int, dict[str, Any]]]:
    """(createdTime, fill) for every fill of one random order: same side, nearby prices/times."""
    side, position_side, direction = rng.choice(_ORDER_KINDS)
    low, high = _PRICE_RANGES.get(symbol, _DEFAULT_PRICE_RANGE)
    price_cents = rng.randint(low * 100, high * 100)
    order_time = rng.randint(start_ms, end_ms)
    maker = rng.random() < 0.2  # maker fills earn a rebate: negative fee
    margin_mode = "ISOLATED" if rng.random() < 0.2 else "SHARED"
    separated_mode = "SEPARATED" if rng.random() < 0.1 else "COMBINED"
    closing = direction.startswith("CLOSE")
    fills = []
    for trade_id in trade_ids:
        if rng.random() < 0.5:  # otherwise this fill shares the previous fill's millisecond
            order_time = min(end_ms, order_time + rng.randint(0, 40))
        price = Decimal(price_cents + rng.randint(-50, 50)).scaleb(-2)
        size = Decimal(rng.randint(1, 20_000)).scaleb(-4)
        value = price * size
        fee = value * (Decimal("-0.0002") if maker else Decimal("0.0006"))
        pnl = Decimal(rng.randint(-500_000, 500_000)).scaleb(-4) if closing else Decimal(0)
        fill = _fill_dict(
            trade_id=_maybe_text(rng, trade_id, 0.3),
            order_id=_maybe_text(rng, order_id, 0.3),
            symbol=symbol,
            side=side,
            position_side=position_side,
            direction=direction,
            size=_decimal_text(size),
            value=_decimal_text(value),
            fee=_decimal_text(fee),
            realize_pnl=_decimal_text(pnl),
            created_time=_maybe_text(rng, order_time, 0.2),
            margin_mode=margin_mode,
            separated_mode=separated_mode,
        )
        fills.append((order_time, fill))
    return fills


# --------------------------------------------------------------------------- HTTP plumbing


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    fault: str | None = None


@dataclass(frozen=True)
class _Query:
    symbol: str | None
    order_id: int | None
    start: int | None
    end: int | None
    limit: int


def _json_response(status: int, obj: Any, **kwargs: Any) -> _Response:
    return _Response(status, _ENCODER.encode(obj).encode(), **kwargs)


def _html_response(status: int, fault: str) -> _Response:
    title = f"{status} {_HTML_ERRORS[status]}"
    body = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center>"
    body += "<hr><center>nginx</center></body></html>"
    return _Response(status, body.encode(), "text/html", fault=fault)


def _parse_query(query: str) -> _Query | str:
    """The validated fills query, or the reason it is invalid (→ 40017)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    params = dict(pairs)
    if len(params) != len(pairs):
        return "duplicate parameter"
    unknown = set(params) - QUERY_PARAMS
    if unknown:
        return f"unknown parameter {min(unknown)}"
    numbers: dict[str, int | None] = {}
    for name in ("orderId", "startTime", "endTime", "limit"):
        text = params.get(name)
        value = None if text is None else _id_key(text)
        if value == NO_ID:
            return f"{name} must be a 64-bit integer"
        numbers[name] = value
    limit = 100 if numbers["limit"] is None else numbers["limit"]
    if not 1 <= limit <= 100:
        return "limit must be between 1 and 100"
    start, end = numbers["startTime"], numbers["endTime"]
    if start is not None and end is not None and start > end:
        return "startTime must not be after endTime"
    return _Query(params.get("symbol"), numbers["orderId"], start, end, limit)


def _wait_seconds(
    events: deque[tuple[float, int]], limit: int, window: float, now: float, weight: int
) -> int | None:
    """Whole seconds until `weight` more fits in the rolling window, or None if it fits now.

    Expired events are dropped from `events` as a side effect.
    """
    while events and events[0][0] <= now - window:
        events.popleft()
    used = sum(w for _, w in events)
    if used + weight <= limit:
        return None
    if weight > limit:
        return math.ceil(window)
    freed = 0
    for charged_at, w in events:
        freed += w
        if used - freed + weight <= limit:
            break
    return max(1, math.ceil(charged_at + window - now))


class _Server(ThreadingHTTPServer):
    """Tracks open connections so stop() can drop idle keep-alive ones immediately."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        with self._connections_lock:
            self._connections.add(conn)
        return conn, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is normal here (the "slow" fault); anything
        # else is a simulator bug and gets the default traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per request on keep-alive connections).
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        response = self.server.simulator._respond(
            self.path, self.headers, body, self.client_address[0]
        )
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request would drown test and benchmark output."""


# --------------------------------------------------------------------------- simulator


class Simulator:
    """In-memory WEEX accounts and fills served over HTTP; see the module docstring."""

    def __init__(
        self, *, symbols: Iterable[str] = ("cmt_btcusdt", "cmt_ethusdt"), seed: int = 1
    ) -> None:
        self.symbols = tuple(symbols)
        self.seed = seed
        # Behaviour switches: plain attributes, read on every request.
        self.faults: dict[str, float] = dict.fromkeys(FAULT_KINDS, 0.0)
        self.fault_seed: int = seed
        self.slow_seconds: float = 3.0
        self.retry_after: int = 1
        self.latency: float = 0.0
        self.clock_offset_ms: int = 0
        self.uid_limit: tuple[int, float] | None = None
        self.ip_limit: tuple[int, float] | None = None
        # api key -> any JSON value served verbatim (HTTP 200) instead of the real page to that
        # account's accepted fills requests, e.g. {"list": [], "nextFlag": True, "totals": 3}.
        self.hostile_pages: dict[str, Any] = {}
        # Stats.
        self.requests: list[dict[str, Any]] = []
        self.base_url: str | None = None

        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._next_id = ID_BASE + 1
        self._fault_rng = random.Random(seed)
        self._fault_rng_seed = seed
        self._uid_events: dict[str, deque[tuple[float, int]]] = {}
        self._ip_events: dict[str, deque[tuple[float, int]]] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------- accounts & data

    def add_account(
        self, api_key: str, secret_key: str, passphrase: str, *, whitelisted: bool = True
    ) -> None:
        """Adds an account, or replaces the credentials of an existing one (keeping its fills)."""
        with self._lock:
            account = self._accounts.get(api_key)
            books = account.books if account else {symbol: _Book() for symbol in self.symbols}
            self._accounts[api_key] = _Account(secret_key, passphrase, whitelisted, books)

    def generate_fills(
        self,
        api_key: str,
        symbol: str,
        count: int,
        *,
        start_ms: int,
        end_ms: int,
        seed: int | None = None,
    ) -> None:
        """Adds `count` realistic fills spread over [start_ms, end_ms].

        Deterministic: the same calls on a fresh Simulator with the same seed give the same
        fills.  Without `seed`, one is derived from the simulator's seed and the arguments.
        Orders have 1-5 fills, often in the same millisecond; ids, and sometimes createdTime,
        are sent as JSON numbers or strings at random.
        """
        if count < 0 or start_ms > end_ms:
            raise ValueError("need count >= 0 and start_ms <= end_ms")
        with self._lock:
            self._book(api_key, symbol)  # fail early on an unknown account or symbol
        if seed is None:
            seed_material = f"{self.seed}/{api_key}/{symbol}/{count}/{start_ms}/{end_ms}"
        else:
            seed_material = str(seed)
        rng = random.Random(seed_material)
        # Reserve the ids up front: `count` trade ids, then at most `count` order ids.
        first_id = self._reserve_ids(2 * count)
        end_id = first_id + count
        trade_id, order_id = first_id, end_id
        columns = _empty_columns()
        while trade_id < end_id:
            fills_in_order = min(rng.randint(1, 5), end_id - trade_id)
            trade_ids = range(trade_id, trade_id + fills_in_order)
            for created, fill in _order_fills(rng, symbol, order_id, trade_ids, start_ms, end_ms):
                for column, value in zip(columns, _entry(fill, created)):
                    column.append(value)
            trade_id += fills_in_order
            order_id += 1
        with self._lock:
            self._book(api_key, symbol).extend(columns)

    def add_fill(
        self,
        api_key: str,
        symbol: str,
        *,
        created_time: int,
        order_id: int | None = None,
        trade_id: int | None = None,
        size: str = "0.001",
        value: str = "100",
        fee: str = "0.06",
        side: str = "BUY",
        **extra: Any,
    ) -> dict[str, Any]:
        """Adds one well-formed fill with ids as JSON numbers; returns it as it will be served.

        Missing ids are allocated.  `extra` fields are added (or override fields) verbatim;
        the server still filters and sorts by `created_time`.
        """
        if side not in ("BUY", "SELL"):
            raise ValueError(f"side must be BUY or SELL, not {side!r}")
        if trade_id is None:
            trade_id = self._reserve_ids(1)
        if order_id is None:
            order_id = self._reserve_ids(1)
        fill = _fill_dict(
            trade_id=trade_id,
            order_id=order_id,
            symbol=symbol,
            side=side,
            position_side="LONG",
            direction="OPEN_LONG" if side == "BUY" else "CLOSE_LONG",
            size=size,
            value=value,
            fee=fee,
            realize_pnl="0",
            created_time=created_time,
        )
        fill.update(extra)
        self._store(api_key, symbol, _entry(fill, created_time))
        return _served(_to_json(fill))

    def add_burst(
        self, api_key: str, symbol: str, created_time: int, count: int, *, orders: int = 3
    ) -> list[dict[str, Any]]:
        """Adds `count` fills sharing one createdTime, round-robin over `orders` new orders.

        Interleaving the orders means the newest-first page of 100 contains every order, which
        is what a client needs to fall back to per-orderId queries for that millisecond.
        """
        first_order = self._reserve_ids(orders)
        return [
            self.add_fill(
                api_key, symbol, created_time=created_time, order_id=first_order + n % orders
            )
            for n in range(count)
        ]

    def add_raw_fill(
        self, api_key: str, symbol: str, obj: dict[str, Any], *, created_time: int
    ) -> None:
        """Stores any JSON object verbatim (hostile input); served by `created_time`."""
        self._store(api_key, symbol, _entry(obj, created_time))

    def fills(self, api_key: str, symbol: str) -> list[dict[str, Any]]:
        """Every fill of the account and symbol as served, newest first (server order)."""
        with self._lock:
            texts = list(reversed(self._book(api_key, symbol).texts))
        return [_served(text) for text in texts]

    def _reserve_ids(self, n: int) -> int:
        """First of `n` fresh consecutive ids, unique within this simulator."""
        with self._lock:
            first = self._next_id
            self._next_id += n
        return first

    def _store(self, api_key: str, symbol: str, entry: _Entry) -> None:
        with self._lock:
            self._book(api_key, symbol).insert(*entry)

    def _book(self, api_key: str, symbol: str) -> _Book:
        account = self._accounts.get(api_key)
        if account is None:
            raise ValueError(f"unknown account {api_key!r}")
        if symbol not in account.books:
            raise ValueError(f"unknown symbol {symbol!r}; simulator symbols: {self.symbols}")
        return account.books[symbol]

    # ----------------------------------------------------------------------- stats

    def count(
        self, *, status: int | None = None, api_key: str | None = None, path: str | None = None
    ) -> int:
        """Number of recorded requests matching every given criterion."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (status is None or r["status"] == status)
                and (api_key is None or r["api_key"] == api_key)
                and (path is None or r["path"] == path)
            )

    def reset_stats(self) -> None:
        """Forgets recorded requests (rate-limit windows are server state and are kept)."""
        with self._lock:
            self.requests.clear()

    # ----------------------------------------------------------------------- server

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serves in a daemon thread; returns the base URL (with the real port if 0 was given)."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        self._server = _Server((host, port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="weex-sim",
            daemon=True,
        )
        self._thread.start()
        self.base_url = f"http://{host}:{self._server.server_address[1]}"
        return self.base_url

    def stop(self) -> None:
        """Stops serving, dropping open connections and waking sleeping (slow) requests."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- request handling

    def server_time_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    def _respond(
        self, raw_path: str, headers: Mapping[str, str], body: str, client_ip: str
    ) -> _Response:
        """Answers one GET request (called by the HTTP handler) and records it."""
        arrived = time.monotonic()
        path, _, query = raw_path.partition("?")
        if path == TIME_PATH:
            response = self._time_response()
        elif path == FILLS_PATH:
            response = self._fills_response(path, query, headers, body, client_ip)
        else:
            response = self._error(404, "404", f"no such endpoint {path}")
        if self.latency > 0:
            self._stopping.wait(self.latency)
        record = {
            "t": arrived,
            "api_key": headers.get("ACCESS-KEY"),
            "path": path,
            "params": dict(parse_qsl(query, keep_blank_values=True)),
            "status": response.status,
            "fault": response.fault,
        }
        with self._lock:
            self.requests.append(record)
        return response

    def _error(self, status: int, code: str, msg: str, **kwargs: Any) -> _Response:
        body = {"code": code, "msg": msg, "requestTime": self.server_time_ms()}
        return _json_response(status, body, **kwargs)

    def _too_many(self, retry_after: int, fault: str | None = None) -> _Response:
        return self._error(
            429,
            "429",
            "Too many requests, please try again later",
            headers=(("Retry-After", str(retry_after)),),
            fault=fault,
        )

    def _time_response(self) -> _Response:
        now = self.server_time_ms()
        seconds, millis = divmod(now, 1000)
        iso = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return _json_response(
            200,
            {"epoch": f"{seconds}.{millis:03d}", "iso": f"{iso}.{millis:03d}Z", "timestamp": now},
        )

    def _fills_response(
        self, path: str, query: str, headers: Mapping[str, str], body: str, client_ip: str
    ) -> _Response:
        account_or_error = self._authenticate(path, query, headers, body)
        if isinstance(account_or_error, _Response):
            return account_or_error
        api_key, account = account_or_error
        if not account.whitelisted:
            return self._error(
                521, "521", "Request IP not in the API key's IP whitelist: whitelist this IP"
            )
        parsed = _parse_query(query)
        if isinstance(parsed, str):
            return self._error(400, "40017", f"Parameter verification failed: {parsed}")
        if parsed.symbol is not None and parsed.symbol not in account.books:
            return self._error(400, "40034", f"Parameter {parsed.symbol} does not exist")

        fault = self._draw_fault()
        if fault == "429":
            return self._too_many(self.retry_after, fault)
        if fault in ("500", "502", "503"):
            return _html_response(int(fault), fault)
        if fault == "error200":
            return self._error(200, "50001", "system busy, try again later", fault=fault)
        if fault == "malformed":
            page = self._page(account, parsed)
            return _Response(200, page[: len(page) // 2], fault=fault)
        if fault == "slow":
            self._stopping.wait(self.slow_seconds)

        wait = self._charge(api_key, client_ip)
        if wait is not None:
            return self._too_many(wait)
        if api_key in self.hostile_pages:
            return _Response(200, _to_json(self.hostile_pages[api_key]), fault=fault)
        return _Response(200, self._page(account, parsed), fault=fault)

    def _authenticate(
        self, path: str, query: str, headers: Mapping[str, str], body: str
    ) -> tuple[str, _Account] | _Response:
        """(api key, account) if the request is properly signed, else the error response."""
        api_key = headers.get("ACCESS-KEY")
        sign = headers.get("ACCESS-SIGN")
        timestamp = headers.get("ACCESS-TIMESTAMP")
        passphrase = headers.get("ACCESS-PASSPHRASE")
        with self._lock:
            account = self._accounts.get(api_key or "")
        if account is None or sign is None or timestamp is None or passphrase is None:
            return self._error(401, "40006", "Invalid ACCESS_KEY")
        if not hmac.compare_digest(passphrase.encode(), account.passphrase.encode()):
            return self._error(401, "40011", "Invalid ACCESS_PASSPHRASE")
        if (
            not _INTEGER.fullmatch(timestamp)
            or abs(int(timestamp) - self.server_time_ms()) > MAX_CLOCK_DRIFT_MS
        ):
            return self._error(400, "40005", "Invalid ACCESS_TIMESTAMP")
        prehash = timestamp + "GET" + path + ("?" + query if query else "") + body
        digest = hmac.new(account.secret_key.encode(), prehash.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64encode(digest), sign.encode()):
            return self._error(400, "40009", "Signature verification failed")
        return api_key, account

    def _draw_fault(self) -> str | None:
        """One uniform draw per request against the cumulative fault probabilities."""
        with self._lock:
            if self._fault_rng_seed != self.fault_seed:
                self._fault_rng = random.Random(self.fault_seed)
                self._fault_rng_seed = self.fault_seed
            draw = self._fault_rng.random()
        threshold = 0.0
        for kind in FAULT_KINDS:
            threshold += self.faults.get(kind, 0.0)
            if draw < threshold:
                return kind
        return None

    def _charge(self, api_key: str, client_ip: str) -> int | None:
        """Charges the fills weight to the UID and IP windows; seconds to wait if over a limit."""
        now = time.monotonic()
        limits = [
            (limit, events, key)
            for limit, events, key in (
                (self.uid_limit, self._uid_events, api_key),
                (self.ip_limit, self._ip_events, client_ip),
            )
            if limit is not None
        ]
        with self._lock:
            windows = [(limit, events.setdefault(key, deque())) for limit, events, key in limits]
            waits = [
                _wait_seconds(charged, weight, seconds, now, FILLS_WEIGHT)
                for (weight, seconds), charged in windows
            ]
            if any(w is not None for w in waits):
                return max(w for w in waits if w is not None)
            for _, charged in windows:
                charged.append((now, FILLS_WEIGHT))
        return None

    def _page(self, account: _Account, query: _Query) -> bytes:
        symbols = [query.symbol] if query.symbol is not None else list(account.books)
        total = 0
        candidates: list[_Entry] = []
        with self._lock:
            for symbol in symbols:
                matched, page = account.books[symbol].query(
                    query.start, query.end, query.order_id, query.limit
                )
                total += matched
                candidates.extend(page)
        if len(symbols) > 1:
            candidates.sort(key=itemgetter(0, 1), reverse=True)
        texts = [entry[3] for entry in candidates[: query.limit]]
        next_flag = b"true" if total > len(texts) else b"false"
        return b'{"list":[%b],"nextFlag":%b,"totals":%d}' % (b",".join(texts), next_flag, total)


# --------------------------------------------------------------------------- CLI


def _limit_arg(text: str) -> tuple[int, float]:
    weight, _, window = text.partition("/")
    try:
        return int(weight), float(window)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WEIGHT/SECONDS, e.g. 500/10, not {text!r}")


def _date_arg(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, not {text!r}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Local simulator of the WEEX fills API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--accounts", type=int, default=3)
    parser.add_argument("--symbols", default="cmt_btcusdt,cmt_ethusdt")
    parser.add_argument("--fills", type=int, default=500, help="fills per account and symbol")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--start", type=_date_arg, help="first day of history (UTC); default: --days before now"
    )
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--live-fills-per-second", type=float, default=0)
    parser.add_argument("--uid-limit", type=_limit_arg, help="WEIGHT/SECONDS, e.g. 500/10")
    parser.add_argument("--fault-rate", type=float, default=0, help="spread over fault kinds")
    parser.add_argument("--latency-ms", type=float, default=0)
    return parser.parse_args(argv)


def _add_live_fills(
    sim: Simulator, api_keys: list[str], rate: float, stop: threading.Event
) -> None:
    """Adds one realistic fill stamped with the server's current time every 1/rate seconds."""
    rng = random.Random(sim.seed)
    while not stop.wait(1 / rate):
        now = sim.server_time_ms()
        symbol = rng.choice(sim.symbols)
        sim.generate_fills(rng.choice(api_keys), symbol, 1, start_ms=now, end_ms=now)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    sim = Simulator(symbols=symbols, seed=args.seed)
    sim.uid_limit = args.uid_limit
    sim.latency = args.latency_ms / 1000
    sim.faults = dict.fromkeys(FAULT_KINDS, args.fault_rate / len(FAULT_KINDS))

    span_ms = int(args.days * 86_400_000)
    start_ms = int(args.start.timestamp() * 1000) if args.start else sim.server_time_ms() - span_ms
    api_keys = []
    for n in range(1, args.accounts + 1):
        api_key = f"demo-key-{n}"
        sim.add_account(api_key, f"demo-secret-{n}", f"demo-pass-{n}")
        for symbol in symbols:
            sim.generate_fills(
                api_key, symbol, args.fills, start_ms=start_ms, end_ms=start_ms + span_ms
            )
        api_keys.append(api_key)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    url = sim.start(args.host, args.port)
    if args.live_fills_per_second > 0 and api_keys:
        threading.Thread(
            target=_add_live_fills,
            args=(sim, api_keys, args.live_fills_per_second, stop),
            daemon=True,
        ).start()
    total = args.accounts * len(symbols) * args.fills
    print(
        f"weex_sim listening on {url} "
        f"({args.accounts} accounts, {len(symbols)} symbols, {total} fills)",
        flush=True,
    )
    stop.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
