"""Local simulator of the WEEX futures "trade fills" REST API.

It follows docs/weex-api.md over real HTTP, for both versions of the API: HMAC-signed
``GET /capi/v2/order/fills`` (``nextFlag``/``totals``) and ``GET /capi/v3/userTrades``
(a bare array, 7-day span and 365-day horizon limits), the public server-time endpoints of both,
each version's error bodies, weighted rolling-window rate limits and injectable faults.  Both
versions serve one history per account: each fill is stored once and rendered per version.  Where
the docs are silent (which end of a range a page holds and how it lists it, on either version;
when a fill becomes visible) switches
make it behave each way the real exchange might.  Used in-process by the test-suite and benchmarks,
and standalone (see ``main``) by the demo.  Standard library only.

Rate limiting can be made stricter than the docs, as public reports say the exchange may be (each
default is the docs' behaviour; see _Limits):

* ``burst_limit`` (None): a second per-IP window, e.g. (50, 1.0), a burst cap the docs do not list;
* ``limit_code`` ("429"): a refusal's code; "-1003" and "-1059" answer in v3's shape, ``{"code":
  -1059, "msg": ...}``, on either version;
* ``limit_retry_after`` (True): False leaves Retry-After out of refusals;
* ``charge_refused`` (False): True charges refused requests to the windows too;
* ``penalty_box`` (None): (refusals, within_seconds, box_seconds): an IP refused that often is
  refused everything for box_seconds (``penalty_boxes`` counts the boxes entered);
* ``penalty_status`` (429): the HTTP status of a boxed IP's refusals, 429 or 418 (a ban).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import heapq
import hmac
import itertools
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
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, Inexact
from email.message import Message  # a request's headers, looked up case-insensitively
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import itemgetter
from typing import Any, ClassVar, Generic, NamedTuple, Self, TypeVar, overload
from urllib.parse import parse_qsl

FILLS_PATH = "/capi/v2/order/fills"
TIME_PATH = "/capi/v2/market/time"
V3_FILLS_PATH = "/capi/v3/userTrades"
V3_TIME_PATH = "/capi/v3/market/time"
FILLS_PATHS = {2: FILLS_PATH, 3: V3_FILLS_PATH}
FILLS_WEIGHT = 5
MAX_CLOCK_DRIFT_MS = 30_000
# Drawn in this order (see _Faults.draw): new kinds go at the end so existing seeds keep meaning.
FAULT_KINDS = ("429", "500", "502", "503", "slow", "malformed", "error200", "drop", "stall")
# Faults whose response announces its full length but sends only the first half of the body.
CUT_FAULTS = ("drop", "stall")
# Simulator.limit_code -> the message of a rate-limit refusal with that code (see _too_many).
LIMIT_CODES = {
    "429": "Too many requests, please try again later",
    "-1003": "TOO_MANY_REQUESTS: too many requests",
    "-1059": "TOO_MANY_REQUESTS: too many high-frequency requests",
}
PENALTY_STATUSES = (429, 418)  # Simulator.penalty_status: 418 is what some exchanges ban with
ID_BASE = 10**18  # every generated id is ID_BASE + n, far above 2**53
QUERY_PARAMS = frozenset({"symbol", "orderId", "startTime", "endTime", "limit"})
DAY_MS = 86_400_000
V3_MAX_SPAN_MS = 7 * DAY_MS  # default of Simulator.max_span_ms
V3_HORIZON_MS = 365 * DAY_MS  # default of Simulator.horizon_ms
V3_ORDERS = ("newest", "oldest")
LISTINGS = ("newest", "oldest", "shuffled")

_INTEGER = re.compile(r"-?[0-9]+")
_AMOUNT = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONTRACT = re.compile(r"cmt_([a-z0-9]+)(usdt|usdc)")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# Decimal arithmetic that never rounds silently: an inexact result raises.
_EXACT = Context(prec=1_000, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact])
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
# (orderSide, positionSide, direction) combinations a fill can have; add_fill uses the first two.
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


# --------------------------------------------------------------------------- storage
#
# Memory per fill matters (benchmarks keep 200,000+ fills per account), so a fill is not stored as
# the JSON text of either version.  createdTime, tradeId and orderId live in int64 columns of the
# (account, contract) book, and the rest in one compact record:
#
#     b"<flags, 2 hex digits>|<size>|<price>|<value>|<fee>|<realized pnl>"
#
# plus b"|<JSON object>" when add_fill was given extra fields.  The flags (see _template) say the
# order kind, margin modes, maker, and which of the ids and time are sent as JSON strings, so both
# renderings of a fill agree.  Each page renders its records into the asked version, one bytes
# format per fill.  Measured on 200,000 generated fills: ~135 bytes of RSS per fill, against ~490
# when the v2 JSON text was stored, for ~0.1 ms more CPU per page of 100.  A verbatim object
# (add_raw_fill) is stored as its JSON text, told apart by its leading "{", and served as-is.

_ISOLATED, _SEPARATED, _MAKER, _TRADE_ID_TEXT, _ORDER_ID_TEXT, _TIME_TEXT = 4, 8, 16, 32, 64, 128

# Every field of the contract's example object of each version, in the same order.
_V2_TEMPLATE = (
    b'{"tradeId":%b,"orderId":%b,"symbol":"%b","marginMode":"%b","separatedMode":"%b",'
    b'"positionSide":"%b","orderSide":"%b","fillSize":"%b","fillValue":"%b","fillFee":"%b",'
    b'"liquidateFee":"0","realizePnl":"%b","direction":"%b","liquidateType":"",'
    b'"legacyOrdeDirection":"%b","createdTime":%b}'
)
_V3_TEMPLATE = (
    b'{"id":%b,"orderId":%b,"symbol":"%b","buyer":%b,"commission":"%b","commissionAsset":"%b",'
    b'"maker":%b,"price":"%b","qty":"%b","quoteQty":"%b","realizedPnl":"%b","side":"%b",'
    b'"positionSide":"%b","time":%b}'
)


@dataclass(frozen=True, slots=True)
class _Contract:
    """A listed contract in the forms each version names it."""

    name: str  # v2 form, the simulator's key: cmt_btcusdt
    v2: bytes
    v3: bytes  # BTCUSDT
    asset: bytes  # margin (and commission) coin: USDT or USDC
    # version -> record flags -> format of the text of such fills (see _template), made on use
    templates: dict[int, dict[bytes, bytes]] = field(
        default_factory=lambda: {version: {} for version in FILLS_PATHS}, compare=False
    )


def _contract(name: str) -> _Contract:
    match = _CONTRACT.fullmatch(name)
    if match is None:
        raise ValueError(f"contract {name!r} is not of the form cmt_<base>usdt or cmt_<base>usdc")
    v3 = name.removeprefix("cmt_").upper()
    return _Contract(name, name.encode(), v3.encode(), match[2].upper().encode())


# A fill as a book hands it out: (createdTime, tradeId, orderId, record, contract).
_Entry = tuple[int, int, int, bytes, _Contract]
_Columns = tuple[array, array, array, list[bytes]]
_ENTRY_KEY = itemgetter(0, 1)


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


def _record(flags: int, size: str, price: str, value: str, fee: str, pnl: str) -> bytes:
    return f"{flags:02x}|{size}|{price}|{value}|{fee}|{pnl}".encode()


def _template(version: int, contract: _Contract, flags: bytes) -> bytes:
    """The text of the contract's fills with these record flags, all constant fields filled in.

    Its format slots take (tradeId, orderId, size, value, fee, pnl, createdTime) on v2 and
    (tradeId, orderId, fee, price, size, value, pnl, createdTime) on v3: one % per fill served.
    """
    bits = int(flags, 16)
    side, position_side, direction = (text.encode() for text in _ORDER_KINDS[bits & 3])
    trade_id, order_id, created = (
        b'"%d"' if bits & as_text else b"%d"
        for as_text in (_TRADE_ID_TEXT, _ORDER_ID_TEXT, _TIME_TEXT)
    )
    if version == 2:
        margin_mode = b"ISOLATED" if bits & _ISOLATED else b"SHARED"
        separated_mode = b"SEPARATED" if bits & _SEPARATED else b"COMBINED"
        return _V2_TEMPLATE % (
            trade_id,
            order_id,
            contract.v2,
            margin_mode,
            separated_mode,
            position_side,
            side,
            *(b"%b",) * 4,
            direction,
            direction,
            created,
        )
    buyer = b"true" if side == b"BUY" else b"false"
    maker = b"true" if bits & _MAKER else b"false"
    return _V3_TEMPLATE % (
        trade_id,
        order_id,
        contract.v3,
        buyer,
        b"%b",
        contract.asset,
        maker,
        *(b"%b",) * 4,
        side,
        position_side,
        created,
    )


def _render(version: int, entry: _Entry) -> bytes:
    """The JSON text of a stored fill as the given API version serves it."""
    created, trade_id, order_id, record, contract = entry
    if record[0] == 123:  # "{": a verbatim object
        return record
    parts = record.split(b"|", 6)
    if len(parts) == 7:  # extra fields, rare: the slow way
        obj = _served(
            _render(version, (created, trade_id, order_id, b"|".join(parts[:6]), contract))
        )
        obj.update(_served(parts[6]))
        return _to_json(obj)
    flags, size, price, value, fee, pnl = parts
    templates = contract.templates[version]
    template = templates.get(flags)
    if template is None:
        template = templates[flags] = _template(version, contract, flags)
    if version == 2:
        return template % (trade_id, order_id, size, value, fee, pnl, created)
    return template % (trade_id, order_id, fee, price, size, value, pnl, created)


def _empty_columns() -> _Columns:
    return array("q"), array("q"), array("q"), []


def _columns(fills: Iterable[tuple[int, int, int, bytes]]) -> _Columns:
    """(createdTime, tradeId, orderId, record) tuples as the parallel columns books take."""
    columns = _empty_columns()
    for fill in fills:
        for column, value in zip(columns, fill):
            column.append(value)
    return columns


class _Book:
    """The visible fills of one (account, contract), sorted ascending by (createdTime, tradeId).

    Parallel columns keep bisecting on createdTime cheap and a page is a slice of the records,
    so serving a page costs O(log n + limit) whatever the history size.
    """

    __slots__ = ("contract", "order_ids", "records", "times", "trade_ids")

    # Above this many new fills one sort of everything beats inserting them one by one.
    BULK_THRESHOLD = 256

    def __init__(self, contract: _Contract) -> None:
        self.contract = contract
        self.times, self.trade_ids, self.order_ids, self.records = _empty_columns()

    def insert(self, created: int, trade_id: int, order_id: int, record: bytes) -> None:
        lo = bisect_left(self.times, created)
        hi = bisect_right(self.times, created, lo)
        pos = bisect_right(self.trade_ids, trade_id, lo, hi)
        self.times.insert(pos, created)
        self.trade_ids.insert(pos, trade_id)
        self.order_ids.insert(pos, order_id)
        self.records.insert(pos, record)

    def extend(self, columns: _Columns) -> None:
        """Adds many fills given as parallel columns (createdTime, tradeId, orderId, record).

        Columns rather than one tuple per fill: 200k short-lived tuples allocated between the
        long-lived records would fragment the heap and cost ~15 MB of RSS.
        """
        times, trade_ids, order_ids, records = columns
        if len(times) <= self.BULK_THRESHOLD:
            for entry in zip(times, trade_ids, order_ids, records):
                self.insert(*entry)
            return
        times = self.times + times
        trade_ids = self.trade_ids + trade_ids
        order_ids = self.order_ids + order_ids
        records = self.records + records
        order = sorted(range(len(times)), key=trade_ids.__getitem__)
        order.sort(key=times.__getitem__)  # stable, so equal times stay in tradeId order
        self.times = array("q", [times[i] for i in order])
        self.trade_ids = array("q", [trade_ids[i] for i in order])
        self.order_ids = array("q", [order_ids[i] for i in order])
        self.records = [records[i] for i in order]

    def query(
        self, start: int | None, end: int | None, order_id: int | None, limit: int, newest: bool
    ) -> tuple[int, list[_Entry]]:
        """(number of matching fills, the newest `limit` of them newest first if `newest`,
        else the oldest `limit` oldest first)."""
        lo = 0 if start is None else bisect_left(self.times, start)
        hi = len(self.times) if end is None else bisect_right(self.times, end)
        indices: Iterable[int]
        if order_id is None:
            total = max(0, hi - lo)
            if newest:
                indices = range(hi - 1, max(lo, hi - limit) - 1, -1)
            else:
                indices = range(lo, min(hi, lo + limit))
        else:
            ids = self.order_ids[lo:hi]
            matched = [i for i, oid in enumerate(ids, lo) if oid == order_id]
            total = len(matched)
            indices = reversed(matched[-limit:]) if newest else matched[:limit]
        return total, [self.entry(i) for i in indices]

    def remove(self, trade_id: int) -> int:
        """Removes the fills with this tradeId; how many there were."""
        keep = [i for i, t in enumerate(self.trade_ids) if t != trade_id]
        removed = len(self.times) - len(keep)
        if removed:
            self.times = array("q", [self.times[i] for i in keep])
            self.trade_ids = array("q", [self.trade_ids[i] for i in keep])
            self.order_ids = array("q", [self.order_ids[i] for i in keep])
            self.records = [self.records[i] for i in keep]
        return removed

    def entry(self, i: int) -> _Entry:
        return self.times[i], self.trade_ids[i], self.order_ids[i], self.records[i], self.contract

    def entries(self) -> Iterable[_Entry]:
        """Every fill, oldest first."""
        columns = self.times, self.trade_ids, self.order_ids, self.records
        return zip(*columns, itertools.repeat(self.contract))


@dataclass(slots=True)
class _Account:
    secret_key: str
    passphrase: str
    whitelisted: bool
    permitted: bool
    # contract name -> book, created on the account's first (visible) fill of that contract
    books: dict[str, _Book] = field(default_factory=dict)


class _Pending(NamedTuple):
    """A fill hidden until `visible_at` (server time, ms); see _FillStore._release_due."""

    visible_at: int
    seq: int  # insertion order: ties never compare the fields below
    api_key: str
    contract: _Contract
    created: int
    trade_id: int
    order_id: int
    record: bytes


# --------------------------------------------------------------------------- fill generation


def _decimal_text(value: Decimal) -> str:
    """Plain decimal notation without trailing zeros, as the exchange sends amounts."""
    return format(value.normalize(_EXACT), "f")


def _amount(name: str, text: str) -> Decimal:
    if not isinstance(text, str) or not _AMOUNT.fullmatch(text):
        raise ValueError(f"{name} must be a decimal number as text, not {text!r}")
    return Decimal(text)


def _price_of(value: Decimal, size: Decimal) -> Decimal:
    """value / size: exact when the quotient terminates, else to 60 significant digits."""
    quotient = Fraction(value) / Fraction(size)
    rest, twos, fives = quotient.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return Context(prec=60).divide(quotient.numerator, quotient.denominator)
    places = max(twos, fives)  # 10**places is a multiple of the denominator
    return Decimal(f"{quotient.numerator * 10**places // quotient.denominator}e-{places}")


def _order_fills(
    rng: random.Random,
    symbol: str,
    order_id: int,
    trade_ids: Iterable[int],
    start_ms: int,
    end_ms: int,
) -> list[tuple[int, int, int, bytes]]:
    """(createdTime, tradeId, orderId, record) for every fill of one random order: same side,
    nearby prices and times."""
    kind = rng.randrange(len(_ORDER_KINDS))  # the draw rng.choice makes: seeds keep their fills
    low, high = _PRICE_RANGES.get(symbol, _DEFAULT_PRICE_RANGE)
    price_cents = rng.randint(low * 100, high * 100)
    order_time = rng.randint(start_ms, end_ms)
    maker = rng.random() < 0.2  # maker fills earn a rebate: negative fee
    order_flags = kind | (_MAKER if maker else 0)
    order_flags |= _ISOLATED if rng.random() < 0.2 else 0
    order_flags |= _SEPARATED if rng.random() < 0.1 else 0
    closing = _ORDER_KINDS[kind][2].startswith("CLOSE")
    fills = []
    for trade_id in trade_ids:
        if rng.random() < 0.5:  # otherwise this fill shares the previous fill's millisecond
            order_time = min(end_ms, order_time + rng.randint(0, 40))
        price = Decimal(price_cents + rng.randint(-50, 50)).scaleb(-2)
        size = Decimal(rng.randint(1, 20_000)).scaleb(-4)
        value = price * size
        fee = value * (Decimal("-0.0002") if maker else Decimal("0.0006"))
        pnl = Decimal(rng.randint(-500_000, 500_000)).scaleb(-4) if closing else Decimal(0)
        # ids, and sometimes createdTime, go out as JSON strings at random
        flags = order_flags | (_TRADE_ID_TEXT if rng.random() < 0.3 else 0)
        flags |= _ORDER_ID_TEXT if rng.random() < 0.3 else 0
        flags |= _TIME_TEXT if rng.random() < 0.2 else 0
        texts = (_decimal_text(amount) for amount in (size, price, value, fee, pnl))
        fills.append((order_time, trade_id, order_id, _record(flags, *texts)))
    return fills


def _given_fill_record(
    side: str, size: str, value: str | None, price: str | None, fee: str, extra: dict[str, Any]
) -> bytes:
    """The record of a fill add_fill was given (see there); raises ValueError on bad amounts."""
    if side not in ("BUY", "SELL"):
        raise ValueError(f"side must be BUY or SELL, not {side!r}")
    if value is not None and price is not None:
        raise ValueError("give value or price, not both")
    size_amount = _amount("size", size)
    if size_amount <= 0:
        raise ValueError(f"size must be positive, not {size!r}")
    if price is None:
        value = "100" if value is None else value
        price = _decimal_text(_price_of(_amount("value", value), size_amount))
    else:
        value = _decimal_text(_EXACT.multiply(_amount("price", price), size_amount))
    flags = (0 if side == "BUY" else 1) | (_MAKER if _amount("fee", fee) < 0 else 0)
    record = _record(flags, size, price, value, fee, "0")
    if extra:
        record += b"|" + _to_json(extra)
    return record


# --------------------------------------------------------------------------- requests and answers


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    fault: str | None = None
    refused: bool = False  # by the rate limits (see _Limits), not by a fault
    boxed: bool = False  # because the client IP is in the penalty box


@dataclass(frozen=True)
class _Query:
    symbol: str | None  # the contract in its v2 form (the simulator's key)
    order_id: int | None
    start: int | None
    end: int | None
    limit: int


# Why a request is refused -> {API version: (HTTP status, code, message)}; a "{}" in the message
# takes the detail.  v2 codes are strings and its bodies carry requestTime (see
# _ApiVersion.rejection).
_ERRORS: dict[str, dict[int, tuple[int, str | int, str]]] = {
    "header": {
        2: (401, "40006", "Invalid ACCESS_KEY"),
        3: (401, -1040, "MISSING_HEADER header {} is missing"),
    },
    "key": {
        2: (401, "40006", "Invalid ACCESS_KEY"),
        3: (401, -1041, "INVALID_API_KEY invalid ACCESS_KEY"),
    },
    "passphrase": {
        2: (401, "40011", "Invalid ACCESS_PASSPHRASE"),
        3: (401, -1044, "INVALID_PASSPHRASE API key or passphrase incorrect"),
    },
    "timestamp": {
        2: (400, "40005", "Invalid ACCESS_TIMESTAMP"),
        3: (400, -1043, "INVALID_TIMESTAMP invalid or expired ACCESS_TIMESTAMP"),
    },
    "signature": {
        2: (400, "40009", "Signature verification failed"),
        3: (401, -1042, "AUTH_FAILED signature verification failed"),
    },
    "ip": {
        2: (521, "521", "Request IP not in the API key's IP whitelist: whitelist this IP"),
        3: (403, -1056, "ILLEGAL_IP request IP not in the API key's whitelist: whitelist this IP"),
    },
    "permission": {
        2: (403, "40014", "Insufficient permissions"),
        3: (403, -1052, "NO_PERMISSION no permission for this API key"),
    },
    "parameter": {
        2: (400, "40017", "Parameter verification failed: {}"),
        3: (400, -1140, "PARAMETER_INVALID {}"),
    },
    "symbol": {
        2: (400, "40034", "Parameter {} does not exist"),
        3: (400, -1121, "INVALID_SYMBOL invalid symbol {}"),
    },
    "too_long": {3: (400, -1170, "TIME_RANGE_INVALID time range too long: {}")},
    "too_old": {3: (400, -1170, "TIME_RANGE_INVALID startTime too old: {}")},
    "start_after_end": {3: (400, -1171, "TIME_RANGE_INVALID startTime after endTime: {}")},
    "busy": {
        2: (200, "50001", "system busy, try again later"),
        3: (200, -1054, "SYSTEM_ERROR system error"),
    },
}
_AUTH_HEADERS = ("ACCESS-KEY", "ACCESS-SIGN", "ACCESS-TIMESTAMP", "ACCESS-PASSPHRASE")
# path -> (endpoint, API version)
_ROUTES = {
    FILLS_PATH: ("fills", 2),
    TIME_PATH: ("time", 2),
    V3_FILLS_PATH: ("fills", 3),
    V3_TIME_PATH: ("time", 3),
}


class _Rejected(Exception):
    """A request the exchange refuses; `reason` is a key of _ERRORS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _json_response(status: int, obj: Any, **kwargs: Any) -> _Response:
    return _Response(status, _ENCODER.encode(obj).encode(), **kwargs)


