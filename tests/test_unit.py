"""Fast unit tests: no database, no HTTP (``pytest -m unit`` runs them in about a second).

Pure pieces of weex_sync: response classification (both API versions), the rate limiter,
batching and prefetching, and parsing of hostile values. The cursor rule and the walk are in
test_paging.py.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

import weex_sync
from weex_sync import V2, V3, Cursor

pytestmark = pytest.mark.unit
DAY = 86_400_000


# --- classification -----------------------------------------------------------------------


def body(code, msg="text") -> bytes:
    return json.dumps({"code": code, "msg": msg}).encode()


CLASSIFICATION = [
    # (api, HTTP status, body, exception, words in its message)
    (V2, 400, body("40005"), weex_sync._ClockRejected, ""),
    (V2, 400, body("40008"), weex_sync._ClockRejected, ""),
    (V2, 401, body("40006"), weex_sync.CredentialsError, "credentials rejected"),
    (V2, 400, body("40009"), weex_sync.CredentialsError, "credentials rejected"),
    (V2, 401, body("40011"), weex_sync.CredentialsError, "passphrase"),
    (V2, 400, body("40012"), weex_sync.CredentialsError, "credentials rejected"),
    (V2, 400, body("40018"), weex_sync.AccessDenied, "whitelist this IP"),
    (V2, 521, body("521"), weex_sync._OriginDown, "HTTP 521"),  # retried; see below
    (V2, 400, body("40001"), weex_sync.CredentialsError, "headers are missing"),
    (V2, 400, body("40003"), weex_sync.CredentialsError, "headers are missing"),
    (V2, 400, body("40013"), weex_sync.AccessDenied, "account frozen"),
    (V2, 403, body("40014"), weex_sync.AccessDenied, "not permitted"),
    (V2, 200, body("40015"), weex_sync._Busy, "exchange busy"),
    (V2, 400, body("40034"), weex_sync.SymbolRejected, "check sync.symbols"),
    (V2, 400, body("40017"), weex_sync.SymbolRejected, "bug in weex_sync"),
    (V2, 200, body("50001"), weex_sync._Transient, "exchange answered HTTP 200"),
    (V3, 400, body(-1043), weex_sync._ClockRejected, ""),
    (V3, 400, body(-1046), weex_sync._ClockRejected, ""),
    (V3, 401, body(-1041), weex_sync.CredentialsError, "credentials rejected"),
    (V3, 401, body(-1044), weex_sync.CredentialsError, "credentials rejected"),
    (V3, 403, body(-1052), weex_sync.AccessDenied, "read permission"),
    (V3, 403, body(-1190), weex_sync.AccessDenied, "not permitted"),
    (V3, 403, body(-1056), weex_sync.AccessDenied, "whitelist this IP"),
    (V3, 400, body(-1121), weex_sync.SymbolRejected, "check sync.symbols"),
    (V3, 400, body(-3235), weex_sync.SymbolRejected, "check sync.symbols"),
    (V3, 400, body(-1140), weex_sync.SymbolRejected, "bug in weex_sync"),
    (V3, 400, body(-1170), weex_sync.SymbolRejected, "bug in weex_sync"),
    (V3, 500, body(-1054), weex_sync._Transient, "busy"),
    (V3, 200, body(-1000), weex_sync._Transient, "busy"),
    (V3, 200, body("anything"), weex_sync._Transient, "exchange answered HTTP 200"),
    # HTTP status decides when the code is unknown
    (V3, 429, b"{}", weex_sync._Transient, "HTTP 429"),
    (V3, 502, b"<html>Bad Gateway</html>", weex_sync._Transient, "HTTP 502"),
    (V2, 503, b"", weex_sync._Transient, "HTTP 503"),
    (V3, 401, b"{}", weex_sync.CredentialsError, "credentials rejected"),
    (V3, 403, b"{}", weex_sync.AccessDenied, "not permitted"),
    (V3, 400, b"{}", weex_sync.SymbolRejected, "request rejected"),
    # rate-limit refusals: the limiter slows the address down (docs/weex-api.md, Rate limits)
    (V3, 418, b"{}", weex_sync._Throttled, "rate limited (HTTP 418)"),
    (V3, 429, body(-1059), weex_sync._Throttled, "code -1059"),
    (V3, 429, body(-1003), weex_sync._Throttled, "code -1003"),
    (V3, 200, body(-1059), weex_sync._Throttled, "HTTP 200, code -1059"),
    (V3, 200, body(-1003), weex_sync._Throttled, "HTTP 200, code -1003"),
    (V3, 429, body(-1040), weex_sync._Throttled, "HTTP 429, code -1040"),  # the status first
    (V2, 200, body("429"), weex_sync._Throttled, "HTTP 200, code 429"),
    (V2, 429, body("429"), weex_sync._Throttled, "rate limited"),
    # the form of our request refused: a bug, never retried
    (V2, 400, body("40007"), weex_sync.ExchangeError, "form of the request"),
    (V3, 400, body(-1045), weex_sync.ExchangeError, "form of the request"),
    (V3, 400, body(-1135), weex_sync.ExchangeError, "form of the request"),
    (V3, 405, body(-1150), weex_sync.ExchangeError, "form of the request"),
    (V3, 400, body(-1160), weex_sync.ExchangeError, "form of the request"),
    (V2, 400, body("40016"), weex_sync.AccessDenied, "bind a phone or an authenticator"),
    (V3, 302, b"", weex_sync.ExchangeError, "not followed"),
    (V3, 200, b"not json", weex_sync._Transient, "not JSON"),
    (V3, 200, b"[" * 100_000, weex_sync._Transient, "not JSON"),  # nesting: RecursionError
]


@pytest.mark.parametrize(("api", "status", "content", "error", "words"), CLASSIFICATION)
def test_responses_are_classified_per_the_table(api, status, content, error, words):
    with pytest.raises(error) as raised:
        weex_sync.classify_response(api, status, content, None, str)
    assert words in str(raised.value)
    if isinstance(raised.value, weex_sync.SyncError):
        user_wide = error in (weex_sync.CredentialsError, weex_sync.AccessDenied)
        assert raised.value.user_wide == user_wide


def test_success_answers_pass_through():
    assert weex_sync.classify_response(V3, 200, b"[]", None, str) == []
    v2 = {"list": [], "nextFlag": False, "totals": 0}
    assert weex_sync.classify_response(V2, 200, json.dumps(v2).encode(), None, str) == v2
    success = {"code": "00000", "list": [], "nextFlag": False}
    assert weex_sync.classify_response(V2, 200, json.dumps(success).encode(), None, str) == success


def test_http_521_mentions_the_ip_whitelist_only_once_the_retries_are_spent():
    with pytest.raises(weex_sync._OriginDown) as raised:
        weex_sync.classify_response(V3, 521, b"<html>origin down</html>", None, str)
    assert "whitelist" not in str(raised.value)
    final = raised.value.give_up(6)
    assert "all 6 attempts" in str(final) and "whitelist it" in str(final)
    assert not isinstance(final, weex_sync.ExchangeUnreachable)  # other users go on


def test_retry_after_is_honoured_and_capped():
    with pytest.raises(weex_sync._Transient) as raised:
        weex_sync.classify_response(V3, 429, b"", "3600", str)
    assert raised.value.retry_after == weex_sync.RETRY_AFTER_CAP_SECONDS
    assert isinstance(raised.value, weex_sync._Throttled)
    with pytest.raises(weex_sync._Transient) as raised:
        weex_sync.classify_response(V3, 503, b"", "2", str)
    assert raised.value.retry_after == 2
    with pytest.raises(weex_sync._Transient) as raised:
        weex_sync.classify_response(V3, 503, b"", "Wed, 21 Oct 2015 07:28:00 GMT", str)
    assert raised.value.retry_after is None  # not a number: our own backoff


def test_the_message_is_scrubbed_before_it_is_cut():
    secret = "PASSPHRASE-0123456789"
    msg = "x" * 190 + secret + "\nforged line"
    with pytest.raises(weex_sync.SymbolRejected) as raised:
        weex_sync.classify_response(V3, 400, body(-1121, msg), None, weex_sync.Redactor([secret]))
    text = str(raised.value)
    assert "PASSPH" not in text and "***" in text
    assert "\n" not in text and "***\\x0a" in text


# --- the fills WEEX sends ------------------------------------------------------------------


def test_real_v3_fills_carry_ids_and_time_as_json_strings():
    """The shape of a captured v3 answer (ccxt's static tests): id, orderId and time as
    strings, the other fields as the docs list them."""
    body = json.loads(
        '[{"id": "801234567890123456", "orderId": "702345678901234567", "symbol": "DOGEUSDT",'
        ' "buyer": true, "commission": "0.00413", "commissionAsset": "USDT", "maker": false,'
        ' "price": "0.13769", "qty": "50", "quoteQty": "6.8845", "realizedPnl": "0",'
        ' "side": "BUY", "positionSide": "LONG", "time": "1764505701456"}]'
    )
    answer = weex_sync.parse_answer(V3, body, "cmt_dogeusdt", 1764505701456, 1764505701456, 1)
    [fill] = answer.fills
    assert (fill.trade_id, fill.order_id, fill.trade_time) == (
        "801234567890123456",
        "702345678901234567",
        1764505701456,
    )
    assert (fill.price, fill.size, fill.fee, fill.fee_coin) == (
        Decimal("0.13769"),
        Decimal(50),
        Decimal("0.00413"),
        "USDT",
    )
    assert answer.full and answer.rejected == []


def test_a_fill_without_commission_has_no_fee_coin():
    obj = {
        "id": 1,
        "orderId": 2,
        "symbol": "BTCUSDT",
        "side": "SELL",
        "price": "100",
        "qty": "1",
        "commission": "0",
        "commissionAsset": "",
        "time": 1764505701456,
    }
    fill = weex_sync.parse_fill(V3, obj, "cmt_btcusdt")
    assert (fill.fee, fill.fee_coin) == (Decimal(0), "")
    with pytest.raises(weex_sync.BadData, match="commissionAsset"):  # a fee needs its coin
        weex_sync.parse_fill(V3, {**obj, "commission": "0.1"}, "cmt_btcusdt")


# --- concurrency -------------------------------------------------------------------------------


def batch(n: int, done: bool = False) -> weex_sync.Batch:
    return weex_sync.Batch([n], [], Cursor(n), done)


def test_batched_stores_the_good_pages_before_an_error_surfaces():
    def pages():
        yield batch(1)
        yield batch(2)
        raise weex_sync.BadData("page 3 is bad")

    out: list[weex_sync.Batch] = []
    with pytest.raises(weex_sync.BadData):
        out.extend(weex_sync.batched(pages(), lambda: False))
    assert [(b.fills, b.cursor, b.done) for b in out] == [([1, 2], Cursor(2), False)]


def test_prefetch_reraises_in_the_consumer_and_never_outlives_its_block():
    stop = weex_sync.Stop()

    def items():
        yield 1
        raise weex_sync.ExchangeError("boom")

    got = []
    with pytest.raises(weex_sync.ExchangeError), weex_sync.prefetch(items(), stop) as it:
        got += it
    assert got == [1]
    assert not [t for t in threading.enumerate() if t.name == "weex-prefetch"]

    def endless():
        n = 0
        while not stop2.wait(0.01):
            n += 1
            yield n

    stop2 = weex_sync.Stop()
    with weex_sync.prefetch(endless(), stop2) as it:
        assert next(it) == 1
    assert stop2.is_set()
    assert not [t for t in threading.enumerate() if t.name == "weex-prefetch"]


def test_a_stop_wakes_a_child_stop_waiting_on_it():
    parent = weex_sync.Stop()
    child = weex_sync.Stop(parent)
    threading.Timer(0.05, parent.set).start()
    began = time.monotonic()
    assert child.wait(10) is True
    assert time.monotonic() - began < 1


# --- rate limiter --------------------------------------------------------------------------


class FakeClock:
    """The limiter's clock, moved only by its waits: a test sees each wait exactly."""

    def __init__(self) -> None:
        self.t = 1_000_000.0
        self.waits: list[float] = []

    def now(self) -> float:
        return self.t

    def wait(self, seconds: float, stop: weex_sync.Stop | None) -> bool:
        if stop is not None and stop.is_set():
            return True
        self.waits.append(seconds)
        self.t += seconds
        return False

    def waited(self) -> float:
        return sum(self.waits)


def limiter(tmp_path=None, ip=50, uid=20, clock: FakeClock | None = None) -> weex_sync.RateLimiter:
    """A limiter of 0.2 s windows, on ``clock`` (a FakeClock of its own if none is given)."""
    cfg = weex_sync.RateLimitConfig(
        uid_weight=uid,
        ip_weight=ip,
        window_seconds=0.2,
        shared_file=str(tmp_path / "budget") if tmp_path else "",
    )
    return weex_sync.RateLimiter(cfg, "host", margin=0.0, clock=clock or FakeClock())


def test_two_keys_of_one_account_share_its_budget():
    """WEEX counts the UID budget per account, not per API key (sync.users[].account)."""
    clock = FakeClock()
    budget = limiter(uid=10, clock=clock)
    stop = weex_sync.Stop()
    first = weex_sync.UserConfig("a", "key-a", "s", "p", account="acct-1")
    second = weex_sync.UserConfig("b", "key-b", "s", "p", account="acct-1")
    other = weex_sync.UserConfig("c", "key-c", "s", "p")
    budget.acquire(first.budget_key, 5, stop)
    budget.acquire(other.budget_key, 5, stop)
    budget.acquire(second.budget_key, 5, stop)
    assert clock.waited() < 0.1  # 10 of 10 for acct-1: paced only
    budget.acquire(second.budget_key, 5, stop)
    assert clock.waited() >= 0.2 - 1e-6  # the account's window had to roll


def test_the_limiter_admits_the_budget_then_waits_for_the_window():
    clock = FakeClock()
    budget = limiter(uid=20, clock=clock)
    stop = weex_sync.Stop()
    for _ in range(4):
        budget.acquire("key", 5, stop)
    paced = clock.waited()
    assert 0 < paced < 0.15  # 20 of 20: paced (at most 5x the window's rate), no window wait
    assert all(w <= 0.2 / 4 / 5 * 1.5 for w in clock.waits)  # small steps: the pace
    budget.acquire("key", 5, stop)
    assert clock.waited() >= 0.2 - 1e-6  # the 5th waited for the first request's window to end


def test_the_ip_budget_is_shared_by_limiters_of_one_file(tmp_path):
    clock = FakeClock()
    first = limiter(tmp_path, ip=20, uid=100, clock=clock)
    second = limiter(tmp_path, ip=20, uid=100, clock=clock)
    stop = weex_sync.Stop()
    for n in range(4):
        (first if n % 2 else second).acquire(f"key{n}", 5, stop)
    assert clock.waited() < 0.15  # paced, no window wait
    second.acquire("other", 5, stop)  # the file knows the first limiter's requests
    assert clock.waited() >= 0.2 - 1e-6


def test_a_stop_interrupts_a_limiter_wait():
    budget = limiter(uid=5)
    stop = weex_sync.Stop()
    budget.acquire("key", 5, stop)
    stop.set()
    with pytest.raises(weex_sync.Interrupted):
        budget.acquire("key", 5, stop)


# --- the env file (--env-file) ---------------------------------------------------------------


def env_file_errors(tmp_path, capsys, content: str) -> tuple[int, list[str], Path]:
    """weex_sync --status with an env file of ``content``: exit code, its configuration error
    lines, the env file's path. The config is valid and names a database nothing answers at,
    so an env file that is wrongly accepted shows as exit 3, not 2."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "database: {host: 127.0.0.1, port: 1}\n"
        "weex: {api_key: k, secret_key: s, passphrase: '${PASS_X}'}\n"
    )
    env = tmp_path / f"weex_sync-{secrets.token_hex(3)}.env"
    env.write_bytes(content.encode())
    code = weex_sync.main(["-c", str(config), "--env-file", str(env), "--status"], environ={})
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if "configuration error" in line], env


def test_env_file_a_carriage_return_is_one_error_naming_file_and_line(tmp_path, capsys):
    """A line saved with a CRLF end: systemd and a shell read the \\r differently."""
    code, errors, env = env_file_errors(tmp_path, capsys, "A=1\nPASS_X=crlfsecret\r\nC=3\n")

    assert code == 2, errors
    assert len(errors) == 1, errors
    assert f"{env}:2: " in errors[0] and "carriage return" in errors[0], errors
    assert "crlfsecret" not in errors[0]


def test_env_file_an_unquoted_tilde_is_an_error(tmp_path, capsys):
    """A shell expands ~ (systemd does not); in single quotes it is literal for both."""
    code, errors, env = env_file_errors(tmp_path, capsys, "PASS_X=p\nKEYS=~/keys\nQ='~/k'\n")

    assert code == 2, errors
    assert len(errors) == 1 and f"{env}:2: " in errors[0], errors
    assert "~/keys" not in errors[0]


def test_env_file_blanks_around_a_line_are_stripped(tmp_path):
    env = tmp_path / "blanks.env"
    env.write_text("\t PASS_X=value \t\n  \tB='x y'\t\n")

    assert weex_sync.read_env_file(str(env)) == {"PASS_X": "value", "B": "x y"}


def test_a_quarantine_key_ignores_the_order_of_keys_not_how_a_number_is_written():
    def key(raw: str) -> str:
        return weex_sync.Rejected("cmt_btcusdt", "1", "2", 3, "bad", raw).fingerprint

    assert key('{"b": 1, "a": "x"}') == key('{"a": "x", "b": 1}')
    assert key('{"price": 1.10}') != key('{"price": 1.1}')  # two versions of one fill
    assert key('{"price": 1.10}') != key('{"price": "1.10"}')
    assert key('{"cut": "abc') == key('{"cut": "abc')  # not JSON (cut): as it is
