"""Tests of the simulator itself (weex_sim.py), over real HTTP as a client sees it.

The signing is written out here from the API contract (docs/weex-api.md), so these tests
do not depend on the client under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
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

from harness import DEV, ROOT
from weex_sim import (
    FILLS_PATH,
    TIME_PATH,
    V3_FILLS_PATH,
    V3_TIME_PATH,
    Simulator,
    _parse_args,
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


def as_account(sim: Simulator, api_key: str) -> dict[str, str]:
    """signed_get's credentials of a new account `api_key` (a fresh UID budget, same client IP)."""
    sim.add_account(api_key, SECRET, PASSPHRASE)
    return {"key": api_key}


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


# --- stricter than the docs: burst cap, refusal codes, charged refusals, penalty box -------------


def test_burst_limit_caps_an_ip_across_keys_on_top_of_ip_limit(sim):
    other = as_account(sim, "other")
    sim.ip_limit = (15, 60.0)  # three fills requests a minute
    sim.burst_limit = (10, 0.5)  # two per half second
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    assert signed_get(sim, FILLS_PATH, **other).status_code == 200
    capped = signed_get(sim, V3_FILLS_PATH)
    assert capped.status_code == 429 and capped.headers["Retry-After"] == "1"
    assert body(capped)["code"] == "429"

    time.sleep(0.55)  # the burst window has passed; the refused request was not charged
    assert signed_get(sim, V3_FILLS_PATH, **other).status_code == 200
    limited = signed_get(sim, V3_FILLS_PATH)  # fits the burst window, not the IP's minute
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 59


@pytest.mark.parametrize("path", [FILLS_PATH, V3_FILLS_PATH])
@pytest.mark.parametrize(
    ("code", "msg"),
    [
        ("-1003", "TOO_MANY_REQUESTS: too many requests"),
        ("-1059", "TOO_MANY_REQUESTS: too many high-frequency requests"),
    ],
)
def test_limit_code_answers_in_v3_shape_on_either_version(sim, path, code, msg):
    sim.limit_code = code
    sim.uid_limit = (5, 60.0)
    assert signed_get(sim, path).status_code == 200
    refused = signed_get(sim, path)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert json.loads(refused.text) == {"code": int(code), "msg": msg}
    for wrong in ("-1000", -1059, 429, None):
        with pytest.raises(ValueError):
            sim.limit_code = wrong
    assert sim.limit_code == code


def test_limit_retry_after_false_leaves_the_header_out(sim):
    sim.uid_limit = (5, 60.0)
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    refused = signed_get(sim, V3_FILLS_PATH)
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    default = body(refused)  # the gateway's body, as before the switches
    assert set(default) == {"code", "msg", "requestTime"} and default["code"] == "429"

    sim.limit_retry_after = False
    refused = signed_get(sim, FILLS_PATH)
    assert refused.status_code == 429 and "Retry-After" not in refused.headers
    assert body(refused)["code"] == "429"


def test_charge_refused_makes_a_refused_request_extend_the_wait(sim):
    sim.uid_limit = (5, 2.5)  # one fills request per 2.5 s
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    time.sleep(0.6)
    # Not charged: refusals wait for the admitted request's charge only (1.9 s, so 2).
    assert [signed_get(sim, V3_FILLS_PATH).headers["Retry-After"] for _ in range(2)] == ["2", "2"]
    sim.charge_refused = True
    assert signed_get(sim, V3_FILLS_PATH).headers["Retry-After"] == "2"  # charged, though
    assert signed_get(sim, V3_FILLS_PATH).headers["Retry-After"] == "3"  # ...so ~2.5 s more


def test_penalty_box_refuses_an_ip_even_within_its_limits_until_it_ends(sim):
    sim.uid_limit = (5, 60.0)  # one fills request a minute per key
    sim.penalty_box = (2, 10.0, 0.6)  # refused twice within 10 s: boxed for 0.6 s
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    assert signed_get(sim, V3_FILLS_PATH).status_code == 429  # refusal 1
    assert signed_get(sim, V3_FILLS_PATH, **as_account(sim, "k2")).status_code == 200
    assert sim.penalty_boxes == 0
    assert signed_get(sim, V3_FILLS_PATH).status_code == 429  # refusal 2: boxed from now
    boxed_at = time.monotonic()
    assert sim.penalty_boxes == 1

    fresh = as_account(sim, "k3")  # fits every window, refused all the same
    boxed = signed_get(sim, V3_FILLS_PATH, **fresh)
    assert boxed.status_code == 429 and boxed.headers["Retry-After"] == "1"
    assert body(boxed)["code"] == "429"
    assert requests.get(sim.base_url + V3_TIME_PATH, timeout=5).status_code == 200
    time.sleep(0.25)
    for path in (FILLS_PATH, V3_FILLS_PATH):  # in the box: refused, and it is not extended
        assert signed_get(sim, path, **fresh).status_code == 429
    assert sim.penalty_boxes == 1

    time.sleep(max(0.0, boxed_at + 0.65 - time.monotonic()))
    assert signed_get(sim, V3_FILLS_PATH, **fresh).status_code == 200
    # The refusals in the box did not count: one more refusal does not box the IP again.
    assert signed_get(sim, V3_FILLS_PATH).status_code == 429
    assert signed_get(sim, V3_FILLS_PATH, **as_account(sim, "k4")).status_code == 200
    assert sim.penalty_boxes == 1
    flags = [(r["status"], r["refused"], r["boxed"]) for r in sim.requests if r["api_key"]]
    assert flags == [
        (200, False, False),
        (429, True, False),
        (200, False, False),
        (429, True, False),
        *[(429, True, True)] * 3,
        (200, False, False),
        (429, True, False),
        (200, False, False),
    ]