def _html_response(status: int, fault: str) -> _Response:
    title = f"{status} {_HTML_ERRORS[status]}"
    body = f"<html><head><title>{title}</title></head><body><center><h1>{title}</h1></center>"
    body += "<hr><center>nginx</center></body></html>"
    return _Response(status, body.encode(), "text/html", fault=fault)


def _params(query: str) -> tuple[str | None, dict[str, int | None], int]:
    """(symbol, integer parameters, limit) of a fills query; rejects what neither version takes."""
    pairs = parse_qsl(query, keep_blank_values=True)
    params = dict(pairs)
    if len(params) != len(pairs):
        raise _Rejected("parameter", "duplicate parameter")
    unknown = set(params) - QUERY_PARAMS
    if unknown:
        raise _Rejected("parameter", f"unknown parameter {min(unknown)}")
    numbers: dict[str, int | None] = {}
    for name in ("orderId", "startTime", "endTime", "limit"):
        text = params.get(name)
        value = None if text is None else _id_key(text)
        if value == NO_ID:
            raise _Rejected("parameter", f"{name} must be a 64-bit integer")
        numbers[name] = value
    limit = 100 if numbers["limit"] is None else numbers["limit"]
    if not 1 <= limit <= 100:
        raise _Rejected("parameter", "limit must be between 1 and 100")
    return params.get("symbol"), numbers, limit


