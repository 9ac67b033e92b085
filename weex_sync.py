#!/usr/bin/env python3
"""weex_sync: copy the trade fills of WEEX futures accounts into PostgreSQL, incrementally.

One invocation performs one sync pass and exits (cron schedules it; ``--loop N`` repeats it):
validate the configuration, create the database objects if missing, then for every enabled user
fetch the fills that are new since the last pass (every contract of the account in one walk, or
the listed symbols one by one), store them with ``INSERT ... ON CONFLICT DO NOTHING`` and append
the outcome to ``sync_status``.

The file reads top to bottom, each section using only the ones above it:

1. Configuration      -- the YAML file, the env file, environment overrides, validation
2. Errors             -- one exception tree: SyncError and its subclasses
3. Logging            -- secrets scrubbed, control characters escaped, text or JSON lines
4. Fills              -- the two API versions (tables, not branches), an answer's fills
                         validated
5. WEEX client        -- Stop, the request deadline, signing, the shared rate budget (paced,
                         its rate learned from refusals), the exchange's clock, what an
                         answer means, the one retry layer
6. Paging             -- the cursor rule (plan_walk), the walk over its ranges in whatever
                         order pages come, bursts
7. Concurrency        -- batched(), prefetch(), the stop signals
8. Storage            -- schema and its upgrade, partitions, locks, claims, the cursor,
                         batches of fills, status rows
9. The pass           -- PairSync per (user, symbol), SyncPass orchestrating a worker pool
10. Operator commands -- --check, --status, --metrics-file
11. Command line      -- argparse, main()

It depends only on psycopg2, requests and PyYAML, so it can be copied alone to a server.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import enum
import fcntl
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from decimal import Context, Decimal
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar
from urllib.parse import urlencode, urlsplit

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import yaml
from psycopg2 import sql
from requests.adapters import HTTPAdapter

__version__ = "3.4.0"

log = logging.getLogger("weex_sync")

EXIT_OK = 0
EXIT_SYNC_FAILED = 1
EXIT_CONFIG = 2
EXIT_DB_UNREACHABLE = 3

T = TypeVar("T")
Conn = psycopg2.extensions.connection

SECOND_MS = 1000
DAY_MS = 86_400_000


# =============================================================================================
# 1. Configuration
# =============================================================================================


class ConfigError(Exception):
    """A configuration or usage problem. The message is one line that names the key and never
    echoes the value (a secret pasted into the wrong key must not end up in a log)."""


ALL_SYMBOLS = "*"  # the scope of a walk over every contract of an account (sync.symbols: all)


@dataclass(frozen=True)
class DatabaseConfig:
    host: str = "localhost"
    port: int = 5432
    user: str = "postgres"
    password: str = field(default="", repr=False)
    dbname: str = "weex_trading"
    sslmode: str = "prefer"
    partition_fills: str = "none"  # or "monthly": a new trade_fills partitioned by month
    schema: str = "public"  # where weex_sync's tables are; every transaction pins it


@dataclass(frozen=True)
class RateLimitConfig:
    uid_weight: int = 500
    ip_weight: int = 500
    window_seconds: float = 10.0
    # Every weex_sync process of this user charges its requests here, so overlapping passes
    # share one IP budget (default_budget_file; see open_budget_file). Empty: this process
    # keeps its own budget.
    shared_file: str = ""
    shared_file_private: bool = True  # the default location: this user's alone


@dataclass(frozen=True)
class WeexConfig:
    base_url: str = "https://api-contract.weex.com"
    api_version: int = 3
    timeout_seconds: float = 10.0
    max_retries: int = 5
    rate_limit: RateLimitConfig = RateLimitConfig()
    # Local addresses requests may leave from (a host with several public IPs): each process
    # takes one (choose_source_address); each has its own IP budget. Empty: the system's.
    source_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserConfig:
    user_id: str
    api_key: str
    secret_key: str = field(repr=False)
    passphrase: str = field(repr=False)
    symbols: tuple[str, ...] = (ALL_SYMBOLS,)  # (ALL_SYMBOLS,): every contract, one walk
    enabled: bool = True
    account: str = ""  # the WEEX account (UID) the key belongs to; "": its own

    @property
    def fingerprint(self) -> str:
        """Tells whether the credentials changed (sync_backoff) without telling them: 64 bits
        of a hash over all three, which cannot be reversed without the secret key."""
        parts = ("weex_sync credentials", self.api_key, self.secret_key, self.passphrase)
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    @property
    def budget_key(self) -> str:
        """What the per-account budget is kept by: WEEX counts it per UID, not per API key."""
        return "account " + self.account if self.account else "key " + self.api_key


@dataclass(frozen=True)
class SyncConfig:
    interval_seconds: int = 60
    page_size: int = 100
    start_time: int = 0
    workers: int = 8
    lookback_seconds: int = 120
    reconcile_every_seconds: int = 86_400  # 0: no reconcile
    reconcile_window_seconds: int = 172_800
    max_seconds: int = 0  # 0: no limit
    status_retention_days: int = 90  # 0: keep every status row
    min_interval_seconds: int | None = None  # None: 5/6 of the pass interval; 0: no claims
    symbols: tuple[str, ...] = (ALL_SYMBOLS,)
    users: tuple[UserConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    weex: WeexConfig
    sync: SyncConfig

    def secrets(self, database: bool = True) -> list[str]:
        """Every secret value (``database``: with the database password)."""
        named = self.named_secrets()
        return [v for k, v in named.items() if database or k != "database.password"]

    def named_secrets(self) -> dict[str, str]:
        """Every secret value by the setting it comes from."""
        named = {"database.password": self.database.password}
        for user in self.sync.users:
            named[f"the secret_key of user {user.user_id}"] = user.secret_key
            named[f"the passphrase of user {user.user_id}"] = user.passphrase
        return {name: value for name, value in named.items() if value}


CONTRACT_RE = re.compile(r"cmt_[a-z0-9]{1,40}(usdt|usdc)")
V3_SYMBOL_RE = re.compile(r"[A-Za-z0-9]{1,40}(USDT|USDC|usdt|usdc)")
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
HEADER_VALUE_RE = re.compile(r"[\x21-\x7e]{1,256}")  # sent as an HTTP header: printable ASCII
# ${NAME} is replaced by the variable; $${ stays a literal ${; any other ${ is an error (a
# shell's ${A:-x} taken literally would be a silent surprise).
ENV_REF_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
MS_RE = re.compile(r"[0-9]{1,15}")
DB_ENV = {
    "host": ("DB_HOST", "POSTGRES_HOST"),
    "port": ("DB_PORT", "POSTGRES_PORT"),
    "user": ("DB_USER", "POSTGRES_USER"),
    "password": ("DB_PASSWORD", "POSTGRES_PASSWORD"),
    "dbname": ("DB_NAME", "POSTGRES_DB"),
    "sslmode": ("DB_SSLMODE",),
}
WEEX_ENV = {
    "base_url": ("WEEX_BASE_URL",),
    "api_version": ("WEEX_API_VERSION",),
    "api_key": ("WEEX_API_KEY",),
    "secret_key": ("WEEX_SECRET_KEY",),
    "passphrase": ("WEEX_PASSPHRASE",),
    "source_address": ("WEEX_SOURCE_ADDRESS",),
}
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_MISSING = object()


def contract_symbol(text: str) -> str | None:
    """The stored contract form (``cmt_btcusdt``) of a symbol written either way (``cmt_btcusdt``
    or the v3 form ``BTCUSDT``), or None if it is neither."""
    lowered = text.lower()
    if CONTRACT_RE.fullmatch(lowered):
        return lowered
    if V3_SYMBOL_RE.fullmatch(text):
        return "cmt_" + lowered
    return None


def v3_symbol(contract: str) -> str:
    """``cmt_btcusdt`` -> ``BTCUSDT``, the form the v3 API takes and answers with."""
    return contract.removeprefix("cmt_").upper()


def default_budget_file(environ: Mapping[str, str]) -> str:
    """This user's cache directory: the same for cron, systemd and a shell (unlike
    XDG_RUNTIME_DIR, which cron does not set)."""
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "weex_sync", "ratelimit")


ENV_LINE_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)")
# A value systemd's EnvironmentFile= and a shell's `.` read the same: unquoted without spaces
# or shell characters, or in single quotes (literal), or in double quotes without $ ` \ ".
ENV_PLAIN_RE = re.compile(r"[^\s'\"\\$`;&|<>()~]*")  # ~: the shell would expand it
ENV_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # the readers disagree on these
ENV_SINGLE_RE = re.compile(r"'([^']*)'")
ENV_DOUBLE_RE = re.compile(r'"([^"$`\\]*)"')


class EnvFileError(ConfigError):
    """Bad lines of an --env-file: one message per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0])
        self.problems = problems


def read_env_file(path: str) -> dict[str, str]:
    """KEY=value lines (see ENV_PLAIN_RE), blank lines and # comments; every other line is an
    error naming the file and the line number, never the value (it may be a secret)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:  # a \r stays, to be refused
            lines = fh.read().split("\n")  # only \n ends a line for both readers
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"--env-file {path}: cannot read it: {reason}") from None
    values: dict[str, str] = {}
    problems = []
    for number, line in enumerate(lines, start=1):
        text = line.strip(" \t")
        if not text or text.startswith("#"):
            continue
        problem = None
        match = ENV_LINE_RE.fullmatch(text)
        if ENV_CONTROL_RE.search(text):
            problem = "a control character (a carriage return: save the file with Unix line ends)"
        elif text.startswith("export "):
            problem = "no 'export' (systemd's EnvironmentFile= does not take it): KEY=value"
        elif match is None:
            problem = "not KEY=value (no spaces around '=', KEY of letters, digits and _)"
        else:
            value = match[2]
            quoted = ENV_SINGLE_RE.fullmatch(value) or ENV_DOUBLE_RE.fullmatch(value)
            if quoted:
                values[match[1]] = quoted[1]
            elif ENV_PLAIN_RE.fullmatch(value):
                values[match[1]] = value
            else:
                problem = (
                    f"the value of {match[1]} has spaces, quotes or shell characters: put it "
                    "in single quotes (and use no single quote inside)"
                )
        if problem:
            problems.append(f"{path}:{number}: {problem}")
    if problems:
        raise EnvFileError(problems)
    return values


def load_config(path: str | None, environ: Mapping[str, str]) -> Config:
    """Read the YAML file (optional when ``path`` is None), expand ``${VAR}``, apply environment
    overrides and validate everything. Raises ConfigError before anything is touched."""
    raw = _read_yaml(path)
    raw = _expand_env_refs(raw, "", environ)
    _apply_env_overrides(raw, environ)
    _check_keys(raw, "", {"database", "weex", "sync"})
    weex_raw = _section(raw, "weex")
    return Config(
        database=_database_config(_section(raw, "database")),
        weex=_weex_config(weex_raw, environ),
        sync=_sync_config(_section(raw, "sync"), weex_raw),
    )


# libyaml's parser when PyYAML has it (its wheels do): 8,000 users load in a fraction of a
# second instead of several seconds. Same safe types either way.
SAFE_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=SAFE_YAML_LOADER)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        if isinstance(exc, yaml.constructor.ConstructorError):  # it quotes the value's tag
            problem = "a tag (!...) weex_sync does not read"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except (ValueError, UnicodeDecodeError):  # e.g. an integer of thousands of digits
        raise ConfigError(f"{path}: invalid YAML: a value cannot be read (too long?)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _expand_env_refs(
    value: Any, path: str, environ: Mapping[str, str], done: dict[int, Any] | None = None
) -> Any:
    """``value`` with ${NAME} replaced. A node that YAML aliases in many places is expanded
    once (``done``): a few hundred bytes of nested aliases must not take minutes."""
    done = {} if done is None else done
    if isinstance(value, (dict, list)) and id(value) in done:
        return done[id(value)]
    if isinstance(value, dict):
        out: dict = {}
        done[id(value)] = out
        out.update(
            (k, _expand_env_refs(v, _join(path, k), environ, done)) for k, v in value.items()
        )
        return out
    if isinstance(value, list):
        items: list = []
        done[id(value)] = items
        items.extend(
            _expand_env_refs(v, f"{path}[{i}]", environ, done) for i, v in enumerate(value)
        )
        return items
    if isinstance(value, str):

        def lookup(match: re.Match) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group(1)
            if name is None:
                raise ConfigError(
                    f"{path}: only ${{NAME}} is replaced by an environment variable (write $${{ "
                    "for a literal ${)"
                )
            if name not in environ:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return environ[name]

        return ENV_REF_RE.sub(lookup, value)
    return value


def _apply_env_overrides(raw: dict, environ: Mapping[str, str]) -> None:
    """The first set variable of each key's list wins over the file."""
    for section, env_map in (("database", DB_ENV), ("weex", WEEX_ENV)):
        for key, names in env_map.items():
            value = next((environ[n] for n in names if environ.get(n)), None)
            if value is None:
                continue
            if raw.get(section) is None:
                raw[section] = {}
            if isinstance(raw[section], dict):  # otherwise validation reports the section
                raw[section][key] = value


def _join(path: str, key: Any) -> str:
    """'section.key'. A key that is not a plain word is not shown (it may hold a secret, as
    `secret_key Hunter2` does when a colon is missing): it is named as a key that is not."""
    if not (isinstance(key, str) and re.fullmatch(r"\w{1,64}", key)):
        return f"{path} (a key that is not a plain word)"
    return f"{path}.{key}" if path else key


def _section(raw: dict, name: str, path: str = "") -> dict:
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{_join(path, name)}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(raw: dict, path: str, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"{_join(path, key)}: unknown key (expected one of: {', '.join(sorted(allowed))})"
            )


def _typed(raw: dict, path: str, key: str, kind: type, default: Any = _MISSING) -> Any:
    """raw[key] checked against ``kind``; strings are accepted for numbers (environment values)."""
    name = _join(path, key)
    value: Any = raw.get(key, default)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise ConfigError(f"{name}: missing")
        return default
    if kind in (int, float) and isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"-?[0-9]{1,12}(\.[0-9]{1,12})?", text):
            raise ConfigError(f"{name}: expected a number")
        value = kind(float(text)) if kind is float else _int_text(text, name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number")
    if isinstance(value, str) and not value.strip() and default is _MISSING:
        raise ConfigError(f"{name}: must not be empty")
    return value


def _int_text(text: str, name: str) -> int:
    if "." in text:
        raise ConfigError(f"{name}: expected a whole number")
    return int(text)


def _ranged(raw: dict, path: str, key: str, kind: type, default: Any, low: Any, high: Any) -> Any:
    value = _typed(raw, path, key, kind, default)
    if not low <= value <= high:
        raise ConfigError(f"{_join(path, key)}: out of range {low}..{high}")
    return value


def _database_config(raw: dict) -> DatabaseConfig:
    p = "database"
    _check_keys(
        raw,
        p,
        {"host", "port", "user", "password", "dbname", "sslmode"} | {"partition_fills", "schema"},
    )
    for key in ("host", "user", "password", "dbname"):
        if isinstance(raw.get(key), str) and "\0" in raw[key]:
            raise ConfigError(f"database.{key}: contains a NUL character")
    sslmode = _typed(raw, p, "sslmode", str, DatabaseConfig.sslmode)
    if sslmode not in SSL_MODES:
        raise ConfigError(f"database.sslmode: must be one of {', '.join(SSL_MODES)}")
    return DatabaseConfig(
        host=_typed(raw, p, "host", str, DatabaseConfig.host),
        port=_ranged(raw, p, "port", int, DatabaseConfig.port, 1, 65535),
        user=_typed(raw, p, "user", str, DatabaseConfig.user),
        password=_not_placeholder(_typed(raw, p, "password", str, ""), "database.password"),
        dbname=_typed(raw, p, "dbname", str, DatabaseConfig.dbname),
        sslmode=sslmode,
        partition_fills=_partition_fills(raw),
        schema=_schema_name(raw),
    )


def _schema_name(raw: dict) -> str:
    value = _typed(raw, "database", "schema", str, DatabaseConfig.schema)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value) or value.startswith("pg_"):
        raise ConfigError(
            "database.schema: a schema name in lower case (letters, digits, _), not pg_…"
        )
    return value


def _partition_fills(raw: dict) -> str:
    value = _typed(raw, "database", "partition_fills", str, DatabaseConfig.partition_fills)
    if value not in ("none", "monthly"):
        raise ConfigError("database.partition_fills: must be none or monthly")
    return value


def _weex_config(raw: dict, environ: Mapping[str, str]) -> WeexConfig:
    p = "weex"
    keys = {"base_url", "api_version", "api_key", "secret_key", "passphrase", "timeout_seconds"}
    _check_keys(raw, p, keys | {"max_retries", "rate_limit", "source_address"})
    base_url = _typed(raw, p, "base_url", str, WeexConfig.base_url).rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(/[\x21-\x7e]*)?", base_url):
        raise ConfigError("weex.base_url: not an http(s) URL such as https://api-contract.weex.com")
    api_version = _typed(raw, p, "api_version", int, WeexConfig.api_version)
    if api_version not in (2, 3):
        raise ConfigError("weex.api_version: must be 3 (GET /capi/v3/userTrades) or 2 (older)")
    limits = _section(raw, "rate_limit", p)
    lp = "weex.rate_limit"
    _check_keys(limits, lp, {"uid_weight", "ip_weight", "window_seconds", "shared_file"})
    defaults = RateLimitConfig()
    shared_file = _typed(limits, lp, "shared_file", str, default_budget_file(environ))
    if "\0" in shared_file:
        raise ConfigError("weex.rate_limit.shared_file: contains a NUL character")
    if shared_file:
        shared_file = os.path.abspath(os.path.expanduser(shared_file))
    return WeexConfig(
        base_url=base_url,
        api_version=api_version,
        source_addresses=_source_addresses(raw.get("source_address")),
        timeout_seconds=_ranged(
            raw, p, "timeout_seconds", float, WeexConfig.timeout_seconds, 0.1, 300.0
        ),
        max_retries=_ranged(raw, p, "max_retries", int, WeexConfig.max_retries, 0, 20),
        rate_limit=RateLimitConfig(
            uid_weight=_ranged(limits, lp, "uid_weight", int, defaults.uid_weight, 5, 10**6),
            ip_weight=_ranged(limits, lp, "ip_weight", int, defaults.ip_weight, 5, 10**7),
            window_seconds=_ranged(
                limits, lp, "window_seconds", float, defaults.window_seconds, 0.1, 3600.0
            ),
            shared_file=shared_file,
            shared_file_private=shared_file == default_budget_file(environ),
        ),
    )


def _source_addresses(value: Any) -> tuple[str, ...]:
    """weex.source_address: an IP address, a list of them, or (the environment variable) a
    comma-separated list."""
    if value in (None, "", []):
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError("weex.source_address: expected an IP address or a list of them")
    addresses = []
    for i, item in enumerate(items):
        try:
            address = ipaddress.ip_address(str(item).strip())
        except ValueError:
            raise ConfigError(f"weex.source_address[{i}]: not an IP address") from None
        addresses.append(str(address))
    if len(set(addresses)) < len(addresses):
        raise ConfigError("weex.source_address: an address is listed twice")
    return tuple(addresses)


def check_source_addresses(cfg: WeexConfig) -> None:
    """Each weex.source_address is an address of this host: asked of the kernel before a pass
    or --check (not --status, which may run on a monitoring host that shares the file), so
    the error names the setting instead of every request failing to connect."""
    for i, text in enumerate(cfg.source_addresses):
        problem = _unbindable(ipaddress.ip_address(text))
        if problem:
            raise ConfigError(
                f"weex.source_address[{i}]: {text} is not an address of this host ({problem})"
            )


def _unbindable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why requests could not leave from ``address`` (None: they can)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(address), 0))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _symbols(value: Any, path: str) -> tuple[str, ...]:
    """``all`` (every contract of the account, one walk) or a list of contracts."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return (ALL_SYMBOLS,)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: expected all, or a non-empty list such as [cmt_btcusdt]")
    symbols: list[str] = []
    for i, item in enumerate(value):
        symbol = contract_symbol(item.strip()) if isinstance(item, str) else None
        if symbol is None:
            raise ConfigError(
                f"{path}[{i}]: not a WEEX contract symbol (expected like cmt_btcusdt or BTCUSDT)"
            )
        if symbol in symbols:
            raise ConfigError(f"{path}[{i}]: duplicate symbol {symbol}")
        symbols.append(symbol)
    return tuple(symbols)


def _setting(raw: dict, name: str, low: int, high: int) -> int:
    """sync.<name>, a whole number in low..high, its default SyncConfig's (written once)."""
    return _ranged(raw, "sync", name, int, getattr(SyncConfig, name) or 0, low, high)


def _sync_config(raw: dict, weex_raw: dict) -> SyncConfig:
    p = "sync"
    _check_keys(
        raw,
        p,
        {"interval_seconds", "page_size", "start_time", "workers", "symbols", "users"}
        | {"lookback_seconds", "max_seconds", "reconcile_every_seconds"}
        | {"reconcile_window_seconds", "min_interval_seconds", "status_retention_days"},
    )
    symbols = _symbols(raw.get("symbols", "all"), "sync.symbols")
    every = _setting(raw, "reconcile_every_seconds", 0, 30 * 86_400)
    window = _setting(raw, "reconcile_window_seconds", 1, 365 * 86_400)
    if every and window < every:
        raise ConfigError(
            "sync.reconcile_window_seconds: must be at least sync.reconcile_every_seconds "
            "(else a fill shown late can fall between two reconciles)"
        )
    if "users" in raw:
        users = _users(raw["users"], symbols)
    else:
        users = (_default_user(weex_raw, symbols),)
    return SyncConfig(
        interval_seconds=_setting(raw, "interval_seconds", 1, 86400),
        page_size=_setting(raw, "page_size", 1, 100),
        start_time=parse_time(raw.get("start_time", SyncConfig.start_time), "sync.start_time"),
        workers=_setting(raw, "workers", 1, 64),
        lookback_seconds=_setting(raw, "lookback_seconds", 0, 86400),
        reconcile_every_seconds=every,
        reconcile_window_seconds=window,
        min_interval_seconds=(
            None
            if raw.get("min_interval_seconds") is None
            else _setting(raw, "min_interval_seconds", 0, 86400)
        ),
        max_seconds=_setting(raw, "max_seconds", 0, 86400),
        status_retention_days=_setting(raw, "status_retention_days", 0, 36500),
        symbols=symbols,
        users=users,
    )


# The examples' placeholders (deploy/weex_sync.env.example): a value left as shipped is named
# as one to fill in, not as a wrong one.
PLACEHOLDER = "fill-in"


def _not_placeholder(value: str, name: str) -> str:
    if value.startswith(PLACEHOLDER):
        raise ConfigError(f"{name}: still the example's placeholder: fill in the real value")
    return value


def _credential(raw: dict, path: str, key: str) -> str:
    value = _not_placeholder(_typed(raw, path, key, str), _join(path, key))
    if key != "secret_key" and not HEADER_VALUE_RE.fullmatch(value):
        raise ConfigError(
            f"{_join(path, key)}: must be 1-256 printable ASCII characters without spaces "
            "(it is sent as an HTTP header)"
        )
    return value


def _account(item: dict, path: str) -> str:
    account = _typed(item, path, "account", str, "")
    if account and not USER_ID_RE.fullmatch(account):
        raise ConfigError(f"{path}.account: must be 1-64 letters, digits or _.@- characters")
    return account


def _default_user(weex_raw: dict, symbols: tuple[str, ...]) -> UserConfig:
    """Without ``sync.users`` the credentials in ``weex`` (or WEEX_* variables) are one user."""
    for key in ("api_key", "secret_key", "passphrase"):
        if not weex_raw.get(key):
            raise ConfigError(
                f"weex.{key}: missing (set it, the {WEEX_ENV[key][0]} variable, or list sync.users)"
            )
    return UserConfig(
        user_id="default",
        api_key=_credential(weex_raw, "weex", "api_key"),
        secret_key=_credential(weex_raw, "weex", "secret_key"),
        passphrase=_credential(weex_raw, "weex", "passphrase"),
        symbols=symbols,
    )


def _users(value: Any, symbols: tuple[str, ...]) -> tuple[UserConfig, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("sync.users: expected a non-empty list of users")
    users: list[UserConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        p = f"sync.users[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{p}: expected a mapping with user_id, api_key, secret_key, ...")
        _check_keys(
            item,
            p,
            {"user_id", "api_key", "secret_key", "passphrase", "enabled", "symbols", "account"},
        )
        user_id = _typed(item, p, "user_id", str)
        if not USER_ID_RE.fullmatch(user_id):
            raise ConfigError(f"{p}.user_id: must be 1-64 letters, digits or _.@- characters")
        if user_id in seen:
            raise ConfigError(f"{p}.user_id: duplicate user_id {user_id}")
        seen.add(user_id)
        try:
            users.append(_user(item, p, user_id, symbols))
        except ConfigError as exc:  # the index, and the user it is: whoever reads the log
            raise ConfigError(f"{exc} (user {user_id})") from None
    return tuple(users)


def _user(item: dict, p: str, user_id: str, symbols: tuple[str, ...]) -> UserConfig:
    user_symbols = _symbols(item["symbols"], f"{p}.symbols") if "symbols" in item else symbols
    return UserConfig(
        user_id=user_id,
        api_key=_credential(item, p, "api_key"),
        secret_key=_credential(item, p, "secret_key"),
        passphrase=_credential(item, p, "passphrase"),
        symbols=user_symbols,
        enabled=_typed(item, p, "enabled", bool, True),
        account=_account(item, p),
    )


def parse_time(value: Any, name: str) -> int:
    """Milliseconds since the epoch from an int (ms) or an ISO date/datetime (UTC unless given)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a date, datetime or milliseconds")
    if isinstance(value, int):
        moment = value
    else:
        if isinstance(value, str):
            text = value.strip()
            if MS_RE.fullmatch(text):
                return parse_time(int(text), name)
            try:
                value = dt.datetime.fromisoformat(text[:64])
            except ValueError:
                raise ConfigError(
                    f"{name}: not an ISO date (2024-01-01), datetime or milliseconds"
                ) from None
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if not isinstance(value, dt.datetime):
            raise ConfigError(f"{name}: expected a date, datetime or milliseconds")
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        moment = int(value.timestamp() * 1000)
    if not 0 <= moment < 10**14:
        raise ConfigError(f"{name}: outside 1970..5000 (in milliseconds)")
    return moment


def format_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_age(text: str, name: str) -> int:
    """Seconds from ``90``, ``90s``, ``10m``, ``2h`` or ``1d``."""
    match = re.fullmatch(r"([0-9]{1,9})([smhd]?)", text.strip())
    if not match:
        raise ConfigError(f"{name}: expected a duration such as 90s, 10m, 2h or 1d")
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


# =============================================================================================
# 2. Errors
# =============================================================================================


class SyncError(Exception):
    """Why a (user, symbol) pair failed. The message is one line, safe to log and to store.
    ``user_wide`` errors fail every pair of the user (without more requests). ``kind`` goes to
    sync_status.error_kind; the PERSISTENT kinds do not go away by themselves (--max-age says
    FAILING at once)."""

    user_wide = False
    kind = "internal"


class ExchangeError(SyncError):
    """The exchange gave no usable answer, after the retries the error allowed."""

    kind = "exchange"


class CredentialsError(ExchangeError):
    """api_key, secret_key or passphrase rejected."""

    user_wide = True
    kind = "credentials"


class AccessDenied(ExchangeError):
    """The key is valid but not allowed: IP not whitelisted, permission missing, account locked."""

    user_wide = True
    kind = "access"


class SymbolRejected(ExchangeError):
    """The exchange rejects the request for this symbol (unknown contract, bad parameter)."""

    kind = "symbol"


class RangeRejected(SymbolRejected):
    """The exchange refuses the request's time range (v3: -1170/-1171)."""


class RateLimited(ExchangeError):
    """Still HTTP 429 after every retry."""

    kind = "rate_limit"


class BackingOff(ExchangeError):
    """The user's credentials or access were refused on its last passes: not asked this pass
    (sync_backoff). Its kind is the refusal's."""

    user_wide = True

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class ExchangeUnreachable(ExchangeError):
    """No connection to the exchange host at all; the pairs still waiting fail fast with it."""

    kind = "unreachable"


class MalformedAnswer(ExchangeError):
    """An HTTP 200 answer that is not a page of fills at all (wrong shape): retried like a
    transport fault, never quarantined."""


class BadData(SyncError):
    """The exchange sent fills that cannot be stored faithfully (they are quarantined)."""

    kind = "rejected_fills"


class StorageError(SyncError):
    """PostgreSQL failed (or went away); the next pass resumes from the last commit."""

    kind = "database"


PERSISTENT_ERRORS = frozenset({"credentials", "access", "symbol", "rejected_fills"})


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); what was fetched so far is committed."""


# =============================================================================================
# 3. Logging
# =============================================================================================

_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str, limit: int | None = None) -> str:
    """External text made safe for one log line or a status row: control characters, line
    breaks and unpaired surrogates are escaped (a message cannot forge a second log line, and
    PostgreSQL can store it), then the result is cut to ``limit`` characters."""
    text = _UNPRINTABLE_RE.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 256 else f"\\u{ord(m[0]):04x}", text
    )
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


Scrub = Callable[[str], str]


def secret_forms(secret: str) -> set[str]:
    """A secret as it may appear in a text on its way out: raw, and as a Python repr, a JSON
    string or printable() escape it (a backslash doubled, a control character spelled out)."""
    forms = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], printable(secret)}
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    escaped = secret.replace("\\", "\\\\")  # repr() escapes whichever quote it picks
    forms |= {escaped.replace("'", "\\'"), escaped.replace('"', '\\"')}
    forms |= {printable(f) for f in list(forms)}
    return {f for f in forms if f}


class Redactor:
    """Replaces every configured secret, in every form it can take (secret_forms), with '***'.

    A few users' forms are one alternation, longest first. A fleet's would make every line cost
    O(users) (10,000 users: 11 ms a line), so past ALTERNATION_LIMIT forms they are indexed by
    their first WINDOW characters, and a line is first cut into its windows (one set) to see
    which forms could be in it at all, almost always none; only then is it searched for those.
    Forms shorter than a window are few (a short database password): one small alternation."""

    WINDOW = 8
    ALTERNATION_LIMIT = 256

    def __init__(self, secrets: Iterable[str] = (), min_length: int = 1) -> None:
        forms = {form for s in secrets if len(s) >= min_length for form in secret_forms(s)}
        indexed = set() if len(forms) <= self.ALTERNATION_LIMIT else forms
        short = sorted(
            (f for f in forms if f not in indexed or len(f) < self.WINDOW), key=len, reverse=True
        )
        self._short = re.compile("|".join(map(re.escape, short))) if short else None
        self._by_window: dict[str, list[str]] = {}
        for form in indexed - set(short):
            self._by_window.setdefault(form[: self.WINDOW], []).append(form)

    def __call__(self, text: str) -> str:
        w = self.WINDOW
        if self._by_window and len(text) >= w:
            windows = {text[i : i + w] for i in range(len(text) - w + 1)}
            hits = self._by_window.keys() & windows
            if hits:  # longest first: a form that holds another is replaced whole
                found = sorted({f for h in hits for f in self._by_window[h]}, key=len, reverse=True)
                text = re.sub("|".join(map(re.escape, found)), "***", text)
        return self._short.sub("***", text) if self._short else text


class RedactingFormatter(logging.Formatter):
    """UTC timestamps; every message one printable line; secrets scrubbed from every line,
    tracebacks included."""

    converter = staticmethod(time.gmtime)

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s")
        self.datefmt = "%Y-%m-%dT%H:%M:%S"
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(self.redact(record.message))
        return super().formatMessage(record)


class JsonFormatter(RedactingFormatter):
    """One JSON object per line: ts, level, event, message and the event's fields."""

    FIELDS = (
        "user",
        "symbol",
        "pass_id",
        "fetched",
        "inserted",
        "present",
        "unstored",
        "late",
        "rejected",
        "requests",
        "refused",
        "duration_ms",
        "success_count",
        "error_count",
        "skipped_count",
        "fresh_count",
        "interrupted_count",
        "left_count",
        "error",
    )

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": format_ms(int(record.created * 1000)),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": printable(self.redact(record.getMessage())),
        }
        entry.update((f, getattr(record, f)) for f in self.FIELDS if hasattr(record, f))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        redacted = {k: self.redact(v) if isinstance(v, str) else v for k, v in entry.items()}
        return self.redact(json.dumps(redacted))


def quiet_filter(record: logging.LogRecord) -> bool:
    """-q: warnings, errors and the one summary line of each pass."""
    return record.levelno >= logging.WARNING or getattr(record, "event", "") == "pass_done"


