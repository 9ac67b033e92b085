"""What the documentation promises exists, and what exists is documented: every key the
configuration accepts (docs/configuration.md) and every command-line option
(docs/command-line.md), both ways."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import weex_sync
from harness import ROOT

pytestmark = pytest.mark.unit
SECTIONS = ("", "database", "weex", "weex.rate_limit", "sync", "sync.users[]")


def accepted_keys(section: str, tmp_path: Path) -> set[str]:
    """The keys weex_sync accepts in ``section``, as its own error for an unknown one lists them."""
    config: dict = {
        "weex": {"api_key": "k", "secret_key": "secret-key", "passphrase": "pass-phrase"}
    }
    if section == "":
        config["zz_unknown"] = 1
    elif section == "weex.rate_limit":
        config["weex"]["rate_limit"] = {"zz_unknown": 1}
    elif section == "sync.users[]":
        user = {"user_id": "u", "api_key": "k", "secret_key": "s", "passphrase": "p"}
        config["sync"] = {"users": [{**user, "zz_unknown": 1}]}
    else:
        config.setdefault(section, {})["zz_unknown"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(weex_sync.ConfigError) as raised:
        weex_sync.load_config(str(path), {})
    listed = re.search(r"unknown key \(expected one of: ([^)]*)\)", str(raised.value))
    assert listed, str(raised.value)
    return set(listed[1].split(", "))


def documented_keys() -> dict[str, set[str]]:
    """The keys docs/configuration.md's table names, by section: its first column (`a.b` and
    the `/ c / d` that follow), and for sync.users[] the keys its meaning lists."""
    found: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 3:
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        first = names[0]
        if first == "sync.users[]":
            listed = re.sub(r"\([^)]*\)", "", cells[2])  # the keys, not what they hold
            found["sync.users[]"] = set(re.findall(r"`([a-z_]+)`", listed))
            continue
        section, _, key = first.rpartition(".")
        found.setdefault(section, set()).update([key, *names[1:]])
    for nested in [s for s in found if "." in s]:  # weex.rate_limit: a key of weex
        parent, _, key = nested.rpartition(".")
        found.setdefault(parent, set()).add(key.removesuffix("[]"))
    return found


@pytest.mark.parametrize("section", SECTIONS[1:])
def test_every_configuration_key_is_documented_and_every_documented_one_exists(section, tmp_path):
    assert documented_keys().get(section, set()) == accepted_keys(section, tmp_path)


def test_every_top_level_section_is_documented(tmp_path):
    assert accepted_keys("", tmp_path) == {s for s in SECTIONS[1:] if "." not in s}


def test_every_option_is_documented_and_every_documented_one_exists():
    parser = weex_sync.build_parser()
    options = {o for action in parser._actions for o in action.option_strings if o.startswith("--")}
    text = (ROOT / "docs" / "command-line.md").read_text()
    documented = set(re.findall(r"(--[a-z][a-z-]*)", text))
    assert documented == options - {"--help"}
