"""Tests of the simulator itself (weex_sim.py), over real HTTP as a client sees it.

The signing is written out here from the API contract (docs/weex-api.md), so these tests
do not depend on the client under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from harness import DEV
from weex_sim import (
    FILLS_PATH,
    TIME_PATH,
    V3_FILLS_PATH,
    V3_TIME_PATH,
    Simulator,
)

BTC, ETH = "cmt_btcusdt", "cmt_ethusdt"
DAY_MS = 86_400_000
KEY, SECRET, PASSPHRASE = "test-key", "test-secret", "test-pass"
V3_FIELDS = [
    "id",
    "orderId",
    "symbol",
    "buyer",
    "commission",
    "commissionAsset",
    "maker",
    "price",
    "qty",
    "quoteQty",
    "realizedPnl",
    "side",
    "positionSide",
    "time",
]


@pytest.fixture
def sim() -> Simulator:
    simulator = Simulator(symbols=[BTC, ETH, "cmt_solusdc"], seed=3)
    simulator.add_account(KEY, SECRET, PASSPHRASE)
    with simulator:
        yield simulator


def now_ms() -> int:
    return int(time.time() * 1000)


def signed_get(
    sim: Simulator,
    path: str,
    params: dict[str, Any] | list[tuple[str, Any]] | None = None,
    *,
    key: str = KEY,
    secret: str = SECRET,
    passphrase: str = PASSPHRASE,
    timestamp: str | None = None,
    omit: str | None = None,
) -> requests.Response:
    """A GET signed as the contract says; `omit` leaves out one ACCESS-* header."""
    query = urlencode(params or {})
    timestamp = timestamp or str(now_ms())
    prehash = timestamp + "GET" + path + ("?" + query if query else "")
    digest = hmac.new(secret.encode(), prehash.encode(), hashlib.sha256).digest()
    headers = {
        "ACCESS-KEY": key,
        "ACCESS-SIGN": base64.b64encode(digest).decode(),
        "ACCESS-TIMESTAMP": timestamp,
        "ACCESS-PASSPHRASE": passphrase,
        "Content-Type": "application/json",
        "locale": "en-US",
    }
    headers.pop(omit or "", None)
    url = sim.base_url + path + ("?" + query if query else "")
    return requests.get(url, headers=headers, timeout=5)


def body(response: requests.Response) -> Any:
    return json.loads(response.text, parse_float=Decimal)


def v3(sim: Simulator, **params: Any) -> list[dict[str, Any]]:
    response = signed_get(sim, V3_FILLS_PATH, params)
    assert response.status_code == 200, response.text
    page = body(response)
    assert isinstance(page, list)
    return page


def v2(sim: Simulator, **params: Any) -> dict[str, Any]:
    response = signed_get(sim, FILLS_PATH, params)
    assert response.status_code == 200, response.text
    return body(response)


def v3_error(response: requests.Response) -> tuple[int, int]:
    error = body(response)
    assert set(error) == {"code", "msg"} and isinstance(error["msg"], str)
    return response.status_code, error["code"]


def key(fill: dict[str, Any]) -> tuple[int, int]:
    """(time, id) of a fill of either version: the order the server sorts by."""
    return int(fill.get("time", fill.get("createdTime"))), int(fill.get("id", fill.get("tradeId")))


# --- v3 rendering -------------------------------------------------------------------------------


def test_v3_is_a_bare_array_with_the_documented_fields_and_exact_amounts(sim):
    start = now_ms() - DAY_MS
    sim.generate_fills(KEY, BTC, 60, start_ms=start, end_ms=start + DAY_MS // 2)
    sim.generate_fills(KEY, "cmt_solusdc", 5, start_ms=start, end_ms=start + DAY_MS // 2)

    page = v3(sim, symbol="BTCUSDT")
    assert len(page) == 60
    v2_by_id = {str(f["tradeId"]): f for f in sim.fills(KEY, BTC)}
    for fill in page:
        assert list(fill) == V3_FIELDS
        assert fill["symbol"] == "BTCUSDT" and fill["commissionAsset"] == "USDT"
        assert Decimal(fill["price"]) * Decimal(fill["qty"]) == Decimal(fill["quoteQty"])
        old = v2_by_id[str(fill["id"])]
        # one fill, two renderings: same values, ids and time sent the same way
        assert type(fill["id"]) is type(old["tradeId"])
        assert fill["orderId"] == old["orderId"] and fill["time"] == old["createdTime"]
        assert (fill["qty"], fill["quoteQty"]) == (old["fillSize"], old["fillValue"])
        assert (fill["commission"], fill["realizedPnl"]) == (old["fillFee"], old["realizePnl"])
        assert (fill["side"], fill["positionSide"]) == (old["orderSide"], old["positionSide"])
        assert fill["buyer"] is (fill["side"] == "BUY")
        assert fill["maker"] is (Decimal(fill["commission"]) < 0)
    assert {type(f["id"]) for f in page} == {int, str}  # both representations occur
    assert sim.fills(KEY, BTC, version=3) == page  # newest first, like the default order

    usdc = v3(sim, symbol="SOLUSDC")
    assert len(usdc) == 5 and {f["commissionAsset"] for f in usdc} == {"USDC"}


def test_add_fill_derives_price_or_value_exactly(sim):
    t = now_ms() - 1000
    sim.add_fill(KEY, BTC, created_time=t, trade_id=1, size="0.002", price="95250.5")
    sim.add_fill(KEY, BTC, created_time=t + 1, trade_id=2, size="0.5", value="50000")
    sim.add_fill(KEY, BTC, created_time=t + 2, trade_id=3, size="3", value="1", fee="-0.01")
    sim.add_fill(KEY, BTC, created_time=t + 3, trade_id=4, side="SELL", brandNew=[1, "x"])

    one, two, three, four = sorted(v3(sim), key=key)
    assert (one["price"], one["qty"], one["quoteQty"]) == ("95250.5", "0.002", "190.501")
    assert (two["price"], two["quoteQty"]) == ("100000", "50000")
    assert three["price"] == "0." + "3" * 60 and three["maker"] is True  # 60 significant digits
    assert four["side"] == "SELL" and four["buyer"] is False and four["brandNew"] == [1, "x"]
    assert sim.fills(KEY, BTC)[0]["brandNew"] == [1, "x"]  # extras go into both renderings
    with pytest.raises(ValueError):
        sim.add_fill(KEY, BTC, created_time=t, value="1", price="2")


def test_raw_fills_and_hostile_pages_are_served_verbatim_on_both_versions(sim):
    t = now_ms() - 1000
    raw = {"id": "x-1", "time": t, "qty": Decimal("0.10"), "weird": None}
    sim.add_raw_fill(KEY, BTC, raw, created_time=t)
    assert v3(sim) == [raw]
    assert v2(sim)["list"] == [raw]
    sim.hostile_pages[KEY] = {"anything": [1, 2]}
    assert body(signed_get(sim, V3_FILLS_PATH)) == {"anything": [1, 2]}
    assert body(signed_get(sim, FILLS_PATH)) == {"anything": [1, 2]}


# --- v2 as before -------------------------------------------------------------------------------


def test_v2_is_newest_first_with_next_flag_and_totals_unless_told(sim):
    start = now_ms() - 3 * DAY_MS
    sim.generate_fills(KEY, BTC, 150, start_ms=start, end_ms=start + DAY_MS)
    sim.order = "oldest"  # a v3 switch: v2 has its own

    page = v2(sim, symbol=BTC, limit=100)
    assert set(page) == {"list", "nextFlag", "totals"}
    assert page["nextFlag"] is True and page["totals"] == 150 and len(page["list"]) == 100
    assert page["list"] == sim.fills(KEY, BTC)[:100]
    assert [key(f) for f in page["list"]] == sorted(map(key, page["list"]), reverse=True)
    assert v2(sim, symbol=ETH) == {"list": [], "nextFlag": False, "totals": 0}
    sim.v2_order = "oldest"
    page = v2(sim, symbol=BTC, limit=100)
    assert page["list"] == sim.fills(KEY, BTC)[::-1][:100]


def test_v2_errors_keep_their_codes(sim):
    sim.add_account("closed", "s", "p", whitelisted=False)
    cases = {
        "no key": (signed_get(sim, FILLS_PATH, omit="ACCESS-KEY"), 401, "40006"),
        "bad passphrase": (signed_get(sim, FILLS_PATH, passphrase="no"), 401, "40011"),
        "old timestamp": (signed_get(sim, FILLS_PATH, timestamp="1"), 400, "40005"),
        "bad signature": (signed_get(sim, FILLS_PATH, secret="no"), 400, "40009"),
        "ip": (signed_get(sim, FILLS_PATH, key="closed", secret="s", passphrase="p"), 521, "521"),
        "parameter": (signed_get(sim, FILLS_PATH, {"from": 1}), 400, "40017"),
        "symbol": (signed_get(sim, FILLS_PATH, {"symbol": "BTCUSDT"}), 400, "40034"),
    }
    for name, (response, status, code) in cases.items():
        assert (response.status_code, body(response)["code"]) == (status, code), name
        assert "requestTime" in body(response), name


# --- v3 order and limits ------------------------------------------------------------------------


def test_v3_sort_order_switch_and_shuffled_pages(sim):
    start = now_ms() - 2 * DAY_MS
    sim.generate_fills(KEY, BTC, 250, start_ms=start, end_ms=start + DAY_MS)
    every = sorted(map(key, sim.fills(KEY, BTC)))

    newest = v3(sim, symbol="BTCUSDT")
    assert [key(f) for f in newest] == every[::-1][:100]
    sim.order = "oldest"
    oldest = v3(sim, symbol="BTCUSDT", limit=30)
    assert [key(f) for f in oldest] == every[:30]

    sim.listing = "shuffled"
    shuffled = v3(sim, symbol="BTCUSDT")
    assert sorted(map(key, shuffled)) == every[:100]  # the same slice...
    assert [key(f) for f in shuffled] != every[:100]  # ...not in order
    sim.listing = "newest"  # the oldest 100, listed newest first
    assert [key(f) for f in v3(sim, symbol="BTCUSDT")] == every[:100][::-1]
    sim.order, sim.listing = "newest", "oldest"  # the newest 100, listed oldest first
    assert [key(f) for f in v3(sim, symbol="BTCUSDT")] == every[-100:]
    with pytest.raises(ValueError):
        sim.order = "random"
    with pytest.raises(ValueError):
        sim.listing = "sideways"


def test_v3_time_range_limits(sim):
    now = now_ms()
    week = 7 * DAY_MS

    def code(**params: Any) -> tuple[int, int]:
        return v3_error(signed_get(sim, V3_FILLS_PATH, params))

    assert v3(sim, startTime=now - week, endTime=now) == []  # exactly 7 days is fine
    assert code(startTime=now - week - 1, endTime=now) == (400, -1170)  # too long
    assert code(startTime=now - week - 1) == (400, -1170)  # endTime defaults to now
    assert code(startTime=now - 366 * DAY_MS, endTime=now - 360 * DAY_MS) == (400, -1170)  # old
    assert code(startTime=now, endTime=now - 1) == (400, -1171)
    sim.max_span_ms = None
    assert v3(sim, startTime=now - 30 * DAY_MS, endTime=now) == []
    sim.horizon_ms = None
    assert v3(sim, startTime=now - 400 * DAY_MS, endTime=now) == []


def test_v3_parameters_are_strict(sim):
    cases = {
        "v2 symbol": ({"symbol": BTC}, -1121),
        "lower case": ({"symbol": "btcusdt"}, -1121),
        "unlisted": ({"symbol": "DOGEUSDT"}, -1121),
        "unknown parameter": ({"fromId": 1}, -1140),
        "duplicate": ([("limit", 5), ("limit", 6)], -1140),
        "not an integer": ({"startTime": "1.5"}, -1140),
        "limit 0": ({"limit": 0}, -1140),
        "limit 101": ({"limit": 101}, -1140),
    }
    for name, (params, expected) in cases.items():
        assert v3_error(signed_get(sim, V3_FILLS_PATH, params)) == (400, expected), name
    assert v3(sim, symbol="ETHUSDT", limit=1) == []  # listed, no fills: empty, not an error


def test_v3_auth_and_account_errors(sim):
    sim.add_account("closed", "s", "p", whitelisted=False)
    sim.add_account("readonly", "s", "p", permitted=False)
    path = V3_FILLS_PATH
    cases = {
        "missing header": (signed_get(sim, path, omit="ACCESS-SIGN"), 401, -1040),
        "unknown key": (signed_get(sim, path, key="nobody"), 401, -1041),
        "bad signature": (signed_get(sim, path, secret="wrong"), 401, -1042),
        "bad passphrase": (signed_get(sim, path, passphrase="wrong"), 401, -1044),
        "expired": (signed_get(sim, path, timestamp=str(now_ms() - 31_000)), 400, -1043),
        "not a time": (signed_get(sim, path, timestamp="soon"), 400, -1043),
        "ip": (signed_get(sim, path, key="closed", secret="s", passphrase="p"), 403, -1056),
        "permission": (
            signed_get(sim, path, key="readonly", secret="s", passphrase="p"),
            403,
            -1052,
        ),
    }
    for name, (response, status, code) in cases.items():
        assert v3_error(response) == (status, code), name
    v2_denied = signed_get(sim, FILLS_PATH, key="readonly", secret="s", passphrase="p")
    assert (v2_denied.status_code, body(v2_denied)["code"]) == (403, "40014")


def test_signature_covers_the_v3_path(sim):
    """A request signed for the v2 path is refused on v3."""
    timestamp = str(now_ms())
    prehash = timestamp + "GET" + FILLS_PATH
    sign = base64.b64encode(hmac.new(SECRET.encode(), prehash.encode(), "sha256").digest())
    headers = {
        "ACCESS-KEY": KEY,
        "ACCESS-SIGN": sign.decode(),
        "ACCESS-TIMESTAMP": timestamp,
        "ACCESS-PASSPHRASE": PASSPHRASE,
    }
    response = requests.get(sim.base_url + V3_FILLS_PATH, headers=headers, timeout=5)
    assert v3_error(response) == (401, -1042)


# --- visibility, contracts ----------------------------------------------------------------------


def test_late_fills_are_invisible_everywhere_until_their_moment(sim):
    t = now_ms() - 1000
    seen = sim.add_fill(KEY, BTC, created_time=t, order_id=77)
    sim.add_fill(KEY, BTC, created_time=t + 1, order_id=77, visible_after_ms=10_000)
    sim.generate_fills(KEY, ETH, 20, start_ms=t - 500, end_ms=t, visible_delay_ms=10_000)

    assert v3(sim) == sim.fills(KEY, BTC, version=3, visible_only=True)
    assert [f["id"] for f in v3(sim)] == [seen["tradeId"]]
    assert [f["id"] for f in v3(sim, orderId=77)] == [seen["tradeId"]]
    assert v2(sim)["totals"] == 1 and v2(sim, orderId=77)["totals"] == 1
    assert len(sim.fills(KEY)) == 22 and len(sim.fills(KEY, visible_only=True)) == 1

    sim.clock_offset_ms = 10_000  # the server's clock reaches their moment (still within 30 s)
    assert len(v3(sim, orderId=77)) == 2
    assert v2(sim)["totals"] == 22
    assert len(v3(sim, symbol="ETHUSDT")) == 20
    assert sim.fills(KEY, visible_only=True) == sim.fills(KEY)


def test_symbol_less_queries_merge_all_contracts_and_contracts_appear_lazily(sim):
    start = now_ms() - DAY_MS
    sim.generate_fills(KEY, BTC, 40, start_ms=start, end_ms=start + 1000)
    assert v3(sim, symbol="ETHUSDT") == [] and v2(sim, symbol=ETH)["totals"] == 0
    assert sim.fills(KEY, ETH) == []

    sim.generate_fills(KEY, ETH, 30, start_ms=start, end_ms=start + 1000)  # trading starts
    merged = v3(sim)
    assert len(merged) == 70 and {f["symbol"] for f in merged} == {"BTCUSDT", "ETHUSDT"}
    assert [key(f) for f in merged] == sorted(map(key, merged), reverse=True)
    assert merged == sim.fills(KEY, version=3)
    sim.order = "oldest"
    assert [key(f) for f in v3(sim, limit=10)] == sorted(map(key, merged))[:10]
    page = v2(sim, limit=50)
    assert page["totals"] == 70 and page["nextFlag"] is True
    assert page["list"] == sim.fills(KEY)[:50]


# --- faults, endpoints, limits ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["drop", "stall"])
def test_drop_and_stall_send_an_incomplete_body(sim, kind):
    sim.generate_fills(KEY, BTC, 50, start_ms=now_ms() - DAY_MS, end_ms=now_ms() - 1)
    sim.faults = {kind: 1.0}
    sim.slow_seconds = 0.3
    for path in (FILLS_PATH, V3_FILLS_PATH):
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
            signed_get(sim, path)
        if kind == "stall":
            assert time.monotonic() - started >= 0.3
    assert [r["fault"] for r in sim.requests] == [kind, kind]


def test_stop_wakes_a_stalled_response(sim):
    sim.faults = {"stall": 1.0}
    sim.slow_seconds = 60
    errors = []

    def fetch() -> None:
        try:
            signed_get(sim, V3_FILLS_PATH)
        except requests.RequestException as error:
            errors.append(error)

    thread = threading.Thread(target=fetch)
    thread.start()
    while not sim.requests:
        time.sleep(0.01)
    started = time.monotonic()
    sim.stop()
    thread.join(5)
    assert not thread.is_alive() and errors and time.monotonic() - started < 5


def test_v3_busy_and_gateway_faults(sim):
    sim.faults = {"error200": 1.0}
    response = signed_get(sim, V3_FILLS_PATH)
    assert response.status_code == 200 and body(response)["code"] == -1054
    sim.faults = {"429": 1.0}
    sim.retry_after = 7
    response = signed_get(sim, V3_FILLS_PATH)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    sim.faults = {"502": 1.0}
    assert signed_get(sim, V3_FILLS_PATH).status_code == 502


def test_time_endpoints_and_dropping_v2(sim):
    sim.clock_offset_ms = 5000
    server = requests.get(sim.base_url + V3_TIME_PATH, timeout=5).json()
    assert list(server) == ["serverTime"] and abs(server["serverTime"] - now_ms() - 5000) < 1000
    assert requests.get(sim.base_url + TIME_PATH, timeout=5).json()["timestamp"] > 0

    sim.v2_enabled = False
    assert requests.get(sim.base_url + TIME_PATH, timeout=5).status_code == 404
    assert signed_get(sim, FILLS_PATH).status_code == 404
    assert v3(sim) == []
    assert requests.get(sim.base_url + V3_TIME_PATH, timeout=5).status_code == 200


def test_rate_limits_charge_both_fills_endpoints_but_not_time(sim):
    sim.uid_limit = (10, 60.0)  # two fills requests a minute
    for _ in range(3):
        requests.get(sim.base_url + V3_TIME_PATH, timeout=5)
    assert signed_get(sim, FILLS_PATH).status_code == 200
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    limited = signed_get(sim, V3_FILLS_PATH)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0

    sim.uid_limit = None
    sim.ip_limit = (5, 60.0)
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    assert signed_get(sim, FILLS_PATH).status_code == 429


def test_cli_help_tells_credentials_and_base_url():
    result = subprocess.run(
        [sys.executable, str(DEV / "weex_sim.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for text in ("demo-key-N", "demo-secret-N", "demo-pass-N", "base_url", "--order"):
        assert text in result.stdout
    for option in ("--ip-limit", "--visible-delay-ms"):
        assert option in result.stdout
