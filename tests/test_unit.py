"""Fast unit tests: no database, no HTTP (``pytest -m unit`` runs them in about a second).

Pure pieces of weex_sync: parsing the fills WEEX sends (and hostile values), batching and
prefetching, the env file. Elsewhere: the cursor rule and the walk (test_paging.py), the error
codes and their classification (test_client_codes.py), the rate budget (test_rate_budget.py).
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
from weex_sync import V3, Cursor

pytestmark = pytest.mark.unit
DAY = 86_400_000


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