# --------------------------------------------------------------------------- the store of fills


class _FillStore:
    """The exchange's data: the listed contracts, the accounts and their books of visible fills,
    the fills not visible yet, and the ids handed out.  Each fill is stored once, whatever
    version serves it (see the storage section).

    Its public methods are the Simulator's (it binds them in __init__).  `now_ms` is the server
    clock, which decides when a late fill becomes visible.
    """

    def __init__(self, symbols: tuple[str, ...], seed: int, now_ms: Callable[[], int]) -> None:
        # The contracts the exchange lists; an account's book of one appears on its first fill.
        self.symbols = symbols
        self.seed = seed  # what generate_fills derives its seeds from
        self.contracts = {name: _contract(name) for name in symbols}
        self._now_ms = now_ms
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._pending: list[_Pending] = []  # a heap: the next fill to become visible first
        self._pending_seq = itertools.count()
        self._next_id = ID_BASE + 1

    def add_account(
        self,
        api_key: str,
        secret_key: str,
        passphrase: str,
        *,
        whitelisted: bool = True,
        permitted: bool = True,
    ) -> None:
        """Adds an account, or replaces the credentials of an existing one (keeping its fills).

        `whitelisted=False`: requests come from an IP the key does not allow; `permitted=False`:
        the key lacks the permission to read trades.
        """
        with self._lock:
            account = self._accounts.get(api_key)
            books = account.books if account else {}
            self._accounts[api_key] = _Account(
                secret_key, passphrase, whitelisted, permitted, books
            )

    def generate_fills(
        self,
        api_key: str,
        symbol: str,
        count: int,
        *,
        start_ms: int,
        end_ms: int,
        seed: int | None = None,
        visible_delay_ms: int = 0,
    ) -> None:
        """Adds `count` realistic fills spread over [start_ms, end_ms].

        Deterministic: the same calls on a fresh Simulator with the same seed give the same
        fills.  Without `seed`, one is derived from the simulator's seed and the arguments.
        Orders have 1-5 fills, often in the same millisecond; ids, and sometimes createdTime,
        are sent as JSON numbers or strings at random (the same way on both versions).  Each
        fill is served from server time createdTime + `visible_delay_ms` on.
        """
        if count < 0 or start_ms > end_ms:
            raise ValueError("need count >= 0 and start_ms <= end_ms")
        with self._lock:
            self._account(api_key)  # fail early on an unknown account or symbol
        self._contract_of(symbol)
        if seed is None:
            seed_material = f"{self.seed}/{api_key}/{symbol}/{count}/{start_ms}/{end_ms}"
        else:
            seed_material = str(seed)
        rng = random.Random(seed_material)
        # Reserve the ids up front: `count` trade ids, then at most `count` order ids.
        first_id = self._reserve_ids(2 * count)

        def fills() -> Iterable[tuple[int, int, int, bytes]]:
            end_id = first_id + count
            trade_id, order_id = first_id, end_id
            while trade_id < end_id:
                in_order = min(rng.randint(1, 5), end_id - trade_id)
                trade_ids = range(trade_id, trade_id + in_order)
                yield from _order_fills(rng, symbol, order_id, trade_ids, start_ms, end_ms)
                trade_id += in_order
                order_id += 1

        self._add(api_key, symbol, _columns(fills()), visible_delay_ms)

    def add_fill(
        self,
        api_key: str,
        symbol: str,
        *,
        created_time: int,
        order_id: int | None = None,
        trade_id: int | None = None,
        size: str = "0.001",
        value: str | None = None,
        price: str | None = None,
        fee: str = "0.06",
        side: str = "BUY",
        visible_after_ms: int = 0,
        **extra: Any,
    ) -> dict[str, Any]:
        """Adds one well-formed fill with ids as JSON numbers; returns it as served on v2.

        Give the quote `value` (default "100") or the `price`; the other follows exactly:
        value = price * size, or price = value / size (to 60 significant digits when that does
        not terminate).  Amounts are decimal texts, served as given.  A negative fee (a rebate)
        makes it a maker fill, as in generated fills.  Missing ids are allocated.  `extra`
        fields are added to (or override fields of) the objects of both versions verbatim; the
        server still filters and sorts by `created_time`, `trade_id` and `order_id`.  The fill is
        served from server time `created_time + visible_after_ms` on.
        """
        record = _given_fill_record(side, size, value, price, fee, extra)
        if trade_id is None:
            trade_id = self._reserve_ids(1)
        if order_id is None:
            order_id = self._reserve_ids(1)
        for name, id_value in (("trade_id", trade_id), ("order_id", order_id)):
            if not isinstance(id_value, int) or _id_key(id_value) == NO_ID:
                raise ValueError(f"{name} must be a 64-bit integer (add_raw_fill takes any id)")
        fill = (created_time, trade_id, order_id, record)
        self._add(api_key, symbol, _columns([fill]), visible_after_ms)
        return _served(_render(2, (*fill, self._contract_of(symbol))))

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
        """Stores any JSON object verbatim (hostile input), served as-is on both versions.

        The server filters and sorts it by `created_time`, its "tradeId" (or, without one, its
        v3 "id") and its "orderId", and serves it once its clock reaches `created_time`.
        """
        trade_id = obj["tradeId"] if "tradeId" in obj else obj.get("id")
        fill = (created_time, _id_key(trade_id), _id_key(obj.get("orderId")), _to_json(obj))
        self._add(api_key, symbol, _columns([fill]), 0)

    def remove_fill(self, api_key: str, symbol: str, trade_id: int) -> None:
        """Withdraws a visible fill (the exchange corrects it: add its new version after)."""
        with self._lock:
            book = self._account(api_key).books.get(self._contract_of(symbol).name)
            if book is None or not book.remove(trade_id):
                raise KeyError(f"no visible fill with tradeId {trade_id} in {symbol}")

    def fills(
        self,
        api_key: str,
        symbol: str | None = None,
        *,
        version: int = 2,
        visible_only: bool = False,
    ) -> list[dict[str, Any]]:
        """The account's fills of `symbol` (None: of every contract) as served on `version`,
        newest first (the server's order); fills not visible yet are included unless
        `visible_only`."""
        if version not in FILLS_PATHS:
            raise ValueError(f"version must be one of {list(FILLS_PATHS)}, not {version!r}")
        names = self.symbols if symbol is None else (self._contract_of(symbol).name,)
        with self._lock:
            account = self._account(api_key)
            self._release_due()
            books = [account.books[name] for name in names if name in account.books]
            entries = [entry for book in books for entry in book.entries()]
            if not visible_only:
                entries += [
                    (p.created, p.trade_id, p.order_id, p.record, p.contract)
                    for p in self._pending
                    if p.api_key == api_key and p.contract.name in names
                ]
        entries.sort(key=_ENTRY_KEY)  # stable: one book's order is kept
        return [_served(_render(version, entry)) for entry in reversed(entries)]

    def find_account(self, api_key: str) -> _Account | None:
        """The account of this key, if there is one (what authentication looks up)."""
        with self._lock:
            return self._accounts.get(api_key)

    def select(self, account: _Account, query: _Query, newest: bool) -> tuple[int, list[_Entry]]:
        """(number of visible fills matching the query, the page of them in serving order)."""
        names = self.symbols if query.symbol is None else (query.symbol,)
        total = 0
        entries: list[_Entry] = []
        with self._lock:
            self._release_due()
            for name in names:
                book = account.books.get(name)
                if book is not None:
                    matched, page = book.query(
                        query.start, query.end, query.order_id, query.limit, newest
                    )
                    total += matched
                    entries.extend(page)
        entries.sort(key=_ENTRY_KEY, reverse=newest)  # merges the contracts' pages
        return total, entries[: query.limit]

    def _reserve_ids(self, n: int) -> int:
        """First of `n` fresh consecutive ids, unique within this simulator."""
        with self._lock:
            first = self._next_id
            self._next_id += n
        return first

    def _add(self, api_key: str, symbol: str, columns: _Columns, delay_ms: int) -> None:
        """Adds fills to the account's book; those not visible yet wait in the pending heap."""
        contract = self._contract_of(symbol)
        times = columns[0]
        if not times:
            return
        with self._lock:
            account = self._account(api_key)
            now = self._now_ms()
            if max(times) + delay_ms <= now:  # the usual case: everything visible at once
                self._book(account, contract).extend(columns)
                return
            visible = _empty_columns()
            for fill in zip(*columns):
                if fill[0] + delay_ms <= now:
                    for column, value in zip(visible, fill):
                        column.append(value)
                else:
                    seq = next(self._pending_seq)
                    pending = _Pending(fill[0] + delay_ms, seq, api_key, contract, *fill)
                    heapq.heappush(self._pending, pending)
            if visible[0]:
                self._book(account, contract).extend(visible)

    def _release_due(self) -> None:
        """Moves the pending fills whose moment has come into their books (lock held).

        Called before anything reads the books, so a hidden fill is invisible everywhere
        (pages, totals, per-order queries) until then; free while nothing is pending.
        """
        if not self._pending:
            return
        now = self._now_ms()
        while self._pending and self._pending[0].visible_at <= now:
            fill = heapq.heappop(self._pending)
            book = self._book(self._accounts[fill.api_key], fill.contract)
            book.insert(fill.created, fill.trade_id, fill.order_id, fill.record)

    def _account(self, api_key: str) -> _Account:
        account = self._accounts.get(api_key)
        if account is None:
            raise ValueError(f"unknown account {api_key!r}")
        return account

    def _contract_of(self, symbol: str) -> _Contract:
        contract = self.contracts.get(symbol)
        if contract is None:
            raise ValueError(f"unknown symbol {symbol!r}; simulator symbols: {self.symbols}")
        return contract

    @staticmethod
    def _book(account: _Account, contract: _Contract) -> _Book:
        """The account's book of the contract, created on first use."""
        book = account.books.get(contract.name)
        if book is None:
            book = account.books[contract.name] = _Book(contract)
        return book