def setup_logging(level: str, redact: Redactor, fmt: str = "text", quiet: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else RedactingFormatter(redact))
    if quiet:
        handler.addFilter(quiet_filter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


# =============================================================================================
# 4. Fills: the two API versions, what an answer holds, each fill validated
# =============================================================================================


class FillFields(NamedTuple):
    """Where a fill object of one API version keeps what trade_fills needs (besides orderId,
    symbol and the price, see parse_fill)."""

    trade_id: str
    time: str
    side: str
    size: str
    fee: str


@dataclass(frozen=True)
class Api:
    """What differs between the two versions of the fills endpoint (see docs/weex-api.md)."""

    version: int
    fills_path: str
    time_path: str
    # Which end of [startTime, endTime] a full page is taken from, where the docs say. Neither
    # version's docs do, so each walk learns it from what its requests return (see Walk).
    selects: Selection | None
    has_totals: bool  # v2 answers carry nextFlag and totals; v3 is a bare array
    max_span_ms: int | None  # the longest endTime - startTime one request may ask for
    horizon_ms: int | None  # how far back startTime may reach
    codes: Mapping[str, str]  # error code -> what it means (see classify_response)
    fields: FillFields


class Selection(enum.Enum):
    """Which fills of a range a full page holds: the newest or the oldest ``limit`` of them
    (however the page itself lists them)."""

    NEWEST = "newest"
    OLDEST = "oldest"


V2 = Api(
    version=2,
    fills_path="/capi/v2/order/fills",
    time_path="/capi/v2/market/time",
    selects=None,
    has_totals=True,
    max_span_ms=None,
    horizon_ms=None,
    codes={
        **dict.fromkeys(("40005", "40008"), "clock"),
        **dict.fromkeys(("40006", "40009", "40011", "40012"), "credentials"),
        **dict.fromkeys(("40001", "40002", "40003"), "headers"),
        "40013": "frozen",
        "40014": "permission",
        "40015": "busy",
        "40018": "ip",
        "40017": "parameter",
        "40034": "symbol",
        "40007": "bug",
        "40016": "unsecured",
        "429": "throttled",
    },
    fields=FillFields("tradeId", "createdTime", "orderSide", "fillSize", "fillFee"),
)
V3 = Api(
    version=3,
    fills_path="/capi/v3/userTrades",
    time_path="/capi/v3/market/time",
    selects=None,
    has_totals=False,
    max_span_ms=7 * DAY_MS - 1,  # "at most 7 days": stay a millisecond inside it
    horizon_ms=365 * DAY_MS,
    codes={
        **dict.fromkeys(("-1043", "-1046"), "clock"),
        **dict.fromkeys(("-1040", "-1041", "-1042", "-1044", "-1047", "-1049"), "credentials"),
        **dict.fromkeys(
            ("-1050", "-1051", "-1052", "-1053", "-1055", "-1057", "-1190", "-3236"),
            "permission",
        ),
        "-1056": "ip",
        **dict.fromkeys(("-1121", "-1058", "-3235"), "symbol"),
        **dict.fromkeys(("-1140", "-1142", "-1128", "-1141"), "parameter"),
        **dict.fromkeys(("-1170", "-1171"), "range"),
        **dict.fromkeys(("-1054", "-1000"), "busy"),
        **dict.fromkeys(("-1003", "-1059"), "throttled"),
        **dict.fromkeys(("-1045", "-1135", "-1150", "-1160"), "bug"),
    },
    fields=FillFields("id", "time", "side", "qty", "commission"),
)
APIS = {2: V2, 3: V3}


class Fill(NamedTuple):
    """One parsed fill (a NamedTuple: a long backfill creates hundreds of thousands)."""

    trade_id: str
    order_id: str
    symbol: str  # the contract, cmt_ form, whichever API version sent it
    side: str
    price: Decimal
    size: Decimal
    fee: Decimal
    fee_coin: str
    trade_time: int
    raw: str  # the fill object as JSON text, encoded on the fetching thread
    # The analysis columns: what both versions send that analysts ask about (None: not sent).
    quote_value: Decimal | None = None  # v3 quoteQty, v2 fillValue
    realized_pnl: Decimal | None = None  # v3 realizedPnl, v2 realizePnl
    maker: bool | None = None  # v3 maker; v2 does not say
    position_side: str | None = None  # positionSide in both: LONG or SHORT

    @property
    def identity(self) -> tuple[str, str]:
        """Which fill it is (with its user): its order and trade. One fill, one row: one whose
        identity is stored is never inserted again, whatever its time or contents (another
        version is a correction, quarantined). trade_fills' UNIQUE constraint adds trade_time
        only because PostgreSQL requires the partition key in it (partition_fills: monthly);
        the INSERT enforces the identity (INSERT_FILLS_SQL), and --dry-run counts by it."""
        return (self.order_id, self.trade_id)

    @property
    def seen_key(self) -> tuple[str, str, int]:
        """What a walk remembers of a fill it read at a page's edge: its identity and time,
        so that a fill served again at another time is read again (and judged on storing)."""
        return (self.order_id, self.trade_id, self.trade_time)

    def same_content(self, other: Fill) -> bool:
        return self[:9] == other[:9]


class Rejected(NamedTuple):
    """A fill that failed validation, on its way to the quarantine (rejected_fills)."""

    symbol: str  # the fill's contract if readable, else the walk's scope
    order_id: str | None  # if readable
    trade_id: str | None  # if readable
    trade_time: int | None  # if readable
    reason: str
    raw: str  # the fill object as sent, as JSON text (escaped, scrubbed, cut)

    @property
    def fingerprint(self) -> str:
        """What makes two rejections one quarantine row: the fill's content, its keys in
        order, never how an answer happened to serialise it (two versions of one fill stay
        two rows: which one is right cannot be told)."""
        try:  # numbers as written: 1.10 and 1.1 are two versions
            parsed = json.loads(self.raw, parse_float=lambda t: {"\0number": t})
            content = json.dumps(parsed, sort_keys=True)
        except (ValueError, RecursionError):  # cut at REJECTED_RAW_LIMIT: as it is
            content = self.raw
        return hashlib.sha256(content.encode()).hexdigest()[:32]


class Answer(NamedTuple):
    fills: list[Fill]  # the valid fills inside the requested range, in the order served
    rejected: list[Rejected]
    full: bool  # there may be more: v2 nextFlag, v3 a full page
    total: int | None  # v2 'totals': how many fills match the query
    times: list[int]  # in serving order, the time of every fill served inside the range whose
    # time is readable, rejected ones included: they bound the page for paging


SIDES = {"BUY": "1", "SELL": "2"}
ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
COIN_RE = re.compile(r"[A-Z0-9]{1,16}")
# A plain decimal: no exponent, no underscores, no spaces; "1e-999999999" or "1_000" are not
# amounts an exchange sends, and Decimal() would accept both.
PLAIN_DECIMAL_RE = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?")
PRICE_CONTEXT = Context(prec=60)
V2_PRICE_FIELDS = ("fillPrice", "price")
MAX_PAGE_SIZE = 100  # the largest limit either version takes
REJECTED_RAW_LIMIT = 16_384  # characters of a rejected fill's raw text kept in the quarantine


def parse_answer(
    api: Api, body: Any, scope: str, start: int, end: int, limit: int, scrub: Scrub = str
) -> Answer:
    """An answer's fills, each validated: the valid ones inside [start, end], and the others
    rejected with the reason (a fill the exchange dates outside the request -- after its own
    "now", say -- is rejected too, never a cursor position). An answer that is not a page of
    fills at all raises MalformedAnswer (the client retries it)."""
    if api.version == 2:
        items, more, total = _v2_envelope(body)
    else:
        if not isinstance(body, list):
            raise MalformedAnswer(f"answer is a JSON {type(body).__name__}, not the array of fills")
        items, more, total = body, len(body) >= limit, None
    fills: list[Fill] = []
    rejected: list[Rejected] = []
    times: list[int] = []
    for item in items:
        try:
            fill = parse_fill(api, item, scope)
        except BadData as exc:
            when = _readable(_time_field, item, api.fields.time)
            if when is not None and start <= when <= end:
                times.append(when)
            rejected.append(reject(api, item, scope, str(exc), scrub))
            continue
        if not start <= fill.trade_time <= end:
            reason = (
                f"fill tradeId={fill.trade_id} at {fill.trade_time} "
                f"({format_ms(fill.trade_time)}) is outside the requested range {start}..{end}"
            )
            rejected.append(reject(api, item, scope, reason, scrub))
            continue
        times.append(fill.trade_time)
        fills.append(fill)
    return Answer(_distinct(fills), rejected, more, total, times)


def _v2_envelope(body: Any) -> tuple[list, bool, int | None]:
    if not isinstance(body, dict):
        raise MalformedAnswer(f"answer is a JSON {type(body).__name__}, not an object")
    items = body.get("list")
    more = body.get("nextFlag")
    if items is None and more is None:
        raise MalformedAnswer("answer has neither 'list' nor 'nextFlag'")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise MalformedAnswer(f"'list' is a {type(items).__name__}, not an array")
    if not isinstance(more, bool):
        raise MalformedAnswer(f"'nextFlag' {_shown(more)} is not true/false")
    if more and not items:
        raise MalformedAnswer("exchange returned an empty page with nextFlag=true")
    total = body.get("totals")
    return items, more, total if isinstance(total, int) and not isinstance(total, bool) else None


def _distinct(fills: list[Fill]) -> list[Fill]:
    """The answer without a fill listed twice. Two versions of one (order, trade) both stay:
    the store decides (Store.write_batch)."""
    seen: set[tuple] = set()
    out = []
    for f in fills:
        if f[:9] not in seen:
            seen.add(f[:9])
            out.append(f)
    return out


def reject(api: Api, obj: Any, scope: str, reason: str, scrub: Scrub) -> Rejected:
    """A fill that failed validation, with what can still be read of it."""
    symbol = scope
    if isinstance(obj, dict) and isinstance(obj.get("symbol"), str):
        symbol = contract_symbol(obj["symbol"]) or scope
    order_id = _readable(_id_field, obj, "orderId")
    trade_id = _readable(_id_field, obj, api.fields.trade_id)
    when = _readable(_time_field, obj, api.fields.time)
    reason = printable(scrub(reason), 500)
    return Rejected(symbol, order_id, trade_id, when, reason, escaped_raw(obj, scrub))


def fill_rejected(fill: Fill, reason: str) -> Rejected:
    return Rejected(fill.symbol, fill.order_id, fill.trade_id, fill.trade_time, reason, fill.raw)


def _readable(read: Callable[[dict, str, str], T], obj: Any, name: str) -> T | None:
    if not isinstance(obj, dict):
        return None
    try:
        return read(obj, name, "fill")
    except BadData:
        return None


def escaped_raw(obj: Any, scrub: Scrub) -> str:
    """A served value as JSON text for the quarantine: ASCII only (control characters, NUL and
    unpaired surrogates escaped, so PostgreSQL stores it as sent), scrubbed, cut."""
    try:
        text = to_json(obj)
    except (ValueError, TypeError, RecursionError):
        try:
            text = json.dumps(obj, default=str)
        except (ValueError, TypeError, RecursionError):
            text = '"(not encodable: nested too deep)"'
    return printable(scrub(text), REJECTED_RAW_LIMIT)


def parse_fill(api: Api, obj: Any, scope: str) -> Fill:
    """One fill of the answer, validated, or BadData naming the field. Never guesses."""
    if not isinstance(obj, dict):
        raise BadData(f"fill is a {type(obj).__name__}, not an object")
    names = api.fields
    trade_id = _id_field(obj, names.trade_id)
    where = f"fill {names.trade_id}={trade_id}"
    order_id = _id_field(obj, "orderId", where)
    trade_time = _time_field(obj, names.time, where)
    symbol = _fill_symbol(obj.get("symbol"), scope, where)
    side = _side(obj, names.side, where)
    size = _decimal_field(obj, names.size, where, positive=True)
    fee = _decimal_field(obj, names.fee, where)
    if api.version == 2:
        price, coin = _v2_price(obj, size, where), fee_coin(symbol)
    else:
        price, coin = _decimal_field(obj, "price", where, positive=True), _coin(obj, fee, where)
    raw = to_json_checked(obj, where)
    fill = Fill(trade_id, order_id, symbol, side, price, size, fee, coin, trade_time, raw)
    return fill._replace(
        quote_value=_optional_decimal(obj, "quoteQty" if api.version == 3 else "fillValue", where),
        realized_pnl=_optional_decimal(
            obj, "realizedPnl" if api.version == 3 else "realizePnl", where, signed=True
        ),
        maker=_maker(obj, where) if api.version == 3 else None,
        position_side=_position_side(obj, where),
    )


POSITION_SIDE_RE = re.compile(r"[A-Z_]{1,16}")


def _optional_decimal(obj: dict, name: str, where: str, signed: bool = False) -> Decimal | None:
    """An analysis amount: None when the fill does not send it, else a decimal as strict as the
    others (a bad one sends the fill to the quarantine)."""
    if obj.get(name) in (None, ""):
        return None
    number = _decimal_field(obj, name, where)
    if not signed and number < 0:
        raise BadData(f"{where}: {name} {_shown(obj.get(name))} is negative")
    return number


def _maker(obj: dict, where: str) -> bool | None:
    value = obj.get("maker")
    if value is None or isinstance(value, bool):
        return value
    raise BadData(f"{where}: maker {_shown(value)} is not true or false")


def _position_side(obj: dict, where: str) -> str | None:
    value = obj.get("positionSide")
    if value in (None, ""):
        return None
    if isinstance(value, str) and POSITION_SIDE_RE.fullmatch(value):
        return value
    raise BadData(f"{where}: positionSide {_shown(value)} is not a position side such as LONG")


def _v2_price(obj: dict, size: Decimal, where: str) -> Decimal:
    """v2: the fill's price field if it has one, else fillValue / fillSize, exactly."""
    value = None
    if obj.get("fillValue") not in (None, ""):
        value = _decimal_field(obj, "fillValue", where, positive=True)
    price_field = next((f for f in V2_PRICE_FIELDS if obj.get(f) not in (None, "")), None)
    if price_field:
        return _decimal_field(obj, price_field, where, positive=True)
    if value is None:
        raise BadData(f"{where}: neither a price nor fillValue; the price is undefined")
    return exact_quotient(value, size)


def _coin(obj: dict, fee: Decimal, where: str) -> str:
    """The fee's coin; none (empty) for a fill that paid none (WEEX sends "" then)."""
    coin = obj.get("commissionAsset")
    if coin == "" and fee.is_zero():
        return ""
    if not (isinstance(coin, str) and COIN_RE.fullmatch(coin)):
        raise BadData(f"{where}: commissionAsset {_shown(coin)} is not a coin such as USDT")
    return coin


def _id_field(obj: dict, name: str, where: str = "fill") -> str:
    value = obj.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**64:
        return str(value)
    if isinstance(value, str) and ID_RE.fullmatch(value):
        return value
    raise BadData(f"{where}: {name} {_shown(value)} is not an id")


def _time_field(obj: dict, name: str, where: str) -> int:
    value = obj.get(name)
    if isinstance(value, str) and MS_RE.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**14:
        return value
    raise BadData(f"{where}: {name} {_shown(value)} is not a time in milliseconds")


def _fill_symbol(value: Any, scope: str, where: str) -> str:
    """The fill's contract in the stored form; it must be the requested one, if one was."""
    symbol = contract_symbol(value) if isinstance(value, str) else None
    if symbol is None:
        raise BadData(f"{where}: symbol {_shown(value)} is not a contract")
    if scope != ALL_SYMBOLS and symbol != scope:
        raise BadData(f"{where}: symbol {_shown(value)} does not match {scope}")
    return symbol


def _side(obj: dict, name: str, where: str) -> str:
    value = obj.get(name)
    side = SIDES.get(value) if isinstance(value, str) else None
    if side is None:
        raise BadData(f"{where}: {name} {_shown(value)} is not BUY or SELL")
    return side


def _decimal_field(obj: dict, name: str, where: str, positive: bool = False) -> Decimal:
    """A plain decimal string or a JSON number of sane magnitude; positive where a sign makes no
    sense (size, price, value). Fees keep the sign as sent (negative: a rebate)."""
    value = obj.get(name)
    number = None
    if isinstance(value, str) and PLAIN_DECIMAL_RE.fullmatch(value):
        number = Decimal(value)
    elif isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        candidate = Decimal(value)
        exponent = candidate.as_tuple().exponent  # an int unless NaN or infinite
        if (
            isinstance(exponent, int)
            and -40 <= exponent
            and (candidate.is_zero() or candidate.adjusted() < 40)
        ):
            number = candidate
    if number is None:
        raise BadData(f"{where}: {name} {_shown(value)} is not a decimal number")
    if positive and number <= 0:
        raise BadData(f"{where}: {name} {_shown(value)} is not positive")
    return number


def _shown(value: Any) -> str:
    """A value in an error message. Not cut here: the message is cut once it has been scrubbed
    of secrets (finish), so no part of a secret can survive a cut."""
    return "missing" if value is None else printable(repr(value))


def exact_quotient(value: Decimal, size: Decimal) -> Decimal:
    """fillValue / fillSize. The exchange computes value = price * size, so the quotient
    terminates; 60 significant digits is far beyond any contract's price precision."""
    return PRICE_CONTEXT.divide(value, size).normalize(PRICE_CONTEXT)


def fee_coin(symbol: str) -> str:
    """The contract's margin coin: USDT for cmt_*usdt (USDC for cmt_*usdc)."""
    return symbol[-4:].upper()


def to_json(value: Any) -> str:
    """JSON text of a parsed answer; Decimals are written as the exact numbers they were read
    as (the inverse of loads_exact), so the raw column keeps the fill exactly as sent."""
    try:
        return json.dumps(value)  # the C encoder; only Decimals need the slow path below
    except TypeError:
        pass
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        if not (isinstance(exponent, int) and -16383 <= exponent and value.adjusted() < 131072):
            raise ValueError("a number beyond PostgreSQL's numeric range")
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


_UNSTORABLE_JSON_RE = re.compile(
    r"\\u0000|\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f])|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f]"
)


def to_json_checked(obj: dict, where: str) -> str:
    """to_json, or BadData if jsonb could not store it exactly (NUL, an unpaired surrogate, a
    number out of range, nesting too deep)."""
    try:
        text = to_json(obj)
    except (ValueError, RecursionError):
        raise BadData(
            f"{where}: the fill cannot be stored as JSON (a value out of range)"
        ) from None
    if "\\u" in text and _UNSTORABLE_JSON_RE.search(text):
        raise BadData(f"{where}: the fill contains a NUL or an unpaired surrogate character")
    return text


# =============================================================================================
# 5. WEEX client: Stop, deadlines, signing, the shared rate budget, retries, what an answer means
# =============================================================================================


FILLS_WEIGHT = 5
TIME_WEIGHT = 1
V2_SUCCESS_CODES = {None, "0", "00000", "200"}
MAX_BODY_BYTES = 8 * 2**20  # a page of fills is tens of KB; anything near this is not one
RETRY_AFTER_CAP_SECONDS = 60.0
MAX_CLOCK_OFFSET_MS = 7 * DAY_MS
HORIZON_RETRY_MS = 5_000  # a start refused at the horizon's edge is asked again this far inside
BACKOFF_CAP_SECONDS = 30.0
# Rate-limit refusals a request waits out before its pair fails: a pass's interval (the next
# pass would meet the same refusals), at least this long.
THROTTLE_PATIENCE_SECONDS = 60.0


class Stop:
    """A stop request every wait listens to. The pass's Stop is set by SIGINT/SIGTERM; a pair's
    Stop (a child) also when its walk ends, so a prefetching thread stops with its pair."""

    POLL_SECONDS = 0.1

    def __init__(self, parent: Stop | None = None) -> None:
        self.parent = parent
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set() or (self.parent is not None and self.parent.is_set())

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (at once) when a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._event.wait(min(left, self.POLL_SECONDS))
        return True


class Deadline:
    """One request's deadline: the sockets it uses are shut down when it passes, or when its
    stop is set (the read timeout alone applies per received chunk, so an exchange trickling
    its status line, headers or body byte by byte could hold a worker forever)."""

    def __init__(self, seconds: float, stop: Stop | None) -> None:
        self.at = time.monotonic() + seconds
        self.stop = stop
        self.fired: str | None = None  # "deadline" or "stop", once it has fired
        self.closed = False  # the request is over: its sockets may serve the next one
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired
        if fired:
            _shut(sock)

    def close(self) -> None:
        """The request is over: from now on its deadline shuts nothing down."""
        with self._lock:
            self.closed = True

    def check(self, now: float) -> None:
        reason = "stop" if self.stop is not None and self.stop.is_set() else None
        if now >= self.at:
            reason = "deadline"
        if reason is None or self.fired:
            return
        with self._lock:
            if self.closed:
                return
            self.fired = reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut a socket down under a thread blocked reading it: the read returns at once. (The
    base class's shutdown, so a TLS socket's is not half torn down under the reader.)"""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """The one thread that fires the deadlines of every request in flight."""

    TICK_SECONDS = 0.05

    def __init__(self) -> None:
        self._deadlines: set[Deadline] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    @contextlib.contextmanager
    def watch(self, seconds: float, stop: Stop | None) -> Iterator[Deadline]:
        """A deadline for what this thread does inside the block."""
        deadline = Deadline(seconds, stop)
        with self._lock:
            self._deadlines.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="weex-watchdog", daemon=True)
                self._thread.start()
        self._local.deadline = deadline
        try:
            yield deadline
        finally:
            self._local.deadline = None
            deadline.close()
            with self._lock:
                self._deadlines.discard(deadline)

    def adopt(self, sock: socket.socket | None) -> None:
        """The socket this thread's request uses (called by the connection classes below)."""
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and sock is not None:
            deadline.add(sock)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                deadlines = list(self._deadlines)
            for deadline in deadlines:
                deadline.check(now)


WATCHDOG = Watchdog()


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        WATCHDOG.adopt(sock)  # before the TLS handshake and the request
        return sock

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        WATCHDOG.adopt(self.sock)  # a kept-alive connection, reused
        return super().getresponse()


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        WATCHDOG.adopt(sock)
        return sock

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        WATCHDOG.adopt(self.sock)
        return super().getresponse()


class _WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class WatchedAdapter(HTTPAdapter):
    """requests' adapter whose connections report their sockets to the WATCHDOG, and leave
    from ``source_address`` when one is given."""

    POOLS: ClassVar[dict[str, type]] = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def __init__(self, source_address: str | None = None, **kwargs: Any) -> None:
        self.source_address = source_address  # read by init_poolmanager, which __init__ calls
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self.source_address:
            kwargs["source_address"] = (self.source_address, 0)
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, "pool_classes_by_scheme"):
            manager.pool_classes_by_scheme = self.POOLS
        return manager


class _Transient(Exception):
    """An attempt that may succeed if repeated (a garbled answer, a dropped connection, a
    timeout); the subclasses say what giving up after the retries means."""

    sent = True  # the request reached the exchange (it counts as a request made)
    retry_after: float | None = None

    def give_up(self, attempts: int) -> ExchangeError:
        return ExchangeError(f"{self} (gave up after {plural(attempts, 'attempt')})")


class _Unreachable(_Transient):
    """No connection at all: the other pairs of the pass stop retrying once one gives up."""

    sent = False

    def give_up(self, attempts: int) -> ExchangeError:
        return ExchangeUnreachable(
            f"cannot reach the exchange: {self} ({plural(attempts, 'attempt')})"
        )