def test_penalty_box_can_ban_with_418_in_the_limit_code_shape(sim):
    sim.uid_limit = (5, 60.0)
    sim.penalty_box = (1, 10.0, 30.0)
    sim.penalty_status = 418
    sim.limit_code = "-1059"
    sim.limit_retry_after = False
    assert signed_get(sim, FILLS_PATH).status_code == 200
    refused = signed_get(sim, FILLS_PATH)  # the rate-limit refusal itself stays a 429
    assert refused.status_code == 429 and "Retry-After" not in refused.headers
    fresh = as_account(sim, "k2")
    for path in (FILLS_PATH, V3_FILLS_PATH):
        banned = signed_get(sim, path, **fresh)
        assert banned.status_code == 418 and "Retry-After" not in banned.headers
        assert json.loads(banned.text) == {
            "code": -1059,
            "msg": "TOO_MANY_REQUESTS: too many high-frequency requests",
        }
    assert signed_get(sim, V3_FILLS_PATH, key="nobody").status_code == 401  # after authentication
    assert sim.count(status=418) == 2 and sim.penalty_boxes == 1

    sim.reset_stats()  # zeroes the count; the box is server state
    assert sim.penalty_boxes == 0
    assert signed_get(sim, V3_FILLS_PATH, **fresh).status_code == 418
    for wrong in (403, "418", None):
        with pytest.raises(ValueError):
            sim.penalty_status = wrong


def test_records_tell_limit_refusals_from_the_429_fault(sim):
    sim.faults = {"429": 1.0}
    assert signed_get(sim, V3_FILLS_PATH).status_code == 429
    sim.faults = {}
    sim.uid_limit = (5, 60.0)
    assert signed_get(sim, V3_FILLS_PATH).status_code == 200
    assert signed_get(sim, V3_FILLS_PATH).status_code == 429
    fault, served, refused = sim.requests
    assert (fault["fault"], fault["refused"], fault["boxed"]) == ("429", False, False)
    assert (served["refused"], served["boxed"]) == (False, False)
    assert (refused["fault"], refused["refused"], refused["boxed"]) == (None, True, False)
    assert sim.count(status=429) == 2 and sim.count(status=429, api_key=KEY, path=V3_FILLS_PATH)


def test_sim_server_sets_the_switches_and_counts_refusals():
    spec = importlib.util.spec_from_file_location("sim_server", ROOT / "bench" / "sim_server.py")
    assert spec is not None and spec.loader is not None
    sim_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim_server)
    account = {"api_key": KEY, "secret_key": SECRET, "passphrase": PASSPHRASE}
    settings = {"uid_limit": [5, 60], "penalty_box": [1, 10, 30], "burst_limit": [50, 1]}
    server = sim_server.build({"symbols": [BTC], "accounts": [account], **settings})
    assert (server.penalty_box, server.burst_limit) == ((1, 10, 30), (50, 1))
    sim_server.answer(server, {"cmd": "set", "limit_code": "-1003", "penalty_status": 418})
    sim_server.answer(server, {"cmd": "set", "limit_retry_after": False, "charge_refused": True})
    assert (server.limit_code, server.penalty_status) == ("-1003", 418)
    assert (server.limit_retry_after, server.charge_refused) == (False, True)
    with server:
        statuses = [signed_get(server, V3_FILLS_PATH).status_code for _ in range(3)]
    assert statuses == [200, 429, 418]
    stats = sim_server.answer(server, {"cmd": "stats"})
    assert (stats["refused"], stats["penalty_boxes"], stats["status_429"]) == (2, 1, 1)
    assert stats["fills_requests"] == 3


def test_cli_parses_the_strictness_switches():
    argv = ["--burst-limit", "50/1", "--limit-code", "-1059", "--no-retry-after"]
    args = _parse_args([*argv, "--penalty-box", "6/10/60"])  # -1059 is a value, not an option
    assert (args.burst_limit, args.limit_code) == ((50, 1.0), "-1059")
    assert args.limit_retry_after is False and args.penalty_box == (6, 10.0, 60.0)
    defaults = _parse_args([])
    assert (defaults.burst_limit, defaults.limit_code, defaults.penalty_box) == (None, "429", None)
    assert defaults.limit_retry_after is True


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
    options = ("--ip-limit", "--visible-delay-ms", "--burst-limit", "--limit-code")
    for option in (*options, "--no-retry-after", "--penalty-box"):
        assert option in result.stdout
