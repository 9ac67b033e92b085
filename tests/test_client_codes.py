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


@pytest.mark.unit
@pytest.mark.parametrize("api", [weex_sync.V2, weex_sync.V3], ids=["v2", "v3"])
def test_the_docs_tables_are_the_codes_table(api):
    rows = documented_codes(api.version)
    assert set().union(*rows) == set(api.codes)
    for row in rows:  # one meaning per row
        assert len({api.codes[code] for code in row}) == 1, row


CODES = [(api, code) for api in (weex_sync.V2, weex_sync.V3) for code in api.codes]


@pytest.mark.unit
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


@pytest.mark.unit
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