class _Busy(_Transient):
    """5xx, a busy code: backed off, Retry-After honoured."""

    def __init__(self, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Throttled(_Busy):
    """A rate-limit refusal: the limiter slows the address down and pauses it; the request
    waits its turn again without spending a retry (see FillsClient._get)."""

    def give_up(self, attempts: int) -> ExchangeError:
        return RateLimited(
            f"the exchange kept refusing requests as too frequent ({self}), {attempts} times "
            "in a row over longer than a pass: weex_sync slows down by itself; if this goes on, "
            "WEEX may have blocked this IP or key (--status shows the learned rate)"
        )


class _OriginDown(_Busy):
    """HTTP 521: the CDN's "origin down"; some clients report it for an IP not whitelisted."""

    def give_up(self, attempts: int) -> ExchangeError:
        return ExchangeError(
            f"the exchange answered {self} to all {attempts} attempts: its CDN says the origin "
            "is down; if WEEX is up, this IP may not be whitelisted for this API key (whitelist "
            "it in the WEEX API settings)"
        )


class _ClockRejected(Exception):
    """The exchange says our ACCESS-TIMESTAMP is too far from its clock."""


class HostWatch:
    """Shared by the clients of one pass: once one finds the exchange's host unreachable after
    all its retries, the others stop retrying and fail with the same message (one line per
    pair, and a pass against a dead host ends in seconds, not retries x pairs). The pass
    itself learns it from the outcomes its pairs return."""

    def __init__(self) -> None:
        self._unreachable: ExchangeUnreachable | None = None

    def found_unreachable(self, error: ExchangeUnreachable) -> None:
        self._unreachable = self._unreachable or error

    def unreachable(self) -> ExchangeUnreachable | None:
        """The error of the first client that gave up on the host, if one did."""
        return self._unreachable


def sign(secret_key: str, timestamp: str, method: str, path: str, query: str, body: str) -> str:
    """ACCESS-SIGN: base64(HMAC_SHA256(secret, timestamp + METHOD + path [+ "?" + query] + body))."""
    prehash = timestamp + method.upper() + path + (f"?{query}" if query else "") + body
    digest = hmac.new(secret_key.encode(), prehash.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


# Pacing and learning (see RateLimiter). Requests leave one at a time, at most at PACE_PEAK
# times the window's average rate: never more than half a window's budget in a second (the
# exchange's burst caps are learned below that from their refusals), yet a pass still spends a
# whole window in its last seconds, as cron passes cut short by --max-seconds must (measured:
# at twice the average rate, a 55-s pass synced 12 % fewer idle accounts; bench/scale_out.py).
PACE_PEAK = 5.0
RATE_CUT = 0.7  # a refusal multiplies the address's rate by this (TCP's and the SDKs' AIMD)
RATE_FLOOR_SHARE = 1 / 100  # the learned rate never goes below this share of the ceiling
RECOVERY_SECONDS = 750.0  # sending at its rate unrefused, a rate gains its ceiling in this long
PAUSE_FIRST_SECONDS = 1.0  # an address pauses this long after a refusal, doubling in a row
PAUSE_CAP_SECONDS = 60.0
LIMIT_MARGIN = 0.5  # seconds added to every window: jitter between our clock and the exchange's
LEARNED_KEEP_SECONDS = 86_400.0  # a rate not lowered for this long is forgotten (the ceiling)


class Limit(NamedTuple):
    """One budget as a process sees it: ``budget`` weight per ``window`` seconds (the margin
    included), requests paced at up to ``ceiling`` weight per second."""

    budget: int
    window: float
    ceiling: float

    @classmethod
    def of(cls, weight: int, window: float) -> Limit:
        return cls(weight, window, PACE_PEAK * weight / window)

    @property
    def floor(self) -> float:
        return self.ceiling * RATE_FLOOR_SHARE


@dataclass
class Budget:
    """One budget key's state: the weight charged in its rolling window, when the next request
    may leave (pacing), and for an address what its refusals taught: the rate, a pause, the
    refusals in a row. An address's lives in the budget file (every process of the machine
    reads and writes it), an account's in the process."""

    used: list[list[float]] = field(default_factory=list)  # [[bucket end, weight], ...]
    span: float = 0.0  # the longest window of a process that charged it lately
    span_at: float = 0.0  # when that process last charged it
    next_at: float = 0.0  # pacing: the earliest time the next request may leave
    rate: float | None = None  # learned, in weight per second; None: the ceiling
    lowered_at: float = 0.0  # when a refusal last lowered it
    paused_until: float = 0.0
    streak: int = 0  # refusals in a row, reset by a success
    refusals: int = 0  # every refusal this address met (a counter, never reset)
    refused_at: float = 0.0

    FIELDS: ClassVar[dict[str, str]] = {
        "span": "span",
        "span_at": "span_at",
        "next": "next_at",
        "rate": "rate",
        "lowered": "lowered_at",
        "pause": "paused_until",
        "streak": "streak",
        "refusals": "refusals",
        "refused": "refused_at",
    }

    def pace(self, limit: Limit) -> float:
        """The rate requests leave at: the learned one within [floor, ceiling]."""
        rate = limit.ceiling if self.rate is None else self.rate
        return min(max(rate, limit.floor), limit.ceiling)

    def keep_for(self, now: float, window: float) -> float:
        """How far back the entries matter: this process's window, or a longer one's while the
        process that has it charged within it (processes of other configurations may share
        the file)."""
        return max(window, self.span if self.span_at + self.span > now else 0.0)

    def wait(self, now: float, weight: int, limit: Limit) -> float:
        """Seconds until ``weight`` may leave (0: now)."""
        waits = [self.paused_until - now, self.next_at - now]
        entries = [e for e in self.used if e[0] > now - limit.window]
        excess = sum(w for _, w in entries) + weight - limit.budget
        for at, w in entries:
            if excess <= 0:
                break
            excess -= w
            waits.append(at + limit.window - now)
        return max(waits)

    def charge(self, now: float, weight: int, limit: Limit, bucket: float) -> None:
        keep = self.keep_for(now, limit.window)
        if limit.window >= keep:
            self.span, self.span_at = limit.window, now
        self.used = [e for e in self.used if e[0] > now - keep]
        end = round(math.ceil(now / bucket) * bucket, 3)
        if self.used and self.used[-1][0] == end:
            self.used[-1][1] += weight
        else:
            self.used.append([end, weight])
        # A budget of a few requests an hour paces slower than a pause is long: its window
        # holds it (the file never holds a time further ahead than a pause).
        self.next_at = min(
            max(self.next_at, now) + weight / self.pace(limit), now + PAUSE_CAP_SECONDS
        )

    def refused(self, now: float, sent_at: float, retry_after: float | None, limit: Limit) -> None:
        """A rate-limit refusal of a request sent at ``sent_at``. Only one sent after the last
        cut is news (those in flight before it were sent at the old rate): it cuts the rate
        and lengthens the pause; every refusal pauses the address, for its Retry-After if it
        gave one."""
        self.refusals += 1
        self.refused_at = now
        if sent_at >= self.lowered_at:
            self.rate = max(self.pace(limit) * RATE_CUT, limit.floor)
            self.lowered_at = now
            self.streak += 1
        doubling = PAUSE_FIRST_SECONDS * 2 ** min(max(self.streak - 1, 0), 10)
        pause = max(retry_after or 0.0, min(doubling, PAUSE_CAP_SECONDS))
        self.paused_until = max(self.paused_until, now + pause)

    def succeeded(self, ticket: Ticket, limit: Limit) -> None:
        """An answer that was not a refusal. A request that waited for its turn used the rate
        to the full: the rate climbs back (additively, RECOVERY_SECONDS from nothing to the
        ceiling); one that did not wait proves nothing about a higher rate, and one sent before
        the last cut nothing about the rate since."""
        if ticket.sent_at < self.lowered_at:
            return
        self.streak = 0
        weight = ticket.weight
        if ticket.paced and self.rate is not None:
            rate = self.pace(limit)
            rate += limit.ceiling / RECOVERY_SECONDS * weight / rate
            self.rate = None if rate >= limit.ceiling else rate

    def idle(self, now: float) -> bool:
        """Nothing in it matters any more: no weight in a window, no pause, no rate learned."""
        return (
            not any(e[0] > now - self.span for e in self.used)
            and self.paused_until <= now
            and self.next_at <= now
            and (self.rate is None or self.lowered_at < now - LEARNED_KEEP_SECONDS)
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"used": self.used}
        for key, name in self.FIELDS.items():
            value = getattr(self, name)
            if value:
                data[key] = value
        return data

    @classmethod
    def from_json(cls, value: Any, now: float, bucket: float) -> tuple[Budget, int]:
        """A budget from what the file holds, and how many of its entries were not valid (a
        budget file is anyone's to write: never trusted to stall the machine, nor to switch
        its budget off). A list is a 3.1 file's window."""
        if isinstance(value, list):
            value = {"used": value}
        if not isinstance(value, dict):
            return cls(), 1
        budget, discarded = cls(), 0
        budget.used, discarded = _valid_entries(value.get("used", []), now, bucket)
        for key, item in value.items():
            name = cls.FIELDS.get(key)
            number = _budget_number(item)
            limit = _BUDGET_FIELD_LIMITS.get(key, (0.0, now + PAUSE_CAP_SECONDS + bucket))
            if key == "used":
                continue
            if name is None or number is None or not limit[0] <= number <= limit[1]:
                discarded += 1
            elif key in ("streak", "refusals"):
                setattr(budget, name, int(number))
            else:
                setattr(budget, name, number)
        return budget, discarded


# What a budget file's numbers may be; the times (the default) at most a pause ahead, so a
# file written by a clock that was ahead cannot stall the next pass.
_BUDGET_FIELD_LIMITS = {
    "span": (0.0, 3600.5),
    "rate": (1e-6, 1e9),
    "streak": (0, 1000),
    "refusals": (0, 1e15),
}


def _valid_entries(entries: Any, now: float, bucket: float) -> tuple[list[list[float]], int]:
    """[time, weight] pairs of finite numbers, the time at most two buckets ahead and within
    the longest window a configuration may have, the weight positive and at most the largest
    budget; and how many others there were (expired ones are not counted)."""
    if not isinstance(entries, list):
        return [], 1
    kept, discarded = [], 0
    for entry in entries:
        at, weight = (
            (_budget_number(entry[0]), _budget_number(entry[1]))
            if isinstance(entry, list) and len(entry) == 2
            else (None, None)
        )
        if (
            at is None
            or weight is None
            or at > now + 2 * bucket
            or not 0 < weight <= MAX_BUDGET_WEIGHT
        ):
            discarded += 1
        elif at > now - MAX_BUDGET_WINDOW:
            kept.append([at, weight])
    return sorted(kept), discarded


class Ticket(NamedTuple):
    """A request the limiter let go: what its answer teaches goes back with it."""

    sent_at: float
    weight: int
    paced: bool  # it waited for its turn: the rate was the limit


class WallClock:
    """The time the rate budget is kept in: the machine's clock, which every weex_sync process
    of the machine shares (the budget file holds its times). Tests of the budget's rules give
    the limiter a clock of their own that moves only when told to wait."""

    @staticmethod
    def now() -> float:
        return time.time()

    @staticmethod
    def wait(seconds: float, stop: Stop | None) -> bool:
        """Sleep ``seconds``; True if a stop came first."""
        if stop is None:
            time.sleep(seconds)
            return False
        return stop.wait(seconds)


class RateLimiter:
    """The exchange's budgets: weight per IP (the machine's address) and per account (UID).

    Each is a rolling window (exact: a token bucket of the same rate lets up to twice the
    budget through in one window) with pacing on top: requests leave one at a time, at most at
    ``PACE_PEAK`` times the window's average rate, never a window's budget at once (public
    clients report burst caps the docs do not list). The address's rate is learned:
    a rate-limit refusal cuts it (RATE_CUT) and pauses the whole address (its Retry-After, or
    PAUSE_FIRST_SECONDS doubling for refusals in a row, up to PAUSE_CAP_SECONDS), requests that
    waited their turn and were answered raise it back slowly, up to the ceiling: the AIMD of
    TCP and of the cloud SDKs' adaptive retries. Other workers never answer a refusal with
    requests at the old rate.

    The address's budget is kept by every weex_sync process of this machine in one small JSON
    file under flock, so overlapping passes share the window, the pace and what was learned,
    and the next cron pass starts where the last one left off. The per-account budgets stay
    in the process: an account is synced by one pass at a time (its claim and lock), and
    keeping a thousand accounts' windows in the file made every request parse them. ``margin``
    pads the window for jitter between our clock and the exchange's. Requests are recorded in
    buckets of BUCKET seconds, which keeps the file small and errs on the safe side (a bucket
    expires at its end)."""

    BUCKET = 0.1  # a paced window ends this much later than exact: 1 % of a 10 s window

    def __init__(
        self,
        cfg: RateLimitConfig,
        ip_key: str,
        margin: float = LIMIT_MARGIN,
        clock: WallClock = WallClock(),  # noqa: B008 (stateless)
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        window = cfg.window_seconds + margin
        self.ip = Limit.of(cfg.ip_weight, window)
        self.uid = Limit.of(cfg.uid_weight, window)
        self.ip_key = ip_key  # a budget per address (make_limiter_key)
        self.refusals = 0  # this process's, since the last take_refusals()
        self._lock = threading.Lock()
        self._accounts: dict[str, Budget] = {}  # per account, this process only
        self._forgot_at = 0.0  # when idle accounts' budgets were last dropped
        self._own: dict[str, Budget] = {}  # the address's when there is no shared file
        self._successes: list[Ticket] = []  # applied with the next request's file update
        self._warned = False
        self._fd = self._reopen() if cfg.shared_file else None

    def _reopen(self) -> int | None:
        try:
            return open_budget_file(self.cfg.shared_file, private=self.cfg.shared_file_private)
        except BudgetFileRefused as exc:
            log.warning(
                "cannot share the rate budget through %s (%s): this process keeps its own",
                self.cfg.shared_file,
                exc,
            )
            return None

    def _replaced(self) -> bool:
        """Whether the path no longer names the file this process has open."""
        if self._fd is None:
            return False
        try:
            now, held = os.stat(self.cfg.shared_file, follow_symlinks=False), os.fstat(self._fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def acquire(self, account: str | None, weight: int, stop: Stop | None) -> Ticket:
        """Wait until ``weight`` may leave by the address's budget and the ``account``'s (None:
        a public request, the address's only), then charge it. Interrupted on a stop."""
        uid_key = "uid " + hashlib.sha256((account or "").encode()).hexdigest()[:16]
        paced = False
        while True:
            with self._lock, self._machine_state(stop) as machine:
                now = self.clock.now()
                budgets = [(machine.setdefault(self.ip_key, Budget()), self.ip)]
                if account is not None:
                    budgets.append((self._accounts.setdefault(uid_key, Budget()), self.uid))
                wait = max(budget.wait(now, weight, limit) for budget, limit in budgets)
                if wait <= 0:
                    for budget, limit in budgets:
                        budget.charge(now, weight, limit, self.BUCKET)
                else:  # waiting for the address's pace: its rate is what holds the request
                    paced = paced or budgets[0][0].next_at - now >= wait
                if len(self._accounts) > 64 and now - self._forgot_at > 1.0:
                    _forget_idle(self._accounts, now)  # a fleet has thousands: once a second
                    self._forgot_at = now
            if wait <= 0:
                return Ticket(now, weight, paced)
            if self.clock.wait(wait, stop):
                raise Interrupted()

    def succeeded(self, ticket: Ticket) -> None:
        """The request was answered (not refused): applied with the next request."""
        with self._lock:
            self._successes.append(ticket)

    def refused(self, ticket: Ticket, retry_after: float | None) -> None:
        """The exchange refused the request for its rate: the address slows down and pauses,
        for every process of the machine at once (even during a stop: the file must know)."""
        with self._lock, self._machine_state(None) as machine:
            self.refusals += 1
            budget = machine.setdefault(self.ip_key, Budget())
            budget.refused(self.clock.now(), ticket.sent_at, retry_after, self.ip)
            log.debug(
                "rate limited: %s now %.1f weight/s, paused %.1fs",
                self.ip_key,
                budget.pace(self.ip),
                max(0.0, budget.paused_until - self.clock.now()),
            )

    def flush(self) -> None:
        """Write what the answers since the last request taught (the end of a pass)."""
        with self._lock, self._machine_state(None):
            pass

    def take_refusals(self) -> int:
        """This process's refusals since the last call (a pass's, for its summary)."""
        with self._lock:
            count, self.refusals = self.refusals, 0
            return count

    LOCK_WAIT_SECONDS = 10.0

    def _lock_file(self, fd: int, stop: Stop | None) -> bool:
        """flock the budget file; False (this request keeps to this process's own budget, with
        one WARNING) if another process holds it for LOCK_WAIT_SECONDS: it never hangs, and a
        stop interrupts the wait."""
        deadline = time.monotonic() + self.LOCK_WAIT_SECONDS
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    if not self._warned:
                        self._warned = True
                        log.warning(
                            "the shared rate budget file %s stays locked by another process; "
                            "this process keeps its own budget meanwhile",
                            self.cfg.shared_file,
                        )
                    return False
                time.sleep(0.005)

    @contextlib.contextmanager
    def _machine_state(self, stop: Stop | None) -> Iterator[dict[str, Budget]]:
        """The addresses' budgets of the machine, with this process's successes applied: from
        the shared file (locked meanwhile; reopened if it was replaced or removed since, so no
        two processes keep apart inodes), or this process's own when there is no file."""
        if self._fd is None or not self._lock_file(self._fd, stop):
            yield self._with_successes(self._own)
            return
        if self._replaced():
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = self._reopen()
            if self._fd is None or not self._lock_file(self._fd, stop):
                yield self._with_successes(self._own)
                return
        try:
            budgets = self._read_file(self._fd)
            yield self._with_successes(budgets)
            now = self.clock.now()
            _forget_idle(budgets, now)
            state = {key: budget.to_json() for key, budget in budgets.items()}
            data = json.dumps(state, separators=(",", ":")).encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _read_file(self, fd: int) -> dict[str, Budget]:
        text = os.pread(fd, BUDGET_FILE_LIMIT + 1, 0)
        budgets, discarded = read_budgets(text, self.clock.now(), self.BUCKET)
        if discarded and not self._warned:
            self._warned = True
            log.warning(
                "the shared rate budget file %s held %d entries that are not requests "
                "(written by another program, or by a clock that was ahead); discarded",
                self.cfg.shared_file,
                discarded,
            )
        return budgets

    def _with_successes(self, machine: dict[str, Budget]) -> dict[str, Budget]:
        if self._successes:
            budget = machine.setdefault(self.ip_key, Budget())
            for ticket in self._successes:
                budget.succeeded(ticket, self.ip)
            self._successes.clear()
        return machine


BUDGET_FILE_LIMIT = 1 << 20  # bytes; a budget file holds a few hundred entries


class BudgetFileRefused(Exception):
    """The shared budget file cannot be trusted (see open_budget_file)."""


def open_budget_file(path: str, private: bool) -> int:
    """The budget file, opened without following a symlink and checked: a regular file nobody
    else can write. ``private`` (the default location): in a directory of this user's
    (created 0700), owned by this user, 0600. A configured path may be shared on purpose by
    the users of one group: its directory group-owned and setgid (files are created 0660
    there), never writable by every user without the sticky bit, the file never writable by
    every user and owned by this user or one of its groups."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if private:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        where = os.stat(directory)
    except OSError as exc:
        raise BudgetFileRefused(f"its directory: {exc.strerror}") from None
    if where.st_mode & 0o002 and not where.st_mode & stat.S_ISVTX:
        raise BudgetFileRefused("its directory is writable by every user")
    if private and (where.st_uid != os.geteuid() or where.st_mode & 0o022):
        raise BudgetFileRefused("its directory is not this user's alone")
    mode = 0o660 if not private and where.st_mode & stat.S_ISGID else 0o600
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        raise BudgetFileRefused(exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        groups = {os.getegid(), *os.getgroups()}
        if not stat.S_ISREG(st.st_mode):
            raise BudgetFileRefused("not a regular file")
        if st.st_mode & 0o002:
            raise BudgetFileRefused("writable by every user")
        if st.st_uid != os.geteuid() and (
            private or not (st.st_mode & 0o020 and st.st_gid in groups)
        ):
            raise BudgetFileRefused("owned by another user")
        if private and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        os.set_blocking(fd, True)
    except (BudgetFileRefused, OSError) as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise BudgetFileRefused(exc.strerror or str(exc)) from None
        raise
    return fd


MAX_BUDGET_WINDOW = 3600.5  # the longest window_seconds (3600) and margin a config may have
MAX_BUDGET_WEIGHT = 10**7  # the largest ip_weight a config may have


def _budget_number(value: Any) -> float | None:
    """A JSON number as a finite float, or None (a 400-digit integer is no number here)."""
    if type(value) not in (int, float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def read_budgets(text: bytes, now: float, bucket: float) -> tuple[dict[str, Budget], int]:
    """The budgets of a budget file's text, and how many of its entries were not valid. A
    file torn by a kill mid-write, or too large to be one, starts afresh."""
    try:
        state = json.loads(text) if text and len(text) <= BUDGET_FILE_LIMIT else {}
    except (ValueError, RecursionError):
        state = {}
    budgets: dict[str, Budget] = {}
    if not isinstance(state, dict):
        return budgets, 1
    discarded = 0
    for key, value in state.items():
        if not isinstance(key, str) or len(key) > 200:
            discarded += 1
            continue
        budgets[key], bad = Budget.from_json(value, now, bucket)
        discarded += bad
    return budgets, discarded


def address_budget(cfg: WeexConfig) -> tuple[str, Limit, Budget]:
    """The budget of this configuration's address as the budget file holds it, read without
    creating or locking anything (--status); an unreadable file reads as nothing learned."""
    limiter_key = make_limiter_key(cfg)
    limit = Limit.of(cfg.rate_limit.ip_weight, cfg.rate_limit.window_seconds + LIMIT_MARGIN)
    budget = Budget()
    path = cfg.rate_limit.shared_file
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return limiter_key, limit, budget
        try:
            text = os.read(fd, BUDGET_FILE_LIMIT + 1)
            budget = read_budgets(text, time.time(), RateLimiter.BUCKET)[0].get(limiter_key, budget)
        except OSError:
            pass
        finally:
            os.close(fd)
    return limiter_key, limit, budget


def make_limiter_key(cfg: WeexConfig) -> str:
    """What the address's budget is kept by: the exchange's host, and the source address."""
    source = cfg.source_addresses[0] if cfg.source_addresses else None
    return f"ip {urlsplit(cfg.base_url).netloc}" + (f" from {source}" if source else "")


def make_limiter(cfg: WeexConfig) -> RateLimiter:
    return RateLimiter(cfg.rate_limit, make_limiter_key(cfg))


@contextlib.contextmanager
def taking_source_address(cfg: WeexConfig) -> Iterator[WeexConfig]:
    """The configuration with the one source address this process uses: of several, the first
    that no other weex_sync process of this user holds (an flock next to the budget file, held
    while the block runs), so N processes spread over N addresses; with all taken, the first,
    which then shares its budget through the budget file."""
    if len(cfg.source_addresses) <= 1:
        yield cfg
        return
    directory = Path(cfg.rate_limit.shared_file or default_budget_file(os.environ)).parent
    held = None
    for address in cfg.source_addresses:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / f"source-{address}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        held = (fd, address)
        break
    if held is None:
        log.warning(
            "every weex.source_address is taken by another weex_sync process; sharing %s",
            cfg.source_addresses[0],
        )
    try:
        yield replace(cfg, source_addresses=(held[1] if held else cfg.source_addresses[0],))
    finally:
        if held:
            os.close(held[0])


def _forget_idle(budgets: dict[str, Budget], now: float) -> None:
    """Drop the budgets nothing in which matters any more."""
    for key in [k for k, budget in budgets.items() if budget.idle(now)]:
        del budgets[key]


def make_session(cfg: WeexConfig, pool_size: int = 4) -> requests.Session:
    """Connection pooling and TLS settings only. Retries are FillsClient's (every attempt freshly
    signed and charged to the budget); redirects are never followed (see fetch)."""
    session = requests.Session()
    adapter = WatchedAdapter(
        source_address=cfg.source_addresses[0] if cfg.source_addresses else None,
        max_retries=0,
        pool_connections=pool_size,
        pool_maxsize=pool_size,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Content-Type": "application/json", "locale": "en-US"})
    # Read proxy and CA-bundle settings once, not on every request (with trust_env requests
    # also stats ~/.netrc per request: 5 % of a backfill's fetching).
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(cfg.base_url))
    session.verify = ca_bundle(os.environ)
    return session


def ca_bundle(environ: Mapping[str, str]) -> str | bool:
    """The CA bundle requests would use; a configured one that does not exist is a ConfigError
    (requests would only fail later, on every request, with a traceback-shaped message)."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        path = environ.get(name)
        if path:
            if not os.path.exists(path):
                raise ConfigError(f"{name}: {printable(path, 200)} does not exist")
            return path
    return True


def fetch(
    session: requests.Session,
    url: str,
    headers: Mapping[str, str],
    timeout: float,
    stop: Stop | None = None,
) -> tuple[int, str | None, bytes]:
    """One GET: (status, Retry-After, body). Redirects are not followed (the signed headers
    would go to another host). Connecting, the headers and the whole body must arrive within
    ``timeout`` seconds (the WATCHDOG shuts the socket down when they do not, or at once when
    ``stop`` is set: Interrupted), and the body decode to at most MAX_BODY_BYTES (a gzip bomb
    stops there). Transport failures raise _Transient."""
    with WATCHDOG.watch(timeout, stop) as deadline:
        try:
            with session.get(
                url, headers=headers, timeout=timeout, allow_redirects=False, stream=True
            ) as response:
                body = _read_body(response.raw, deadline)
                return response.status_code, response.headers.get("Retry-After"), body
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.fired == "stop":
                raise Interrupted() from None
            if deadline.fired == "deadline":
                raise _Transient("the answer did not arrive within weex.timeout_seconds") from None
            failure = _Unreachable if _never_sent(exc) else _Transient
            raise failure(_describe_transport_error(exc, url)) from None


def _read_body(raw: urllib3.BaseHTTPResponse, deadline: Deadline) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if deadline.fired or time.monotonic() > deadline.at:
            raise _Transient("the answer did not arrive within weex.timeout_seconds")
        chunk = raw.read1(65536, decode_content=True)
        if not chunk:
            if deadline.fired:  # the socket was shut down under the read
                raise _Transient("the answer did not arrive within weex.timeout_seconds")
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Transient(f"the answer is larger than {MAX_BODY_BYTES >> 20} MB")
        chunks.append(chunk)


def _never_sent(exc: BaseException) -> bool:
    """True when the connection was never established (nothing reached the exchange)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(
        reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)
    )


def _describe_transport_error(exc: BaseException, url: str) -> str:
    host = urlsplit(url).netloc
    if _never_sent(exc):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        if isinstance(reason, urllib3.exceptions.NameResolutionError):
            return f"cannot resolve {host}"
        if isinstance(exc, requests.ConnectTimeout):
            return f"connecting to {host} timed out"
        return f"connection to {host} refused or failed"
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        return "timed out waiting for the answer"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error talking to {host}"
    if isinstance(
        exc,
        (
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            requests.ConnectionError,
        ),
    ):
        return "connection dropped before the whole answer arrived"
    if isinstance(exc, (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)):
        return "the answer cannot be decoded"
    return f"transport error ({type(exc).__name__})"


class ServerClock:
    """This machine's clock plus the offset measured against the exchange's public time
    endpoint: once per process (again every REFRESH_SECONDS under --loop), and again when the
    exchange rejects a timestamp. Every walk ends at the exchange's "now"."""

    REFRESH_SECONDS = 600.0

    def __init__(self) -> None:
        self.offset_ms = 0
        self._measured_at: float | None = None
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def walk_end(self) -> int:
        """The exchange's "now", where a walk ends; an error when the exchange's clock and this
        machine's disagree by more than MAX_CLOCK_OFFSET_MS (one request span: beyond it the
        cursor rule could not keep a fill from falling between two walks)."""
        if abs(self.offset_ms) > MAX_CLOCK_OFFSET_MS:
            raise ExchangeError(
                f"the exchange's clock and this machine's differ by {abs(self.offset_ms) / DAY_MS:.1f}"
                " days: fix this machine's clock (NTP) or check weex.base_url; nothing synced"
            )
        return self.now_ms()

    def ensure_measured(
        self, cfg: WeexConfig, api: Api, limiter: RateLimiter, stop: Stop | None = None
    ) -> None:
        """Measure the offset unless done recently; on failure keep this machine's clock (and
        on a stop, return: the pass stops)."""
        with self._lock:
            if self._measured_at and time.monotonic() - self._measured_at < self.REFRESH_SECONDS:
                return
            self._measured_at = time.monotonic()
        session = make_session(cfg, pool_size=1)
        try:
            self.resync(session, cfg, api, limiter, stop)
        except Interrupted:
            return
        except ExchangeError as exc:
            level = logging.DEBUG if isinstance(exc, ExchangeUnreachable) else logging.WARNING
            log.log(level, "cannot read the exchange's clock (%s): using this machine's", exc)
        finally:
            session.close()

    def resync(
        self,
        session: requests.Session,
        cfg: WeexConfig,
        api: Api,
        limiter: RateLimiter,
        stop: Stop | None = None,
    ) -> None:
        limiter.acquire(None, TIME_WEIGHT, stop)  # a public request: the IP budget only
        sent = time.time() * 1000
        try:
            status, _, body = fetch(
                session, cfg.base_url + api.time_path, {}, cfg.timeout_seconds, stop
            )
        except _Transient as exc:
            raise exc.give_up(1) from None
        received = time.time() * 1000
        server_ms = _server_time(status, body)
        if server_ms is None:
            raise ExchangeError(
                f"cannot read the exchange's clock: {api.time_path} answered HTTP {status} "
                "without a time in milliseconds"
            )
        self.offset_ms = int(server_ms - (sent + received) / 2)
        level = logging.WARNING if abs(self.offset_ms) >= 1000 else logging.DEBUG
        log.log(level, "clock skew against the exchange: %+d ms; correcting", self.offset_ms)


def _server_time(status: int, body: bytes) -> int | None:
    try:
        data = loads_exact(body)
    except (ValueError, RecursionError):
        return None
    if status != 200 or not isinstance(data, dict):
        return None
    value = data.get("serverTime", data.get("timestamp"))
    if isinstance(value, str) and MS_RE.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 10**12 <= value < 10**14:
        return value
    return None


def loads_exact(text: bytes | str) -> Any:
    """json.loads that keeps every number exact (Decimal for fractions) and rejects NaN and
    Infinity. Deep nesting raises RecursionError and over-long integers ValueError: callers
    treat both as a malformed body."""

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not a number")

    return json.loads(text, parse_float=Decimal, parse_constant=reject)


def backoff_seconds(failures: int) -> float:
    """Exponential backoff with jitter: ~0.5, 1, 2, 4 ... seconds, at most BACKOFF_CAP_SECONDS."""
    return min(0.5 * 2 ** (failures - 1), BACKOFF_CAP_SECONDS) * random.uniform(0.5, 1.0)


def _retry_after(header: str | None) -> float | None:
    if header and re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,3})?", header.strip()):
        return min(float(header), RETRY_AFTER_CAP_SECONDS)
    return None


# What an error code (or, for a code the tables do not know, the HTTP status) means: the
# exception and its message, the exchange's own words in the parentheses.
REJECTIONS: dict[str, tuple[type[SyncError], str]] = {
    "credentials": (
        CredentialsError,
        (
            "credentials rejected ({}): check this user's api_key, secret_key and passphrase; "
            "not retried"
        ),
    ),
    "headers": (
        CredentialsError,
        (
            "the exchange says ACCESS-* headers are missing ({}): a proxy between here and WEEX "
            "removing headers? not retried"
        ),
    ),
    "ip": (
        AccessDenied,
        "IP not whitelisted for this API key ({}): whitelist this IP in the WEEX API settings",
    ),
    "frozen": (
        AccessDenied,
        "account frozen ({}): the account must be unfrozen on WEEX; not retried",
    ),
    "permission": (
        AccessDenied,
        (
            "API key not permitted ({}): give the key read permission for futures, or check that "
            "the account is active; not retried"
        ),
    ),
    "symbol": (SymbolRejected, "symbol rejected ({}): check sync.symbols; not retried"),
    "range": (
        RangeRejected,
        (
            "time range rejected ({}): if it lies inside the exchange's horizon this is a bug in "
            "weex_sync, please report it; not retried"
        ),
    ),
    "parameter": (
        SymbolRejected,
        (
            "request rejected ({}): if the symbol is right this is a bug in weex_sync, please "
            "report it; not retried"
        ),
    ),
    "bug": (
        ExchangeError,
        (
            "the exchange refused the form of the request ({}): a bug in weex_sync or a proxy "
            "rewriting requests, please report it; not retried"
        ),
    ),
    "unsecured": (
        AccessDenied,
        (
            "the WEEX account must bind a phone or an authenticator before its API keys work "
            "({}): do it in the account's security settings; not retried"
        ),
    ),
}
STATUS_KINDS = {400: "parameter", 401: "credentials", 403: "permission"}


def classify_response(
    api: Api, status: int, content: bytes, retry_after: str | None, scrub: Callable[[str], str]
) -> Any:
    """The parsed answer, or the exception that says what it means. Known error codes first
    (the v3 docs say so), then the HTTP status; the exchange's message is scrubbed of the
    user's secrets and made printable before it is cut, so no part of a secret survives."""
    try:
        body = loads_exact(content)
        parsed = True
    except (ValueError, RecursionError):
        body, parsed = None, False
    code = msg = None
    if isinstance(body, dict) and "code" in body:
        code = printable(scrub(str(body["code"])), 20)
        msg = printable(scrub(str(body.get("msg", ""))), 200)
    detail = f"HTTP {status}" + (f", code {code}: {msg}" if code is not None else "")
    kind = api.codes.get(code or "") or STATUS_KINDS.get(status)
    if 300 <= status < 400:
        raise ExchangeError(
            f"the exchange answered with a redirect ({detail}); not followed: credentials go "
            "to the configured weex.base_url only"
        )
    if kind == "throttled" or status in (418, 429):  # a limiter in front answers first
        raise _Throttled(f"rate limited ({detail})", _retry_after(retry_after))
    if kind == "clock":
        raise _ClockRejected(detail)
    if kind in REJECTIONS:
        error, meaning = REJECTIONS[kind]
        raise error(meaning.format(detail))
    if status == 521:
        raise _OriginDown(detail, _retry_after(retry_after))
    if kind == "busy" or status >= 500:
        raise _Busy(f"exchange busy ({detail})", _retry_after(retry_after))
    if status != 200:
        raise ExchangeError(f"unexpected answer ({detail})")
    if not parsed:
        raise _Transient("exchange answered HTTP 200 with a body that is not JSON")
    if isinstance(body, dict) and (
        code is not None and (api.version != 2 or code not in V2_SUCCESS_CODES)
    ):
        raise _Transient(f"exchange answered {detail}")
    return body


class FillSource(Protocol):
    """What a walk needs of the exchange: one validated answer of the fills endpoint. The real
    FillsClient and the unit tests' in-memory exchange both implement it."""

    api: Api
    user_id: str

    def page(
        self, scope: str, start: int, end: int, limit: int, order_id: str | None = None
    ) -> Answer: ...


class FillsClient:
    """Signed fills requests for one user. This is the one retry layer: every attempt is freshly
    signed (a retried request never carries an expired timestamp), charged to the rate budget
    and counted in ``requests_made``; backoff and Retry-After sleeps wake on a stop. An answer
    that is not a page of fills is retried like a transport fault."""

    def __init__(
        self,
        cfg: WeexConfig,
        user: UserConfig,
        session: requests.Session,
        clock: ServerClock,
        limiter: RateLimiter,
        stop: Stop,
        host: HostWatch | None = None,
        patience: float = THROTTLE_PATIENCE_SECONDS,
    ) -> None:
        self.cfg = cfg
        self.patience = patience  # how long rate-limit refusals may go on before giving up
        self.api = APIS[cfg.api_version]
        self.host = host or HostWatch()
        self.user = user
        self.user_id = user.user_id
        self.session = session
        self.clock = clock
        self.limiter = limiter
        self.stop = stop
        self.requests_made = 0
        self._scrub = Redactor([user.secret_key, user.passphrase])

    def page(
        self, scope: str, start: int, end: int, limit: int, order_id: str | None = None
    ) -> Answer:
        """One answer of the fills endpoint for ``scope`` (a contract, or ALL_SYMBOLS). A
        start the exchange finds past its horizon (the request left a moment after the walk
        was planned at its edge) is asked again from HORIZON_RETRY_MS inside it: what lies
        before is no longer served."""
        try:
            return self._page(scope, start, end, limit, order_id)
        except RangeRejected:
            horizon = self.api.horizon_ms
            if horizon is None or start > self.clock.now_ms() - horizon + HORIZON_RETRY_MS:
                raise
            edge = self.clock.now_ms() - horizon + HORIZON_RETRY_MS
            log.debug("%s: start %s is past the horizon; asking from %s", self.user_id, start, edge)
            return self._page(scope, min(edge, end), end, limit, order_id)

    def _page(self, scope: str, start: int, end: int, limit: int, order_id: str | None) -> Answer:
        symbol = None
        if scope != ALL_SYMBOLS:
            symbol = v3_symbol(scope) if self.api.version == 3 else scope
        params = {
            "symbol": symbol,
            "orderId": order_id,
            "startTime": start,
            "endTime": end,
            "limit": limit,
        }
        query = urlencode({k: v for k, v in params.items() if v is not None})

        def parse(body: Any) -> Answer:
            return parse_answer(self.api, body, scope, start, end, limit, self._scrub)

        return self._get(self.api.fills_path, query, parse)

    def _get(self, path: str, query: str, parse: Callable[[Any], T]) -> T:
        """The answer, after at most ``max_retries`` retries of faults, and rate-limit
        refusals waited out for up to ``patience`` seconds (the limiter paces and pauses the
        next attempt: refusals spend no retries, and are never answered at once)."""
        clock_resynced = False
        failures = refusals = 0
        refused_since: float | None = None
        while True:
            try:
                return self._attempt(path, query, parse)
            except _Throttled as exc:
                refusals += 1
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > self.patience:
                    raise exc.give_up(refusals) from None
            except _ClockRejected as exc:
                if clock_resynced:
                    raise ExchangeError(
                        f"exchange rejects our timestamp even after a clock resync ({exc}): "
                        "enable NTP on this machine"
                    ) from None
                self.clock.resync(self.session, self.cfg, self.api, self.limiter, self.stop)
                clock_resynced = True
            except _Transient as exc:
                failures += 1
                known = self.host.unreachable()
                if isinstance(exc, _Unreachable) and known is not None:
                    raise known from None
                if failures > self.cfg.max_retries:
                    error = exc.give_up(failures)
                    if isinstance(error, ExchangeUnreachable):
                        self.host.found_unreachable(error)
                    raise error from None
                delay = (
                    exc.retry_after if exc.retry_after is not None else backoff_seconds(failures)
                )
                log.debug(
                    "%s: attempt %d failed (%s); retrying in %.1fs",
                    self.user.user_id,
                    failures,
                    exc,
                    delay,
                )
                if self.stop.wait(delay):
                    raise Interrupted() from None

    def _attempt(self, path: str, query: str, parse: Callable[[Any], T]) -> T:
        ticket = self.limiter.acquire(self.user.budget_key, FILLS_WEIGHT, self.stop)
        timestamp = str(self.clock.now_ms())
        headers = {
            "ACCESS-KEY": self.user.api_key,
            "ACCESS-SIGN": sign(self.user.secret_key, timestamp, "GET", path, query, ""),
            "ACCESS-TIMESTAMP": timestamp,
            "ACCESS-PASSPHRASE": self.user.passphrase,
        }
        url = f"{self.cfg.base_url}{path}?{query}" if query else self.cfg.base_url + path
        try:
            status, retry_after, content = fetch(
                self.session, url, headers, self.cfg.timeout_seconds, self.stop
            )
        except _Transient as exc:
            self.requests_made += exc.sent
            raise
        self.requests_made += 1
        refused: _Throttled | None = None
        try:
            body = classify_response(self.api, status, content, retry_after, self._scrub)
        except _Throttled as exc:
            refused = exc
            raise
        finally:
            if refused is None:
                self.limiter.succeeded(ticket)
            else:
                self.limiter.refused(ticket, refused.retry_after)
        try:
            return parse(body)
        except MalformedAnswer as exc:
            raise _Transient(f"malformed answer: {exc}") from None


# =============================================================================================
# 6. Paging: the cursor rule, then the walk over its ranges in whatever order pages come
# =============================================================================================


@dataclass(frozen=True)
class Cursor:
    """Where a (user, symbol) stands; committed in the same transaction as the fills it covers.

    Every fill before ``synced_through`` has been read, except while ``walk_end`` is set: then
    an interrupted walk still owes ``[synced_through, walk_end]``, and once that range is read
    the cursor moves to ``walk_target``. ``last_end``: every fill up to it has been read at
    least once (a fill stored later at or before it became visible late). ``reconciled_at``:
    the end of the last walk that re-read the reconcile window."""

    synced_through: int
    walk_end: int | None = None
    walk_target: int | None = None
    last_end: int | None = None
    reconciled_at: int | None = None

    def complete_through(self, lookback_ms: int) -> int:
        """Up to where the pair is known complete (the status's synced_through, where the
        cursor rule resumes): before an owed range; else the last walk's end minus the
        lookback, fills after it may still become visible."""
        if self.walk_end is not None or self.last_end is None:
            return self.synced_through
        return min(self.synced_through, self.last_end - lookback_ms)


@dataclass(frozen=True)
class CursorRule:
    """The settings the cursor rule reads (sync.*), in milliseconds."""

    start_time: int = SyncConfig.start_time
    lookback_ms: int = SyncConfig.lookback_seconds * SECOND_MS
    reconcile_every_ms: int = SyncConfig.reconcile_every_seconds * SECOND_MS  # 0: no reconcile
    reconcile_window_ms: int = SyncConfig.reconcile_window_seconds * SECOND_MS

    @classmethod
    def of(cls, sync: SyncConfig) -> CursorRule:
        return cls(
            sync.start_time,
            sync.lookback_seconds * SECOND_MS,
            sync.reconcile_every_seconds * SECOND_MS,
            sync.reconcile_window_seconds * SECOND_MS,
        )


class WalkPlan(NamedTuple):
    """What one walk reads, and what its cursors carry on."""

    ranges: tuple[tuple[int, int], ...]  # read in this order, each in windows the API allows
    end: int  # the exchange's "now" when the walk started
    base: Cursor  # the cursor before the walk (last_end, reconciled_at carry on from it)
    late_before: int | None  # a fill stored at or before this became visible late
    reconcile: bool  # the last range covers the reconcile window: the walk renews it
    reconcile_due: bool  # ... because it was due (it costs extra requests: logged)
    horizon: int | None  # the exchange's horizon moved the start up to here


HORIZON_MARGIN_MS = 1_000  # a walk starts this far inside the exchange's horizon (latency)


def plan_walk(
    cursor: Cursor | None, newest_stored: int | None, rule: CursorRule, api: Api, now: int
) -> WalkPlan:
    """The cursor rule, in one place. A walk reads up to the exchange's ``now``, from the
    earlier of

    - the newest stored fill (``start_time`` while there is none), so a fill newer than every
      stored one is fetched however late the exchange shows it -- but from no further back
      than one request span (v3: 7 days; v2: any), so an idle account still costs one request;
    - the end of the last walk minus the lookback (fills older than the newest stored one
      that became visible a little late);
    - once every ``reconcile_every``, ``now`` minus the reconcile window (fills shown up to a
      day late, older than the newest stored one, in any contract).

    A cursor that owes a range (an interrupted walk) reads it first; the first walk of a pair
    starts at ``start_time``. No start lies before the exchange's horizon (v3: 365 days)."""
    if cursor is None:
        first = WalkPlan(
            ranges=((rule.start_time, now),),
            end=now,
            base=Cursor(rule.start_time),
            late_before=None,
            reconcile=True,
            reconcile_due=False,
            horizon=None,
        )
        return _with_horizon(first, api)
    newest = rule.start_time if newest_stored is None else max(newest_stored, rule.start_time)
    recent = newest if api.max_span_ms is None else max(newest, now - api.max_span_ms)
    owed: tuple[int, int] | None = None
    resumed = cursor.complete_through(rule.lookback_ms)
    if cursor.walk_end is not None and cursor.walk_target is not None:
        owed, resumed = (cursor.synced_through, cursor.walk_end), cursor.walk_target
    start = min(resumed, recent)
    window_start = max(now - rule.reconcile_window_ms, rule.start_time)
    last = cursor.reconciled_at  # one in the future: a clock was ahead, reconcile now
    due = rule.reconcile_every_ms > 0 and (
        last is None or last > now or now - last >= rule.reconcile_every_ms
    )
    if due:
        start = min(start, window_start)
    reconcile = rule.reconcile_every_ms > 0 and start <= window_start
    ranges = [(start, now)]
    if owed is not None:
        if start <= owed[1] + 1:  # the owed range is inside the walk: one range reads both
            ranges = [(min(owed[0], start), now)]
        else:
            ranges = [owed, (start, now)]
    plan = WalkPlan(
        ranges=tuple(ranges),
        end=now,
        base=cursor,
        late_before=cursor.last_end,
        reconcile=reconcile,
        reconcile_due=due and reconcile,
        horizon=None,
    )
    return _with_horizon(plan, api)


def _with_horizon(plan: WalkPlan, api: Api) -> WalkPlan:
    """The plan without what lies before the exchange's horizon (it is not served), and
    without empty ranges."""
    floor = None if api.horizon_ms is None else plan.end - api.horizon_ms + HORIZON_MARGIN_MS
    ranges = tuple(
        (lo if floor is None else max(lo, floor), hi)
        for lo, hi in plan.ranges
        if (floor is None or hi >= floor) and max(lo, floor or lo) <= hi
    )
    moved = floor is not None and any(lo < floor for lo, _ in plan.ranges)
    return plan._replace(ranges=ranges, horizon=floor if moved else None)


def windows(start: int, end: int, span: int | None) -> Iterator[tuple[int, int]]:
    """[start, end] cut into consecutive windows, oldest first, each at most ``span`` long."""
    lo = start
    while lo <= end:
        hi = end if span is None else min(end, lo + span)
        yield lo, hi
        lo = hi + 1


class Batch(NamedTuple):
    """New fills of one or more pages, the fills rejected in them, and the cursor that is true
    once they are stored."""

    fills: list[Fill]
    rejected: list[Rejected]
    cursor: Cursor
    done: bool  # the walk is complete

    @property
    def size(self) -> int:
        """The fills received, rejected ones included."""
        return len(self.fills) + len(self.rejected)


class BatchWrite(NamedTuple):
    """A batch and what is written with it, in its transaction."""

    batch: Batch
    cursor: Cursor | None  # None: the cursor stays (a re-scan)
    late_before: int | None  # a fill stored at or before this became visible late
    claim: tuple[str, str] | None  # (claim key, pass id): renewed, while the pass is at work


class Side(enum.Enum):
    """Which side of a full page a range continues: the older fills below its oldest, or the
    newer fills above its newest."""

    BELOW = "below"
    ABOVE = "above"


# A full page of selection NEWEST leaves the fills below it to read; OLDEST those above it.
CONTINUES = {Selection.NEWEST: Side.BELOW, Selection.OLDEST: Side.ABOVE}
OTHER_SIDE = {Side.BELOW: Side.ABOVE, Side.ABOVE: Side.BELOW}


@dataclass(frozen=True)
class Span:
    """A range of one window still to read. ``seen``: the fills at an inclusive edge that are
    already read. A range that continues a full page knows which ``side`` of it it is, the
    page's ``edge`` millisecond, the ``page`` it continues, and the ``guard``: the page's
    other side, which the learned selection says holds nothing new -- read all the same
    unless this side's answer bears the selection out."""

    lo: int
    hi: int
    seen: frozenset = frozenset()
    side: Side | None = None
    edge: int = 0
    page: int = 0
    guard: Span | None = None


class Walk:
    """One walk over a plan's ranges, and all it learns on the way.

    The API returns at most ``limit`` fills of a range and does not say which ones (the newest
    or the oldest of the range) nor in which order it lists them. Each full page leaves one of
    its sides unread: the older side if the exchange selects the newest fills, the newer side
    if the oldest. Until the walk knows the selection it reads both. It learns it from what
    the next request returns (see _check), and then reads only the side the selection leaves,
    checking it on every page: the skipped side is read after all unless the side read proves
    the selection again, and a contradicting answer makes the walk read both sides again."""

    def __init__(self, source: FillSource, scope: str, plan: WalkPlan, page_size: int) -> None:
        self.source = source
        self.scope = scope
        self.plan = plan
        self.page_size = page_size
        self.selects: Selection | None = source.api.selects
        self.read_through = plan.base.last_end  # advances with each finished window
        self._pages = itertools.count(1)
        self._rejected_seen: set[str] = set()

    def batches(self) -> Iterator[Batch]:
        """Every fill of the plan's ranges, each batch with the cursor to commit with it."""
        span = self.source.api.max_span_ms
        parts = [w for lo, hi in self.plan.ranges for w in windows(lo, hi, span)]
        for i, (lo, hi) in enumerate(parts):
            after = parts[i + 1][0] if i + 1 < len(parts) else None
            yield from self._window(lo, hi, after)

    def _window(self, lo: int, hi: int, after: int | None) -> Iterator[Batch]:
        todo = [Span(lo, hi)]
        while todo:
            span = todo.pop()
            answer = self.source.page(self.scope, span.lo, span.hi, self.page_size)
            new = [f for f in answer.fills if f.seen_key not in span.seen]
            rejected = answer.rejected
            self._check(span, answer, todo)
            if answer.full:
                more, burst, burst_rejected = self._continue(span, answer)
                new = new if burst is None else [f for f in burst if f.seen_key not in span.seen]
                rejected = rejected + burst_rejected
                todo.extend(more)
            rejected = self._first_sight(rejected)
            if todo:
                yield Batch(new, rejected, self._owing(todo, hi, after), False)
            else:
                yield Batch(new, rejected, self._finished(hi, after), after is None)

    def _check(self, span: Span, answer: Answer, todo: list[Span]) -> None:
        """What this answer says of the selection. A side holding at least half a page of
        fills beyond the edge of the page it continues shows which end that page was taken
        from (fills that became visible in between are not that many): such an answer teaches
        the selection, or confirms it and lets the skipped side go. An answer beyond the
        other edge unlearns it. Anything else proves nothing: the skipped side is read. (A
        side queued before the selection was learned is read all the same.)"""
        if span.side is None:
            return
        if span.side is Side.BELOW:
            beyond = sum(t < span.edge for t in answer.times)
        else:
            beyond = sum(t > span.edge for t in answer.times)
        shown = Selection.NEWEST if span.side is Side.BELOW else Selection.OLDEST
        proof = beyond >= max(1, self.page_size // 2)
        if beyond and self.selects not in (None, shown):
            log.info(
                "%s/%s: the exchange's pages contradict the selection learned so far; reading "
                "both sides of every page again",
                self.source.user_id,
                self.scope,
            )
            self.selects = None
        elif proof and self.selects is None:
            self.selects = shown
            log.debug(
                "%s/%s: pages hold the %s fills", self.source.user_id, self.scope, shown.value
            )
        if span.guard is not None and not proof:
            todo.append(span.guard)

    def _continue(
        self, span: Span, answer: Answer
    ) -> tuple[list[Span], list[Fill] | None, list[Rejected]]:
        """The ranges left of ``span`` after a full answer (in the order to read them, last
        first), and for a page of one millisecond the fills of that millisecond."""
        if not answer.times:
            raise ExchangeError(
                f"a full page of {span.lo}..{span.hi} holds no fill with a readable time inside "
                "the range; the walk cannot page past it (reported every pass)"
            )
        oldest, newest = min(answer.times), max(answer.times)
        page = next(self._pages)
        burst: list[Fill] | None = None
        burst_rejected: list[Rejected] = []
        if oldest == newest:  # one millisecond fills the page: the inclusive walk cannot move
            burst, burst_rejected = resolve_burst(
                self.source, self.scope, oldest, answer, self.page_size
            )
            below = Span(span.lo, oldest - 1, side=Side.BELOW, edge=oldest, page=page)
            above = Span(oldest + 1, span.hi, side=Side.ABOVE, edge=oldest, page=page)
        else:
            at: dict[int, set[tuple[str, str, int]]] = {oldest: set(), newest: set()}
            for f in answer.fills:
                if f.trade_time in at:
                    at[f.trade_time].add(f.seen_key)
            below = Span(span.lo, oldest, frozenset(at[oldest]), Side.BELOW, oldest, page)
            above = Span(newest, span.hi, frozenset(at[newest]), Side.ABOVE, newest, page)
        sides = {Side.BELOW: below, Side.ABOVE: above}
        if self.selects is None:  # both, the side the page's own order hints at first
            first = Side.ABOVE if served_newest_first(answer.times) is False else Side.BELOW
            more = [sides[OTHER_SIDE[first]], sides[first]]
        else:
            side = CONTINUES[self.selects]
            read, skipped = sides[side], sides[OTHER_SIDE[side]]
            if read.lo > read.hi:  # nothing to read on the learned side: the check is the other
                more = [skipped]
            else:
                more = [replace(read, guard=skipped if skipped.lo <= skipped.hi else None)]
        return [s for s in more if s.lo <= s.hi], burst, burst_rejected

    def _owing(self, todo: list[Span], hi: int, after: int | None) -> Cursor:
        """The cursor while ``todo`` (and the sides it guards) is unread: one owed range from
        the lowest of them to the window's end (conservative), then on to the next window."""
        low = min(min(s.lo, s.guard.lo if s.guard else s.lo) for s in todo)
        base = self.plan.base
        target = hi + 1 if after is None else after
        return Cursor(low, hi, target, self.read_through, base.reconciled_at)

    def _finished(self, hi: int, after: int | None) -> Cursor:
        self.read_through = hi if self.read_through is None else max(self.read_through, hi)
        reconciled = self.plan.base.reconciled_at
        if after is None:
            if self.plan.reconcile:
                reconciled = self.plan.end
            return Cursor(hi + 1, last_end=self.read_through, reconciled_at=reconciled)
        return Cursor(after, last_end=self.read_through, reconciled_at=reconciled)

    def _first_sight(self, rejected: list[Rejected]) -> list[Rejected]:
        """Each rejected fill once per walk (pages overlap at their edges)."""
        out = []
        for r in rejected:
            if r.fingerprint not in self._rejected_seen:
                self._rejected_seen.add(r.fingerprint)
                out.append(r)
        return out


def served_newest_first(times: list[int]) -> bool | None:
    """True if the page lists its fills newest first, False if oldest first, None if neither.
    A hint for which side of a page to read first; never taken for the selection."""
    steps = list(itertools.pairwise(times))
    if all(x >= y for x, y in steps):
        return True
    if all(x <= y for x, y in steps):
        return False
    return None


def resolve_burst(
    source: FillSource, scope: str, ms: int, answer: Answer, page_size: int
) -> tuple[list[Fill], list[Rejected]]:
    """All fills of millisecond ``ms`` when a full page holds nothing else. That millisecond
    is asked for once with the largest page (unless the page was one: v3), and if that is full
    too, order by order. v2 says how many fills it holds ('totals') and we check: every one
    must be reachable (valid, or in the quarantine); v3 does not, so an order whose fills
    there all lie beyond the first page would stay invisible -- logged, because the API offers
    no way to know."""
    whole = answer
    if page_size < MAX_PAGE_SIZE or source.api.has_totals:
        whole = source.page(scope, ms, ms, MAX_PAGE_SIZE)
        if not whole.full:
            return whole.fills, whole.rejected
    found = {f.seen_key: f for f in whole.fills}
    rejected = list(whole.rejected)
    for order_id in sorted({f.order_id for f in whole.fills}):
        per_order = source.page(scope, ms, ms, MAX_PAGE_SIZE, order_id)
        if per_order.full:
            raise ExchangeError(
                f"order {order_id} has {MAX_PAGE_SIZE} or more fills in millisecond {ms} "
                f"({format_ms(ms)}); the API cannot page within one millisecond, so the sync "
                "of this symbol stops before it (reported every pass)"
            )
        found.update((f.seen_key, f) for f in per_order.fills)
        rejected += per_order.rejected
    if source.api.has_totals:
        if whole.total is None:
            raise ExchangeError("v2 answer without 'totals': the burst cannot be checked")
        reached = len(found) + len({r.fingerprint for r in rejected})
        if reached < whole.total:
            raise ExchangeError(
                f"{whole.total} fills share millisecond {ms} ({format_ms(ms)}) but only "
                f"{reached} are reachable through their orders; the rest cannot be fetched, "
                "so the sync of this symbol stops before that millisecond"
            )
    else:
        log.warning(
            "%s/%s: %d fills share millisecond %s; fetched order by order (%d orders). The v3 "
            "API gives no count to check this against",
            source.user_id,
            scope,
            len(found),
            format_ms(ms),
            len({f.order_id for f in found.values()}),
        )
    return sorted(found.values(), key=lambda f: (f.order_id, f.trade_id)), rejected


# =============================================================================================
# 7. Concurrency: batches, prefetching, stop signals
# =============================================================================================

BATCH_PAGES = 10  # pages per transaction at most: 1,000 fills at the default page size
BATCH_SECONDS = 1.0  # ... and a commit at least every second while a walk is running


def batched(pages: Iterable[Batch], flush_now: Callable[[], bool]) -> Iterator[Batch]:
    """Consecutive pages merged, so a long backfill commits ~1,000 fills at a time (bigger
    statements, fewer commits) instead of 100; a merged batch carries its last page's cursor. A
    batch is cut short at the walk's end, after BATCH_SECONDS, or on flush_now()."""
    fills: list[Fill] = []
    rejected: list[Rejected] = []
    count, started, last = 0, time.monotonic(), None
    try:
        for page in pages:
            fills.extend(page.fills)
            rejected.extend(page.rejected)
            count, last = count + 1, page
            if (
                page.done
                or count >= BATCH_PAGES
                or time.monotonic() - started >= BATCH_SECONDS
                or flush_now()
            ):
                yield Batch(fills, rejected, page.cursor, page.done)
                fills, rejected, count, started = [], [], 0, time.monotonic()
    except Exception:
        if count and last is not None:  # the pages before a failure are good: store them first
            yield Batch(fills, rejected, last.cursor, False)
        raise


@contextlib.contextmanager
def prefetch(items: Iterator[T], stop: Stop, depth: int = 2) -> Iterator[Iterator[T]]:
    """``items`` iterated in a background thread up to ``depth`` ahead, so the next HTTP request
    overlaps the database write of the current batch. Exceptions are re-raised in the consumer.
    Leaving the block sets ``stop`` (every wait of the client listens to it) and joins the
    thread: it never outlives the block, and never uses the session after it."""
    channel: queue.Queue = queue.Queue(maxsize=depth)
    closed = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not closed.is_set():
            try:
                channel.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    def consume() -> Iterator[T]:
        while True:
            item = channel.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    worker = threading.Thread(target=produce, name="weex-prefetch", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        closed.set()
        stop.set()
        worker.join()


def install_stop_handlers(stop: Stop, busy: threading.Event) -> dict[int, Any]:
    """SIGINT/SIGTERM: the running batches commit, then the process exits. A second signal
    exits at once (crash safety makes that harmless). Returns the previous handlers."""

    def handle(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("%s received again: stopping at once", name)
            logging.shutdown()
            os._exit(128 + signum)
        stop.set()
        if busy.is_set():
            log.warning("%s received: finishing the current batches (again: stop at once)", name)
        else:
            log.warning("%s received: stopping", name)
        if SIGNALS_INTERRUPT.is_set():  # the main thread is in a call nothing else wakes
            raise Interrupted()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


# Set while the main thread makes a request outside the pool (the exchange's clock): a socket
# still connecting is not yet the watchdog's to shut, so the stop signal raises instead.
SIGNALS_INTERRUPT = threading.Event()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    SIGNALS_INTERRUPT.set()
    try:
        yield
    finally:
        SIGNALS_INTERRUPT.clear()


# =============================================================================================
# 8. Storage: schema and partitions, locks, claims, the cursor, batches of fills, status rows
# =============================================================================================

SCHEMA_VERSION = 7
# The fills table, unpartitioned or (database.partition_fills: monthly) by month of trade_time.
FILLS_TABLE_SQL = """\
CREATE TABLE IF NOT EXISTS trade_fills (
    user_id    text        NOT NULL,
    order_id   text        NOT NULL,
    trade_id   text        NOT NULL,
    symbol     text        NOT NULL,                             -- contract, e.g. cmt_btcusdt
    side       text        NOT NULL CHECK (side IN ('1', '2')),  -- '1' buy, '2' sell
    price      numeric     NOT NULL,
    size       numeric     NOT NULL,
    fee        numeric     NOT NULL,                             -- sign as sent (negative = rebate)
    fee_coin   text        NOT NULL,
    trade_time bigint      NOT NULL,                             -- ms since epoch
    raw        jsonb       NOT NULL,
    synced_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trade_fills_fill_key UNIQUE (user_id, order_id, trade_id, trade_time)
){partitioning};
"""
# What both API versions send that analysts filter and sum by, as typed columns (NULL where a
# version does not send it: v2 has no maker flag). A table made before gains them (instant:
# no default), and the upgrade fills them from raw (backfill_analysis_columns).
ANALYSIS_COLUMNS = {
    "quote_value": "numeric",  # price x size as sent: v3 quoteQty, v2 fillValue
    "realized_pnl": "numeric",  # v3 realizedPnl, v2 realizePnl
    "maker": "boolean",  # v3 maker; v2: NULL
    "position_side": "text",  # positionSide: LONG or SHORT
}
ANALYSIS_COLUMNS_SQL = "".join(
    f"ALTER TABLE trade_fills ADD COLUMN IF NOT EXISTS {name} {kind};\n"
    for name, kind in ANALYSIS_COLUMNS.items()
)
# Indexes an upgrade builds CONCURRENTLY on an existing table (build_new_indexes): a running
# pass keeps inserting meanwhile. user_time serves one user's fills over time; the BRIN index
# (a few dozen KB per million rows: fills arrive roughly in time order) serves time ranges,
# on trade_time in ms and on the readable view's timestamp.
FILLS_INDEXES = {  # name: what follows ON trade_fills
    "trade_fills_user_time": "(user_id, trade_time)",
    "trade_fills_time": "USING brin (trade_time)",
    "trade_fills_time_utc": "USING brin ((to_timestamp(trade_time / 1000.0)))",
}


def column(sql_type: str, doc: str = "", default: str = "", check: str = "") -> Any:
    """A dataclass field that is a table's column: its SQL type (NOT NULL unless the field may
    be None), what it means, its DEFAULT in sync_status (a column added to a table with rows
    needs one unless it may be NULL) and its CHECK."""
    return field(metadata={"sql": sql_type, "doc": doc, "default": default, "check": check})


@dataclass(frozen=True)
class StatusRow:
    """A sync_status row by column name. sync_status's and sync_latest's DDL, the upgrade that
    adds the columns an older table lacks, the status INSERT and sync_latest's copy of it are
    made from these fields: a new status column is one field here (at the end, with a default
    or nullable) and a SCHEMA_VERSION step. (sync_status also has id, and last_sync_time after
    symbol, which PostgreSQL fills.)"""

    pass_id: str = column("text")
    user_id: str = column("text")
    symbol: str = column("text")
    last_trade_time: int | None = column("bigint", "newest fill stored for (user, symbol), ms")
    records_count: int = column("integer", "rows inserted this pass")
    fetched_count: int = column("integer", "fills received this pass")
    requests_count: int = column("integer", "HTTP requests sent, retries included")
    duration_ms: int = column("integer")
    status: str = column(
        "text",
        check="CONSTRAINT sync_status_status_check CHECK (status IN ('success', 'error'))",
    )
    error_message: str | None = column("text")
    late_count: int = column(
        "integer",
        "of records_count: fills that became visible after a walk had read their time",
        default="0",
    )
    rejected_count: int = column("integer", "fills put in rejected_fills this pass", default="0")
    synced_through: int | None = column(
        "bigint", "every fill up to here is stored (ms): the last walk end minus the lookback"
    )
    error_kind: str | None = column(
        "text", "credentials, access, symbol, rejected_fills, exchange, rate_limit, database, ..."
    )


STATUS_FIELDS = tuple(f.name for f in fields(StatusRow))
CARRIED_FIELDS = ("last_trade_time",)  # NULL: not read this pass, the pair's latest one stands
LATEST_FIELDS = ("pass_id", "last_sync_time", *STATUS_FIELDS[3:])
LATEST_COLUMNS = ", ".join(LATEST_FIELDS)
# The columns weex_sync 1.x and 2.x lacked, and any added since: added to an older table by
# the upgrade (before an unpartitioned one becomes the first partition: a partition has
# exactly the columns of its table).
ADDED_FIELDS = STATUS_FIELDS[STATUS_FIELDS.index("late_count") :]


def _column_ddl(f: Any, table: str) -> str:
    """The column's definition in ``table`` (sync_latest's have no defaults and no checks; the
    upgrade's ADD COLUMN uses sync_status's, as a table with rows needs a default)."""
    nullable = f.type.endswith("| None")
    definition = f"{f.name:<15} {f.metadata['sql']}" + ("" if nullable else " NOT NULL")
    if table == "sync_status" and f.metadata["default"]:
        definition += f" DEFAULT {f.metadata['default']}"
    if table == "sync_status" and f.metadata["check"]:
        definition += f" {f.metadata['check']}"
    return definition


def _columns_ddl(names: Iterable[str], table: str, last: bool = False) -> str:
    """The columns' lines of a CREATE TABLE, each with its comment (``last``: the final ones)."""
    by_name = {f.name: f for f in fields(StatusRow)}
    lines = []
    names = list(names)
    for i, name in enumerate(names):
        f = by_name[name]
        comma = "" if last and i == len(names) - 1 else ","
        doc = f"  -- {f.metadata['doc']}" if f.metadata["doc"] else ""
        lines.append(f"    {_column_ddl(f, table)}{comma}{doc}\n")
    return "".join(lines)


def _added_columns_sql(table: str) -> str:
    """ADD COLUMN IF NOT EXISTS of ADDED_FIELDS: an older table gains what it lacks."""
    by_name = {f.name: f for f in fields(StatusRow)}
    return "".join(
        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "
        f"{' '.join(_column_ddl(by_name[name], 'sync_status').split())};\n"
        for name in ADDED_FIELDS
    )


def _status_value(name: str) -> str:
    if name not in CARRIED_FIELDS:
        return f"%({name})s"
    return (
        f"coalesce(%({name})s, (SELECT {name} FROM sync_latest"
        " WHERE user_id = %(user_id)s AND symbol = %(symbol)s))"
    )


STATUS_TABLE_SQL = f"""\
CREATE SEQUENCE IF NOT EXISTS sync_status_id_seq;
CREATE TABLE IF NOT EXISTS sync_status (
    id              bigint NOT NULL DEFAULT nextval('sync_status_id_seq'),
{_columns_ddl(STATUS_FIELDS[:3], "sync_status")}\
    last_sync_time  timestamptz NOT NULL DEFAULT now(),
{_columns_ddl(STATUS_FIELDS[3:], "sync_status", last=True)}\
) PARTITION BY RANGE (last_sync_time);
ALTER SEQUENCE sync_status_id_seq OWNED BY sync_status.id;"""
# Status rows of days without a partition of their own: every row of a role that cannot make
# partitions (only the documented grants), the odd row of a day maintenance did not reach.
# Retention deletes its old rows in small batches (delete_old_default_rows).
STATUS_DEFAULT_SQL = """\
CREATE TABLE IF NOT EXISTS sync_status_default PARTITION OF sync_status DEFAULT;
CREATE INDEX IF NOT EXISTS sync_status_default_time ON sync_status_default (last_sync_time);
CREATE INDEX IF NOT EXISTS sync_status_default_pair
    ON sync_status_default (user_id, symbol, last_sync_time);"""
STATUS_COLUMNS_SQL = _added_columns_sql("sync_status")


# An upgrade from version 3 or older: each pair's latest state from its history, one index
# probe per pair (the pairs found by a loose index scan), not a sort of every row.
LATEST_FROM_HISTORY_SQL = f"""\
WITH RECURSIVE pairs AS (
    (SELECT user_id, symbol FROM sync_status ORDER BY user_id, symbol LIMIT 1)
    UNION ALL
    SELECT later.user_id, later.symbol FROM pairs CROSS JOIN LATERAL (
        SELECT user_id, symbol FROM sync_status s
         WHERE (s.user_id, s.symbol) > (pairs.user_id, pairs.symbol)
         ORDER BY user_id, symbol LIMIT 1) later
)
INSERT INTO sync_latest (user_id, symbol, status_id, {LATEST_COLUMNS}, last_success_time)
SELECT pairs.user_id, pairs.symbol, latest.id, {LATEST_COLUMNS}, success.last_success_time
  FROM pairs
 CROSS JOIN LATERAL (
        SELECT * FROM sync_status s WHERE s.user_id = pairs.user_id AND s.symbol = pairs.symbol
         ORDER BY s.last_sync_time DESC, s.id DESC LIMIT 1) latest
  LEFT JOIN LATERAL (
        SELECT s.last_sync_time AS last_success_time FROM sync_status s
         WHERE s.user_id = pairs.user_id AND s.symbol = pairs.symbol AND s.status = 'success'
         ORDER BY s.last_sync_time DESC LIMIT 1) success ON true
ON CONFLICT (user_id, symbol) DO NOTHING;"""
SCHEMA_DDL = f"""\
-- weex_sync schema (python weex_sync.py --print-schema); weex_sync creates it when missing.
-- sync_status is partitioned by day: a pass run by the tables' owner makes the partitions
-- ahead (and drops those older than sync.status_retention_days); days without one go to
-- sync_status_default. Apply this file as the owner (or run a pass as the owner).

-- One row per fill, exactly as the exchange reported it (raw) plus typed columns.
{FILLS_TABLE_SQL.format(partitioning="")}{ANALYSIS_COLUMNS_SQL}CREATE INDEX IF NOT EXISTS trade_fills_user_symbol_time
    ON trade_fills (user_id, symbol, trade_time DESC);
{"".join(f"CREATE INDEX IF NOT EXISTS {name} ON trade_fills {how};{chr(10)}" for name, how in FILLS_INDEXES.items())}
-- Append-only: one row per (user, symbol) per pass; symbol '*' for sync.symbols: all.
-- Partitioned by day of last_sync_time (sync_status_pYYYYMMDD; an upgraded table is the
-- partition sync_status_until_YYYYMMDD): retention drops whole days, and deletes old rows
-- of sync_status_default in small batches.
{STATUS_TABLE_SQL}
{STATUS_COLUMNS_SQL}\
{STATUS_DEFAULT_SQL}
-- The latest status of each pair, and its last success: written with every status row (the
-- same statement), so --status costs the same however long a pair has failed, and a last
-- success stays known after retention dropped its row.
CREATE TABLE IF NOT EXISTS sync_latest (
{_columns_ddl(STATUS_FIELDS[1:3], "sync_latest")}\
    status_id       bigint NOT NULL,  -- sync_status.id of the latest row
{_columns_ddl(STATUS_FIELDS[:1], "sync_latest")}\
    last_sync_time  timestamptz NOT NULL,
{_columns_ddl(STATUS_FIELDS[3:], "sync_latest")}\
    last_success_time timestamptz,  -- the latest row with status 'success'
    PRIMARY KEY (user_id, symbol)
);
{_added_columns_sql("sync_latest")}\

-- The incremental cursor, written in the same transaction as the fills it covers.
-- Every fill with trade_time < synced_through has been read, except while walk_end is set:
-- then an interrupted walk still owes [synced_through, walk_end] and, when it completes,
-- moves synced_through to walk_target. last_end: every fill up to it has been read once (one
-- stored later at or before it was late). reconciled_at: the last re-read of the reconcile
-- window. Where the next walk starts is the cursor rule (docs/exactness.md).
CREATE TABLE IF NOT EXISTS sync_cursor (
    user_id        text        NOT NULL,
    symbol         text        NOT NULL,
    synced_through bigint      NOT NULL,
    walk_end       bigint,
    walk_target    bigint,
    last_end       bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    reconciled_at  bigint,
    PRIMARY KEY (user_id, symbol)
);

-- The quarantine: fills the exchange served that weex_sync will not store as they are (a bad
-- amount or id, a time outside the request, another version of a stored fill). One row per
-- distinct fill as sent; resolved_at is set when a valid version of it is stored.
CREATE TABLE IF NOT EXISTS rejected_fills (
    id          bigserial   PRIMARY KEY,
    user_id     text        NOT NULL,
    symbol      text        NOT NULL,    -- the fill's contract if readable, else '*'
    order_id    text,                    -- if readable
    trade_id    text,                    -- if readable
    trade_time  bigint,                  -- if readable, ms
    reason      text        NOT NULL,
    raw         text        NOT NULL,    -- the fill as sent, JSON text (escaped, cut at 16 KB)
    fingerprint text        NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    seen_count  integer     NOT NULL DEFAULT 1,
    resolved_at timestamptz,
    CONSTRAINT rejected_fills_fill UNIQUE (user_id, fingerprint)
);
CREATE INDEX IF NOT EXISTS rejected_fills_open
    ON rejected_fills (user_id, order_id, trade_id) WHERE resolved_at IS NULL;

-- Which pass works on a user, so that several processes or machines split a fleet without
-- syncing a user twice: a pass claims a user only if no other pass claimed it within
-- sync.min_interval_seconds; the holder renews claimed_at with every commit, and the claim of
-- a pass that died expires by itself.
CREATE TABLE IF NOT EXISTS sync_claims (
    claim_key  text        PRIMARY KEY,  -- 'user <user_id>', or 'account <account>'
    claimed_at timestamptz NOT NULL,
    claimed_by text        NOT NULL      -- the pass id
);

-- Users whose credentials or access the exchange refused: not asked again before next_try
-- (the wait doubles from one pass interval up to an hour: WEEX may disable a key that keeps
-- sending refused requests), or at once when the credentials in the configuration change
-- (fingerprint: a hash of api_key, secret_key and passphrase). A success deletes the row.
CREATE TABLE IF NOT EXISTS sync_backoff (
    user_id       text        PRIMARY KEY,
    fingerprint   text        NOT NULL,
    failures      integer     NOT NULL,  -- refused passes in a row
    failed_at     timestamptz NOT NULL,
    next_try      timestamptz NOT NULL,
    error_kind    text        NOT NULL,  -- credentials or access
    error_message text        NOT NULL
);

-- Upgrades from weex_sync 1.x and 2.x (no-ops on a new database).
ALTER TABLE sync_cursor ADD COLUMN IF NOT EXISTS last_end bigint;
ALTER TABLE sync_cursor ADD COLUMN IF NOT EXISTS reconciled_at bigint;
{LATEST_FROM_HISTORY_SQL}

-- For analysts: times as timestamptz (UTC) and sides as words.
CREATE OR REPLACE VIEW trade_fills_readable AS
SELECT user_id, symbol, order_id, trade_id,
       CASE side WHEN '1' THEN 'buy' WHEN '2' THEN 'sell' END AS side,
       price, size, fee, fee_coin,
       to_timestamp(trade_time / 1000.0) AS trade_time,
       synced_at, quote_value, realized_pnl, maker, position_side
  FROM trade_fills;
-- (WHERE trade_time >= now() - interval '1 day' on the view uses trade_fills_time_utc.)

-- Per user, contract, UTC day and fee coin: what the fills of trade_fills add up to. Kept in
-- the transaction that inserts them, from the rows the INSERT really inserted, so it always
-- equals the same aggregate over trade_fills (sums of NULLs stay NULL, as sum() does); an
-- upgrade builds it from the stored fills. weex_sync never deletes fills: a user who deletes
-- or detaches some deletes their days here too.
CREATE TABLE IF NOT EXISTS trade_fills_daily (
    user_id      text    NOT NULL,
    symbol       text    NOT NULL,
    day          date    NOT NULL,  -- UTC day of trade_time
    fee_coin     text    NOT NULL,
    fills        bigint  NOT NULL,
    size         numeric NOT NULL,
    quote_value  numeric,
    fee          numeric NOT NULL,
    realized_pnl numeric,
    maker_fills  bigint  NOT NULL,  -- of fills: maker = true
    taker_fills  bigint  NOT NULL,  -- of fills: maker = false (v2 does not say: neither)
    PRIMARY KEY (user_id, symbol, day, fee_coin)
);
CREATE INDEX IF NOT EXISTS trade_fills_daily_day ON trade_fills_daily (day);  -- every account's days
"""
SCHEMA_VERSION_SQL = f"""
-- When this says the current version, weex_sync runs none of the statements above: no pass
-- ever waits for a lock that an analyst's open transaction holds.
CREATE TABLE IF NOT EXISTS weex_sync_schema (version integer NOT NULL);
DELETE FROM weex_sync_schema;
INSERT INTO weex_sync_schema (version) VALUES ({SCHEMA_VERSION});
"""

SCHEMA_SQL = SCHEMA_DDL + SCHEMA_VERSION_SQL
DAY_SQL = "DATE '1970-01-01' + (trade_time / 86400000)::int"  # the UTC day of a trade_time
# Fills (from {fills}: rows of trade_fills' columns) added to trade_fills_daily. A sum that
# meets NULL keeps the other side, as sum() skips NULLs: the rollup always equals the aggregate.
ROLLUP_SQL = f"""INSERT INTO trade_fills_daily AS d (user_id, symbol, day, fee_coin, fills, size,
                                     quote_value, fee, realized_pnl, maker_fills, taker_fills)
    SELECT {{user}}, symbol, {DAY_SQL}, fee_coin, count(*), sum(size), sum(quote_value),
           sum(fee), sum(realized_pnl), count(*) FILTER (WHERE maker),
           count(*) FILTER (WHERE NOT maker)
      FROM {{fills}} GROUP BY {{by}}symbol, {DAY_SQL}, fee_coin
    ON CONFLICT (user_id, symbol, day, fee_coin) DO UPDATE
       SET fills = d.fills + EXCLUDED.fills, size = d.size + EXCLUDED.size,
           quote_value = coalesce(d.quote_value + EXCLUDED.quote_value, d.quote_value,
                                  EXCLUDED.quote_value),
           fee = d.fee + EXCLUDED.fee,
           realized_pnl = coalesce(d.realized_pnl + EXCLUDED.realized_pnl, d.realized_pnl,
                                   EXCLUDED.realized_pnl),
           maker_fills = d.maker_fills + EXCLUDED.maker_fills,
           taker_fills = d.taker_fills + EXCLUDED.taker_fills"""
SCHEMA_LOCK_KEY = 0x7765_6578_5F73_796E  # "wex_syn": serialises concurrent schema creation
LOCK_TIMEOUT = "10s"  # how long any statement of ours waits for a lock another session holds

# One statement per batch with a column array per field (measured 1.7x the rows/s of
# execute_values, which renders one VALUES tuple per row in Python; see bench/). A fill whose
# (user, order, trade) is stored already is not inserted, whatever its time: it is the same
# fill, or a correction (CORRECTIONS_SQL). A stored fill resolves its quarantine rows. What was
# really inserted (RETURNING) is added to trade_fills_daily in the same statement. It returns
# how many rows were new, and how many of those were late.
INSERT_FILLS_SQL = f"""
WITH batch AS (
    SELECT * FROM unnest(%(order_id)s::text[], %(trade_id)s::text[], %(symbol)s::text[],
                         %(side)s::text[], %(price)s::numeric[], %(size)s::numeric[],
                         %(fee)s::numeric[], %(fee_coin)s::text[], %(trade_time)s::bigint[],
                         %(raw)s::text[], %(quote_value)s::numeric[], %(realized_pnl)s::numeric[],
                         %(maker)s::boolean[], %(position_side)s::text[])
           AS b(order_id, trade_id, symbol, side, price, size, fee, fee_coin, trade_time, raw,
                quote_value, realized_pnl, maker, position_side)
), inserted AS (
    INSERT INTO trade_fills (user_id, order_id, trade_id, symbol, side, price, size, fee,
                             fee_coin, trade_time, raw, quote_value, realized_pnl, maker,
                             position_side)
    SELECT %(user_id)s, order_id, trade_id, symbol, side, price, size, fee, fee_coin,
           trade_time, raw::jsonb, quote_value, realized_pnl, maker, position_side
      FROM batch
     WHERE NOT EXISTS (SELECT 1 FROM trade_fills stored
                        WHERE stored.user_id = %(user_id)s AND stored.order_id = batch.order_id
                          AND stored.trade_id = batch.trade_id)
    ON CONFLICT DO NOTHING
    RETURNING order_id, trade_id, trade_time, symbol, fee_coin, size, fee, quote_value,
              realized_pnl, maker
), rolled_up AS (
    {ROLLUP_SQL.format(user="%(user_id)s", fills="inserted", by="")}
), resolved AS (
    UPDATE rejected_fills r SET resolved_at = now()
      FROM inserted
     WHERE r.user_id = %(user_id)s AND r.order_id = inserted.order_id
       AND r.trade_id = inserted.trade_id AND r.resolved_at IS NULL
    RETURNING 1
)
SELECT count(*), count(*) FILTER (WHERE trade_time <= %(late_before)s),
       (SELECT count(*) FROM resolved), max(trade_time)
  FROM inserted
"""
# The fills of a batch that were not inserted and differ from the stored fill of their
# (user, order, trade): corrections. Those that match it are fills already stored.
CORRECTIONS_SQL = """
SELECT batch.n, stored.symbol, stored.side, stored.price, stored.size, stored.fee,
       stored.trade_time
  FROM unnest(%(order_id)s::text[], %(trade_id)s::text[], %(symbol)s::text[],
              %(side)s::text[], %(price)s::numeric[], %(size)s::numeric[],
              %(fee)s::numeric[], %(trade_time)s::bigint[], %(n)s::int[])
       AS batch(order_id, trade_id, symbol, side, price, size, fee, trade_time, n)
  JOIN trade_fills stored
    ON stored.user_id = %(user_id)s AND stored.order_id = batch.order_id
   AND stored.trade_id = batch.trade_id
 WHERE (stored.symbol, stored.side, stored.price, stored.size, stored.fee, stored.trade_time)
       IS DISTINCT FROM
       (batch.symbol, batch.side, batch.price, batch.size, batch.fee, batch.trade_time)
"""
# Rejected fills, once each: a fill seen again counts; it is open until a valid version of it
# is stored (or someone sets resolved_at). Returns whether each row is still open.
QUARANTINE_SQL = """
INSERT INTO rejected_fills (user_id, symbol, order_id, trade_id, trade_time, reason, raw,
                            fingerprint)
SELECT %(user_id)s, *
  FROM unnest(%(symbol)s::text[], %(order_id)s::text[], %(trade_id)s::text[],
              %(trade_time)s::bigint[], %(reason)s::text[], %(raw)s::text[],
              %(fingerprint)s::text[])
ON CONFLICT (user_id, fingerprint) DO UPDATE
   SET last_seen = now(), seen_count = rejected_fills.seen_count + 1, reason = EXCLUDED.reason
RETURNING id
"""
# Claim those of the keys that no other pass claimed within %(interval)s seconds, nor since
# this pass started (%(since)s: an account another pass synced meanwhile is not stale for this
# one); this pass may claim again what it holds. A claim dated in the future (the database's
# clock stepped back since) has expired: it would otherwise hold its account for as long as
# the step. Returns the keys claimed.
CLAIM_SQL = """
INSERT INTO sync_claims AS c (claim_key, claimed_at, claimed_by)
SELECT key, now(), %(by)s FROM unnest(%(keys)s::text[]) AS key
ON CONFLICT (claim_key) DO UPDATE SET claimed_at = now(), claimed_by = EXCLUDED.claimed_by
 WHERE (c.claimed_at <= now() - make_interval(secs => %(interval)s)
        AND c.claimed_at < %(since)s)
    OR c.claimed_by = %(by)s
    OR c.claimed_at > clock_timestamp() + interval '5 seconds'
RETURNING claim_key
"""
RENEW_CLAIM_SQL = """
UPDATE sync_claims SET claimed_at = now() WHERE claim_key = %s AND claimed_by = %s
"""
# Claims of users the pass did not get to (its time limit): free for the next pass at once.
RELEASE_CLAIMS_SQL = """
UPDATE sync_claims SET claimed_at = '-infinity'
 WHERE claim_key = ANY(%(keys)s) AND claimed_by = %(by)s
"""
BACKOFF_SQL = """
INSERT INTO sync_backoff (user_id, fingerprint, failures, failed_at, next_try, error_kind,
                          error_message)
VALUES (%(user)s, %(fingerprint)s, %(failures)s, now(), now() + make_interval(secs => %(wait)s),
        %(kind)s, %(error)s)
ON CONFLICT (user_id) DO UPDATE
   SET fingerprint = EXCLUDED.fingerprint, failures = EXCLUDED.failures,
       failed_at = EXCLUDED.failed_at, next_try = EXCLUDED.next_try,
       error_kind = EXCLUDED.error_kind, error_message = EXCLUDED.error_message
RETURNING next_try
"""
CURSOR_FIELDS = tuple(f.name for f in fields(Cursor))  # sync_cursor's columns, by name
SAVE_CURSOR_SQL = f"""
INSERT INTO sync_cursor (user_id, symbol, {", ".join(CURSOR_FIELDS)})
VALUES (%(user_id)s, %(symbol)s, {", ".join(f"%({name})s" for name in CURSOR_FIELDS)})
ON CONFLICT (user_id, symbol) DO UPDATE
   SET ({", ".join(CURSOR_FIELDS)}, updated_at) =
       ({", ".join(f"EXCLUDED.{name}" for name in CURSOR_FIELDS)}, now())
"""
# The newest stored fill of a scope at or after %(floor)s: the newest known before (fills are
# never deleted by weex_sync, so it is a lower bound that lets PostgreSQL prune the months of a
# partitioned trade_fills; NULL when a user removed them: then the caller asks without it).
# One probe of trade_fills_user_time ('*': every contract) or of trade_fills_user_symbol_time.
NEWEST_FILL_SQL = {
    True: """SELECT max(trade_time) FROM trade_fills
              WHERE user_id = %(user_id)s AND trade_time >= %(floor)s""",
    False: """SELECT max(trade_time) FROM trade_fills
               WHERE user_id = %(user_id)s AND symbol = %(symbol)s AND trade_time >= %(floor)s""",
}
# A status row and the pair's latest state, in one statement.
INSERT_STATUS_SQL = f"""
WITH row AS (
    INSERT INTO sync_status ({", ".join(STATUS_FIELDS)})
    VALUES ({", ".join(_status_value(name) for name in STATUS_FIELDS)})
    RETURNING *
)
INSERT INTO sync_latest AS l (user_id, symbol, status_id, {LATEST_COLUMNS}, last_success_time)
SELECT user_id, symbol, id, {LATEST_COLUMNS},
       CASE WHEN status = 'success' THEN last_sync_time END
  FROM row
ON CONFLICT (user_id, symbol) DO UPDATE
   SET ({LATEST_COLUMNS}, status_id) =
       ({", ".join("EXCLUDED." + c for c in LATEST_FIELDS)}, EXCLUDED.status_id),
       last_success_time = coalesce(EXCLUDED.last_success_time, l.last_success_time)
"""


MIN_BIGINT = -(2**63)


def max_known(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def one_row(cur: psycopg2.extensions.cursor) -> tuple:
    """The row a statement that always returns one (an aggregate, RETURNING) returned."""
    row = cur.fetchone()
    if row is None:
        raise StorageError("database error: a statement returned no row")
    return row


class PinnedConnection(psycopg2.extensions.connection):
    """A connection whose every transaction begins by pinning weex_sync's settings with SET
    LOCAL: its schema first in search_path (no search_path a DBA or a role chose can send a
    write elsewhere) and its lock_timeout. Never session state or startup options, which a
    transaction pooler (pgbouncer) hands to other clients, loses, or refuses."""

    schema = DatabaseConfig.schema
    pin = b""

    def pin_to(self, schema: str) -> None:
        """Pin ``schema``, and READ COMMITTED whatever the database's default (sent with each
        BEGIN): a lock's idle transaction then holds no snapshot (nothing for VACUUM or an
        index build to wait for), and a batch sees the rows another committed before it got
        the user's lock."""
        self.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED
        self.schema = schema
        self.pin = (
            sql.SQL("SET LOCAL search_path TO {}; SET LOCAL lock_timeout = {}")
            .format(sql.Identifier(schema), sql.Literal(LOCK_TIMEOUT))
            .as_string(self)
            .encode()
        )


class PinnedCursor(psycopg2.extensions.cursor):
    """Pins the connection's settings before the first statement of each transaction, sent
    with it (one round trip: a pair's pass makes about five transactions)."""

    connection: PinnedConnection

    def execute(self, query: Any, vars: Any = None) -> None:
        conn = self.connection
        idle = conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        if idle and not conn.autocommit and conn.pin:  # in the same round trip
            query, vars = conn.pin + b"; " + self.mogrify(query, vars), None
        super().execute(query, vars)


class PinnedDictCursor(PinnedCursor, psycopg2.extras.RealDictCursor):
    """Rows as dicts, the settings pinned likewise."""


def connect(db: DatabaseConfig, dbname: str | None = None) -> Conn:
    conn = psycopg2.connect(
        host=db.host,
        port=db.port,
        user=db.user,
        password=db.password,
        dbname=dbname or db.dbname,
        sslmode=db.sslmode,
        connect_timeout=10,
        application_name="weex_sync",
        connection_factory=PinnedConnection,
        cursor_factory=PinnedCursor,
        **KEEPALIVES,
    )
    conn.pin_to(db.schema)
    return conn


# A lock's transaction sits idle while the work commits elsewhere: a peer that vanished without
# closing (a dead host, a dropped route) is noticed within about two minutes, not TCP's two
# hours, and its locks go with it.
KEEPALIVES: dict[str, Any] = {
    "keepalives_idle": 60,
    "keepalives_interval": 10,
    "keepalives_count": 6,
}


def sibling(conn: Conn) -> Conn:
    """A second connection to conn's database, as conn's role, with conn's schema pinned."""
    password = conn.info.password
    dsn = psycopg2.extensions.make_dsn(conn.dsn, password=password) if password else conn.dsn
    if not isinstance(conn, PinnedConnection):
        other = psycopg2.connect(dsn)
        other.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED
        return other
    other = psycopg2.connect(dsn, connection_factory=PinnedConnection, cursor_factory=PinnedCursor)
    other.pin_to(conn.schema)
    return other


def describe_db_error(exc: BaseException) -> str:
    """A psycopg2 error as one line: its lines joined, a hint where one helps."""
    text = str(exc).strip() or type(exc).__name__
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    if isinstance(exc, psycopg2.errors.LockNotAvailable):
        line += (
            f" (waited {LOCK_TIMEOUT} for a lock another session holds on weex_sync's tables: "
            "an open transaction? see pg_stat_activity)"
        )
    return printable(line)


def open_database(db: DatabaseConfig, create: bool = True) -> Conn:
    """Connect; when that fails because the database does not exist (asked of the server's
    catalog, not read off its message, which may be in any language), create it through the
    ``postgres`` database -- unless ``create`` is False (read-only commands)."""
    try:
        return connect(db)
    except psycopg2.OperationalError as exc:
        failure = exc
    exists = database_exists(db)
    if exists is None:  # the server cannot be asked
        raise StorageError(describe_db_error(failure))
    if not exists:
        create_database(db, create)
        return connect_once_created(db, created=True)
    return connect_once_created(db)  # the failure was another, or another process created it


# How long the first connection to a database weex_sync just created may take: pgbouncer
# answers a login that failed (the database was missing) by holding the next ones until its
# server_login_retry (15 s by default) has passed.
CREATED_PATIENCE = 40.0


def create_database(db: DatabaseConfig, create: bool) -> None:
    """CREATE DATABASE through the ``postgres`` database; another weex_sync creating it at the
    same moment is fine."""
    if not create:
        raise StorageError(f'database "{db.dbname}" does not exist (nothing was created)')
    try:
        admin = connect(db, "postgres")
        admin.autocommit = True
        try:
            create_utf8_database(admin, db.dbname)
        finally:
            admin.close()
        log.warning(  # a WARNING, seen under -q: a mistyped dbname would otherwise go unseen
            "created database %s on %s:%s (it did not exist; if that is a typo in "
            "database.dbname, drop it)",
            db.dbname,
            db.host,
            db.port,
        )
    except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
        pass  # another weex_sync is creating it (pg_database's unique index says so)
    except psycopg2.Error as exc:
        raise StorageError(
            f'database "{db.dbname}" does not exist and cannot be created: {describe_db_error(exc)}'
        ) from None


def create_utf8_database(admin: Conn, dbname: str) -> None:
    """CREATE DATABASE in UTF8 whatever the cluster's default (initdb under LANG=C makes
    SQL_ASCII): from template0, in the cluster's locale, or in the C locale where that locale
    cannot hold UTF8 (a LATIN1 locale, say)."""
    create = sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
        sql.Identifier(dbname)
    )
    with admin.cursor() as cur:
        try:
            cur.execute(create)
        except psycopg2.errors.InvalidParameterValue:
            cur.execute(create + sql.SQL(" LC_COLLATE 'C' LC_CTYPE 'C'"))


def connect_once_created(db: DatabaseConfig, created: bool = False) -> Conn:
    """A connection to a database that exists or is being created: while the catalog says it
    does not (another process's CREATE DATABASE has not committed) for 10 s, or for
    CREATED_PATIENCE once this process ``created`` it, try again."""
    deadline = time.monotonic() + (CREATED_PATIENCE if created else 10.0)
    while True:
        try:
            return connect(db)
        except psycopg2.OperationalError as exc:
            waiting = created or database_exists(db) is False
            if time.monotonic() > deadline or not waiting:
                raise StorageError(describe_db_error(exc)) from None
            time.sleep(0.1)


def database_exists(db: DatabaseConfig) -> bool | None:
    """Whether the server has the database (None: it cannot be asked)."""
    try:
        admin = connect(db, "postgres")
    except psycopg2.Error:
        return None
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.dbname,))
            return cur.fetchone() is not None
    except psycopg2.Error:
        return None
    finally:
        admin.close()


def open_for_reading(db: DatabaseConfig) -> Conn:
    """A connection to an existing database with weex_sync's current tables; StorageError
    (exit 3) otherwise. Creates nothing: --status must not make a mistyped dbname real."""
    conn = open_database(db, create=False)
    try:
        version = schema_version(conn)
    except psycopg2.Error as exc:
        conn.close()
        raise StorageError(describe_db_error(exc)) from None
    if version > SCHEMA_VERSION:
        conn.close()
        raise newer_schema(version)
    if version < SCHEMA_VERSION:
        conn.close()
        if version == 0:
            raise StorageError(
                f"database {db.dbname} has no weex_sync tables (nothing was created): run a "
                "pass first"
            )
        raise StorageError(
            f"database {db.dbname} holds weex_sync's schema version {version}, this weex_sync "
            f"reads version {SCHEMA_VERSION}: run a pass to upgrade it"
        )
    return conn


def backfill_analysis_columns(conn: Conn) -> None:
    """The analysis columns of the fills stored before they existed, from raw, in batches of
    BACKFILL_BLOCKS pages (a TID range scan: no index needed), each its own transaction:
    readers never wait, and a writer at most for the rows of one batch."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT n.nspname, c.relname, pg_relation_size(c.oid) / current_setting('block_size')::int"
            "  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid IN (SELECT relid FROM pg_partition_tree('trade_fills') WHERE isleaf"
            "                 UNION SELECT 'trade_fills'::regclass)"
            "   AND c.relkind = 'r'"
        )
        tables = cur.fetchall()
    total = sum(blocks for *_, blocks in tables)
    log.info("upgrade: filling the analysis columns of stored fills (%d pages)", total)
    for schema, name, blocks in tables:
        where = " WHERE ctid >= %s::tid AND ctid < %s::tid"
        update = sql.SQL("UPDATE {} SET " + ANALYSIS_FROM_RAW + where).format(
            sql.Identifier(schema, name)
        )
        for first in range(0, blocks, BACKFILL_BLOCKS):  # not the pages the batches append
            with conn, conn.cursor() as cur:
                last = min(first + BACKFILL_BLOCKS, blocks)
                cur.execute(update, (f"({first},0)", f"({last},0)"))


def build_daily_rollup(cur: psycopg2.extensions.cursor) -> None:
    """trade_fills_daily from every stored fill, in the upgrade's last transaction. Writers of
    trade_fills wait meanwhile; readers go on. The fills an older weex_sync inserted during the
    backfill get their columns here (and are counted); one still running after this commits
    would add fills the rollup never counts: stop older versions before upgrading."""
    cur.execute("LOCK TABLE trade_fills IN SHARE ROW EXCLUSIVE MODE")
    cur.execute(
        "UPDATE trade_fills SET "
        + ANALYSIS_FROM_RAW.format()
        + " WHERE quote_value IS NULL AND realized_pnl IS NULL AND maker IS NULL"
        " AND position_side IS NULL"
    )
    cur.execute("DELETE FROM trade_fills_daily")
    cur.execute(ROLLUP_SQL.format(user="user_id", fills="trade_fills", by="user_id, "))
    log.info("upgrade: trade_fills_daily built (%d days)", cur.rowcount)


def newer_schema(version: int) -> StorageError:
    """A database a newer weex_sync upgraded: this one neither writes to it nor reads it."""
    return StorageError(
        f"the database holds weex_sync's schema version {version}, newer than this weex_sync's "
        f"({__version__}, schema {SCHEMA_VERSION}): nothing was written; run the newer "
        "weex_sync (CHANGELOG.md says which version made which schema)"
    )


def ensure_schema(conn: Conn, partition_fills: str = "none") -> None:
    """Create or upgrade the schema, unless it is current: then no DDL runs at all (DDL waits
    for the locks of every open transaction on those tables, and everyone then waits for it).
    An upgrade runs in steps that never block a running pass (upgrade_status_table,
    build_new_indexes), under a session lock that other passes wait a while for."""
    try:
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise newer_schema(version)
        if version == SCHEMA_VERSION:
            return
        with held_lock(conn, SCHEMA_LOCK_KEY, SCHEMA_LOCK_PATIENCE) as locked:
            if not locked:
                raise StorageError(
                    "another weex_sync process has been creating or upgrading the schema for "
                    f"{SCHEMA_LOCK_PATIENCE:.0f} s (building indexes on a large table takes "
                    "minutes): this pass did nothing; the next one runs once it is done"
                )
            if schema_version(conn) >= SCHEMA_VERSION:
                return
            upgrade_status_table(conn)
            build_new_indexes(conn)
            with conn, conn.cursor() as cur:
                schema = getattr(conn, "schema", DatabaseConfig.schema)
                cur.execute("SELECT to_regnamespace(%s) IS NULL", (schema,))
                if one_row(cur)[0]:  # only when missing: it needs CREATE on the database
                    cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
                if partition_fills == "monthly":
                    cur.execute(FILLS_TABLE_SQL.format(partitioning=FILLS_PARTITIONING))
                    first_fills_partitions(cur, time.time())
                cur.execute(SCHEMA_DDL)
            if version < ANALYSIS_SCHEMA:  # fills stored before (1.x has no version: 0)
                backfill_analysis_columns(conn)
            with conn, conn.cursor() as cur:
                if version < ANALYSIS_SCHEMA:
                    build_daily_rollup(cur)
                cur.execute(SCHEMA_VERSION_SQL)
    except psycopg2.Error as exc:
        hint = ""
        if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
            hint = (
                f" (weex_sync {__version__} needs schema version {SCHEMA_VERSION}: its owner "
                "creates or upgrades it, running a pass of this version once; docs/postgres.md)"
            )
        raise StorageError(
            f"cannot create or upgrade the schema: {describe_db_error(exc)}{hint}"
        ) from None


# What a pass does to each relation of its schema: the documented grants of a role with least
# privilege (docs/postgres.md), checked before every pass and by --check.
REQUIRED_PRIVILEGES = {
    "trade_fills": ("SELECT", "INSERT"),
    "rejected_fills": ("SELECT", "INSERT", "UPDATE"),
    "sync_status": ("SELECT", "INSERT"),
    "sync_status_default": ("SELECT", "DELETE"),  # retention of its old rows
    "sync_latest": ("SELECT", "INSERT", "UPDATE"),
    "sync_cursor": ("SELECT", "INSERT", "UPDATE"),
    "sync_claims": ("SELECT", "INSERT", "UPDATE"),
    "sync_backoff": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "weex_sync_schema": ("SELECT",),
    "trade_fills_daily": ("SELECT", "INSERT", "UPDATE"),
    "sync_status_id_seq": ("USAGE",),
    "rejected_fills_id_seq": ("USAGE",),
}
# (A relation not there yet is not asked about: the pass creates it, or says it cannot.)
MISSING_PRIVILEGES_SQL = """
SELECT r.name, r.privilege FROM unnest(%(names)s::text[], %(privileges)s::text[]) AS r(name, privilege)
 WHERE CASE WHEN r.privilege = 'USAGE' THEN NOT has_sequence_privilege(to_regclass(r.name), 'USAGE')
            ELSE NOT has_table_privilege(to_regclass(r.name), r.privilege) END
"""


def require_privileges(conn: Conn) -> None:
    """StorageError naming the first privilege this role lacks, with the GRANT that gives it:
    one missing grant would otherwise fail every pair of every pass."""
    schema = getattr(conn, "schema", DatabaseConfig.schema)
    pairs = [(name, p) for name, privileges in REQUIRED_PRIVILEGES.items() for p in privileges]
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT quote_ident(current_user), quote_ident(%s),"
            " coalesce(has_schema_privilege(to_regnamespace(%s), 'USAGE'), true)",
            (schema, schema),
        )
        role, quoted, usage = one_row(cur)
        missing = [] if usage else [("SCHEMA", quoted, "USAGE")]
        if usage:  # our relations' names need no quotes
            names = [f"{quoted}.{name}" for name, _ in pairs]
            cur.execute(
                MISSING_PRIVILEGES_SQL, {"names": names, "privileges": [p for _, p in pairs]}
            )
            missing = [
                ("SEQUENCE" if p == "USAGE" else "TABLE", name, p) for name, p in cur.fetchall()
            ]
    if missing:
        kind, name, privilege = missing[0]
        more = f" (and {plural(len(missing) - 1, 'more grant')})" if len(missing) > 1 else ""
        raise StorageError(
            f"role {role} lacks {privilege} on {name}{more}: GRANT {privilege} ON {kind} "
            f"{name} TO {role} (docs/postgres.md lists every grant)"
        )


SCHEMA_LOCK_PATIENCE = 60.0  # how long a pass waits for another one's schema upgrade
ANALYSIS_SCHEMA = 7  # the schema that added the analysis columns and trade_fills_daily
BACKFILL_BLOCKS = 1_000  # pages of trade_fills per backfill transaction (~8 MB, ~20,000 fills)
# The analysis columns of a stored fill, from its raw object as parse_fill reads them (a value
# parse_fill would have refused stays NULL: the fill is stored already).
ANALYSIS_FROM_RAW = """
quote_value = CASE WHEN raw->>'quoteQty' ~ '^[0-9]{{1,40}}(\\.[0-9]{{1,40}})?$'
                   THEN (raw->>'quoteQty')::numeric
                   WHEN raw->>'fillValue' ~ '^[0-9]{{1,40}}(\\.[0-9]{{1,40}})?$'
                   THEN (raw->>'fillValue')::numeric END,
realized_pnl = CASE WHEN raw->>'realizedPnl' ~ '^-?[0-9]{{1,40}}(\\.[0-9]{{1,40}})?$'
                    THEN (raw->>'realizedPnl')::numeric
                    WHEN raw->>'realizePnl' ~ '^-?[0-9]{{1,40}}(\\.[0-9]{{1,40}})?$'
                    THEN (raw->>'realizePnl')::numeric END,
maker = CASE jsonb_typeof(raw->'maker') WHEN 'boolean' THEN (raw->>'maker')::boolean END,
position_side = CASE WHEN raw->>'positionSide' ~ '^[A-Z_]{{1,16}}$' THEN raw->>'positionSide' END"""
FILLS_PARTITIONING = " PARTITION BY RANGE (trade_time)"


def _own_key(conn: Conn, key: int) -> int:
    return schema_lock_key(key, getattr(conn, "schema", DatabaseConfig.schema))


# The first statement of a transaction that holds an advisory lock while other transactions
# do the work: pooler-safe (see Store.try_lock), and never ended by a DBA's
# idle_in_transaction_session_timeout while the work goes on.
HOLD_LOCK_SQL = (
    "SET LOCAL idle_in_transaction_session_timeout = 0; SELECT pg_try_advisory_xact_lock(%s)"
)


@contextlib.contextmanager
def held_lock(conn: Conn, key: int, patience: float = 0.0) -> Iterator[bool]:
    """Whether weex_sync's lock ``key`` (of conn's schema) is held for the block, waited for up
    to ``patience`` seconds: held by a transaction on a second connection to conn's database,
    while ``conn`` commits its steps (an upgrade or partition maintenance is several
    transactions, some of which cannot run in one)."""
    holder = sibling(conn)
    try:
        deadline = time.monotonic() + patience
        with holder.cursor() as cur:
            cur.execute(HOLD_LOCK_SQL, (_own_key(conn, key),))
            locked = bool(one_row(cur)[0])
            while not locked and time.monotonic() < deadline:
                time.sleep(0.2)
                cur.execute(HOLD_LOCK_SQL, (_own_key(conn, key),))
                locked = bool(one_row(cur)[0])
        yield locked
    finally:
        holder.close()


def relation_kind(conn: Conn, name: str) -> str | None:
    """'r' a table, 'p' a partitioned table, None: none by that name."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", (name,))
        row = cur.fetchone()
    return row[0] if row else None