# --------------------------------------------------------------------------- the API versions


def _gateway_error(status: int, code: str, msg: str, now_ms: int, **kwargs: Any) -> _Response:
    """An error in v2's shape: v2's own, and what the gateway answers for 404 and 429 on both
    versions."""
    body = {"code": code, "msg": msg, "requestTime": now_ms}
    return _json_response(status, body, **kwargs)


def _too_many(
    retry_after: int | None, now_ms: int, *, status: int = 429, code: str = "429", **kwargs: Any
) -> _Response:
    """A rate-limit refusal with a code of LIMIT_CODES: "429" in the gateway's shape, the others
    in v3's, whatever version was asked; with Retry-After unless `retry_after` is None."""
    headers = () if retry_after is None else (("Retry-After", str(retry_after)),)
    if code == "429":
        return _gateway_error(status, code, LIMIT_CODES[code], now_ms, headers=headers, **kwargs)
    body = {"code": int(code), "msg": LIMIT_CODES[code]}
    return _json_response(status, body, headers=headers, **kwargs)


class _ApiVersion(ABC):
    """What one version of the fills API does its own way: read a fills query, lay out a page,
    word a refusal and tell the time.  Both versions serve the one store of fills."""

    version: ClassVar[int]

    def __init__(self, contracts: dict[str, _Contract], now_ms: Callable[[], int]) -> None:
        self.contracts = contracts  # the listed contracts by their v2 name
        self.now_ms = now_ms  # the server clock
        self.enabled = True  # False: its paths answer 404 (an exchange without this version)
        # Which end of [startTime, endTime] a full page is taken from -- the newest or the
        # oldest fills of the range: the docs of neither version say.
        self.order = "newest"

    @abstractmethod
    def parse(self, query: str) -> _Query:
        """The fills query of this query string; raises _Rejected if this version refuses it."""

    def page(self, total: int, entries: list[_Entry]) -> bytes:
        """The body of a page listing `entries`, of `total` fills matching its query."""
        return self._page_body(total, [_render(self.version, entry) for entry in entries])

    def rejection(self, rejected: _Rejected, **kwargs: Any) -> _Response:
        status, code, message = _ERRORS[rejected.reason][self.version]
        return self._error(status, code, message.format(rejected.detail), **kwargs)

    def server_time(self) -> _Response:
        """The answer of this version's public server-time endpoint."""
        return _json_response(200, self._time_body(self.now_ms()))

    @abstractmethod
    def _page_body(self, total: int, texts: list[bytes]) -> bytes: ...

    @abstractmethod
    def _error(self, status: int, code: str | int, msg: str, **kwargs: Any) -> _Response: ...

    @abstractmethod
    def _time_body(self, now: int) -> dict[str, Any]: ...


