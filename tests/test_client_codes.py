"""The exchange's error codes: one table (``Api.codes`` of each API version in weex_sync.py)
that docs/weex-api.md's tables and the simulator are tested against, and every code in it
classified as the table says."""

from __future__ import annotations

import json
import re

import pytest

import weex_sim
import weex_sync
from harness import ROOT
from weex_sync import V2, V3

pytestmark = pytest.mark.unit
KINDS_OF_EXCEPTIONS = {
    "throttled": weex_sync._Throttled,
    "clock": weex_sync._ClockRejected,
    "busy": weex_sync._Busy,
    **{kind: error for kind, (error, _) in weex_sync.REJECTIONS.items()},
}
LEADING_CODES = re.compile(r"^(-?\d+(?:, -?\d+)*)(?:\s|$)")


def documented_codes(version: int) -> list[set[str]]:
    """The codes of each row of docs/weex-api.md's error table of this API version (rows whose
    first cell starts with codes; "HTTP 521" and such are statuses, not codes)."""
    text = (ROOT / "docs" / "weex-api.md").read_text(encoding="utf-8")
    heading = "## v3" if version == 3 else "## v2"
    section = text[text.index(heading) :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3:
            continue
        match = LEADING_CODES.match(cells[0])
        if match:
            rows.append(set(match[1].split(", ")))
    return rows


@pytest.mark.parametrize("api", [weex_sync.V2, weex_sync.V3], ids=["v2", "v3"])
def test_the_docs_tables_are_the_codes_table(api):
    rows = documented_codes(api.version)
    assert set().union(*rows) == set(api.codes)
    for row in rows:  # one meaning per row
        assert len({api.codes[code] for code in row}) == 1, row


CODES = [(api, code) for api in (weex_sync.V2, weex_sync.V3) for code in api.codes]


@pytest.mark.parametrize(
    ("api", "code"), CODES, ids=[f"v{api.version}:{code}" for api, code in CODES]
)
@pytest.mark.parametrize("status", [200, 400])
def test_every_code_is_classified_as_the_table_says(api, code, status):
    body: dict = {"code": code if api.version == 2 else int(code), "msg": "NAME some text"}
    if api.version == 2:
        body["requestTime"] = 0
    kind = api.codes[code]

    with pytest.raises(Exception) as raised:
        weex_sync.classify_response(api, status, json.dumps(body).encode(), None, str)

    assert type(raised.value) is KINDS_OF_EXCEPTIONS[kind], (kind, raised.value)
    assert f"code {code}: NAME some text" in str(raised.value)
    if kind in weex_sync.REJECTIONS:
        meaning = weex_sync.REJECTIONS[kind][1].split("{}")[0]
        assert str(raised.value).startswith(meaning)


# What the simulator sends that is not in the table, and why weex_sync needs no code for it:
# v2's 521 comes with HTTP 521 (handled by status), 50001 is any non-success code (retried).
SIMULATOR_ONLY = {"521", "50001"}


def test_every_code_the_simulator_sends_is_in_the_table():
    sent = {
        (version, str(code))
        for versions in weex_sim._ERRORS.values()
        for version, (_, code, _) in versions.items()
    }
    sent |= {(3, code) for code in weex_sim.LIMIT_CODES if code != "429"}
    sent |= {(2, "429")}
    for version, code in sorted(sent):
        if code in SIMULATOR_ONLY:
            continue
        assert code in weex_sync.APIS[version].codes, (version, code)


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