def upgrade_status_table(conn: Conn) -> None:
    """Make a sync_status of weex_sync 3 or older (a plain table) the first partition of the
    partitioned one, without copying a row: a CHECK constraint on its time is validated first
    (a scan that blocks no one), so attaching it needs no scan under a lock; the table then
    covers everything before a day boundary two days ahead, the days' partitions the rest,
    and retention drops it whole once its last day is past sync.status_retention_days."""
    if relation_kind(conn, "sync_status") != "r":
        return
    until = utc_day(time.time()) + dt.timedelta(days=2)
    name = f"sync_status_until_{until:%Y%m%d}"
    log.info("upgrading sync_status: it becomes the partition %s (no rows are copied)", name)
    steps = [
        (STATUS_COLUMNS_SQL, ()),
        ("ALTER TABLE sync_status DROP CONSTRAINT IF EXISTS sync_status_until", ()),
        (
            (
                "ALTER TABLE sync_status ADD CONSTRAINT sync_status_until"
                " CHECK (last_sync_time < %s) NOT VALID"
            ),
            (until,),
        ),
        ("ALTER TABLE sync_status VALIDATE CONSTRAINT sync_status_until", ()),
    ]
    for statement, params in steps:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
    with conn, conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER TABLE sync_status RENAME TO {}").format(sql.Identifier(name)))
        cur.execute(STATUS_TABLE_SQL)
        cur.execute(
            sql.SQL(
                "ALTER TABLE sync_status ATTACH PARTITION {} FOR VALUES FROM (MINVALUE) TO (%s)"
            ).format(sql.Identifier(name)),
            (until,),
        )