class _V2Api(_ApiVersion):
    """GET /capi/v2/order/fills: a page is {"list", "nextFlag", "totals"}; codes are strings."""

    version = 2

    def parse(self, query: str) -> _Query:
        symbol, numbers, limit = _params(query)
        start, end = numbers["startTime"], numbers["endTime"]
        if start is not None and end is not None and start > end:
            raise _Rejected("parameter", "startTime must not be after endTime")
        if symbol is not None and symbol not in self.contracts:
            raise _Rejected("symbol", symbol)
        return _Query(symbol, numbers["orderId"], start, end, limit)

    def _page_body(self, total: int, texts: list[bytes]) -> bytes:
        next_flag = b"true" if total > len(texts) else b"false"
        return b'{"list":[%b],"nextFlag":%b,"totals":%d}' % (b",".join(texts), next_flag, total)

    def _error(self, status: int, code: str | int, msg: str, **kwargs: Any) -> _Response:
        return _gateway_error(status, str(code), msg, self.now_ms(), **kwargs)

    def _time_body(self, now: int) -> dict[str, Any]:
        seconds, millis = divmod(now, 1000)
        iso = dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return {"epoch": f"{seconds}.{millis:03d}", "iso": f"{iso}.{millis:03d}Z", "timestamp": now}


class _V3Api(_ApiVersion):
    """GET /capi/v3/userTrades: symbols as BTCUSDT, a time range always (filled in when not
    given) and limited in span and age, a page is a bare array, codes are negative numbers."""

    version = 3

    def __init__(self, contracts: dict[str, _Contract], now_ms: Callable[[], int]) -> None:
        super().__init__(contracts, now_ms)
        self.max_span_ms: int | None = V3_MAX_SPAN_MS  # longest endTime - startTime
        self.horizon_ms: int | None = V3_HORIZON_MS  # how far back startTime may reach
        self._names = {c.v3.decode(): name for name, c in contracts.items()}  # BTCUSDT -> v2 name

    def parse(self, query: str) -> _Query:
        """The v3 query with its time range filled in; the limits judge that effective range."""
        symbol, numbers, limit = _params(query)
        name = None
        if symbol is not None:
            name = self._names.get(symbol)
            if name is None:
                raise _Rejected("symbol", symbol)
        now = self.now_ms()
        end = now if numbers["endTime"] is None else numbers["endTime"]
        # Without startTime: the 7 days up to endTime.  A guess, the docs are silent; it is what
        # Binance's userTrades (which v3 mirrors) does when neither time is given.
        start = end - V3_MAX_SPAN_MS if numbers["startTime"] is None else numbers["startTime"]
        if start > end:
            raise _Rejected("start_after_end", f"{start} > {end}")
        if self.max_span_ms is not None and end - start > self.max_span_ms:
            raise _Rejected("too_long", f"{end - start} ms > {self.max_span_ms} ms")
        if self.horizon_ms is not None and start < now - self.horizon_ms:
            raise _Rejected("too_old", f"{start} < server time - {self.horizon_ms} ms")
        return _Query(name, numbers["orderId"], start, end, limit)

    def _page_body(self, total: int, texts: list[bytes]) -> bytes:
        return b"[%b]" % b",".join(texts)

    def _error(self, status: int, code: str | int, msg: str, **kwargs: Any) -> _Response:
        return _json_response(status, {"code": code, "msg": msg}, **kwargs)

    def _time_body(self, now: int) -> dict[str, Any]:
        return {"serverTime": now}