def build_new_indexes(conn: Conn) -> None:
    """The indexes of FILLS_INDEXES missing on an existing trade_fills, built CONCURRENTLY (a
    pass keeps inserting meanwhile; a build cut short leaves an invalid index, dropped and
    built again here). A partitioned table cannot build them so: SCHEMA_SQL does, briefly
    blocking inserts."""
    if relation_kind(conn, "trade_fills") != "r":
        return
    schema = getattr(conn, "schema", DatabaseConfig.schema)
    # No transaction to pin the schema in: every name qualified; no session setting either
    # (a transaction pooler would hand it to another client). A build waits for the open
    # transactions on trade_fills, and blocks none.
    with autocommit(conn), conn.cursor() as cur:
        for name, how in FILLS_INDEXES.items():
            index = sql.Identifier(schema, name)
            cur.execute(
                "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
                (index.as_string(conn),),
            )
            row = cur.fetchone()
            if row is not None and row[0]:
                continue
            if row is not None:
                cur.execute(sql.SQL("DROP INDEX CONCURRENTLY {}").format(index))
            log.info("building index %s on trade_fills (concurrently)", name)
            cur.execute(
                sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} ").format(
                    sql.Identifier(name), sql.Identifier(schema, "trade_fills")
                )
                + sql.SQL(how)
            )


@contextlib.contextmanager
def autocommit(conn: Conn) -> Iterator[Conn]:
    """``conn`` in autocommit, for statements that cannot run in a transaction block."""
    before = conn.autocommit
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.autocommit = before


def utc_day(epoch: float) -> dt.datetime:
    """Midnight UTC of the day ``epoch`` falls in."""
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


RETENTION_LOCK_TIMEOUT = "2s"  # how long a drop waits for readers of sync_status; then: next pass
DELETE_OLD_DEFAULT_SQL = """
DELETE FROM sync_status_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM sync_status_default WHERE last_sync_time < %(cutoff)s LIMIT %(rows)s))
"""
STATUS_DAYS_AHEAD = 2  # days' partitions an owner's pass makes ahead
FILLS_MONTHS_AHEAD = 2
FILLS_MONTHS_BACK = 13  # made with the table: the v3 history (365 days) and a month
PARTITION_LOCK_KEY = 0x7765_6578_5F70_6172  # "wex_par": one process maintains partitions
STATUS_PARTITION_RE = re.compile(r"sync_status_(p|until_)(\d{8})")
FILLS_PARTITION_RE = re.compile(r"trade_fills_p(\d{6})")


def maintain_partitions(
    conn: Conn, partition_fills: str = "none", retention_days: int = 90, now: float | None = None
) -> None:
    """Days of sync_status made ahead and those past sync.status_retention_days dropped; with
    database.partition_fills: monthly, months of trade_fills made ahead. One process at a
    time (a try-lock: the others go on, what they need was made days ahead). A failure here
    is a WARNING: a pass that then cannot write a status row fails that pair, loudly."""
    now = time.time() if now is None else now
    try:
        with held_lock(conn, PARTITION_LOCK_KEY) as locked:
            if locked:
                run_partition_tasks(conn, partition_fills, retention_days, now)
    except psycopg2.Error as exc:
        log.warning("partition maintenance: %s", describe_db_error(exc))


def run_partition_tasks(conn: Conn, partition_fills: str, retention_days: int, now: float) -> None:
    """Each task in transactions of its own: one that fails is a WARNING, the others run. The
    DDL ones need the tables' owner: a role with only the documented grants runs the DELETE
    of old status rows from sync_status_default, where its status rows land."""
    tasks: list[tuple[Callable[..., None], tuple]] = [
        (delete_old_default_rows, (conn, retention_days, now)),
    ]
    if owns_tables(conn):
        tasks += [
            (status_days_ahead, (conn, now)),
            (drop_old_status_days, (conn, retention_days, now)),
            (fills_months_ahead, (conn, partition_fills, now)),
        ]
    for task, args in tasks:
        try:
            task(*args)
        except psycopg2.Error as exc:
            conn.rollback()
            log.warning("partition maintenance (%s): %s", task.__name__, describe_db_error(exc))


def owns_tables(conn: Conn) -> bool:
    """Whether this role may make and drop partitions: it owns the tables (or is a member of
    their owner) and may create tables in the schema."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT bool_and(pg_has_role(c.relowner, 'USAGE')"
            " AND has_schema_privilege(c.relnamespace, 'CREATE')), count(*)"
            " FROM pg_class c WHERE c.oid IN (to_regclass('sync_status'), to_regclass('trade_fills'))"
        )
        owns, found = one_row(cur)
    return bool(owns) and found == 2


def partitions(conn: Conn, table: str) -> dict[str, bool]:
    """The partitions of ``table``: name -> whether a detach of it is pending."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname, i.inhdetachpending FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
            (table,),
        )
        return dict(cur.fetchall())


def status_day_ranges(names: Iterable[str]) -> dict[str, tuple[dt.date | None, dt.date]]:
    """The days (first, last + 1) weex_sync's partitions of sync_status cover."""
    ranges: dict[str, tuple[dt.date | None, dt.date]] = {}
    for name in names:
        match = STATUS_PARTITION_RE.fullmatch(name)
        if match:
            day = dt.datetime.strptime(match[2], "%Y%m%d").date()
            ranges[name] = (day, day + dt.timedelta(days=1)) if match[1] == "p" else (None, day)
    return ranges


def status_days_ahead(conn: Conn, now: float) -> None:
    """Today's partition of sync_status and the next days' (sync_status has no indexes of its
    own: an upgraded table's differ from those made here, see upgrade_status_table)."""
    ranges = status_day_ranges(partitions(conn, "sync_status")).values()
    today = utc_day(now).date()
    for k in range(STATUS_DAYS_AHEAD + 1):
        day = today + dt.timedelta(days=k)
        if any((start is None or start <= day) and day < end for start, end in ranges):
            continue
        low = dt.datetime.combine(day, dt.time(), dt.UTC)
        bounds = ("last_sync_time", low, low + dt.timedelta(days=1))
        if in_default_partition(conn, "sync_status_default", bounds):
            continue  # written by a role that cannot make partitions: that day stays there
        attach_partition(
            conn,
            "sync_status",
            f"sync_status_p{day:%Y%m%d}",
            bounds,
            {"time": "last_sync_time", "pair": "user_id, symbol, last_sync_time"},
        )


def in_default_partition(conn: Conn, default: str, bounds: tuple[str, Any, Any]) -> bool:
    """Whether the ``default`` partition holds rows of ``bounds`` (column, from, to): then
    no partition of that range can be attached (PostgreSQL refuses, the rows being in the
    default), and the rows stay there. (Attaching any other range scans the default partition
    under a lock that holds off its writers: about 0.1 s per million rows.)"""
    column, low, high = bounds
    with conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} >= %s AND {} < %s)").format(
                sql.Identifier(default), sql.Identifier(column), sql.Identifier(column)
            ),
            (low, high),
        )
        return bool(one_row(cur)[0])


def attach_partition(
    conn: Conn, parent: str, name: str, bounds: tuple[str, Any, Any], indexes: dict[str, str]
) -> None:
    """``name`` as a partition of ``parent`` for ``bounds`` (column, from, to): made as a table
    of its own with a CHECK constraint that proves the bounds and its ``indexes`` (suffix ->
    columns), then attached -- ATTACH takes no lock a reader or a writer of ``parent`` waits
    for, and the constraint spares it a scan (CREATE TABLE ... PARTITION OF would lock them
    out). A partitioned table's own indexes are added to the partition by ATTACH."""
    column, low, high = bounds
    table = sql.Identifier(name)
    with conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
                table, sql.Identifier(parent)
            )
        )
        cur.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({} >= %s AND {} < %s)").format(
                table,
                sql.Identifier(f"{name}_bounds"),
                sql.Identifier(column),
                sql.Identifier(column),
            ),
            (low, high),
        )
        for suffix, columns in indexes.items():
            cur.execute(
                sql.SQL("CREATE INDEX {} ON {} (" + columns + ")").format(
                    sql.Identifier(f"{name}_{suffix}"), table
                )
            )
        cur.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM (%s) TO (%s)").format(
                sql.Identifier(parent), table
            ),
            (low, high),
        )


def drop_old_status_days(conn: Conn, days: int, now: float) -> None:
    """Drop the partitions of sync_status whose last day is older than
    sync.status_retention_days, one per transaction. DROP locks sync_status for a moment: it
    waits for open readers at most RETENTION_LOCK_TIMEOUT (those who queue behind it wait as
    long), then leaves the partition to a later pass. (DETACH ... CONCURRENTLY would lock no
    one, but PostgreSQL refuses it on a table with a default partition.)"""
    if not days:
        return
    cutoff = utc_day(now).date() - dt.timedelta(days=days)
    old = [name for name, (_, end) in status_day_ranges(partitions(conn, "sync_status")).items()
           if end <= cutoff]  # fmt: skip
    for name in sorted(old):
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = %s", (RETENTION_LOCK_TIMEOUT,))
                cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
        except psycopg2.errors.LockNotAvailable:
            log.warning(
                "partition maintenance: %s is not dropped yet: a transaction reading "
                "sync_status was open for over %s; a later pass drops it",
                name,
                RETENTION_LOCK_TIMEOUT,
            )
            return
        log.info(
            "dropped %s: status rows older than %s (sync.status_retention_days)",
            name,
            plural(days, "day"),
            extra={"event": "status_retention"},
        )


RETENTION_BATCH_ROWS = 5_000  # status rows deleted per transaction from sync_status_default
RETENTION_BATCHES = 200  # per pass at most: the next pass goes on


def delete_old_default_rows(conn: Conn, days: int, now: float) -> None:
    """Status rows older than sync.status_retention_days deleted from sync_status_default (the
    status rows of days without a partition: a role that cannot make partitions writes all
    its rows there), in small batches, each its own transaction, so no lock is held long."""
    if not days:
        return
    cutoff = utc_day(now) - dt.timedelta(days=days)
    for _ in range(RETENTION_BATCHES):
        with conn, conn.cursor() as cur:
            cur.execute(DELETE_OLD_DEFAULT_SQL, {"cutoff": cutoff, "rows": RETENTION_BATCH_ROWS})
            if cur.rowcount < RETENTION_BATCH_ROWS:
                return


def month_start(year: int, month: int) -> dt.datetime:
    return dt.datetime(year + (month - 1) // 12, (month - 1) % 12 + 1, 1, tzinfo=dt.UTC)


def first_fills_partitions(cur: psycopg2.extensions.cursor, now: float) -> None:
    """A new partitioned trade_fills gets its months (FILLS_MONTHS_BACK before this one,
    FILLS_MONTHS_AHEAD after) and its default partition in the transaction that creates it,
    under the schema's lock: no pass can insert a fill before its month exists (one that did
    would land in the default partition, and the month could then never be attached)."""
    cur.execute(
        "SELECT c.relkind, (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid)"
        " FROM pg_class c WHERE c.oid = 'trade_fills'::regclass"
    )
    kind, made = one_row(cur)
    if kind != "p" or made:
        return  # made before, or a plain table from before the option (fills_months_ahead warns)
    today = utc_day(now)
    for k in range(-FILLS_MONTHS_BACK, FILLS_MONTHS_AHEAD + 1):
        low = month_start(today.year, today.month + k)
        high = month_start(today.year, today.month + k + 1)
        cur.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF trade_fills FOR VALUES FROM (%s) TO (%s)").format(
                sql.Identifier(f"trade_fills_p{low:%Y%m}")
            ),
            (int(low.timestamp() * 1000), int(high.timestamp() * 1000)),
        )
    cur.execute("CREATE TABLE trade_fills_default PARTITION OF trade_fills DEFAULT")


def fills_months_ahead(conn: Conn, partition_fills: str, now: float) -> None:
    """With database.partition_fills: monthly, this month's partition of trade_fills and the
    next ones (on a new table: the 13 months before too), each attached as a table of its own;
    fills of a month without one go to trade_fills_default."""
    if partition_fills != "monthly":
        return
    if relation_kind(conn, "trade_fills") != "p":
        log.warning(
            "database.partition_fills is monthly, but trade_fills is not partitioned (it was "
            "created before): no partitions made (docs/tables.md)"
        )
        return
    existing = partitions(conn, "trade_fills")
    months = [m for m in existing if FILLS_PARTITION_RE.fullmatch(m)]
    today = utc_day(now)
    with conn, conn.cursor() as cur:
        if "trade_fills_default" not in existing:
            cur.execute("CREATE TABLE trade_fills_default PARTITION OF trade_fills DEFAULT")
    first = -FILLS_MONTHS_BACK if not months else 0
    for k in range(first, FILLS_MONTHS_AHEAD + 1):
        low, high = (
            month_start(today.year, today.month + k),
            month_start(today.year, today.month + k + 1),
        )
        name = f"trade_fills_p{low:%Y%m}"
        bounds = ("trade_time", int(low.timestamp() * 1000), int(high.timestamp() * 1000))
        if name in existing or in_default_partition(conn, "trade_fills_default", bounds):
            continue  # a month whose fills went to the default partition stays there
        attach_partition(conn, "trade_fills", name, bounds, {})


def prepare_database(cfg: Config) -> Conn:
    """Connect (creating the database if missing) and bring the schema up to date."""
    db = cfg.database
    try:
        conn = open_database(db)
    except StorageError as exc:
        raise StorageError(
            f"database unreachable ({db.host}:{db.port}/{db.dbname}): {exc}"
        ) from None
    try:
        require_utf8(conn)
        require_privileges(conn)  # first: without them, the schema would look missing
        ensure_schema(conn, db.partition_fills)
        maintain_partitions(conn, db.partition_fills, cfg.sync.status_retention_days)
    except StorageError as exc:
        conn.close()
        raise StorageError(f"database {db.host}:{db.port}/{db.dbname}: {exc}") from None
    except psycopg2.Error as exc:
        conn.close()
        raise StorageError(
            f"database {db.host}:{db.port}/{db.dbname}: {describe_db_error(exc)}"
        ) from None
    return conn