class _Listing:
    """How a page lists the fills it selected, on either version, whatever end of the range it
    took them from (the docs do not say).  `mode` None lists them in the order they were
    selected in (from the newest end: descending), "newest"/"oldest" always descending/ascending,
    "shuffled" in a random order, seeded so that a run can be repeated."""

    def __init__(self, seed: int) -> None:
        self.mode: str | None = None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def arrange(self, entries: list[_Entry], newest: bool) -> None:
        """Puts a page's entries, selected from the newest end if `newest`, in listing order."""
        if self.mode == "shuffled":
            with self._lock:
                self._rng.shuffle(entries)
        elif self.mode is not None and (self.mode == "newest") != newest:
            entries.reverse()


# --------------------------------------------------------------------------- faults and limits


class _Faults:
    """Injected faults: each fills request that passes authentication and parsing draws one kind
    of FAULT_KINDS, or none, against the `rates` (kind -> probability), and `hostile_pages`
    replace the pages of chosen keys.

    The draws come from one generator seeded with `seed`; setting `seed` starts them over from
    the new one, so a test that sets it gets the same faults in the same order every run.
    """

    def __init__(self, seed: int, stopping: threading.Event, now_ms: Callable[[], int]) -> None:
        self.rates: dict[str, float] = dict.fromkeys(FAULT_KINDS, 0.0)
        self.seed = seed
        self.slow_seconds: float = 3.0  # the "slow" fault's delay, and how long "stall" stalls
        self.retry_after: int = 1  # the "429" fault's Retry-After, in seconds
        # api key -> any JSON value served verbatim (HTTP 200, either version) instead of the real
        # page to that account's accepted fills requests, e.g. {"list": [], "nextFlag": True}.
        self.hostile_pages: dict[str, Any] = {}
        self._stopping = stopping  # set by Simulator.stop, which cuts the delays short
        self._now_ms = now_ms
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rng_seed = seed

    def draw(self) -> str | None:
        """One uniform draw per request against the cumulative fault probabilities."""
        with self._lock:
            if self._rng_seed != self.seed:
                self._rng = random.Random(self.seed)
                self._rng_seed = self.seed
            draw = self._rng.random()
        threshold = 0.0
        for kind in FAULT_KINDS:
            threshold += self.rates.get(kind, 0.0)
            if draw < threshold:
                return kind
        return None

    def answer(
        self, fault: str | None, api: _ApiVersion, page: Callable[[], bytes]
    ) -> _Response | None:
        """What a request that drew `fault` gets instead of its page, or None if it is served
        (after the "slow" fault's delay).  `page` makes the page it asked for."""
        if fault == "429":
            return _too_many(self.retry_after, self._now_ms(), fault=fault)
        if fault in ("500", "502", "503"):
            return _html_response(int(fault), fault)
        if fault == "error200":
            return api.rejection(_Rejected("busy"), fault=fault)
        if fault == "malformed":
            body = page()
            return _Response(200, body[: len(body) // 2], fault=fault)
        if fault in CUT_FAULTS:  # the handler sends half of it
            return _Response(200, page(), fault=fault)
        if fault == "slow":
            self.delay()
        return None

    def delay(self) -> None:
        """The "slow" fault's delay and the "stall" fault's stall; stop() ends it early."""
        self._stopping.wait(self.slow_seconds)

    def hostile_page(self, api_key: str) -> bytes | None:
        """The body served instead of this key's real pages, if `hostile_pages` has one."""
        if api_key in self.hostile_pages:
            return _to_json(self.hostile_pages[api_key])
        return None


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


class _Limits:
    """Weighted rolling-window rate limits, and how the exchange refuses what exceeds them.

    Each fills request that gets past the faults costs FILLS_WEIGHT to its API key's window (the
    UID's) and to its client IP's.  It must fit every window configured, else it is refused (HTTP
    429) and, unless `charge_refused`, not charged.  A window is (weight, seconds) or None:

    * `uid`, `ip`: the documented windows of an API key and of a client IP;
    * `burst`: a second, short per-IP window the docs do not list, e.g. (50, 1.0).

    How the refusals go (the defaults are the docs'):

    * `code`: a key of LIMIT_CODES: "429" (the gateway's body) or "-1003"/"-1059" (v3's shape,
      on either version);
    * `retry_after`: whether a refusal carries Retry-After (in whole seconds, rounded up);
    * `charge_refused`: refused requests are charged to the windows too;
    * `penalty_box`: (refusals, within_seconds, box_seconds) or None: an IP refused `refusals`
      times within `within_seconds` has every fills request refused for `box_seconds`, right
      after authentication; refusals in the box neither extend it nor count toward the next;
    * `penalty_status`: the HTTP status of those refusals, one of PENALTY_STATUSES.

    The windows and boxes are server state: reset_stats keeps them, but zeroes `boxes`, how many
    times an IP entered the penalty box.
    """

    def __init__(self, now_ms: Callable[[], int]) -> None:
        self.uid: tuple[int, float] | None = None
        self.ip: tuple[int, float] | None = None
        self.burst: tuple[int, float] | None = None
        self.code = "429"
        self.retry_after = True
        self.charge_refused = False
        self.penalty_box: tuple[int, float, float] | None = None
        self.penalty_status = 429
        self.boxes = 0
        self._now_ms = now_ms  # the server clock, for the gateway's requestTime
        self._lock = threading.Lock()
        self._uid_events: dict[str, deque[tuple[float, int]]] = {}
        self._ip_events: dict[str, deque[tuple[float, int]]] = {}
        self._burst_events: dict[str, deque[tuple[float, int]]] = {}
        self._refusals: dict[str, deque[float]] = {}  # client IP -> when it was refused lately
        self._boxed_until: dict[str, float] = {}  # client IP -> when its penalty box ends

    def boxed(self, client_ip: str) -> _Response | None:
        """The refusal of a request from an IP in the penalty box, or None if it is not in one."""
        if self.penalty_box is None:
            return None
        now = time.monotonic()
        with self._lock:
            until = self._boxed_until.get(client_ip, now)
            if until <= now:
                self._boxed_until.pop(client_ip, None)
                return None
        return self._refusal(self.penalty_status, math.ceil(until - now), boxed=True)

    def charge(self, api_key: str, client_ip: str) -> _Response | None:
        """Charges the fills weight to every window; the refusal if it does not fit them all."""
        now = time.monotonic()
        limits = [
            (limit, events, key)
            for limit, events, key in (
                (self.uid, self._uid_events, api_key),
                (self.ip, self._ip_events, client_ip),
                (self.burst, self._burst_events, client_ip),
            )
            if limit is not None
        ]
        with self._lock:
            windows = [(limit, events.setdefault(key, deque())) for limit, events, key in limits]
            waits = [
                _wait_seconds(charged, weight, seconds, now, FILLS_WEIGHT)
                for (weight, seconds), charged in windows
            ]
            wait = max((w for w in waits if w is not None), default=None)
            if wait is None or self.charge_refused:
                for _, charged in windows:
                    charged.append((now, FILLS_WEIGHT))
            if wait is not None:
                self._count_refusal(client_ip, now)
        return None if wait is None else self._refusal(429, wait, boxed=False)

    def _count_refusal(self, client_ip: str, now: float) -> None:
        """Notes a refusal of the IP, which the last straw puts in the penalty box (lock held)."""
        if self.penalty_box is None or self._boxed_until.get(client_ip, now) > now:
            return
        refusals, within, box = self.penalty_box
        times = self._refusals.setdefault(client_ip, deque())
        while times and times[0] <= now - within:
            times.popleft()
        times.append(now)
        if len(times) >= refusals:
            times.clear()
            self._boxed_until[client_ip] = now + box
            self.boxes += 1

    def _refusal(self, status: int, wait: int, *, boxed: bool) -> _Response:
        retry_after = wait if self.retry_after else None
        return _too_many(
            retry_after, self._now_ms(), status=status, code=self.code, refused=True, boxed=boxed
        )


# --------------------------------------------------------------------------- HTTP plumbing


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
        simulator = self.server.simulator
        response = simulator._respond(self.path, self.headers, body, self.client_address[0])
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if response.fault not in CUT_FAULTS:
            self.wfile.write(response.body)
            return
        # The announced length is never reached: the client sees an incomplete read.
        self.wfile.write(response.body[: len(response.body) // 2])
        if response.fault == "stall":
            simulator._faults.delay()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request would drown test and benchmark output."""


# --------------------------------------------------------------------------- simulator

_T = TypeVar("_T")


def _check_choice(value: object, allowed: tuple[object, ...], name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, not {value!r}")


class _Forwarded(Generic[_T]):
    """A Simulator attribute kept by one of its parts: `sim.<name>` reads and sets
    `sim.<part>.<attribute>`, so the switches keep their names for the tests, the benchmark
    and the demo while each part owns the ones it reads.

    With `choices`, a value outside them (None too, unless `nullable`) raises ValueError.
    """

    def __init__(
        self, part: str, attribute: str, *, choices: tuple[object, ...] = (), nullable: bool = False
    ) -> None:
        self.part = part
        self.attribute = attribute
        self.choices = choices
        self.nullable = nullable
        self.name = attribute

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, sim: None, owner: type) -> Self: ...

    @overload
    def __get__(self, sim: object, owner: type) -> _T: ...

    def __get__(self, sim: object | None, owner: type) -> _T | Self:
        if sim is None:
            return self
        value: _T = getattr(getattr(sim, self.part), self.attribute)
        return value

    def __set__(self, sim: object, value: _T) -> None:
        if self.choices and not (self.nullable and value is None):
            _check_choice(value, self.choices, self.name)
        setattr(getattr(sim, self.part), self.attribute, value)


class Simulator:
    """In-memory WEEX accounts and fills served over HTTP; see the module docstring.

    The facade of its parts: it serves HTTP, authenticates and records the requests, and leaves
    the rest to the store of fills (_FillStore, whose methods it binds as its own), one
    _ApiVersion per version, the page _Listing, the _Faults and the rate _Limits.
    """

    # The contracts the exchange lists, and the seed generate_fills derives its seeds from.
    symbols = _Forwarded[tuple[str, ...]]("_store", "symbols")
    seed = _Forwarded[int]("_store", "seed")
    # Behaviour switches, read on every request; each is kept (and documented) by its part.
    faults = _Forwarded[dict[str, float]]("_faults", "rates")
    fault_seed = _Forwarded[int]("_faults", "seed")
    slow_seconds = _Forwarded[float]("_faults", "slow_seconds")
    retry_after = _Forwarded[int]("_faults", "retry_after")
    hostile_pages = _Forwarded[dict[str, Any]]("_faults", "hostile_pages")
    uid_limit = _Forwarded[tuple[int, float] | None]("_limits", "uid")
    ip_limit = _Forwarded[tuple[int, float] | None]("_limits", "ip")
    burst_limit = _Forwarded[tuple[int, float] | None]("_limits", "burst")
    limit_code = _Forwarded[str]("_limits", "code", choices=tuple(LIMIT_CODES))
    limit_retry_after = _Forwarded[bool]("_limits", "retry_after")
    charge_refused = _Forwarded[bool]("_limits", "charge_refused")
    penalty_box = _Forwarded[tuple[int, float, float] | None]("_limits", "penalty_box")
    penalty_status = _Forwarded[int]("_limits", "penalty_status", choices=PENALTY_STATUSES)
    v2_enabled = _Forwarded[bool]("_v2", "enabled")
    v2_order = _Forwarded[str]("_v2", "order", choices=V3_ORDERS)
    order = _Forwarded[str]("_v3", "order", choices=V3_ORDERS)
    max_span_ms = _Forwarded[int | None]("_v3", "max_span_ms")
    horizon_ms = _Forwarded[int | None]("_v3", "horizon_ms")
    listing = _Forwarded[str | None]("_listing", "mode", choices=LISTINGS, nullable=True)

    def __init__(
        self, *, symbols: Iterable[str] = ("cmt_btcusdt", "cmt_ethusdt"), seed: int = 1
    ) -> None:
        self.latency: float = 0.0  # seconds every answer waits before it goes out
        self.clock_offset_ms: int = 0  # how far the server clock is ahead of this machine's
        # Stats: one record per request answered (see _respond).
        self.requests: list[dict[str, Any]] = []
        self.base_url: str | None = None

        self._stopping = threading.Event()  # set by stop(): every wait ends
        self._store = _FillStore(tuple(symbols), seed, self.server_time_ms)
        self._v2 = _V2Api(self._store.contracts, self.server_time_ms)
        self._v3 = _V3Api(self._store.contracts, self.server_time_ms)
        self._apis: dict[int, _ApiVersion] = {2: self._v2, 3: self._v3}
        self._listing = _Listing(seed)
        self._faults = _Faults(seed, self._stopping, self.server_time_ms)
        self._limits = _Limits(self.server_time_ms)
        self._lock = threading.Lock()  # guards `requests`
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

        # The store's methods are the simulator's (documented there).
        self.add_account = self._store.add_account
        self.generate_fills = self._store.generate_fills
        self.add_fill = self._store.add_fill
        self.add_burst = self._store.add_burst
        self.add_raw_fill = self._store.add_raw_fill
        self.remove_fill = self._store.remove_fill
        self.fills = self._store.fills

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

    @property
    def penalty_boxes(self) -> int:
        """How many times a client IP entered the penalty box since the last reset_stats."""
        return self._limits.boxes

    def reset_stats(self) -> None:
        """Forgets recorded requests and zeroes penalty_boxes (rate-limit windows and penalty
        boxes are server state and are kept)."""
        with self._lock:
            self.requests.clear()
            self._limits.boxes = 0

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

    def _respond(self, raw_path: str, headers: Message, body: str, client_ip: str) -> _Response:
        """Answers one GET request (called by the HTTP handler) and records it."""
        arrived = time.monotonic()
        path, _, query = raw_path.partition("?")
        endpoint, version = _ROUTES.get(path, ("", 0))
        api = self._apis.get(version)
        if api is None or not api.enabled:
            response = _gateway_error(404, "404", f"no such endpoint {path}", self.server_time_ms())
        elif endpoint == "time":
            response = api.server_time()
        else:
            response = self._fills_response(api, path, query, headers, body, client_ip)
        if self.latency > 0:
            self._stopping.wait(self.latency)
        record = {
            "t": arrived,
            "api_key": headers.get("ACCESS-KEY"),
            "path": path,
            "params": dict(parse_qsl(query, keep_blank_values=True)),
            "status": response.status,
            "fault": response.fault,
            "client": client_ip,
            "refused": response.refused,  # by a rate limit or the penalty box (not a 429 fault)
            "boxed": response.boxed,
        }
        with self._lock:
            self.requests.append(record)
        return response

    def _fills_response(
        self,
        api: _ApiVersion,
        path: str,
        query: str,
        headers: Message,
        body: str,
        client_ip: str,
    ) -> _Response:
        try:
            api_key, account = self._authenticate(path, query, headers, body)
            if not account.whitelisted:
                raise _Rejected("ip")
            if not account.permitted:
                raise _Rejected("permission")
            boxed = self._limits.boxed(client_ip)
            if boxed is not None:
                return boxed
            parsed = api.parse(query)
        except _Rejected as rejected:
            return api.rejection(rejected)

        def page() -> bytes:
            return self._page(api, account, parsed)

        fault = self._faults.draw()
        instead = self._faults.answer(fault, api, page)
        if instead is not None:
            return instead
        refusal = self._limits.charge(api_key, client_ip)
        if refusal is not None:
            return refusal
        hostile = self._faults.hostile_page(api_key)
        return _Response(200, page() if hostile is None else hostile, fault=fault)

    def _authenticate(
        self, path: str, query: str, headers: Message, body: str
    ) -> tuple[str, _Account]:
        """(api key, account) if the request is properly signed, else raises _Rejected."""
        values: list[str] = []
        for name in _AUTH_HEADERS:
            value = headers.get(name)
            if value is None:
                raise _Rejected("header", name)
            values.append(value)
        api_key, sign, timestamp, passphrase = values
        account = self._store.find_account(api_key)
        if account is None:
            raise _Rejected("key")
        if not hmac.compare_digest(passphrase.encode(), account.passphrase.encode()):
            raise _Rejected("passphrase")
        if (
            not _INTEGER.fullmatch(timestamp)
            or abs(int(timestamp) - self.server_time_ms()) > MAX_CLOCK_DRIFT_MS
        ):
            raise _Rejected("timestamp")
        prehash = timestamp + "GET" + path + ("?" + query if query else "") + body
        digest = hmac.new(account.secret_key.encode(), prehash.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64encode(digest), sign.encode()):
            raise _Rejected("signature")
        return api_key, account

    def _page(self, api: _ApiVersion, account: _Account, query: _Query) -> bytes:
        newest = api.order == "newest"
        total, entries = self._store.select(account, query, newest)
        self._listing.arrange(entries, newest)
        return api.page(total, entries)


# --------------------------------------------------------------------------- CLI


def _limit_arg(text: str) -> tuple[int, float]:
    weight, _, window = text.partition("/")
    try:
        return int(weight), float(window)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WEIGHT/SECONDS, e.g. 500/10, not {text!r}")


def _penalty_box_arg(text: str) -> tuple[int, float, float]:
    refusals, _, rest = text.partition("/")
    within, _, box = rest.partition("/")
    try:
        return int(refusals), float(within), float(box)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N/WITHIN/BOX, e.g. 6/10/60, not {text!r}")


def _date_arg(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, not {text!r}")


def _credentials(n: int) -> tuple[str, str, str]:
    """(api_key, secret_key, passphrase) of the n-th simulated account, n from 1."""
    return f"demo-key-{n}", f"demo-secret-{n}", f"demo-pass-{n}"


_CLI_EPILOG = """\
accounts:
  account N (N = 1..--accounts) has api_key demo-key-N, secret_key demo-secret-N and
  passphrase demo-pass-N, with --fills fills per contract over --days of history.

pointing weex_sync at it (config.yaml):
  weex:
    base_url: http://127.0.0.1:8080      # http://HOST:PORT of this simulator
  sync:
    users:
      - {user_id: user1, api_key: demo-key-1, secret_key: demo-secret-1, passphrase: demo-pass-1}

Both API versions are served: v2 GET /capi/v2/order/fills and v3 GET /capi/v3/userTrades
(v3 takes symbols as BTCUSDT, spans of at most 7 days, at most 365 days back).
"""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Local simulator of the WEEX fills API (v2 and v3).",
        epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--accounts", type=int, default=3, help="accounts demo-key-1..N")
    parser.add_argument("--symbols", default="cmt_btcusdt,cmt_ethusdt")
    parser.add_argument("--fills", type=int, default=500, help="fills per account and symbol")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--start", type=_date_arg, help="first day of history (UTC); default: --days before now"
    )
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--live-fills-per-second", type=float, default=0)
    parser.add_argument(
        "--visible-delay-ms",
        type=int,
        default=0,
        help="live fills become visible this long after their time (late fills)",
    )
    parser.add_argument(
        "--order", choices=V3_ORDERS, default="newest", help="which end of a range v3 pages start"
    )
    parser.add_argument(
        "--v2-order", choices=V3_ORDERS, default="newest", help="the same for v2 pages"
    )
    parser.add_argument(
        "--listing",
        choices=LISTINGS,
        help="how a page lists its fills whatever end it starts at (default: from that end)",
    )
    parser.add_argument("--uid-limit", type=_limit_arg, help="WEIGHT/SECONDS, e.g. 500/10")
    parser.add_argument("--ip-limit", type=_limit_arg, help="WEIGHT/SECONDS, e.g. 500/10")
    parser.add_argument(
        "--burst-limit", type=_limit_arg, help="a second per-IP window WEIGHT/SECONDS, e.g. 50/1"
    )
    parser.add_argument(
        "--limit-code",
        choices=tuple(LIMIT_CODES),
        default="429",
        help="the code of a rate-limit refusal (negative: v3-shaped body on both versions)",
    )
    parser.add_argument(
        "--no-retry-after",
        dest="limit_retry_after",
        action="store_false",
        help="rate-limit refusals carry no Retry-After",
    )
    parser.add_argument(
        "--penalty-box",
        type=_penalty_box_arg,
        metavar="N/WITHIN/BOX",
        help="e.g. 6/10/60: an IP refused N times within WITHIN seconds is refused everything "
        "for BOX seconds",
    )
    parser.add_argument("--fault-rate", type=float, default=0, help="spread over fault kinds")
    parser.add_argument("--latency-ms", type=float, default=0)
    return parser.parse_args(argv)


def _add_live_fills(
    sim: Simulator, api_keys: list[str], rate: float, delay_ms: int, stop: threading.Event
) -> None:
    """Adds one realistic fill stamped with the server's current time every 1/rate seconds."""
    rng = random.Random(sim.seed)
    while not stop.wait(1 / rate):
        now = sim.server_time_ms()
        symbol = rng.choice(sim.symbols)
        sim.generate_fills(
            rng.choice(api_keys), symbol, 1, start_ms=now, end_ms=now, visible_delay_ms=delay_ms
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    sim = Simulator(symbols=symbols, seed=args.seed)
    sim.uid_limit = args.uid_limit
    sim.ip_limit = args.ip_limit
    sim.burst_limit = args.burst_limit
    sim.limit_code = args.limit_code
    sim.limit_retry_after = args.limit_retry_after
    sim.penalty_box = args.penalty_box
    sim.order = args.order
    sim.v2_order = args.v2_order
    sim.listing = args.listing
    sim.latency = args.latency_ms / 1000
    sim.faults = dict.fromkeys(FAULT_KINDS, args.fault_rate / len(FAULT_KINDS))

    span_ms = int(args.days * DAY_MS)
    start_ms = int(args.start.timestamp() * 1000) if args.start else sim.server_time_ms() - span_ms
    api_keys = []
    for n in range(1, args.accounts + 1):
        api_key, secret_key, passphrase = _credentials(n)
        sim.add_account(api_key, secret_key, passphrase)
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
            args=(sim, api_keys, args.live_fills_per_second, args.visible_delay_ms, stop),
            daemon=True,
        ).start()
    total = args.accounts * len(symbols) * args.fills
    accounts = ", ".join("/".join(_credentials(n)) for n in range(1, args.accounts + 1))
    print(
        f"weex_sim listening on {url} "
        f"({args.accounts} accounts, {len(symbols)} symbols, {total} fills); "
        f"weex.base_url: {url}; accounts api_key/secret_key/passphrase: {accounts or 'none'}",
        flush=True,
    )
    stop.wait()
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