def require_utf8(conn: Conn) -> None:
    """An exchange's text (a message, a field of a fill) may hold any character: in a LATIN1 or
    SQL_ASCII database one it cannot store would stop an account, or lose a status row, on
    every pass. So weex_sync writes only to a UTF8 database (it creates its own so)."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_encoding_to_char(encoding) FROM pg_database"
                    " WHERE datname = current_database()")  # fmt: skip
        encoding = one_row(cur)[0]
    if encoding != "UTF8":
        raise StorageError(
            f"the database is encoded {encoding}; weex_sync needs UTF8 (exchange text may hold "
            "any character): let weex_sync create its database, or CREATE DATABASE … ENCODING "
            "'UTF8' TEMPLATE template0"
        )


def schema_version(conn: Conn) -> int:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('weex_sync_schema') IS NOT NULL")
        if not one_row(cur)[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM weex_sync_schema")
        return one_row(cur)[0]


USER_LOCK_CLASS = 0x7778  # pg_advisory_xact_lock(class, key): one writer per user's fills


def _key32(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(text.encode(), digest_size=4).digest(), "big", signed=True
    )


def lock_key(user_id: str, symbol: str, schema: str = DatabaseConfig.schema) -> int:
    """A stable signed 64-bit advisory-lock key for one (user, symbol) of one schema (the
    public schema's keys are 3.1's: its processes and 3.2's exclude each other)."""
    text = f"weex_sync\0{user_id}\0{symbol}" + (f"\0{schema}" if schema != "public" else "")
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def schema_lock_key(key: int, schema: str) -> int:
    """A lock key of weex_sync's own (the schema's, the partitions') for one schema: two
    deployments in two schemas of one database never wait for each other."""
    if schema == DatabaseConfig.schema:
        return key
    return key ^ int.from_bytes(hashlib.blake2b(schema.encode(), digest_size=7).digest(), "big")


def _columns(rows: Sequence[NamedTuple]) -> dict[str, list]:
    """Fills (or rejected fills) as one array per field: the parameters of an unnest()."""
    fields = type(rows[0])._fields if rows else ()
    return {name: [getattr(row, name) for row in rows] for name in fields}


class Saved(NamedTuple):
    """What storing a batch came to."""

    inserted: int
    late: int  # of inserted: fills that became visible after a walk had read their time
    rejected: int  # fills quarantined (or seen there again) that are still open
    quarantined: list[Rejected]
    newest: int | None  # the newest fill inserted


def _one_version(
    fills: list[Fill],
) -> tuple[list[Fill], dict[tuple[str, str], list[Fill]]]:
    """The batch's fills of one (order, trade) each, and those served in several versions
    (in two contracts of an ``all`` walk, or corrected while the walk was reading)."""
    by_key: dict[tuple[str, str], list[Fill]] = {}
    for f in fills:
        served = by_key.setdefault(f.identity, [])
        if not any(f.same_content(other) for other in served):
            served.append(f)
    singles = [served[0] for served in by_key.values() if len(served) == 1]
    return singles, {key: served for key, served in by_key.items() if len(served) > 1}


def _versions_reason(fill: Fill, served: list[Fill]) -> str:
    return (
        f"fill tradeId={fill.trade_id} of order {fill.order_id} was served in {len(served)} "
        f"versions ({', '.join(sorted({f.symbol for f in served}))}); none is stored until one "
        "version is served alone"
    )


def _correction(fill: Fill, stored: tuple) -> Rejected:
    symbol, side, price, size, fee, trade_time = stored
    kept = fill._replace(
        symbol=symbol, side=side, price=price, size=size, fee=fee, trade_time=trade_time
    )
    return fill_rejected(fill, _correction_reason(kept, fill))


def _correction_reason(stored: Fill, served: Fill) -> str:
    changed = [
        f"{name} {getattr(stored, name)} -> {getattr(served, name)}"
        for name in ("symbol", "side", "price", "size", "fee", "trade_time")
        if getattr(stored, name) != getattr(served, name)
    ]
    return (
        f"correction: fill tradeId={served.trade_id} of order {served.order_id} is stored with "
        f"other contents ({', '.join(changed)}); the stored row is kept"
    )


def _distinct_rejected(rejected: list[Rejected]) -> list[Rejected]:
    return list({r.fingerprint: r for r in rejected}.values())


class Store:
    """The PostgreSQL connections of one worker and every statement a pass runs on them. Each
    psycopg2 error leaves as StorageError and drops the connection, so the next call
    reconnects (a pair lock dies with its transaction, as it should)."""

    def __init__(self, db: DatabaseConfig) -> None:
        self.db = db
        self._conn: Conn | None = None
        self._locks: Conn | None = None  # holds the pair lock's transaction (see try_lock)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg2.extensions.cursor]:
        """A transaction: exactly this block, committed at its end, rolled back by an error."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.db)
            conn = self._conn
            try:
                with conn.cursor() as cur:
                    yield cur
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        except psycopg2.Error as exc:
            self.close()
            raise StorageError(f"database error: {describe_db_error(exc)}") from None

    def close(self) -> None:
        for conn in (self._conn, self._locks):
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()
        self._conn = self._locks = None

    def try_lock(self, user_id: str, symbol: str) -> bool:
        """The pair's lock, if no one holds it (never waits): a transaction-level advisory lock
        in a transaction of a connection of its own, open until unlock(). A transaction
        pooler (pgbouncer) keeps that client on one server connection while it is open, and
        PostgreSQL drops the lock if this process dies: no session state that could outlive
        it. Called again while not got, it tries again in the same transaction."""
        try:
            if self._locks is None or self._locks.closed:
                self._locks = connect(self.db)
            with self._locks.cursor() as cur:
                cur.execute(HOLD_LOCK_SQL, (lock_key(user_id, symbol, self.db.schema),))
                return bool(one_row(cur)[0])
        except psycopg2.Error as exc:
            self.close()
            raise StorageError(f"database error: {describe_db_error(exc)}") from None

    def unlock(self) -> None:
        """Ends the lock transaction: the pair's lock (if got) is released."""
        if self._locks is not None:
            with contextlib.suppress(psycopg2.Error):
                self._locks.rollback()

    def load_state(self, user_id: str, symbol: str) -> tuple[Cursor | None, int | None]:
        """The pair's cursor and the time of its newest stored fill (what the cursor rule
        reads), in one transaction."""
        with self.transaction() as cur:
            cursor = self.read_cursor(cur, user_id, symbol)
            cur.execute(
                "SELECT last_trade_time FROM sync_latest WHERE user_id = %s AND symbol = %s",
                (user_id, symbol),
            )
            known = cur.fetchone()
            newest = None
            if known is not None and known[0] is not None:
                newest = self._newest(cur, user_id, symbol, known[0])
            if newest is None:
                newest = self._newest(cur, user_id, symbol, MIN_BIGINT)
        return cursor, newest

    @staticmethod
    def read_cursor(cur: psycopg2.extensions.cursor, user_id: str, symbol: str) -> Cursor | None:
        """The pair's cursor as committed, in the transaction of ``cur``."""
        cur.execute(
            f"SELECT {', '.join(CURSOR_FIELDS)} FROM sync_cursor WHERE user_id = %s AND symbol = %s",
            (user_id, symbol),
        )
        row = cur.fetchone()
        return Cursor(**dict(zip(CURSOR_FIELDS, row, strict=True))) if row else None

    @staticmethod
    def _newest(
        cur: psycopg2.extensions.cursor, user_id: str, symbol: str, floor: int
    ) -> int | None:
        query = NEWEST_FILL_SQL[symbol == ALL_SYMBOLS]
        cur.execute(query, {"user_id": user_id, "symbol": symbol, "floor": floor})
        return one_row(cur)[0]

    def claim(self, keys: list[str], pass_id: str, interval: int, since: dt.datetime) -> set[str]:
        """The keys this pass now holds (see CLAIM_SQL)."""
        with self.transaction() as cur:
            params = {"keys": keys, "by": pass_id, "interval": interval, "since": since}
            cur.execute(CLAIM_SQL, params)
            return {row[0] for row in cur.fetchall()}

    def claim_holders(self, keys: list[str]) -> dict[str, tuple[dt.datetime, str]]:
        """Who claimed these keys, and when."""
        with self.transaction() as cur:
            cur.execute(
                "SELECT claim_key, claimed_at, claimed_by FROM sync_claims"
                " WHERE claim_key = ANY(%s)",
                (keys,),
            )
            return {key: (at, by) for key, at, by in cur.fetchall()}

    def release(self, keys: list[str], pass_id: str) -> None:
        with self.transaction() as cur:
            cur.execute(RELEASE_CLAIMS_SQL, {"keys": keys, "by": pass_id})

    def back_off(
        self, user: UserConfig, failures: int, wait: float, cause: SyncError
    ) -> dt.datetime:
        """Record the user's ``failures``-th refused pass in a row; when it is next tried."""
        params = {
            "user": user.user_id,
            "fingerprint": user.fingerprint,
            "failures": failures,
            "wait": wait,
            "kind": cause.kind,
            "error": str(cause),
        }
        with self.transaction() as cur:
            cur.execute(BACKOFF_SQL, params)
            return one_row(cur)[0]

    def end_backoff(self, user_id: str) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM sync_backoff WHERE user_id = %s", (user_id,))

    def save_batch(
        self,
        user_id: str,
        symbol: str,
        batch: Batch,
        cursor: Cursor | None,
        late_before: int | None,
        claim: tuple[str, str] | None = None,
    ) -> Saved:
        """write_batch in a transaction of its own."""
        with self.transaction() as cur:
            write = BatchWrite(batch, cursor, late_before, claim)
            return self.write_batch(cur, user_id, symbol, write)

    def write_batch(
        self, cur: psycopg2.extensions.cursor, user_id: str, symbol: str, write: BatchWrite
    ) -> Saved:
        """In the transaction of ``cur``: insert the batch's fills, quarantine its rejected ones
        and the corrections it holds (a fill whose (order, trade) is stored with other
        contents or another time: the stored row is kept), move the cursor (unless None) and
        renew the pass's claim."""
        batch, cursor, late_before, claim = write
        fills, versions = _one_version(batch.fills)
        rejected = list(batch.rejected)
        inserted = late = 0
        newest = None
        # One writer of a user's fills at a time: the pair locks are per (user, symbol),
        # and a re-scan of one contract may run beside the user's all-contracts walk.
        owner = user_id if self.db.schema == "public" else f"{self.db.schema}\0{user_id}"
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (USER_LOCK_CLASS, _key32(owner)))
        if versions:  # compared with the stored fill if there is one, else all rejected
            stored = self._stored_keys(cur, user_id, list(versions))
            for key, served in versions.items():
                if key in stored:
                    fills += served
                else:
                    rejected += [fill_rejected(f, _versions_reason(f, served)) for f in served]
        ids = self._quarantine(cur, user_id, rejected)  # first: a valid version below resolves
        if fills:
            columns = _columns(fills)
            cur.execute(
                INSERT_FILLS_SQL, {**columns, "user_id": user_id, "late_before": late_before}
            )
            inserted, late, _, newest = one_row(cur)
            if inserted < len(fills):
                cur.execute(
                    CORRECTIONS_SQL,
                    {**columns, "user_id": user_id, "n": list(range(len(fills)))},
                )
                corrections = [_correction(fills[row[0]], row[1:]) for row in cur.fetchall()]
                ids += self._quarantine(cur, user_id, corrections)
                rejected += corrections
        still_open = 0
        if ids:
            cur.execute(
                "SELECT count(*) FROM rejected_fills WHERE id = ANY(%s) AND resolved_at IS NULL",
                (ids,),
            )
            still_open = one_row(cur)[0]
        if cursor is not None:
            cur.execute(SAVE_CURSOR_SQL, {"user_id": user_id, "symbol": symbol, **asdict(cursor)})
        if claim is not None:  # the claim of a pass at work does not expire
            cur.execute(RENEW_CLAIM_SQL, claim)
        return Saved(inserted, late, still_open, _distinct_rejected(rejected), newest)

    @staticmethod
    def _quarantine(
        cur: psycopg2.extensions.cursor, user_id: str, rejected: list[Rejected]
    ) -> list[int]:
        """Put fills in rejected_fills (once each); their rows' ids."""
        if not rejected:
            return []
        distinct = _distinct_rejected(rejected)
        columns = {**_columns(distinct), "fingerprint": [r.fingerprint for r in distinct]}
        cur.execute(QUARANTINE_SQL, {**columns, "user_id": user_id})
        return [row[0] for row in cur.fetchall()]

    @staticmethod
    def _stored_keys(
        cur: psycopg2.extensions.cursor, user_id: str, keys: list[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        cur.execute(
            "SELECT DISTINCT order_id, trade_id FROM trade_fills WHERE user_id = %s"
            " AND (order_id, trade_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            (user_id, [k[0] for k in keys], [k[1] for k in keys]),
        )
        return {(o, t) for o, t in cur.fetchall()}

    def count_new(self, user_id: str, fills: list[Fill]) -> int:
        """How many of these fills a pass would insert (read only, for --dry-run): those of one
        version in the batch whose identity is not stored."""
        singles, _ = _one_version(fills)
        if not singles:
            return 0
        with self.transaction() as cur:
            stored = self._stored_keys(cur, user_id, [f.identity for f in singles])
        return sum(f.identity not in stored for f in singles)

    @staticmethod
    def record_status(cur: psycopg2.extensions.cursor, row: StatusRow) -> None:
        """The pair's status row and latest state, in the transaction of ``cur``."""
        cur.execute(INSERT_STATUS_SQL, asdict(row))


# =============================================================================================
# 9. The pass: PairSync for one (user, symbol), SyncPass for all of them
# =============================================================================================

STOP_GRACE_SECONDS = 5.0  # after a stop request, requests in flight get this long to finish

REJECTED_LOG_LIMIT = 5  # rejected fills logged one by one per pair and pass (all are stored)
ERROR_LIMIT = 500  # characters of an error message kept in sync_status and the log


@dataclass(frozen=True)
class PassOptions:
    """dry_run: fetch and count, write nothing. since/until: re-scan that range (ms; until None
    = now) without moving the cursor. lock_wait: how long a re-scan waits for a pair another
    pass is syncing. max_seconds: start no new pair after this long (0: no limit)."""

    dry_run: bool = False
    since: int | None = None
    until: int | None = None
    lock_wait: float = 60.0
    max_seconds: float = 0.0
    min_interval: int = 0  # claim a user only if no pass claimed it this recently (0: no claims)
    interval: int = 60  # seconds between passes (cron's, or --loop's)

    @property
    def repair(self) -> bool:
        return self.since is not None

    @property
    def claims(self) -> bool:
        """Whether the pass claims users: a normal pass does; a re-scan or a dry run does not."""
        return self.min_interval > 0 and not (self.repair or self.dry_run)


class PairStatus(enum.StrEnum):
    """How a (user, symbol) came out of a pass. Only SUCCESS and ERROR (INTERRUPTED is
    recorded as an error) make a sync_status row."""

    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"  # another pass holds its lock
    INTERRUPTED = "interrupted"  # a stop signal
    LEFT = "left"  # the time limit (--max-seconds): the next pass starts with it
    FRESH = "fresh"  # another pass claimed its user within sync.min_interval_seconds


@dataclass
class Outcome:
    """What one (user, symbol) came to in a pass. It reports itself: a log line, a status row."""

    user_id: str
    symbol: str
    status: PairStatus = PairStatus.SUCCESS
    fetched: int = 0
    inserted: int = 0
    late: int = 0
    rejected: int = 0  # fills quarantined this pass that are still open
    quarantined: int = 0  # every fill quarantined (or seen there again) this pass
    requests: int = 0
    duration_ms: int = 0
    error: str | None = None
    cause: SyncError | None = field(default=None, repr=False)
    first_rejection: str | None = None
    newest: int | None = None  # the newest stored fill of the pair, once read
    unstored: int = 0  # new fills of the last batch, rolled back with its status row

    @property
    def name(self) -> str:
        return f"{self.user_id}/{self.symbol}"

    @property
    def present(self) -> int:
        """Fills received that were stored already (not those a rolled-back batch held)."""
        return self.fetched - self.inserted - self.quarantined - self.unstored

    @property
    def recorded(self) -> bool:
        """Whether it makes a sync_status row (an interruption is recorded as an error)."""
        return self.status in (PairStatus.SUCCESS, PairStatus.ERROR, PairStatus.INTERRUPTED)

    def fail(self, cause: SyncError) -> None:
        self.status, self.error, self.cause = PairStatus.ERROR, str(cause), cause

    def count(self, saved: Saved, size: int) -> Outcome:
        """Count a committed batch of ``size`` fills (rejected ones included)."""
        self.inserted += saved.inserted
        self.late += saved.late
        self.note_rejected(saved.quarantined, saved.rejected)
        self.newest = max_known(self.newest, saved.newest)
        self.fetched += size
        return self

    def counted(self, saved: Saved, size: int) -> Outcome:
        """A copy that counts a batch, to be true once its transaction commits."""
        return replace(self).count(saved, size)

    def judged(self) -> Outcome:
        """A walk that succeeded but quarantined fills still open fails its pair (a copy)."""
        if self.status != PairStatus.SUCCESS or not self.rejected:
            return self
        judged = replace(self)
        judged.fail(
            BadData(
                f"{plural(self.rejected, 'fill')} rejected (kept in rejected_fills; the other "
                f"fills are stored): {self.first_rejection}"
            )
        )
        return judged

    def lost(self, cause: SyncError) -> Outcome:
        """This outcome, failed by ``cause``: its last batch could not be written (not counted,
        as no batch is that did not commit) (a copy)."""
        failed = replace(self)
        failed.fail(cause)
        return failed

    def unrecorded(self, reason: str, saved: Saved | None = None, size: int = 0) -> Outcome:
        """This outcome, whose status row (and the last batch of ``size`` fills it carried,
        ``saved``) could not be written: an error, never an ok (a copy). The batch's fills that
        were new count as unstored; those stored before stay present."""
        lost = saved.inserted + len(saved.quarantined) if saved else 0
        failed = replace(self, fetched=self.fetched + size, unstored=self.unstored + lost)
        if self.status == PairStatus.ERROR:
            log.error("%s: cannot record sync_status: %s", self.name, reason)
        else:
            failed.fail(
                StorageError(
                    "cannot record sync_status, so the pass's last batch is not stored either "
                    f"(the next pass reads it again): {reason}"
                )
            )
        return failed

    def note_rejected(self, rejected: list[Rejected], still_open: int) -> None:
        """Count fills put in the quarantine, and log the first few of each pass."""
        for r in rejected[: max(0, REJECTED_LOG_LIMIT - self.quarantined)]:
            log.warning(
                "%s: fill rejected: %s",
                self.name,
                r.reason,
                extra={"event": "fill_rejected", "user": self.user_id, "symbol": self.symbol},
            )
        self.quarantined += len(rejected)
        self.rejected += still_open
        if rejected and self.first_rejection is None:
            self.first_rejection = rejected[0].reason

    def status_row(self, pass_id: str, cursor: Cursor | None, lookback_ms: int) -> StatusRow:
        """Its sync_status row; ``cursor``: the pair's as committed (None: it has none)."""
        success = self.status == PairStatus.SUCCESS
        interrupted = self.status == PairStatus.INTERRUPTED
        kind = self.cause.kind if self.cause else "internal"
        return StatusRow(
            pass_id=pass_id,
            user_id=self.user_id,
            symbol=self.symbol,
            last_trade_time=self.newest,
            records_count=self.inserted,
            fetched_count=self.fetched,
            requests_count=self.requests,
            duration_ms=self.duration_ms,
            status="success" if success else "error",
            error_message=(
                "interrupted by a stop signal; the next pass resumes" if interrupted else self.error
            ),
            late_count=self.late,
            rejected_count=self.rejected,
            synced_through=cursor.complete_through(lookback_ms) if cursor else None,
            error_kind=None if success else "interrupted" if interrupted else kind,
        )

    def log(self, dry_run: bool) -> None:
        new = "new" if dry_run else "inserted"
        unstored = f" unstored={self.unstored}" if self.unstored else ""
        counts = (
            f"fetched={self.fetched} {new}={self.inserted} present={self.present}{unstored}"
            f" late={self.late} rejected={self.quarantined} requests={self.requests}"
            f" duration_ms={self.duration_ms}"
        )
        fields = {
            "user": self.user_id,
            "symbol": self.symbol,
            "fetched": self.fetched,
            "inserted": self.inserted,
            "present": self.present,
            "unstored": self.unstored,
            "late": self.late,
            "rejected": self.quarantined,
            "requests": self.requests,
            "duration_ms": self.duration_ms,
        }
        if self.status == PairStatus.SUCCESS:
            log.info("%s: ok %s", self.name, counts, extra={"event": "synced", **fields})
        elif self.status == PairStatus.ERROR:
            log.error(
                "%s: error %s: %s",
                self.name,
                counts,
                self.error,
                extra={"event": "sync_error", "error": self.error, **fields},
            )
        elif self.status == PairStatus.INTERRUPTED:
            log.warning(
                "%s: interrupted after %d new fills; the next pass resumes where this one stopped",
                self.name,
                self.inserted,
                extra={"event": "interrupted", **fields},
            )
        elif self.status == PairStatus.SKIPPED:
            log.warning(
                "%s: skipped, another weex_sync process is syncing it",
                self.name,
                extra={"event": "skipped", **fields},
            )
        elif self.status == PairStatus.FRESH:
            log.debug("%s: claimed by another pass a moment ago; not synced again", self.name)
        else:
            log.debug("%s: left for the next pass (time limit)", self.name)


class Progress:
    """Logs a progress line every few seconds while a long walk is running."""

    EVERY_SECONDS = 5.0

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.started = time.monotonic()
        self.last = self.started

    def update(self, batch: Batch) -> None:
        now = time.monotonic()
        if now - self.last < self.EVERY_SECONDS or not batch.fills:
            return
        self.last = now
        rate = self.outcome.fetched / max(now - self.started, 1e-9)
        log.info(
            "%s: backfill reached %s, %d fills so far (%.0f fills/s)",
            self.outcome.name,
            format_ms(batch.fills[-1].trade_time),
            self.outcome.fetched,
            rate,
            extra={
                "event": "progress",
                "user": self.outcome.user_id,
                "symbol": self.outcome.symbol,
                "fetched": self.outcome.fetched,
            },
        )


@dataclass
class PassContext:
    """What every pair of one pass shares."""

    cfg: Config
    options: PassOptions
    stop: Stop
    clock: ServerClock
    limiter: RateLimiter
    redact: Redactor
    pass_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: HostWatch = field(default_factory=HostWatch)


class Worker:
    """The resources of one pool thread, reused for every pair it syncs: one HTTP session and
    one database connection (never one per request)."""

    def __init__(self, cfg: Config) -> None:
        self.session = make_session(cfg.weex)
        self.store = Store(cfg.database)

    def close(self) -> None:
        self.store.close()
        self.session.close()


class PairSync:
    """One (user, symbol) -- ``scope`` ALL_SYMBOLS: every contract of the account -- end to end,
    the unit of work of a pass: its lock, its state, the walk's plan (plan_walk, or a --since
    re-scan's range), each batch committed with its cursor, and the walk's last batch committed
    with the pair's status row in one ``with store.transaction()`` (finish): a status row
    never counts fills that are not stored, nor is a last batch stored without its status row.
    Whatever happens ends up in the Outcome, never in an exception."""

    def __init__(self, ctx: PassContext, worker: Worker, user: UserConfig, scope: str) -> None:
        self.ctx, self.store = ctx, worker.store
        self.outcome = Outcome(user.user_id, scope)
        self.stop = Stop(ctx.stop)
        patience = max(THROTTLE_PATIENCE_SECONDS, ctx.options.interval)
        self.client = FillsClient(
            ctx.cfg.weex,
            user,
            worker.session,
            ctx.clock,
            ctx.limiter,
            self.stop,
            ctx.host,
            patience,
        )
        self.cursor: Cursor | None = None  # the pair's cursor as committed, once read
        self.last: BatchWrite | None = None  # the walk's last batch: committed by finish()

    def run(self) -> Outcome:
        outcome, options = self.outcome, self.ctx.options
        started = time.monotonic()
        with contextlib.ExitStack() as held:
            try:
                if held.enter_context(pair_lock(self.store, outcome, self.ctx)):
                    self.walk()
                elif options.repair:
                    raise ExchangeError(
                        f"not re-scanned: another weex_sync pass held this pair for "
                        f"{options.lock_wait:.0f}s; run the re-scan again (--lock-wait N)"
                    )
                else:
                    outcome.status = PairStatus.SKIPPED
            except Interrupted:
                outcome.status = PairStatus.INTERRUPTED
            except SyncError as exc:
                outcome.fail(exc)
            except Exception as exc:  # one pair's bug must not stop the pass
                log.exception("%s: unexpected error", outcome.name)
                outcome.fail(internal_error(exc))
            finally:
                outcome.requests = self.client.requests_made
                outcome.duration_ms = int((time.monotonic() - started) * 1000)
            self.outcome = finish(self.ctx, self.store, outcome, self.last, self.cursor)
        return self.outcome  # (recorded while the pair's lock is held)

    def walk(self) -> None:
        """Plan the walk and store each batch with its cursor in one transaction, so a pass
        killed at any moment resumes exactly where its last commit left off. A re-scan
        (--since) or a dry run never moves the cursor."""
        ctx, outcome, options, store = self.ctx, self.outcome, self.ctx.options, self.store
        end = ctx.clock.walk_end()
        self.cursor, newest = store.load_state(outcome.user_id, outcome.symbol)
        plan = self.plan(end, newest)
        log_plan(plan, self.cursor, outcome, self.client.api)
        moves_cursor = not (options.repair or options.dry_run)
        claim = (claim_key(self.client.user), ctx.pass_id) if options.claims else None
        outcome.newest = newest
        progress = Progress(outcome)
        walk = Walk(self.client, outcome.symbol, plan, ctx.cfg.sync.page_size)
        with prefetch(walk.batches(), self.stop, depth=2 * BATCH_PAGES) as prefetched:
            for batch in batched(prefetched, ctx.stop.is_set):
                cursor = batch.cursor if moves_cursor else None
                write = BatchWrite(batch, cursor, plan.late_before, claim)
                if options.dry_run:
                    outcome.inserted += store.count_new(outcome.user_id, batch.fills)
                    outcome.note_rejected(batch.rejected, len(batch.rejected))
                    outcome.fetched += batch.size
                elif batch.done:
                    self.last = write  # committed with the status row
                elif batch.fills or batch.rejected or (cursor and cursor != self.cursor):
                    with store.transaction() as cur:
                        saved = store.write_batch(cur, outcome.user_id, outcome.symbol, write)
                    outcome.count(saved, batch.size)
                    self.cursor = cursor or self.cursor
                else:
                    outcome.fetched += batch.size
                progress.update(batch)
                if ctx.stop.is_set() and not batch.done:
                    raise Interrupted()

    def plan(self, end: int, newest: int | None) -> WalkPlan:
        """The cursor rule's walk, or a --since re-scan's range (up to --until)."""
        options, api = self.ctx.options, self.client.api
        if not options.repair:
            return plan_walk(self.cursor, newest, CursorRule.of(self.ctx.cfg.sync), api, end)
        until = end if options.until is None else min(end, options.until)
        since = options.since if options.since is not None else until
        rescan = WalkPlan(
            ranges=((since, until),),
            end=until,
            base=Cursor(since),
            late_before=None,
            reconcile=False,
            reconcile_due=False,
            horizon=None,
        )
        return _with_horizon(rescan, api)


def finish(
    ctx: PassContext,
    store: Store,
    outcome: Outcome,
    last: BatchWrite | None = None,
    cursor: Cursor | None = None,
) -> Outcome:
    """The pair's status row (none for a pair skipped or left, nor in a dry run) and the walk's
    ``last`` batch in one transaction, then its log line; the outcome as recorded. It counts
    the batch once committed. A batch that cannot be written fails the pair, whose status row
    is then written alone; a status row that cannot be written fails the pair too (never an
    ok without its row), its batch with it. A batch not written counts as unstored: the next
    pass reads it again. ``cursor``: the pair's cursor as committed before, if read."""
    if outcome.error:
        outcome.error = printable(ctx.redact(outcome.error), ERROR_LIMIT)
    saved: Saved | None = None
    try:
        if ctx.options.dry_run or not outcome.recorded:
            done = outcome.judged()
        else:
            with store.transaction() as cur:
                done = outcome
                if last is not None:
                    saved = store.write_batch(cur, outcome.user_id, outcome.symbol, last)
                    done = outcome.counted(saved, last.batch.size)
                    cursor = last.cursor or cursor
                if cursor is None:  # not read this pass (it failed before): as committed
                    cursor = store.read_cursor(cur, outcome.user_id, outcome.symbol)
                done = done.judged()
                lookback_ms = ctx.cfg.sync.lookback_seconds * SECOND_MS
                store.record_status(cur, done.status_row(ctx.pass_id, cursor, lookback_ms))
    except Exception as exc:
        if not isinstance(exc, SyncError):  # logged with its traceback; the pass goes on
            log.exception("%s: cannot store its last batch or sync_status", outcome.name)
        error = exc if isinstance(exc, SyncError) else internal_error(exc)
        if last is not None and saved is None:  # the batch failed: the status row alone
            return finish(ctx, store, outcome.lost(error), None, cursor)
        reason = printable(ctx.redact(str(error)), ERROR_LIMIT)
        done = outcome.unrecorded(reason, saved, last.batch.size if last is not None else 0)
    done.log(ctx.options.dry_run)
    return done


def internal_error(exc: Exception) -> SyncError:
    return SyncError(f"internal error: {printable(str(exc) or type(exc).__name__)}")


@contextlib.contextmanager
def pair_lock(store: Store, outcome: Outcome, ctx: PassContext) -> Iterator[bool]:
    """The pair's advisory lock, or False if another pass holds it. A normal pass never waits
    (the holder is doing the work); a --since re-scan waits up to --lock-wait seconds, since
    skipping would silently not repair anything."""
    try:
        locked = store.try_lock(outcome.user_id, outcome.symbol)
        if not locked and ctx.options.repair and ctx.options.lock_wait > 0:
            log.info(
                "%s: another weex_sync pass is syncing it; waiting up to %.0fs",
                outcome.name,
                ctx.options.lock_wait,
            )
            deadline = time.monotonic() + ctx.options.lock_wait
            while not locked and time.monotonic() < deadline:
                if ctx.stop.wait(0.5):
                    raise Interrupted()
                locked = store.try_lock(outcome.user_id, outcome.symbol)
        yield locked
    finally:
        store.unlock()


def log_plan(plan: WalkPlan, cursor: Cursor | None, outcome: Outcome, api: Api) -> None:
    """One INFO line for what a walk does beyond the usual: resume, reconcile, horizon."""
    fields = {"user": outcome.user_id, "symbol": outcome.symbol}
    if cursor is not None and cursor.walk_end is not None:
        log.info(
            "%s: resuming an interrupted walk over %s .. %s",
            outcome.name,
            format_ms(cursor.synced_through),
            format_ms(cursor.walk_end),
            extra={"event": "resume", **fields},
        )
    if plan.reconcile_due and plan.ranges:
        log.info(
            "%s: reconcile: re-reading from %s (sync.reconcile_window_seconds)",
            outcome.name,
            format_ms(plan.ranges[-1][0]),
            extra={"event": "reconcile", **fields},
        )
    if plan.horizon is not None:
        log.info(
            "%s: starting at %s, the exchange's %d-day horizon (fills before it are not served)",
            outcome.name,
            format_ms(plan.horizon),
            (api.horizon_ms or 0) // DAY_MS,
            extra={"event": "horizon", **fields},
        )


def claim_key(user: UserConfig) -> str:
    """What a pass claims: the user, or the WEEX account its key belongs to (one budget)."""
    return f"account {user.account}" if user.account else f"user {user.user_id}"


class Backoff(NamedTuple):
    """A sync_backoff row: a user whose credentials or access the exchange refused."""

    fingerprint: str
    failures: int
    next_try: dt.datetime
    error_kind: str
    error: str


BACKOFF_KINDS = frozenset({"credentials", "access"})  # refusals WEEX may punish if repeated
USER_BACKOFF_CAP_SECONDS = 3600


def backoff_wait(failures: int, interval: int) -> float:
    """How long after its ``failures``-th refused pass in a row a user is left alone: none (the
    next pass tries), then 1, 3, 7 ... intervals (every other pass, every fourth ...), at most
    an hour. Half an interval early, so the pass that is due is not missed by a second."""
    return min(interval * (2 ** (min(failures, 16) - 1) - 0.5), USER_BACKOFF_CAP_SECONDS)


def load_backoffs(conn: Conn) -> dict[str, Backoff]:
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT user_id, fingerprint, failures, next_try, error_kind, error_message"
                " FROM sync_backoff"
            )
            return {row[0]: Backoff(*row[1:]) for row in cur.fetchall()}
    except psycopg2.Error as exc:
        raise StorageError(f"database error: {describe_db_error(exc)}") from None


def stalest_first(conn: Conn, users: list[UserConfig]) -> tuple[list[UserConfig], dt.datetime]:
    """Users synced (or claimed) least recently first (never: before all), so a pass cut short
    by --max-seconds leaves the freshest for the next one, and passes of several machines meet
    the same order; and the database's time now (the pass's start, for its claims)."""
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT now()")
            started = one_row(cur)[0]
            cur.execute("SELECT claim_key, claimed_at FROM sync_claims")
            claimed = dict(cur.fetchall())
            cur.execute("SELECT user_id, symbol, updated_at FROM sync_cursor")
            synced = {(u, s): t for u, s, t in cur.fetchall()}
    except psycopg2.Error as exc:
        raise StorageError(f"database error: {describe_db_error(exc)}") from None
    never = dt.datetime.min.replace(tzinfo=dt.UTC)

    def staleness(user: UserConfig) -> dt.datetime:
        moved = min(synced.get((user.user_id, s), never) for s in user.symbols)
        return max(claimed.get(claim_key(user), never), moved)

    return sorted(users, key=staleness), started


class Claims:
    """The users this pass holds. Claimed a chunk at a time just ahead of the workers, in the
    pass's order (one statement per chunk of as many users as there are workers: a few
    transactions fewer than one per user, and never much more claimed than the workers are
    about to sync, which other passes would then have to leave alone), never a user another
    pass claimed within ``min_interval`` seconds or since ``started`` (the pass's start: once
    all are synced, passes that run on do not start over)."""

    def __init__(self, ctx: PassContext, users: list[UserConfig], started: dt.datetime) -> None:
        self.ctx = ctx
        self.started = started
        self.chunk = max(1, ctx.cfg.sync.workers)
        self.keys = list(dict.fromkeys(claim_key(u) for u in users))
        self.position = {key: i for i, key in enumerate(self.keys)}
        self.held: dict[str, bool] = {}
        self.others: dict[str, tuple[dt.datetime, str]] = {}  # key -> (claimed_at, pass id)
        self._lock = threading.Lock()

    def holds(self, user: UserConfig, store: Store) -> bool:
        key = claim_key(user)
        with self._lock:
            if key not in self.held:
                ahead = self.keys[self.position[key] :]
                chunk = [k for k in ahead if k not in self.held][: self.chunk]
                got = store.claim(
                    chunk, self.ctx.pass_id, self.ctx.options.min_interval, self.started
                )
                self.held.update((k, k in got) for k in chunk)
                if len(got) < len(chunk):  # who holds the others, for the pass's summary
                    self.others.update(store.claim_holders([k for k in chunk if k not in got]))
            return self.held[key]

    def latest_other(self) -> tuple[dt.datetime, str] | None:
        """The most recent claim of another pass this pass found: (when, which pass)."""
        return max(self.others.values(), default=None)

    def release(self, users: Iterable[UserConfig], store: Store) -> None:
        keys = [claim_key(u) for u in users if self.held.get(claim_key(u))]
        if keys:
            with contextlib.suppress(SyncError):
                store.release(keys, self.ctx.pass_id)


def log_pass_start(ctx: PassContext, users: list[UserConfig]) -> None:
    options = ctx.options
    mode = " (dry run)" if options.dry_run else ""
    if options.repair:
        until = format_ms(options.until) if options.until else "now"
        mode += f" (re-scan {format_ms(options.since)} .. {until})"
    pairs = sum(len(u.symbols) for u in users)
    log.info(
        "pass %s started%s: %s, %s, %d workers, API v%d",
        ctx.pass_id,
        mode,
        plural(len(users), "user"),
        plural(pairs, "(user, symbol) pair"),
        ctx.cfg.sync.workers,
        ctx.cfg.weex.api_version,
        extra={"event": "pass_start", "pass_id": ctx.pass_id},
    )


CLOCK_WARN_MS = 60_000  # an exchange clock this far from this machine's is worth a WARNING


def log_pass_summary(
    ctx: PassContext,
    outcomes: list[Outcome],
    seconds: float,
    refusals: int,
    fresh_by: tuple[dt.datetime, str] | None = None,
) -> None:
    offset = ctx.clock.offset_ms
    if abs(offset) >= CLOCK_WARN_MS:
        log.warning(
            "pass %s: the exchange's clock is %+.1f s from this machine's (walks end at the "
            "exchange's time, and --status measures 'synced through' against this machine's): "
            "check NTP here, or the exchange's time endpoint",
            ctx.pass_id,
            offset / SECOND_MS,
            extra={"event": "clock_offset", "pass_id": ctx.pass_id},
        )
    counts = {s.value: sum(o.status == s for o in outcomes) for s in PairStatus}
    totals = {
        "fetched": sum(o.fetched for o in outcomes),
        "inserted": sum(o.inserted for o in outcomes),
        "late": sum(o.late for o in outcomes),
        "requests": sum(o.requests for o in outcomes),
    }
    left = f"; {counts['left']} left for the next pass (time limit)" if counts["left"] else ""
    if counts["fresh"]:
        latest = ""
        if fresh_by is not None:
            at, by = fresh_by
            latest = f", the latest by pass {by} at {at.astimezone(dt.UTC):%H:%M:%S} UTC"
        left += (
            f"; {counts['fresh']} fresh (claimed by another pass within the last "
            f"{ctx.options.min_interval} s{latest}: sync.min_interval_seconds; --min-interval 0 "
            "syncs them now)"
        )
    log.log(
        logging.ERROR if counts["error"] else logging.INFO,
        "pass %s finished in %.1fs: %d ok, %d failed, %d skipped, %d interrupted%s; "
        "fetched=%d %s=%d late=%d requests=%d refused=%d%s",
        ctx.pass_id,
        seconds,
        counts["success"],
        counts["error"],
        counts["skipped"],
        counts["interrupted"],
        left,
        totals["fetched"],
        "new" if ctx.options.dry_run else "inserted",
        totals["inserted"],
        totals["late"],
        totals["requests"],
        refusals,
        " (dry run: nothing written)" if ctx.options.dry_run else "",
        extra={
            "event": "pass_done",
            "pass_id": ctx.pass_id,
            "duration_ms": int(seconds * 1000),
            **{f"{k}_count": v for k, v in counts.items()},
            **totals,
            "refused": refusals,
        },
    )


class StopNow(Exception):
    """Requests still in flight after STOP_GRACE_SECONDS of a stop request: main() exits at
    once (crash safety makes that harmless)."""


class SyncPass:
    """One pass over the selected users on a worker pool, the least recently synced first."""

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.deadline = (
            time.monotonic() + ctx.options.max_seconds if ctx.options.max_seconds else None
        )
        self.claims: Claims | None = None
        self.started = dt.datetime.now(dt.UTC)  # the database's time at the pass's start
        self.backoffs: dict[str, Backoff] = {}
        self.refusals = 0  # rate-limit refusals the pass met
        self.unreachable: ExchangeUnreachable | None = None  # from a pair's outcome
        self._local = threading.local()
        self._workers: list[Worker] = []
        self._workers_lock = threading.Lock()

    def run(self, users: list[UserConfig], conn: Conn) -> list[Outcome]:
        """The pass over ``users``; ``conn`` (the pass's set-up connection) orders them."""
        started = time.monotonic()
        with contextlib.suppress(Interrupted), signals_interrupt():
            self.ctx.clock.ensure_measured(
                self.cfg.weex, APIS[self.cfg.weex.api_version], self.ctx.limiter, self.ctx.stop
            )
        users, db_started = stalest_first(conn, users)
        self.started = db_started
        self.backoffs = load_backoffs(conn)
        self.claims = Claims(self.ctx, users, db_started) if self.ctx.options.claims else None
        log_pass_start(self.ctx, users)
        try:
            outcomes = self._run_pool(users)
            if self.claims is not None:  # users left by the time limit: free them at once
                left = {o.user_id for o in outcomes if o.status == PairStatus.LEFT}
                self.claims.release([u for u in users if u.user_id in left], self._worker().store)
        finally:
            for worker in self._workers:
                worker.close()
        self.ctx.limiter.flush()
        self.refusals = self.ctx.limiter.take_refusals()
        fresh_by = self.claims.latest_other() if self.claims is not None else None
        log_pass_summary(self.ctx, outcomes, time.monotonic() - started, self.refusals, fresh_by)
        return outcomes

    def _run_pool(self, users: list[UserConfig]) -> list[Outcome]:
        pool = ThreadPoolExecutor(self.cfg.sync.workers, thread_name_prefix="sync")
        futures = [pool.submit(self.sync_user, user) for user in users]
        try:
            self._wait(futures)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return [o for f in futures if not f.cancelled() for o in f.result()]

    def _wait(self, futures: list[Future]) -> None:
        """Until every user is done; once a stop is requested, STOP_GRACE_SECONDS at most.
        (Woken by the clock, not by each completion: a wait per completion over a thousand
        futures costs N^2, 18 % of an idle fleet pass's CPU.)"""
        pending, stopped_at = set(futures), None
        while pending:
            _, pending = wait(pending, timeout=0.2)
            if self.ctx.stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if pending and time.monotonic() - stopped_at > STOP_GRACE_SECONDS:
                    raise StopNow(f"{len(pending)} users still waiting on the exchange")

    def _worker(self) -> Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = self._local.worker = Worker(self.cfg)
            with self._workers_lock:
                self._workers.append(worker)
        return worker

    def sync_user(self, user: UserConfig) -> list[Outcome]:
        """The user's pairs in order. A credentials failure fails the rest without requests, and
        an unreachable exchange fails every pair still waiting, with the same message."""
        outcomes: list[Outcome] = []
        user_error: SyncError | None = None  # fails the user's other pairs without requests
        if self.claims is not None and not self._past_deadline():
            try:
                held = self.claims.holds(user, self._worker().store)
            except SyncError as exc:
                held, user_error = True, exc  # every pair of the user fails with it
            if not held:  # another pass synced it within min_interval, or is at it
                fresh = PairStatus.FRESH
                return [Outcome(user.user_id, scope, status=fresh) for scope in user.symbols]
        user_error = user_error or self._backing_off(user)
        for scope in user.symbols:
            if self.ctx.stop.is_set():
                break
            failed = user_error or self.unreachable
            if self._past_deadline():
                outcome = Outcome(user.user_id, scope, status=PairStatus.LEFT)
            elif failed is not None:
                outcome = Outcome(user.user_id, scope)
                outcome.fail(failed)
            else:
                outcome = PairSync(self.ctx, self._worker(), user, scope).run()
                if isinstance(outcome.cause, ExchangeUnreachable):
                    self.unreachable = self.unreachable or outcome.cause  # every pair waiting
                elif outcome.cause is not None and outcome.cause.user_wide:
                    user_error = outcome.cause
                outcomes.append(outcome)
                continue
            outcomes.append(finish(self.ctx, self._worker().store, outcome))
        self._note_refusals(user, outcomes)
        return outcomes

    def _backing_off(self, user: UserConfig) -> BackingOff | None:
        """The user's refusal, if it is not to be asked this pass: a normal pass leaves it
        alone until its next try; a re-scan or a dry run (asked for by hand) and new
        credentials try at once."""
        backoff = self.backoffs.get(user.user_id)
        longest = dt.timedelta(seconds=USER_BACKOFF_CAP_SECONDS)
        if (
            backoff is None
            or backoff.fingerprint != user.fingerprint
            or backoff.next_try <= self.started
            or backoff.next_try > self.started + longest  # a clock that stepped back since
            or self.ctx.options.repair
            or self.ctx.options.dry_run
        ):
            return None
        return BackingOff(
            f"not asked this pass: {backoff.error} ({plural(backoff.failures, 'pass')} in a "
            f"row); next try after {backoff.next_try.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC, "
            "or at once when this user's credentials in the configuration change",
            backoff.error_kind,
        )

    def _note_refusals(self, user: UserConfig, outcomes: list[Outcome]) -> None:
        """Start or lengthen the user's backoff after a refusal of its credentials or access;
        end it after a success."""
        if self.ctx.options.dry_run:
            return
        backoff = self.backoffs.get(user.user_id)
        refusal = next(
            (
                o.cause
                for o in outcomes
                if o.cause is not None
                and o.cause.kind in BACKOFF_KINDS
                and not isinstance(o.cause, BackingOff)
            ),
            None,
        )
        try:
            if refusal is not None:
                same = backoff is not None and backoff.fingerprint == user.fingerprint
                failures = (backoff.failures if backoff and same else 0) + 1
                wait = backoff_wait(failures, self.ctx.options.interval)
                next_try = self._worker().store.back_off(user, failures, wait, refusal)
                log.warning(
                    "%s: refused %s in a row; not asked again before %s UTC, or at once when "
                    "its credentials in the configuration change",
                    user.user_id,
                    plural(failures, "pass"),
                    next_try.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
                    extra={"event": "backoff", "user": user.user_id, "failures": failures},
                )
            elif backoff is not None and any(o.status == PairStatus.SUCCESS for o in outcomes):
                self._worker().store.end_backoff(user.user_id)
        except SyncError as exc:
            log.error("%s: cannot record the refusal's backoff: %s", user.user_id, exc)

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def exit_code(outcomes: list[Outcome]) -> int:
    failed = any(o.status == PairStatus.ERROR for o in outcomes)
    return EXIT_SYNC_FAILED if failed else EXIT_OK


# =============================================================================================
# 10. Operator commands: --check, --status, --metrics-file
# =============================================================================================

PAIR_STATUS_SQL = f"""
SELECT pair.user_id, pair.symbol, latest.status, latest.last_sync_time,
       now() - latest.last_sync_time AS age, latest.records_count, latest.fetched_count,
       latest.requests_count, latest.late_count, latest.last_trade_time, latest.error_message,
       latest.error_kind, latest.last_success_time,
       now() - latest.last_success_time AS success_age,
       quarantine.rejected_open, (extract(epoch FROM now()) * 1000)::bigint AS now_ms,
       {", ".join(f"c.{name} AS cursor_{name}" for name in CURSOR_FIELDS)}
  FROM unnest(%(users)s::text[], %(symbols)s::text[]) WITH ORDINALITY
       AS pair(user_id, symbol, n)
  LEFT JOIN sync_latest latest ON latest.user_id = pair.user_id AND latest.symbol = pair.symbol
  LEFT JOIN LATERAL (
        SELECT count(*) AS rejected_open FROM rejected_fills r
         WHERE r.user_id = pair.user_id AND r.resolved_at IS NULL
           AND (pair.symbol = '*' OR r.symbol = pair.symbol)) quarantine ON true
  LEFT JOIN sync_cursor c ON c.user_id = pair.user_id AND c.symbol = pair.symbol
 ORDER BY pair.n
"""


def configured_pairs(users: Iterable[UserConfig]) -> list[tuple[str, str]]:
    return [(u.user_id, s) for u in users for s in u.symbols]


def pair_status(conn: Conn, cfg: Config, users: list[UserConfig]) -> list[dict]:
    """Per configured pair: its latest state (sync_latest) and cursor: a lookup each."""
    pairs = configured_pairs(users)
    try:
        with conn, conn.cursor(cursor_factory=PinnedDictCursor) as cur:
            cur.execute(
                PAIR_STATUS_SQL,
                {"users": [p[0] for p in pairs], "symbols": [p[1] for p in pairs]},
            )
            rows = [dict(r) for r in cur.fetchall()]
    except psycopg2.Error as exc:
        raise StorageError(describe_db_error(exc)) from None
    lookback_ms = cfg.sync.lookback_seconds * SECOND_MS
    for row in rows:
        state = {name: row.pop(f"cursor_{name}") for name in CURSOR_FIELDS}
        now_ms = row.pop("now_ms")
        cursor = Cursor(**state) if state["synced_through"] is not None else None
        row["synced_through"] = cursor.complete_through(lookback_ms) if cursor else None
        row["behind_ms"] = now_ms - row["synced_through"] if cursor else None
    return rows


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def format_age(age: dt.timedelta | None) -> str:
    if age is None:
        return "-"
    seconds = max(int(age.total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _utc(moment: dt.datetime | None) -> str | None:
    return moment.astimezone(dt.UTC).isoformat() if moment else None


def health(row: dict, max_age: int) -> str | None:
    """What --max-age says of a pair that is not fine: FAILING (its latest pass failed with an
    error that does not go away by itself), STALE (not synced through the last ``max_age``
    seconds), or None."""
    name = f"{row['user_id']}/{row['symbol']}"
    latest = f"latest pass failed: {row['error_message']}" if row["status"] == "error" else ""
    if row["status"] == "error" and row["error_kind"] in PERSISTENT_ERRORS:
        return f"FAILING {name}: {latest}"
    through = row["synced_through"]
    if through is None:
        return f"STALE {name}: never synced" + (f"; {latest}" if latest else "")
    behind = max(row["behind_ms"], 0) / SECOND_MS
    if behind <= max_age:
        return None
    return (
        f"STALE {name}: synced through {format_ms(through)}, {behind:.0f} s ago (limit "
        f"{max_age} s)" + (f"; {latest}" if latest else "")
    )


def unmet_max_age(cfg: Config, max_age: int) -> str | None:
    """What to change when --max-age cannot be met even by passes that all succeed: a pair is
    synced through its last walk's end minus sync.lookback_seconds (fills that late may still
    show up), and the last walk ended up to sync.interval_seconds ago."""
    sync = cfg.sync
    least = sync.lookback_seconds + sync.interval_seconds
    if max_age >= least:
        return None
    return (
        f"NOTE: --max-age {max_age} s cannot be met: a pair is synced through its last walk's "
        f"end minus sync.lookback_seconds ({sync.lookback_seconds} s), and passes come every "
        f"sync.interval_seconds ({sync.interval_seconds} s); choose at least {least} s plus "
        f"a pass's duration (e.g. --max-age {least * 2}s)"
    )


def print_status(cfg: Config, users: list[UserConfig], as_json: bool, max_age: int | None) -> int:
    conn = open_for_reading(cfg.database)
    try:
        rows = pair_status(conn, cfg, users)
    finally:
        conn.close()
    verdicts = (
        {(r["user_id"], r["symbol"]): health(r, max_age) for r in rows}
        if max_age is not None
        else {}
    )
    code = EXIT_SYNC_FAILED if any(verdicts.values()) else EXIT_OK
    rate = rate_limit_state(cfg)
    if as_json:
        print(
            json.dumps([_status_json(r, verdicts) | {"rate_limit": rate} for r in rows], indent=2)
        )
    elif max_age is not None:
        problems = [v for v in verdicts.values() if v]
        problems.sort(key=lambda v: not v.startswith("FAILING"))  # those first
        for problem in problems:
            print(problem)
        if not problems:
            print(f"OK: all {plural(len(rows), 'pair')} synced through less than {max_age} s ago")
        unmet = unmet_max_age(cfg, max_age)
        if unmet:
            print(unmet)
    else:
        print(_status_table(rows))
        if rate["refusals"]:
            lowered = f", lowered {rate['lowered_at']}" if rate["learned"] else ""
            print(
                f"rate limit: {rate['address']} paces at {rate['weight_per_second']:g} of "
                f"{rate['ceiling']:g} weight/s{lowered}; {plural(rate['refusals'], 'refusal')} "
                f"so far, the last {rate['last_refusal']}"
            )
    return code


def rate_limit_state(cfg: Config) -> dict[str, Any]:
    """What this machine's passes learned of the exchange's limit for this address."""
    key, limit, budget = address_budget(cfg.weex)
    now = time.time()

    def utc(epoch: float) -> str | None:
        return _utc(dt.datetime.fromtimestamp(epoch, dt.UTC)) if epoch else None

    return {
        "address": key,
        "weight_per_second": round(budget.pace(limit), 3),
        "ceiling": round(limit.ceiling, 3),
        "learned": budget.rate is not None,
        "lowered_at": utc(budget.lowered_at),
        "paused_until": utc(budget.paused_until) if budget.paused_until > now else None,
        "refusals": budget.refusals,
        "last_refusal": utc(budget.refused_at),
    }


def _status_json(row: dict, verdicts: dict) -> dict:
    out = {k: v for k, v in row.items() if k not in ("age", "success_age", "behind_ms")}
    out["last_sync_time"] = _utc(row["last_sync_time"])
    out["last_success_time"] = _utc(row["last_success_time"])
    out["age_seconds"] = int(row["age"].total_seconds()) if row["age"] is not None else None
    out["last_trade_time_utc"] = (
        format_ms(row["last_trade_time"]) if row["last_trade_time"] else None
    )
    through = row["synced_through"]
    out["synced_through_utc"] = format_ms(through) if through is not None else None
    out["behind_seconds"] = (
        round(max(row["behind_ms"], 0) / SECOND_MS, 1) if through is not None else None
    )
    if verdicts:
        verdict = verdicts.get((row["user_id"], row["symbol"]))
        out["stale"] = bool(verdict)
        out["failing"] = bool(verdict and verdict.startswith("FAILING"))
    return out


def _status_table(rows: list[dict]) -> str:
    headers = ["USER", "SYMBOL", "STATUS", "LAST SYNC (UTC)", "AGE", "INSERTED", "LATE", "REJECTED"]
    headers += ["FETCHED", "REQUESTS", "LAST FILL (UTC)", "SYNCED THROUGH (UTC)", "LAST SUCCESS"]
    headers += ["ERROR"]
    table = []
    for r in rows:
        synced = r["last_sync_time"]
        table.append(
            [
                r["user_id"],
                r["symbol"],
                r["status"] or "never",
                synced.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if synced else "-",
                format_age(r["age"]),
                str(r["records_count"] if synced else "-"),
                str(r["late_count"] if synced else "-"),
                str(r["rejected_open"]),
                str(r["fetched_count"] if synced else "-"),
                str(r["requests_count"] if synced else "-"),
                format_ms(r["last_trade_time"]),
                format_ms(r["synced_through"]),
                format_age(r["success_age"]) + (" ago" if r["success_age"] else ""),
                printable(r["error_message"] or "", 80),
            ]
        )
    return format_table(headers, table)


CHECK_VERDICTS = {
    "credentials": "CREDENTIALS FAILED",
    "access": "ACCESS DENIED",
    "symbol": "SYMBOL REJECTED",
    "unreachable": "UNREACHABLE",
    "rate_limit": "RATE LIMITED",
}


class CheckRun:
    """What the users checked in parallel share: the clock, the budget, and whether the
    exchange has been found down (then the rest fail at once, with the same message)."""

    def __init__(self, cfg: Config, stop: Stop) -> None:
        self.cfg, self.stop = cfg, stop
        self.limiter = make_limiter(cfg.weex)
        self.clock, self.host = ServerClock(), HostWatch()
        self.down: SyncError | None = None

    def user(self, user: UserConfig) -> list[tuple[str, SyncError | None]]:
        """Per symbol of the user (or its one all-contracts request): None if a signed fills
        request (limit 1, the last hour) succeeds, else why not. An error of the user's (its
        credentials, its key's access) fails the rest of its symbols without requests; an
        exchange that does not answer, every user's."""
        session = make_session(self.cfg.weex, pool_size=1)
        client = FillsClient(
            self.cfg.weex,
            user,
            session,
            self.clock,
            self.limiter,
            Stop(self.stop),
            self.host,
            patience=self.cfg.weex.timeout_seconds,
        )
        results: list[tuple[str, SyncError | None]] = []
        failed: SyncError | None = None
        try:
            for scope in user.symbols:
                failed = failed or self.down
                if failed is not None:
                    results.append((scope, failed))
                    continue
                end = self.clock.now_ms()
                try:
                    client.page(scope, end - 3_600_000, end, 1)
                    results.append((scope, None))
                except SyncError as exc:
                    results.append((scope, exc))
                    failed = exc if exc.user_wide else None
                    if exc.kind in HOST_ERRORS:
                        self.down = self.down or exc
        finally:
            session.close()
        return results


HOST_ERRORS = frozenset({"exchange", "unreachable", "rate_limit"})  # not this user's doing


# What the next pass's upgrade does from each schema version (docs/upgrading.md in full).
UPGRADES = {
    3: "partitions sync_status by day (no row copied), builds three trade_fills indexes "
    "concurrently (minutes on a large table), adds sync_latest and sync_claims",
    4: "adds the table sync_backoff",
    5: "adds the partition sync_status_default (the tables' owner only)",
    6: "adds the analysis columns of trade_fills and fills them from raw (about 35 s per "
    "million fills; readers go on), then builds trade_fills_daily (writers wait meanwhile)",
}


def check_database(cfg: Config, users: list[UserConfig]) -> list[dict]:
    """--check's database line, changing nothing (no database created, no schema upgraded):
    what the next pass would find and do. The pairs' latest status, when the schema is
    current; StorageError (exit 3) for what would fail every pass."""
    db = cfg.database
    where = f"{db.host}:{db.port}/{db.dbname}"
    try:
        conn = open_database(db, create=False)
    except StorageError as exc:
        if database_exists(db) is not False:
            raise StorageError(f"database unreachable ({where}): {exc}") from None
        print(f"database: missing ({where} does not exist: the next pass creates it)")
        return []
    try:
        require_utf8(conn)
        require_privileges(conn)
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise newer_schema(version)
        if version == SCHEMA_VERSION:
            print(f"database: ok ({where})")
            return pair_status(conn, cfg, users)
        if version == 0:
            print(f"database: ok ({where}; no weex_sync tables yet: the next pass creates them)")
        else:
            steps = "; ".join(
                UPGRADES.get(v, "see docs/upgrading.md") for v in range(version, SCHEMA_VERSION)
            )
            print(
                f"database: ok ({where}; schema version {version}: the next pass upgrades it "
                f"to {SCHEMA_VERSION}: {steps})"
            )
        return []
    except psycopg2.Error as exc:
        raise StorageError(f"database {where}: {describe_db_error(exc)}") from None
    except StorageError as exc:
        raise StorageError(f"database {where}: {exc}") from None
    finally:
        conn.close()


def run_check(cfg: Config, users: list[UserConfig], redact: Redactor) -> int:
    """Config, database, and every configured symbol of every user (users in parallel): a
    table, the problems in full below it."""
    latest = {(r["user_id"], r["symbol"]): r for r in check_database(cfg, users)}
    stop, busy = Stop(), threading.Event()
    handlers = install_stop_handlers(stop, busy)
    run = CheckRun(cfg, stop)
    try:
        with contextlib.suppress(Interrupted), signals_interrupt():
            run.clock.ensure_measured(cfg.weex, APIS[cfg.weex.api_version], run.limiter, stop)
        try:
            run.clock.walk_end()
        except ExchangeError as exc:
            run.down = exc  # every pass would fail with it
        workers = max(1, min(cfg.sync.workers, len(users)))
        with ThreadPoolExecutor(workers, thread_name_prefix="check") as pool:
            checked = list(pool.map(run.user, users))
    except Interrupted:
        print("check interrupted by a stop signal")
        return EXIT_SYNC_FAILED
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    table, problems = [], []
    for user, results in zip(users, checked, strict=True):
        told: set[str] = set()
        for scope, error in results:
            row = latest.get((user.user_id, scope)) or {}
            verdict = "ok"
            if error is not None:
                verdict = CHECK_VERDICTS.get(error.kind, "FAILED") + " (below)"
                if error is run.down and error.kind == "exchange":
                    verdict = "EXCHANGE FAILED (below)"
                message = printable(redact(str(error)))
                where = user.user_id if error.user_wide else f"{user.user_id}/{scope}"
                if message not in told:
                    told.add(message)
                    problems.append(f"{where}: {message}")
            table.append(
                [
                    user.user_id,
                    scope,
                    verdict,
                    format_ms(row.get("last_trade_time")),
                    row.get("status") or "never synced",
                ]
            )
    headers = ["USER", "SYMBOL", "CHECK", "LAST SYNCED FILL (UTC)", "LAST STATUS"]
    print(format_table(headers, table))
    for problem in problems:
        print(problem)
    return EXIT_SYNC_FAILED if problems else EXIT_OK


class Metrics:
    """Prometheus text format for node_exporter's textfile collector, written atomically after
    each pass. Counters (``_total``) carry on from the file's previous values, so they keep
    counting across cron runs; a missing or unreadable file restarts them (a counter reset,
    which Prometheus handles)."""

    HELP: ClassVar[dict[str, tuple[str, str]]] = {
        "weex_sync_last_success_timestamp_seconds": (
            "gauge",
            "Unix time of the pair's last successful sync.",
        ),
        "weex_sync_last_sync_success": (
            "gauge",
            "1 if the pair's latest sync succeeded, 0 if it failed.",
        ),
        "weex_sync_last_sync_duration_seconds": ("gauge", "Duration of the pair's latest sync."),
        "weex_sync_synced_through_timestamp_seconds": (
            "gauge",
            "Unix time up to which the pair's fills are known complete (alert on its age).",
        ),
        "weex_sync_fills_inserted_total": ("counter", "Fills inserted into trade_fills."),
        "weex_sync_late_fills_total": ("counter", "Inserted fills that became visible late."),
        "weex_sync_rejected_fills_total": (
            "counter",
            "Fills put in the quarantine (rejected_fills), or seen there again.",
        ),
        "weex_sync_rejected_fills_open": (
            "gauge",
            "Fills of the pair in rejected_fills that are not resolved.",
        ),
        "weex_sync_requests_total": ("counter", "HTTP requests sent to the exchange."),
        "weex_sync_pair_errors_total": ("counter", "Pair syncs that ended in an error."),
        "weex_sync_passes_total": ("counter", "Passes run."),
        "weex_sync_pass_pairs": ("gauge", "Pairs of the latest pass, by outcome."),
        "weex_sync_pass_duration_seconds": ("gauge", "Duration of the latest pass."),
        "weex_sync_pass_exit_code": ("gauge", "Exit code of the latest pass."),
        "weex_sync_pass_timestamp_seconds": ("gauge", "Unix time the latest pass ended."),
        "weex_sync_clock_offset_seconds": (
            "gauge",
            "The exchange's clock minus this machine's, as the latest pass measured it.",
        ),
        "weex_sync_database_up": (
            "gauge",
            (
                "1 if the latest pass could read its pairs' state in PostgreSQL; 0: the pair "
                "series are the last known ones, carried over."
            ),
        ),
        "weex_sync_last_pass_success_timestamp_seconds": (
            "gauge",
            "Unix time the latest pass that exited 0 ended (carried over by the passes after it).",
        ),
        "weex_sync_rate_limit_refusals_total": (
            "counter",
            "Requests the exchange refused as too frequent (HTTP 429/418, -1003, -1059).",
        ),
        "weex_sync_rate_limit_pass_refusals": (
            "gauge",
            "Rate-limit refusals of the latest pass.",
        ),
        "weex_sync_rate_limit_weight_per_second": (
            "gauge",
            "The rate requests leave this address at: learned from refusals, at most the ceiling.",
        ),
        "weex_sync_rate_limit_ceiling_weight_per_second": (
            "gauge",
            "The most the address paces at (5 x weex.rate_limit's average rate).",
        ),
    }
    LINE_RE = re.compile(r"(weex_sync_\w+)(\{[^}\n]*\})? ([0-9.eE+-]+)")
    # Carried over from the file when a pass cannot read them afresh (the database is down, or
    # the pass never got to it): alerts on their age then fire, where an empty series would not.
    CARRIED = frozenset(
        {
            "weex_sync_last_success_timestamp_seconds",
            "weex_sync_last_sync_success",
            "weex_sync_rejected_fills_open",
            "weex_sync_synced_through_timestamp_seconds",
            "weex_sync_last_pass_success_timestamp_seconds",
        }
    )

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def write(
        self,
        cfg: Config,
        users: list[UserConfig],
        outcomes: list[Outcome],
        code: int,
        seconds: float,
        clock_offset_ms: int = 0,
        conn: Conn | None = None,
        refusals: int = 0,
    ) -> None:
        """The metrics of a pass; the pairs' gauges are read through ``conn`` (None: the
        database was unreachable, they keep their last values' absence)."""
        previous = self._previous()
        values: dict[str, dict[str, float]] = {name: {} for name in self.HELP}
        for (name, labels), value in previous.items():
            if name.endswith("_total"):
                values[name][labels] = value
        for o in outcomes:
            labels = _labels(user=o.user_id, symbol=o.symbol)
            for name, add in (
                ("weex_sync_fills_inserted_total", o.inserted),
                ("weex_sync_late_fills_total", o.late),
                ("weex_sync_rejected_fills_total", o.quarantined),
                ("weex_sync_requests_total", o.requests),
                ("weex_sync_pair_errors_total", o.status == PairStatus.ERROR),
            ):
                values[name][labels] = values[name].get(labels, 0) + add
            if o.status in (PairStatus.SUCCESS, PairStatus.ERROR):
                values["weex_sync_last_sync_duration_seconds"][labels] = o.duration_ms / 1000
        values["weex_sync_passes_total"][""] = values["weex_sync_passes_total"].get("", 0) + 1
        for status in PairStatus:
            count = sum(o.status == status for o in outcomes)
            values["weex_sync_pass_pairs"][_labels(outcome=status.value)] = count
        values["weex_sync_pass_duration_seconds"][""] = round(seconds, 3)
        values["weex_sync_pass_exit_code"][""] = code
        values["weex_sync_pass_timestamp_seconds"][""] = round(time.time(), 3)
        if code == EXIT_OK:
            values["weex_sync_last_pass_success_timestamp_seconds"][""] = round(time.time(), 3)
        values["weex_sync_clock_offset_seconds"][""] = clock_offset_ms / SECOND_MS
        key, limit, budget = address_budget(cfg.weex)
        address = _labels(address=key)
        refused = values["weex_sync_rate_limit_refusals_total"]
        refused[address] = refused.get(address, 0) + refusals
        values["weex_sync_rate_limit_pass_refusals"][address] = refusals
        values["weex_sync_rate_limit_weight_per_second"][address] = round(budget.pace(limit), 3)
        values["weex_sync_rate_limit_ceiling_weight_per_second"][address] = round(limit.ceiling, 3)
        fresh = self._pair_gauges(cfg, users, values, conn)
        values["weex_sync_database_up"][""] = int(fresh)
        carried = self.CARRIED if not fresh else {"weex_sync_last_pass_success_timestamp_seconds"}
        for (name, labels), value in previous.items():
            if name in carried:
                values[name].setdefault(labels, value)
        self._replace_file(self._render(values))

    @staticmethod
    def _pair_gauges(cfg: Config, users: list[UserConfig], values: dict, conn: Conn | None) -> bool:
        """The pairs' gauges from PostgreSQL, through ``conn`` or, closed (a server's
        idle_session_timeout during a long pass) or missing, a new connection; False if the
        database cannot be read."""
        try:
            if conn is None or conn.closed:
                with contextlib.closing(connect(cfg.database)) as fresh:
                    rows = pair_status(fresh, cfg, users)
            else:
                rows = pair_status(conn, cfg, users)
        except (SyncError, psycopg2.Error) as exc:
            log.warning("metrics: cannot read the pairs' state: %s", describe_db_error(exc))
            return False
        for r in rows:
            labels = _labels(user=r["user_id"], symbol=r["symbol"])
            if r["last_success_time"] is not None:
                values["weex_sync_last_success_timestamp_seconds"][labels] = round(
                    r["last_success_time"].timestamp(), 3
                )
            if r["status"] is not None:
                values["weex_sync_last_sync_success"][labels] = int(r["status"] == "success")
            values["weex_sync_rejected_fills_open"][labels] = r["rejected_open"]
            if r["synced_through"] is not None:
                values["weex_sync_synced_through_timestamp_seconds"][labels] = (
                    r["synced_through"] / SECOND_MS
                )
        return True

    def _previous(self) -> dict[tuple[str, str], float]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return {}
        counters = {}
        for line in text.splitlines():
            match = self.LINE_RE.fullmatch(line)
            if (
                match
                and match[1] in self.HELP
                and (match[1].endswith("_total") or match[1] in self.CARRIED)
            ):
                with contextlib.suppress(ValueError):
                    counters[(match[1], match[2] or "")] = float(match[3])
        return counters

    def _render(self, values: dict[str, dict[str, float]]) -> str:
        lines = []
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{labels} {_number(v)}" for labels, v in sorted(values[name].items())]
        return "\n".join(lines) + "\n"

    def _replace_file(self, text: str) -> None:
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".weex_sync_metrics.")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("cannot write the metrics file %s: %s", self.path, exc.strerror)
            if tmp is not None:  # a full disk, a directory in the way: no temp file left
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# =============================================================================================
# 11. Command line
# =============================================================================================


LOCK_WAIT_DEFAULT = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weex_sync.py",
        description="Copy WEEX futures trade fills into PostgreSQL: one sync pass, then exit.",
        epilog="Exit codes: 0 all synced, 1 some (user, symbol) failed (--status --max-age: "
        "some pair is stale), 2 configuration or usage error, 3 database unreachable.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one pass and exit (default)")
    mode.add_argument(
        "--loop",
        nargs="?",
        const="",  # no N: sync.interval_seconds (read by loop_interval, not by argparse's type)
        metavar="N",
        help="run a pass every N seconds (default sync.interval_seconds) until SIGINT/SIGTERM",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="check config, database and every user's credentials (one request each), then exit",
    )
    mode.add_argument(
        "--status", action="store_true", help="print the latest sync_status per (user, symbol)"
    )
    mode.add_argument("--print-schema", action="store_true", help="print the SQL schema and exit")
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help="YAML config file (default: config.yaml in the working directory, else next to "
        "weex_sync.py)",
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="read KEY=value lines (the secrets config.yaml refers to as ${NAME}) from PATH; "
        "variables already set win",
    )
    parser.add_argument("--user", action="append", metavar="ID", help="only this user (repeatable)")
    parser.add_argument(
        "--symbol", action="append", metavar="S", help="only this symbol (repeatable)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="fetch and count, write nothing (no fills, no status, no cursor)",
    )
    parser.add_argument(
        "--since",
        metavar="DATE",
        help="re-scan fills from DATE (ISO date/datetime UTC, or ms); the cursor is not moved",
    )
    parser.add_argument("--until", metavar="DATE", help="end of the --since re-scan (default now)")
    parser.add_argument(
        "--lock-wait",
        type=float,
        default=LOCK_WAIT_DEFAULT,
        metavar="N",
        help="with --since: wait up to N seconds for a pair another pass is syncing (default 60)",
    )
    parser.add_argument(
        "--max-seconds",
        type=int,
        metavar="N",
        help="start no new pair after N seconds; the next pass starts with those left "
        "(default sync.max_seconds, 0 = no limit)",
    )
    parser.add_argument(
        "--min-interval",
        type=int,
        metavar="N",
        help="claim only users no pass claimed within N seconds (default "
        "sync.min_interval_seconds; 0: sync every selected user)",
    )
    parser.add_argument("--json", action="store_true", help="with --status: print JSON")
    parser.add_argument(
        "--max-age",
        metavar="AGE",
        help="with --status: exit 1, one line per pair, if a pair's last success is older "
        "than AGE (90s, 10m, 2h, 1d)",
    )
    parser.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="after each pass, write Prometheus metrics to PATH (node_exporter textfile)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="default text"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings, errors and the summary line"
    )
    parser.add_argument("--version", action="version", version=f"weex_sync {__version__}")
    return parser


def find_config(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """-c PATH, else config.yaml in the working directory, else next to weex_sync.py (where it
    usually is when cron runs the script from another directory). Without any, only a
    single account from WEEX_* variables is possible; otherwise say where we looked."""
    if explicit:
        return explicit
    places = dict.fromkeys(
        [Path.cwd() / "config.yaml", Path(__file__).resolve().parent / "config.yaml"]
    )
    for place in places:
        if place.is_file():
            return str(place)
    if environ.get("WEEX_API_KEY"):
        return None
    raise ConfigError(
        f"no config file: looked for {' and '.join(str(p) for p in places)}; pass -c PATH "
        "(or set WEEX_API_KEY, WEEX_SECRET_KEY and WEEX_PASSPHRASE for one account)"
    )


PASS_FLAGS = {
    "dry_run": "--dry-run",
    "since": "--since",
    "until": "--until",
    "max_seconds": "--max-seconds",
    "metrics_file": "--metrics-file",
    "loop": "--loop",
    "min_interval": "--min-interval",
}


def pass_options(args: argparse.Namespace, cfg: Config, loop_seconds: int | None) -> PassOptions:
    mode = "--check" if args.check else "--status" if args.status else None
    if mode is not None:
        for name, flag in PASS_FLAGS.items():
            if getattr(args, name, None) not in (None, False):
                raise ConfigError(f"{flag}: not with {mode} (it applies to a sync pass)")
        if args.lock_wait != LOCK_WAIT_DEFAULT:
            raise ConfigError(f"--lock-wait: not with {mode} (it applies to a --since re-scan)")
    if args.until and not args.since:
        raise ConfigError("--until: needs --since")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    if since is not None and until is not None and until < since:
        raise ConfigError("--until: is before --since")
    if args.json and not args.status:
        raise ConfigError("--json: only with --status")
    if args.max_age and not args.status:
        raise ConfigError("--max-age: only with --status")
    if not 0 <= args.lock_wait <= 86400:
        raise ConfigError("--lock-wait: out of range 0..86400")
    for flag, value in (("--max-seconds", args.max_seconds), ("--min-interval", args.min_interval)):
        if value is not None and not 0 <= value <= 86400:
            raise ConfigError(f"{flag}: out of range 0..86400")
    interval = first_set(loop_seconds, cfg.sync.interval_seconds)
    return PassOptions(
        dry_run=args.dry_run,
        since=since,
        until=until,
        lock_wait=args.lock_wait,
        max_seconds=first_set(args.max_seconds, cfg.sync.max_seconds),
        # a little under the interval passes come at, unless set
        min_interval=first_set(args.min_interval, cfg.sync.min_interval_seconds, interval * 5 // 6),
        interval=interval,
    )


def first_set(*values: T | None) -> T:
    """The first value that is set, in the order of precedence of every setting weex_sync takes
    from several places: the command line's flag, then the configuration, then the value
    derived from others."""
    for value in values:
        if value is not None:
            return value
    raise ValueError("no value set")


def select_users(
    cfg: Config, user_ids: list[str] | None, symbols: list[str] | None, repair: bool
) -> list[UserConfig]:
    """The enabled users, restricted by --user / --symbol. Values given on the command line are
    not echoed unless they name something configured (one could be a mistyped secret)."""
    users = [u for u in cfg.sync.users if u.enabled]
    if not users:
        raise ConfigError("sync.users: no user is enabled (enabled: false for every one)")
    if user_ids:
        known = {u.user_id: u for u in cfg.sync.users}
        for user_id in user_ids:
            if user_id not in known:
                raise ConfigError(
                    f"--user: no such user in the configuration (configured: {', '.join(known)})"
                )
            if not known[user_id].enabled:
                raise ConfigError(f"--user {user_id}: the user is disabled (enabled: false)")
        users = [u for u in users if u.user_id in user_ids]
    if symbols:
        wanted = []
        for text in symbols:
            symbol = contract_symbol(text.strip())
            if symbol is None:
                raise ConfigError("--symbol: not a contract symbol (like cmt_btcusdt or BTCUSDT)")
            wanted.append(symbol)
        users = _narrow_to_symbols(users, wanted, repair)
    return users


def _narrow_to_symbols(
    users: list[UserConfig], wanted: list[str], repair: bool
) -> list[UserConfig]:
    """Listed users keep the wanted symbols they list. Users with ``symbols: all`` sync every
    contract in one walk; a --since re-scan can still walk one contract of theirs."""
    narrowed = []
    whole = [u.user_id for u in users if u.symbols == (ALL_SYMBOLS,)]
    if whole and not repair:
        log.warning(
            "--symbol: %s sync%s every contract in one walk (symbols: all) and %s not narrowed; "
            "--symbol with --since re-scans one contract of theirs",
            ", ".join(whole),
            "s" if len(whole) == 1 else "",
            "is" if len(whole) == 1 else "are",
        )
    for user in users:
        if user.symbols == (ALL_SYMBOLS,):
            scopes = tuple(wanted) if repair else user.symbols
        else:
            scopes = tuple(s for s in user.symbols if s in wanted)
        if scopes:
            narrowed.append(replace(user, symbols=scopes))
    if not narrowed:
        listed = sorted({s for u in users for s in u.symbols if s != ALL_SYMBOLS})
        raise ConfigError(
            f"--symbol {', '.join(wanted)}: not configured for the selected users (listed: "
            f"{', '.join(listed) or 'none'}; users with symbols: all take --symbol only "
            "with --since)"
        )
    return narrowed


# Secrets are kept out of messages where they could enter: the exchange's answers are scrubbed
# of the user's secrets (whatever their length) before they become a message, weex_sync never
# puts a secret in one, and the database password goes to libpq as a keyword only (PostgreSQL
# never echoes it). Scrubbing whole log lines of the users' secrets only backs that up, for
# those long enough: "2" or "weex" would garble every timestamp or the program's own name.
SCRUB_MIN_LENGTH = 8


def warn_of_short_secrets(cfg: Config) -> None:
    """One WARNING per user secret too short to scrub from log lines (naming it, not its
    value): it is scrubbed from the exchange's answers only."""
    for name, value in cfg.named_secrets().items():
        if name != "database.password" and len(value) < SCRUB_MIN_LENGTH:
            log.warning(
                "%s is shorter than %d characters: it is scrubbed from the exchange's answers, "
                "not from whole log lines (it would garble them); a longer one is safer",
                name,
                SCRUB_MIN_LENGTH,
            )


def warn_if_plain_http(base_url: str) -> None:
    host = urlsplit(base_url).hostname or ""
    if (
        base_url.startswith("http://")
        and host not in ("localhost", "::1")
        and not host.startswith("127.")
    ):
        log.warning(
            "weex.base_url is plain http:// to %s: API keys and signatures travel unencrypted; "
            "use https://",
            host,
        )


def run_passes(
    cfg: Config,
    users: list[UserConfig],
    loop_seconds: int | None,
    stop: Stop,
    redact: Redactor,
    options: PassOptions,
    metrics_file: str | None,
) -> int:
    """One pass, or a pass every ``loop_seconds`` until a stop. The clock offset and the rate
    budget live as long as the process: a pass does not forget the last one's requests."""
    clock = ServerClock()
    limiter = make_limiter(cfg.weex)
    busy = threading.Event()
    handlers = install_stop_handlers(stop, busy)
    passes = 0

    def one_pass() -> int:
        """Its set-up (schema, partitions, the order of the users) and the metrics after it
        share one connection; the workers have their own."""
        started, outcomes, conn, refusals = time.monotonic(), [], None, 0
        busy.set()
        try:
            conn = prepare_database(cfg)
            sync_pass = SyncPass(PassContext(cfg, options, stop, clock, limiter, redact))
            outcomes = sync_pass.run(users, conn)
            refusals = sync_pass.refusals
            code = exit_code(outcomes)
        except StorageError as exc:
            log.error("%s", exc, extra={"event": "db_unreachable"})
            code = EXIT_DB_UNREACHABLE
        finally:
            busy.clear()
        try:
            if metrics_file:
                Metrics(metrics_file).write(
                    cfg,
                    users,
                    outcomes,
                    code,
                    time.monotonic() - started,
                    clock.offset_ms,
                    conn,
                    refusals,
                )
        finally:
            if conn is not None:
                conn.close()
        return code

    try:
        if loop_seconds is None:
            return one_pass()
        while not stop.is_set():
            one_pass()
            passes += 1
            stop.wait(loop_seconds)
        log.info("stopped after %s", plural(passes, "pass"), extra={"event": "stopped"})
        return EXIT_OK
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_schema:
        sys.stdout.write(SCHEMA_SQL)
        return EXIT_OK
    environ = os.environ if environ is None else environ
    setup_logging(args.log_level, Redactor(), args.log_format, args.quiet)
    try:
        if args.env_file:
            environ = {**read_env_file(args.env_file), **environ}
        cfg = load_config(find_config(args.config, environ), environ)
        users = select_users(cfg, args.user, args.symbol, repair=bool(args.since))
        loop_seconds = loop_interval(args, cfg)
        options = pass_options(args, cfg, loop_seconds)
        max_age = parse_age(args.max_age, "--max-age") if args.max_age is not None else None
        if not args.status:
            check_source_addresses(cfg.weex)
        ca_bundle(environ)
    except ConfigError as exc:
        for problem in getattr(exc, "problems", [str(exc)]):
            log.error("configuration error: %s", problem, extra={"event": "config_error"})
        return EXIT_CONFIG
    redact = Redactor(cfg.secrets(database=False), min_length=SCRUB_MIN_LENGTH)
    setup_logging(args.log_level, redact, args.log_format, args.quiet)
    warn_if_plain_http(cfg.weex.base_url)
    warn_of_short_secrets(cfg)
    with taking_source_address(cfg.weex) as weex:
        cfg = replace(cfg, weex=weex)
        return run_command(args, cfg, users, options, max_age, loop_seconds, redact)


def run_command(
    args: argparse.Namespace,
    cfg: Config,
    users: list[UserConfig],
    options: PassOptions,
    max_age: int | None,
    loop_seconds: int | None,
    redact: Redactor,
) -> int:
    """--status, --check, or the passes."""
    if args.status or args.check:
        try:
            if args.status:
                return print_status(cfg, users, args.json, max_age)
            return run_check(cfg, users, redact)
        except StorageError as exc:
            log.error("%s", redact(str(exc)), extra={"event": "db_unreachable"})
            return EXIT_DB_UNREACHABLE
    try:
        return run_passes(cfg, users, loop_seconds, Stop(), redact, options, args.metrics_file)
    except StopNow as exc:
        log.warning("stopping now (%s); the next pass resumes them", exc)
        logging.shutdown()
        os._exit(EXIT_OK)


def loop_interval(args: argparse.Namespace, cfg: Config) -> int | None:
    if args.loop is None:
        return None
    if args.loop == "":
        return cfg.sync.interval_seconds
    if not re.fullmatch(r"[0-9]{1,6}", args.loop) or int(args.loop) < 1:
        raise ConfigError("--loop: N must be a whole number of seconds, at least 1")
    return int(args.loop)


if __name__ == "__main__":
    sys.exit(main())
