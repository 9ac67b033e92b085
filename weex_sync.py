#!/usr/bin/env python3
"""weex_sync: copy the trade fills of WEEX futures accounts into PostgreSQL, incrementally.

One invocation performs one sync pass and exits (cron schedules it; ``--loop N`` repeats it):
validate the configuration, create the database objects if missing, then for every enabled user
and configured symbol fetch the fills that are new since the last pass, store them with
``INSERT ... ON CONFLICT DO NOTHING`` and append the outcome to ``sync_status``.

The file reads top to bottom: configuration, WEEX client (signing, rate limiting, retries),
parsing and paging, storage, the pass, command line. It depends only on psycopg2, requests and
PyYAML, so it can be copied alone to a server.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Context, Decimal, InvalidOperation
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlencode

import psycopg2
import psycopg2.extras
import requests
import yaml
from psycopg2 import sql
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

__version__ = "1.0.0"

log = logging.getLogger("weex_sync")

EXIT_OK = 0
EXIT_SYNC_FAILED = 1
EXIT_CONFIG = 2
EXIT_DB_UNREACHABLE = 3

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration or usage problem. The message is one line that names the key."""


@dataclass(frozen=True)
class DatabaseConfig:
    host: str = "localhost"
    port: int = 5432
    user: str = "postgres"
    password: str = field(default="", repr=False)
    dbname: str = "weex_trading"
    sslmode: str = "prefer"


@dataclass(frozen=True)
class RateLimitConfig:
    uid_weight: int = 500
    ip_weight: int = 2500
    window_seconds: float = 10.0


@dataclass(frozen=True)
class WeexConfig:
    base_url: str = "https://api-contract.weex.com"
    timeout_seconds: float = 10.0
    max_retries: int = 5
    rate_limit: RateLimitConfig = RateLimitConfig()


@dataclass(frozen=True)
class UserConfig:
    user_id: str
    api_key: str
    secret_key: str = field(repr=False)
    passphrase: str = field(repr=False)
    symbols: tuple[str, ...] = ()
    enabled: bool = True


@dataclass(frozen=True)
class SyncConfig:
    interval_seconds: int = 60
    page_size: int = 100
    start_time: int = 0
    workers: int = 8
    symbols: tuple[str, ...] = ("cmt_btcusdt",)
    users: tuple[UserConfig, ...] = ()


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    weex: WeexConfig
    sync: SyncConfig

    def secrets(self) -> list[str]:
        """Every secret value, so logs and error messages can be scrubbed of them."""
        values = [self.database.password]
        for user in self.sync.users:
            values += [user.secret_key, user.passphrase]
        return [v for v in values if v]


SYMBOL_RE = re.compile(r"^cmt_[a-z0-9]{1,40}(usdt|usdc)$")
USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_FIELDS = {"password", "secret_key", "passphrase"}
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
    "api_key": ("WEEX_API_KEY",),
    "secret_key": ("WEEX_SECRET_KEY",),
    "passphrase": ("WEEX_PASSPHRASE",),
}
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_MISSING = object()


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
        weex=_weex_config(weex_raw),
        sync=_sync_config(_section(raw, "sync"), weex_raw),
    )


def _read_yaml(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _expand_env_refs(value: Any, path: str, environ: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env_refs(v, _join(path, k), environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env_refs(v, f"{path}[{i}]", environ) for i, v in enumerate(value)]
    if isinstance(value, str):

        def lookup(match: re.Match) -> str:
            name = match.group(1)
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
    """'section.key'; keys that are not plain words are quoted, so a message stays one line."""
    if not (isinstance(key, str) and re.fullmatch(r"\w+", key)):
        return f"{path}[{key!r}]"
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
    value = raw.get(key, default)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise ConfigError(f"{name}: missing")
        return default
    if kind in (int, float) and isinstance(value, str) and key not in SECRET_FIELDS:
        try:
            value = kind(value.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        shown = "" if key in SECRET_FIELDS else f" {value!r}"
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__}{shown}")
    if kind is str and not value.strip() and default is _MISSING:
        raise ConfigError(f"{name}: must not be empty")
    return value


def _ranged(raw: dict, path: str, key: str, kind: type, default: Any, low: Any, high: Any) -> Any:
    value = _typed(raw, path, key, kind, default)
    if not low <= value <= high:
        raise ConfigError(f"{_join(path, key)}: {value} is out of range {low}..{high}")
    return value


def _database_config(raw: dict) -> DatabaseConfig:
    p = "database"
    _check_keys(raw, p, {"host", "port", "user", "password", "dbname", "sslmode"})
    sslmode = _typed(raw, p, "sslmode", str, DatabaseConfig.sslmode)
    if sslmode not in SSL_MODES:
        raise ConfigError(f"database.sslmode: {sslmode!r} is not one of {', '.join(SSL_MODES)}")
    return DatabaseConfig(
        host=_typed(raw, p, "host", str, DatabaseConfig.host),
        port=_ranged(raw, p, "port", int, DatabaseConfig.port, 1, 65535),
        user=_typed(raw, p, "user", str, DatabaseConfig.user),
        password=_typed(raw, p, "password", str, ""),
        dbname=_typed(raw, p, "dbname", str, DatabaseConfig.dbname),
        sslmode=sslmode,
    )


def _weex_config(raw: dict) -> WeexConfig:
    p = "weex"
    _check_keys(
        raw,
        p,
        {"base_url", "api_key", "secret_key", "passphrase", "timeout_seconds", "max_retries"}
        | {"rate_limit"},
    )
    base_url = _typed(raw, p, "base_url", str, WeexConfig.base_url).rstrip("/")
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise ConfigError(f"weex.base_url: {base_url!r} is not an http(s) URL")
    limits = _section(raw, "rate_limit", p)
    lp = "weex.rate_limit"
    _check_keys(limits, lp, {"uid_weight", "ip_weight", "window_seconds"})
    defaults = RateLimitConfig()
    return WeexConfig(
        base_url=base_url,
        timeout_seconds=_ranged(raw, p, "timeout_seconds", float, 10.0, 0.1, 300.0),
        max_retries=_ranged(raw, p, "max_retries", int, 5, 0, 20),
        rate_limit=RateLimitConfig(
            uid_weight=_ranged(limits, lp, "uid_weight", int, defaults.uid_weight, 5, 10**6),
            ip_weight=_ranged(limits, lp, "ip_weight", int, defaults.ip_weight, 5, 10**7),
            window_seconds=_ranged(limits, lp, "window_seconds", float, 10.0, 0.1, 3600.0),
        ),
    )


def _symbols(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: expected a non-empty list of symbols such as [cmt_btcusdt]")
    symbols = []
    for i, item in enumerate(value):
        symbol = item.strip().lower() if isinstance(item, str) else item
        if not isinstance(symbol, str) or not SYMBOL_RE.match(symbol):
            raise ConfigError(
                f"{path}[{i}]: {item!r} is not a WEEX contract symbol (expected like cmt_btcusdt)"
            )
        if symbol in symbols:
            raise ConfigError(f"{path}[{i}]: duplicate symbol {symbol!r}")
        symbols.append(symbol)
    return tuple(symbols)


def _sync_config(raw: dict, weex_raw: dict) -> SyncConfig:
    p = "sync"
    _check_keys(
        raw,
        p,
        {"interval_seconds", "page_size", "start_time", "workers", "symbols", "users"},
    )
    symbols = _symbols(raw.get("symbols", ["cmt_btcusdt"]), "sync.symbols")
    if "users" in raw:
        users = _users(raw["users"], symbols)
    else:
        users = (_default_user(weex_raw, symbols),)
    return SyncConfig(
        interval_seconds=_ranged(raw, p, "interval_seconds", int, 60, 1, 86400),
        page_size=_ranged(raw, p, "page_size", int, 100, 1, 100),
        start_time=parse_time(raw.get("start_time", 0), "sync.start_time"),
        workers=_ranged(raw, p, "workers", int, 8, 1, 64),
        symbols=symbols,
        users=users,
    )


def _default_user(weex_raw: dict, symbols: tuple[str, ...]) -> UserConfig:
    """Without ``sync.users`` the credentials in ``weex`` (or WEEX_* variables) are one user."""
    for key in ("api_key", "secret_key", "passphrase"):
        if not weex_raw.get(key):
            raise ConfigError(
                f"weex.{key}: missing (set it, the {WEEX_ENV[key][0]} variable, or list sync.users)"
            )
    return UserConfig(
        user_id="default",
        api_key=_typed(weex_raw, "weex", "api_key", str),
        secret_key=_typed(weex_raw, "weex", "secret_key", str),
        passphrase=_typed(weex_raw, "weex", "passphrase", str),
        symbols=symbols,
    )


def _users(value: Any, symbols: tuple[str, ...]) -> tuple[UserConfig, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("sync.users: expected a non-empty list of users")
    users: list[UserConfig] = []
    for i, item in enumerate(value):
        p = f"sync.users[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{p}: expected a mapping with user_id, api_key, secret_key, ...")
        _check_keys(
            item, p, {"user_id", "api_key", "secret_key", "passphrase", "enabled", "symbols"}
        )
        user_id = _typed(item, p, "user_id", str)
        if not USER_ID_RE.match(user_id):
            raise ConfigError(
                f"{p}.user_id: {user_id!r} must be 1-64 letters, digits or _.@- characters"
            )
        if any(u.user_id == user_id for u in users):
            raise ConfigError(f"{p}.user_id: duplicate user_id {user_id!r}")
        user_symbols = _symbols(item["symbols"], f"{p}.symbols") if "symbols" in item else symbols
        users.append(
            UserConfig(
                user_id=user_id,
                api_key=_typed(item, p, "api_key", str),
                secret_key=_typed(item, p, "secret_key", str),
                passphrase=_typed(item, p, "passphrase", str),
                symbols=user_symbols,
                enabled=_typed(item, p, "enabled", bool, True),
            )
        )
    return tuple(users)


def parse_time(value: Any, name: str) -> int:
    """Milliseconds since the epoch from an int (ms) or an ISO date/datetime (UTC unless given)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a date, datetime or milliseconds, got {value!r}")
    if isinstance(value, int):
        moment = value
    else:
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return parse_time(int(text), name)
            try:
                value = dt.datetime.fromisoformat(text)
            except ValueError:
                raise ConfigError(
                    f"{name}: {value!r} is not an ISO date (2024-01-01), datetime or ms"
                ) from None
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = dt.datetime(value.year, value.month, value.day)
        if not isinstance(value, dt.datetime):
            raise ConfigError(f"{name}: expected a date, datetime or milliseconds")
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        moment = int(value.timestamp() * 1000)
    if not 0 <= moment < 10**14:
        raise ConfigError(f"{name}: {moment} is outside 1970..5000 in milliseconds")
    return moment


def format_ms(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# WEEX client: signing, rate limiting, retries
# ---------------------------------------------------------------------------------------------

FILLS_PATH = "/capi/v2/order/fills"
TIME_PATH = "/capi/v2/market/time"
FILLS_WEIGHT = 5
SUCCESS_CODES = {None, "0", "00000", "200"}
TIMESTAMP_CODES = {"40005"}
AUTH_CODES = {"40006", "40009", "40011"}
PARAMETER_CODES = {"40017", "40034"}
RETRY_STATUSES = (429, 500, 502, 503, 504)


class WeexError(Exception):
    """The exchange gave no usable answer. ``user_wide`` errors (credentials, IP whitelist)
    fail every symbol of the user; the others fail one (user, symbol)."""

    def __init__(self, message: str, *, user_wide: bool = False) -> None:
        super().__init__(message)
        self.user_wide = user_wide


class _RetryablePayload(Exception):
    """HTTP 200 with a body that is not a usable answer (malformed JSON, a busy code)."""


class _TimestampRejected(Exception):
    """The exchange says our ACCESS-TIMESTAMP is too far from its clock (code 40005)."""


def sign(secret_key: str, timestamp: str, method: str, path: str, query: str, body: str) -> str:
    """ACCESS-SIGN: base64(HMAC_SHA256(secret, timestamp + METHOD + path [+ "?" + query] + body))."""
    prehash = timestamp + method.upper() + path + (f"?{query}" if query else "") + body
    digest = hmac.new(secret_key.encode(), prehash.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class RollingWindowLimiter:
    """Admits a request only while the weight admitted in the last ``window`` seconds stays
    within ``budget``: the exchange's own accounting. A token bucket of the same rate would let
    up to twice the budget through in one window (full bucket plus refill) and earn 429s.
    ``margin`` pads the window for network jitter between our clock and the exchange's."""

    def __init__(self, budget: int, window: float, margin: float = 0.25) -> None:
        self.budget = budget
        self.window = window + margin
        self._admitted: deque[tuple[float, int]] = deque()
        self._used = 0
        self._lock = threading.Lock()

    def acquire(self, weight: int) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                while self._admitted and self._admitted[0][0] <= now - self.window:
                    self._used -= self._admitted.popleft()[1]
                if self._used + weight <= self.budget:
                    self._admitted.append((now, weight))
                    self._used += weight
                    return
                wait = self._admitted[0][0] + self.window - now
            time.sleep(max(wait, 0.001))


class ServerClock:
    """Local clock plus the offset last measured against the exchange's /market/time."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def resync(self, session: requests.Session, base_url: str, timeout: float) -> None:
        sent = time.time() * 1000
        try:
            server_ms = int(session.get(base_url + TIME_PATH, timeout=timeout).json()["timestamp"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise WeexError(f"cannot read the exchange's clock: {type(exc).__name__}") from None
        received = time.time() * 1000
        self.offset_ms = int(server_ms - (sent + received) / 2)
        log.warning("clock skew against the exchange: %+d ms; correcting", self.offset_ms)


def make_session(cfg: WeexConfig, pool_size: int = 4) -> requests.Session:
    """A session whose transport retries connection errors, timeouts, 429 (honouring
    Retry-After) and 5xx with exponential backoff and jitter. Other statuses are not retried."""
    retry = Retry(
        total=cfg.max_retries,
        backoff_factor=0.5,
        backoff_max=30,
        backoff_jitter=0.5,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Content-Type": "application/json", "locale": "en-US"})
    # Read proxy and CA-bundle settings from the environment once, not on every request
    # (with trust_env requests also stats ~/.netrc per request: 5 % of a backfill's fetching).
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(cfg.base_url))
    session.verify = (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    )
    return session


class WeexClient:
    """Signed GET requests for one user, counted, rate limited and classified."""

    def __init__(
        self,
        cfg: WeexConfig,
        user: UserConfig,
        session: requests.Session,
        clock: ServerClock,
        ip_limiter: RollingWindowLimiter,
        uid_limiter: RollingWindowLimiter,
    ) -> None:
        self.cfg = cfg
        self.user = user
        self.session = session
        self.clock = clock
        self.limiters = (uid_limiter, ip_limiter)
        self.requests_made = 0

    def get_fills(self, **params: Any) -> dict:
        """One page of ``GET /capi/v2/order/fills``. Transport problems are retried by the
        session; bodies that are not a usable answer (malformed JSON, a busy code with HTTP 200)
        are retried here, and a rejected timestamp once after measuring the clock skew."""
        query = urlencode({k: v for k, v in params.items() if v is not None})
        clock_resynced = False
        attempt = 0
        while True:
            try:
                return self._request(FILLS_PATH, query)
            except _TimestampRejected:
                if clock_resynced:
                    raise WeexError("exchange rejects our timestamp even after a clock resync")
                self.clock.resync(self.session, self.cfg.base_url, self.cfg.timeout_seconds)
                clock_resynced = True
            except _RetryablePayload as exc:
                attempt += 1
                if attempt > self.cfg.max_retries:
                    raise WeexError(f"{exc} (gave up after {attempt} attempts)") from None
                time.sleep(min(0.25 * 2**attempt, 10) * random.uniform(0.5, 1.0))

    def _request(self, path: str, query: str) -> dict:
        for limiter in self.limiters:
            limiter.acquire(FILLS_WEIGHT)
        timestamp = str(self.clock.now_ms())
        headers = {
            "ACCESS-KEY": self.user.api_key,
            "ACCESS-SIGN": sign(self.user.secret_key, timestamp, "GET", path, query, ""),
            "ACCESS-TIMESTAMP": timestamp,
            "ACCESS-PASSPHRASE": self.user.passphrase,
        }
        url = f"{self.cfg.base_url}{path}?{query}" if query else self.cfg.base_url + path
        try:
            response = self.session.get(url, headers=headers, timeout=self.cfg.timeout_seconds)
        except requests.RequestException as exc:
            # requests hides urllib3's retry history here; count the attempts it was allowed
            self.requests_made += self.cfg.max_retries + 1
            raise WeexError(f"cannot reach the exchange: {_describe_network_error(exc)}") from None
        history = getattr(getattr(response.raw, "retries", None), "history", ())
        self.requests_made += 1 + len(history or ())
        return classify_response(response.status_code, response.content)


def _describe_network_error(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out after all retries"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed after all retries"
    return type(exc).__name__


def loads_exact(text: bytes | str) -> Any:
    """json.loads that keeps every number exact (Decimal for fractions) and rejects NaN."""

    def reject(token: str) -> Any:
        raise ValueError(f"{token} is not a number")

    return json.loads(text, parse_float=Decimal, parse_constant=reject)


def to_json(value: Any) -> str:
    """JSON text of a parsed answer; Decimals are written as the exact numbers they were read
    as (the inverse of loads_exact), so the raw column keeps the fill exactly as sent."""
    try:
        return json.dumps(value)  # the C encoder; only Decimals need the slow path below
    except TypeError:
        pass
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def classify_response(status: int, content: bytes) -> dict:
    """The page of an answer, or the right exception: HTTP status first, code second."""
    try:
        body = loads_exact(content)
    except ValueError:
        body = None
    code = str(body.get("code")) if isinstance(body, dict) and "code" in body else None
    msg = str(body.get("msg", ""))[:200] if isinstance(body, dict) else ""
    detail = f"HTTP {status}" + (f", code {code}: {msg}" if code else "")
    if status == 521:
        raise WeexError(
            f"IP not whitelisted for this API key ({detail}): "
            "whitelist this IP in the WEEX API settings",
            user_wide=True,
        )
    if code in TIMESTAMP_CODES:
        raise _TimestampRejected()
    if status == 401 or code in AUTH_CODES:
        raise WeexError(f"credentials rejected ({detail}); not retried", user_wide=True)
    if code in PARAMETER_CODES or status == 400:
        raise WeexError(f"request rejected ({detail}); not retried")
    if status in RETRY_STATUSES:
        raise WeexError(f"exchange still unavailable after retries ({detail})")
    if status != 200:
        raise WeexError(f"unexpected answer ({detail})")
    if not isinstance(body, dict):
        raise _RetryablePayload("exchange answered HTTP 200 with a body that is not JSON")
    if code not in SUCCESS_CODES:
        raise _RetryablePayload(f"exchange answered {detail}")
    return body


# ---------------------------------------------------------------------------------------------
# Parsing and paging
# ---------------------------------------------------------------------------------------------


class BadData(WeexError):
    """The exchange sent something we cannot store faithfully; nothing past it is stored."""


class Fill(NamedTuple):
    """One parsed fill (a NamedTuple: a long backfill creates hundreds of thousands)."""

    trade_id: str
    order_id: str
    side: str
    price: Decimal
    size: Decimal
    fee: Decimal
    trade_time: int
    raw: str  # the fill object as JSON text, encoded on the fetching thread

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.order_id, self.trade_id, self.trade_time)


SIDES = {"BUY": "1", "SELL": "2"}
ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
PRICE_FIELDS = ("fillPrice", "price")


def parse_fill(obj: Any, symbol: str) -> Fill:
    """A validated Fill, or BadData naming the field. Never guesses."""
    if not isinstance(obj, dict):
        raise BadData(f"fill is a {type(obj).__name__}, not an object")
    trade_id = _id_field(obj, "tradeId")
    where = f"fill tradeId={trade_id}"
    order_id = _id_field(obj, "orderId", where)
    trade_time = _int_field(obj, "createdTime", where)
    if str(obj.get("symbol", "")).lower() != symbol:
        raise BadData(f"{where}: symbol {obj.get('symbol')!r} does not match {symbol!r}")
    side = SIDES.get(obj.get("orderSide"))  # type: ignore[arg-type]
    if side is None:
        raise BadData(f"{where}: orderSide {obj.get('orderSide')!r} is not BUY or SELL")
    size = _decimal_field(obj, "fillSize", where)
    fee = _decimal_field(obj, "fillFee", where)
    price_field = next((f for f in PRICE_FIELDS if obj.get(f) not in (None, "")), None)
    if price_field:
        price = _decimal_field(obj, price_field, where)
    else:
        value = _decimal_field(obj, "fillValue", where)
        if size <= 0:
            raise BadData(f"{where}: fillSize {size} is not positive; price is undefined")
        price = exact_quotient(value, size)
    return Fill(trade_id, order_id, side, price, size, fee, trade_time, to_json(obj))


def _id_field(obj: dict, name: str, where: str = "fill") -> str:
    value = obj.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and ID_RE.match(value):
        return value
    raise BadData(f"{where}: {name} {_shown(value)} is not an id")


def _int_field(obj: dict, name: str, where: str) -> int:
    value = obj.get(name)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**14:
        return value
    raise BadData(f"{where}: {name} {_shown(value)} is not a time in milliseconds")


def _decimal_field(obj: dict, name: str, where: str) -> Decimal:
    value = obj.get(name)
    if isinstance(value, (str, int, Decimal)) and not isinstance(value, bool):
        try:
            number = Decimal(value)
        except InvalidOperation:
            number = None
        if number is not None and number.is_finite():
            return number
    raise BadData(f"{where}: {name} {_shown(value)} is not a decimal number")


def _shown(value: Any) -> str:
    return "missing" if value is None else repr(value)[:60]


PRICE_CONTEXT = Context(prec=60)


def exact_quotient(value: Decimal, size: Decimal) -> Decimal:
    """fillValue / fillSize. The exchange computes value = price * size, so the quotient
    terminates; 60 significant digits is far beyond any contract's price precision."""
    return PRICE_CONTEXT.divide(value, size).normalize(PRICE_CONTEXT)


def fee_coin(symbol: str) -> str:
    """The contract's margin coin: USDT for cmt_*usdt (USDC for cmt_*usdc)."""
    return symbol[-4:].upper()


@dataclass
class Page:
    """New fills of one response, newest first, and where to resume if we stop after storing
    them: ``resume_end`` is the next request's endTime, None once the range is exhausted."""

    fills: list[Fill]
    resume_end: int | None


def walk(
    client: WeexClient, symbol: str, start: int, end: int | None, page_size: int
) -> Iterator[Page]:
    """Every fill with start <= createdTime <= end (no end: up to now), as the contract's paging
    section prescribes: newest page first, the next request's endTime is the oldest createdTime
    of the page (inclusive), fills already seen at that boundary are dropped."""
    boundary_keys: set[tuple[str, str, int]] = set()
    while True:
        body = client.get_fills(symbol=symbol, startTime=start, endTime=end, limit=page_size)
        fills, more = parse_page(body, symbol, start, end)
        new = [f for f in fills if f.key not in boundary_keys]
        if not more:
            yield Page(new, None)
            return
        oldest = fills[-1].trade_time
        if fills[0].trade_time == oldest:
            burst = resolve_burst(client, symbol, oldest, fills, page_size)
            new = [f for f in burst if f.key not in boundary_keys]
            boundary_keys = set()
            end = oldest - 1
            yield Page(new, end if end >= start else None)
            if end < start:
                return
            continue
        boundary_keys = {f.key for f in fills if f.trade_time == oldest}
        end = oldest
        yield Page(new, end)


def parse_page(body: dict, symbol: str, start: int, end: int | None) -> tuple[list[Fill], bool]:
    """The page's fills sorted newest first (we do not rely on the exchange's order within a
    page) and its nextFlag. A page we cannot understand raises BadData."""
    items = body.get("list")
    more = body.get("nextFlag")
    if items is None and more is None:
        raise BadData("answer has neither 'list' nor 'nextFlag'")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise BadData(f"'list' is a {type(items).__name__}, not an array")
    if not isinstance(more, bool):
        raise BadData(f"'nextFlag' {_shown(more)} is not true/false")
    fills = [parse_fill(item, symbol) for item in items]
    for f in fills:
        if f.trade_time < start or (end is not None and f.trade_time > end):
            raise BadData(
                f"fill tradeId={f.trade_id} at {f.trade_time} is outside the requested range"
            )
    if more and not fills:
        raise BadData("exchange returned an empty page with nextFlag=true")
    fills.sort(key=lambda f: f.trade_time, reverse=True)
    return fills, more


def resolve_burst(
    client: WeexClient, symbol: str, ms: int, page: list[Fill], page_size: int
) -> list[Fill]:
    """All fills of millisecond ``ms`` when a full page holds nothing else: the inclusive walk
    cannot move past it, so fetch that millisecond order by order, and check the total."""
    expected = client.get_fills(symbol=symbol, startTime=ms, endTime=ms, limit=1).get("totals")
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise BadData(f"'totals' {_shown(expected)} is not a count")
    found = {f.key: f for f in page}
    for order_id in sorted({f.order_id for f in page}):
        body = client.get_fills(
            symbol=symbol, orderId=order_id, startTime=ms, endTime=ms, limit=page_size
        )
        fills, more = parse_page(body, symbol, ms, ms)
        if more:
            raise WeexError(
                f"order {order_id} has more than {page_size} fills in millisecond {ms} "
                f"({format_ms(ms)}); the API cannot page within one millisecond"
            )
        found.update((f.key, f) for f in fills)
    if len(found) < expected:
        raise WeexError(
            f"{expected} fills share millisecond {ms} ({format_ms(ms)}) but only {len(found)} "
            "are reachable through their orders; the rest cannot be fetched, so the sync of "
            "this symbol stops before that millisecond"
        )
    return sorted(found.values(), key=lambda f: (f.order_id, f.trade_id))


BATCH_PAGES = 10  # pages per transaction at most: 1,000 fills at the default page size
BATCH_SECONDS = 1.0  # ... and a commit at least every second while a walk is running


def batched(pages: Iterable[Page], flush_now: Callable[[], bool]) -> Iterator[Page]:
    """Consecutive pages merged into one, so a long backfill commits ~1,000 fills at a time
    (bigger statements, fewer commits) instead of 100; a merged page resumes where its last
    page does. A batch is cut short at the walk's end, after BATCH_SECONDS, or on flush_now()."""
    fills: list[Fill] = []
    count, started, resume_end = 0, time.monotonic(), None
    try:
        for page in pages:
            fills.extend(page.fills)
            count, resume_end = count + 1, page.resume_end
            if (
                resume_end is None
                or count >= BATCH_PAGES
                or time.monotonic() - started >= BATCH_SECONDS
                or flush_now()
            ):
                yield Page(fills, resume_end)
                fills, count, started = [], 0, time.monotonic()
    except Exception:
        if count:  # the pages before a failure are good: store them before reporting it
            yield Page(fills, resume_end)
        raise


def prefetch(items: Iterator[T], cancel: threading.Event, depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread up to ``depth`` items ahead, so the next HTTP
    request overlaps the database write of the current page. Exceptions are re-raised here."""
    done = object()
    channel: queue.Queue = queue.Queue(maxsize=depth)

    def put(item: Any) -> bool:
        while not cancel.is_set():
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

    worker = threading.Thread(target=produce, name="weex-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = channel.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()
        worker.join(timeout=60)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

SCHEMA_SQL = """\
-- weex_sync schema (python weex_sync.py --print-schema); weex_sync creates it when missing.

-- One row per fill, exactly as the exchange reported it (raw) plus typed columns.
CREATE TABLE IF NOT EXISTS trade_fills (
    user_id    text        NOT NULL,
    order_id   text        NOT NULL,
    trade_id   text        NOT NULL,
    symbol     text        NOT NULL,
    side       text        NOT NULL CHECK (side IN ('1', '2')),  -- '1' buy, '2' sell
    price      numeric     NOT NULL,
    size       numeric     NOT NULL,
    fee        numeric     NOT NULL,                             -- sign as sent (negative = rebate)
    fee_coin   text        NOT NULL,
    trade_time bigint      NOT NULL,                             -- createdTime, ms since epoch
    raw        jsonb       NOT NULL,
    synced_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT trade_fills_fill_key UNIQUE (user_id, order_id, trade_id, trade_time)
);
CREATE INDEX IF NOT EXISTS trade_fills_user_symbol_time
    ON trade_fills (user_id, symbol, trade_time DESC);

-- Append-only: one row per (user, symbol) per pass.
CREATE TABLE IF NOT EXISTS sync_status (
    id              bigserial   PRIMARY KEY,
    pass_id         text        NOT NULL,
    user_id         text        NOT NULL,
    symbol          text        NOT NULL,
    last_sync_time  timestamptz NOT NULL DEFAULT now(),
    last_trade_time bigint,                  -- newest fill stored for (user, symbol), ms
    records_count   integer     NOT NULL,    -- rows inserted this pass
    fetched_count   integer     NOT NULL,    -- fills received this pass
    requests_count  integer     NOT NULL,    -- HTTP requests made, retries included
    duration_ms     integer     NOT NULL,
    status          text        NOT NULL CHECK (status IN ('success', 'error')),
    error_message   text
);
CREATE INDEX IF NOT EXISTS sync_status_last_sync_time ON sync_status (last_sync_time DESC);
CREATE INDEX IF NOT EXISTS sync_status_user_symbol
    ON sync_status (user_id, symbol, last_sync_time DESC);

-- The incremental cursor, written in the same transaction as the fills it covers.
-- Every fill with createdTime < synced_through is stored, except while walk_end is set:
-- then an interrupted walk still owes [synced_through, walk_end] and, when it completes,
-- moves synced_through to walk_target. The next walk starts at synced_through inclusive.
CREATE TABLE IF NOT EXISTS sync_cursor (
    user_id        text        NOT NULL,
    symbol         text        NOT NULL,
    synced_through bigint      NOT NULL,
    walk_end       bigint,
    walk_target    bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, symbol)
);

-- For analysts: times as timestamptz (UTC) and sides as words.
CREATE OR REPLACE VIEW trade_fills_readable AS
SELECT user_id, symbol, order_id, trade_id,
       CASE side WHEN '1' THEN 'buy' WHEN '2' THEN 'sell' END AS side,
       price, size, fee, fee_coin,
       to_timestamp(trade_time / 1000.0) AS trade_time,
       synced_at
  FROM trade_fills;
"""

SCHEMA_LOCK_KEY = 0x7765_6578_5F73_796E  # "wex_syn": serialises concurrent schema creation
# One statement per page with a column array per field: measured 1.7x the rows/s of
# execute_values (which renders one VALUES tuple per row in Python); see bench/.
INSERT_FILLS_SQL = """
INSERT INTO trade_fills (user_id, order_id, trade_id, symbol, side, price, size, fee, fee_coin,
                         trade_time, raw)
SELECT %s, order_id, trade_id, %s, side, price, size, fee, %s, trade_time, raw::jsonb
  FROM unnest(%s::text[], %s::text[], %s::text[], %s::numeric[], %s::numeric[], %s::numeric[],
              %s::bigint[], %s::text[])
       AS page(order_id, trade_id, side, price, size, fee, trade_time, raw)
ON CONFLICT DO NOTHING
"""
SAVE_CURSOR_SQL = """
INSERT INTO sync_cursor (user_id, symbol, synced_through, walk_end, walk_target)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (user_id, symbol) DO UPDATE
   SET synced_through = EXCLUDED.synced_through, walk_end = EXCLUDED.walk_end,
       walk_target = EXCLUDED.walk_target, updated_at = now()
"""
INSERT_STATUS_SQL = """
INSERT INTO sync_status (pass_id, user_id, symbol, last_trade_time, records_count,
                         fetched_count, requests_count, duration_ms, status, error_message)
VALUES (%(pass_id)s, %(user_id)s, %(symbol)s,
        (SELECT max(trade_time) FROM trade_fills
          WHERE user_id = %(user_id)s AND symbol = %(symbol)s),
        %(inserted)s, %(fetched)s, %(requests)s, %(duration_ms)s, %(status)s, %(error)s)
"""


class DatabaseUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Cursor:
    synced_through: int
    walk_end: int | None = None
    walk_target: int | None = None


def connect(db: DatabaseConfig, dbname: str | None = None) -> psycopg2.extensions.connection:
    return psycopg2.connect(
        host=db.host,
        port=db.port,
        user=db.user,
        password=db.password,
        dbname=dbname or db.dbname,
        sslmode=db.sslmode,
        connect_timeout=10,
        application_name="weex_sync",
    )


def open_database(db: DatabaseConfig) -> psycopg2.extensions.connection:
    """Connect, creating the database first (through the ``postgres`` database) if missing."""
    try:
        return connect(db)
    except psycopg2.OperationalError as exc:
        if f'database "{db.dbname}" does not exist' not in str(exc):
            raise DatabaseUnavailable(_first_line(exc)) from None
    try:
        admin = connect(db, "postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db.dbname)))
        admin.close()
        log.info("created database %s on %s:%s", db.dbname, db.host, db.port)
    except psycopg2.errors.DuplicateDatabase:
        pass
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(
            f'database "{db.dbname}" does not exist and cannot be created: {_first_line(exc)}'
        ) from None
    try:
        return connect(db)
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(_first_line(exc)) from None


def ensure_schema(conn: psycopg2.extensions.connection) -> None:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cur.execute(SCHEMA_SQL)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def lock_key(user_id: str, symbol: str) -> int:
    """A stable signed 64-bit advisory-lock key for one (user, symbol)."""
    digest = hashlib.blake2b(f"weex_sync\0{user_id}\0{symbol}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def try_lock(conn: psycopg2.extensions.connection, user_id: str, symbol: str) -> bool:
    """Session-level try-lock: never waits; PostgreSQL drops it if this process dies."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(user_id, symbol),))
        return bool(cur.fetchone()[0])


def unlock(conn: psycopg2.extensions.connection, user_id: str, symbol: str) -> None:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (lock_key(user_id, symbol),))


def load_cursor(conn: psycopg2.extensions.connection, user_id: str, symbol: str) -> Cursor | None:
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT synced_through, walk_end, walk_target FROM sync_cursor"
            " WHERE user_id = %s AND symbol = %s",
            (user_id, symbol),
        )
        row = cur.fetchone()
    return Cursor(*row) if row else None


def save_page(
    conn: psycopg2.extensions.connection,
    user_id: str,
    symbol: str,
    fills: list[Fill],
    cursor: Cursor | None,
) -> int:
    """Insert the page's fills and move the cursor (unless None) in one transaction; returns
    the number of rows inserted."""
    with conn, conn.cursor() as cur:
        inserted = 0
        if fills:
            cur.execute(
                INSERT_FILLS_SQL,
                (
                    user_id,
                    symbol,
                    fee_coin(symbol),
                    [f.order_id for f in fills],
                    [f.trade_id for f in fills],
                    [f.side for f in fills],
                    [f.price for f in fills],
                    [f.size for f in fills],
                    [f.fee for f in fills],
                    [f.trade_time for f in fills],
                    [f.raw for f in fills],
                ),
            )
            inserted = cur.rowcount
        if cursor is not None:
            cur.execute(
                SAVE_CURSOR_SQL,
                (user_id, symbol, cursor.synced_through, cursor.walk_end, cursor.walk_target),
            )
    return inserted


def count_new(conn: psycopg2.extensions.connection, user_id: str, fills: list[Fill]) -> int:
    """How many of these fills are not stored yet (read only, for --dry-run)."""
    if not fills:
        return 0
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM trade_fills WHERE user_id = %s"
            " AND (order_id, trade_id, trade_time) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]))",
            (
                user_id,
                [f.order_id for f in fills],
                [f.trade_id for f in fills],
                [f.trade_time for f in fills],
            ),
        )
        return len(fills) - cur.fetchone()[0]


def record_status(conn: psycopg2.extensions.connection, row: dict) -> None:
    with conn, conn.cursor() as cur:
        cur.execute(INSERT_STATUS_SQL, row)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); what was fetched so far is committed."""


@dataclass
class Outcome:
    user_id: str
    symbol: str
    status: str = "success"  # success | error | skipped | interrupted
    fetched: int = 0
    inserted: int = 0
    requests: int = 0
    duration_ms: int = 0
    error: str | None = None
    user_wide: bool = False


class Redactor:
    """Replaces every configured secret in a text with '***'."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # one alternation, longest first, so a line is scanned once however many users there are
        ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        return self.pattern.sub("***", text) if self.pattern else text


class Worker:
    """What one pool thread owns: an HTTP session and a database connection, reused across
    the users it syncs (one connection per worker, never one per request)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.session = make_session(cfg.weex)
        self._conn: psycopg2.extensions.connection | None = None

    def conn(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = connect(self.cfg.database)
            except psycopg2.Error as exc:
                raise DatabaseUnavailable(_first_line(exc)) from None
        return self._conn

    def drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.drop_connection()
        self.session.close()


@dataclass(frozen=True)
class PassOptions:
    """dry_run: fetch and count, write nothing. since/until: re-scan that range (ms, until
    None = now) without moving the cursor; fills already stored are left alone."""

    dry_run: bool = False
    since: int | None = None
    until: int | None = None


class SyncPass:
    """One pass over the selected (user, symbol) pairs, users spread over a worker pool."""

    def __init__(
        self,
        cfg: Config,
        stop: threading.Event,
        redact: Redactor,
        clock: ServerClock | None = None,
        options: PassOptions | None = None,
    ) -> None:
        self.cfg = cfg
        self.options = options or PassOptions()
        self.stop = stop
        self.redact = redact
        self.clock = clock or ServerClock()
        rl = cfg.weex.rate_limit
        self.ip_limiter = RollingWindowLimiter(rl.ip_weight, rl.window_seconds)
        self.uid_limiters = {
            u.api_key: RollingWindowLimiter(rl.uid_weight, rl.window_seconds)
            for u in cfg.sync.users
        }
        self.pass_id = uuid.uuid4().hex[:12]
        self._local = threading.local()
        self._workers: list[Worker] = []
        self._workers_lock = threading.Lock()

    def run(self, users: list[UserConfig]) -> list[Outcome]:
        started = time.monotonic()
        pairs = sum(len(u.symbols) for u in users)
        mode = " (dry run)" if self.options.dry_run else ""
        if self.options.since is not None:
            until = format_ms(self.options.until) if self.options.until else "now"
            mode += f" (re-scan {format_ms(self.options.since)} .. {until})"
        log.info(
            "pass %s started%s: %d users, %d (user, symbol) pairs, %d workers",
            self.pass_id,
            mode,
            len(users),
            pairs,
            self.cfg.sync.workers,
            extra={"event": "pass_start", "pass_id": self.pass_id},
        )
        try:
            with ThreadPoolExecutor(self.cfg.sync.workers, thread_name_prefix="sync") as pool:
                outcomes = [o for batch in pool.map(self.sync_user, users) for o in batch]
        finally:
            for worker in self._workers:
                worker.close()
        self._log_summary(outcomes, time.monotonic() - started)
        return outcomes

    def _worker(self) -> Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = self._local.worker = Worker(self.cfg)
            with self._workers_lock:
                self._workers.append(worker)
        return worker

    def sync_user(self, user: UserConfig) -> list[Outcome]:
        """The user's symbols in order; a credentials failure fails the rest without requests."""
        outcomes: list[Outcome] = []
        user_error: str | None = None
        for symbol in user.symbols:
            if self.stop.is_set():
                break
            if user_error:
                outcome = Outcome(user.user_id, symbol, status="error", error=user_error)
                self._finish(self._worker(), outcome)
            else:
                outcome = self.sync_symbol(user, symbol)
                if outcome.user_wide:
                    user_error = outcome.error
            outcomes.append(outcome)
        return outcomes

    def sync_symbol(self, user: UserConfig, symbol: str) -> Outcome:
        worker = self._worker()
        outcome = Outcome(user.user_id, symbol)
        started = time.monotonic()
        client = WeexClient(
            self.cfg.weex,
            user,
            worker.session,
            self.clock,
            self.ip_limiter,
            self.uid_limiters[user.api_key],
        )
        locked = False
        try:
            locked = try_lock(worker.conn(), user.user_id, symbol)
            if not locked:
                log.warning(
                    "%s/%s: skipped, another weex_sync process is syncing it",
                    user.user_id,
                    symbol,
                    extra={"event": "skipped", "user": user.user_id, "symbol": symbol},
                )
                outcome.status = "skipped"
                return outcome
            self._sync_locked(worker, client, outcome)
        except Interrupted:
            outcome.status = "interrupted"
        except WeexError as exc:
            outcome.status, outcome.error, outcome.user_wide = "error", str(exc), exc.user_wide
        except (psycopg2.Error, DatabaseUnavailable) as exc:
            outcome.status, outcome.error = "error", f"database error: {_first_line(exc)}"
            worker.drop_connection()
            locked = False
        except Exception as exc:  # one pair's bug must not stop the pass
            log.exception("%s/%s: unexpected error", user.user_id, symbol)
            outcome.status, outcome.error = "error", f"internal error: {_first_line(exc)}"
        finally:
            if locked:
                self._release(worker, user.user_id, symbol)
            outcome.requests = client.requests_made
            outcome.duration_ms = int((time.monotonic() - started) * 1000)
        self._finish(worker, outcome)
        return outcome

    def _release(self, worker: Worker, user_id: str, symbol: str) -> None:
        try:
            unlock(worker.conn(), user_id, symbol)
        except psycopg2.Error:
            worker.drop_connection()  # the lock dies with the session

    def _sync_locked(self, worker: Worker, client: WeexClient, outcome: Outcome) -> None:
        """Finish an interrupted walk if there is one, then walk from the cursor to now.
        A re-scan (--since) walks its own range and leaves the cursor alone."""
        if self.options.since is not None:
            self._walk_and_store(
                worker, client, outcome, Cursor(self.options.since, self.options.until), False
            )
            return
        conn = worker.conn()
        cursor = load_cursor(conn, outcome.user_id, outcome.symbol) or Cursor(
            self.cfg.sync.start_time
        )
        if cursor.walk_end is not None:
            log.info(
                "%s/%s: resuming an interrupted walk over %s .. %s",
                outcome.user_id,
                outcome.symbol,
                format_ms(cursor.synced_through),
                format_ms(cursor.walk_end),
                extra={"event": "resume", "user": outcome.user_id, "symbol": outcome.symbol},
            )
            cursor = self._walk_and_store(worker, client, outcome, cursor, True)
        self._walk_and_store(worker, client, outcome, Cursor(cursor.synced_through), True)

    def _walk_and_store(
        self,
        worker: Worker,
        client: WeexClient,
        outcome: Outcome,
        cursor: Cursor,
        move_cursor: bool,
    ) -> Cursor:
        """Store pages as they arrive, each batch of pages and its cursor in one transaction,
        so a pass killed at any moment resumes exactly where its last commit left off."""
        start, target = cursor.synced_through, cursor.walk_target
        stored = cursor
        progress = Progress(outcome)
        cancel = threading.Event()
        pages = walk(client, outcome.symbol, start, cursor.walk_end, self.cfg.sync.page_size)
        for page in batched(prefetch(pages, cancel, depth=2 * BATCH_PAGES), self.stop.is_set):
            if page.fills:
                newest = max(f.trade_time for f in page.fills)
                target = newest if target is None else max(target, newest)
            if page.resume_end is None:
                cursor = Cursor(max(start, target) if target is not None else start)
            else:
                cursor = Cursor(start, page.resume_end, target)
            outcome.fetched += len(page.fills)
            if self.options.dry_run:
                outcome.inserted += count_new(worker.conn(), outcome.user_id, page.fills)
            elif page.fills or (move_cursor and cursor != stored):
                outcome.inserted += save_page(
                    worker.conn(),
                    outcome.user_id,
                    outcome.symbol,
                    page.fills,
                    cursor if move_cursor else None,
                )
                stored = cursor
            progress.update(page)
            if self.stop.is_set() and page.resume_end is not None:
                raise Interrupted()
        return cursor

    def _finish(self, worker: Worker, outcome: Outcome) -> None:
        if outcome.error:
            outcome.error = self.redact(outcome.error)
        if outcome.status == "skipped":
            return
        interrupted = outcome.status == "interrupted"
        if interrupted:
            log.warning(
                "%s/%s: interrupted after %d fills; the next pass resumes where this one stopped",
                outcome.user_id,
                outcome.symbol,
                outcome.inserted,
                extra={"event": "interrupted", "user": outcome.user_id, "symbol": outcome.symbol},
            )
            outcome.status = "error"
            outcome.error = "interrupted by a stop signal; the next pass resumes"
        if not self.options.dry_run:
            self._record(worker, outcome)
        if interrupted:
            outcome.status = "interrupted"
        self._log_outcome(outcome)

    def _record(self, worker: Worker, outcome: Outcome) -> None:
        row = {
            "pass_id": self.pass_id,
            "user_id": outcome.user_id,
            "symbol": outcome.symbol,
            "inserted": outcome.inserted,
            "fetched": outcome.fetched,
            "requests": outcome.requests,
            "duration_ms": outcome.duration_ms,
            "status": outcome.status,
            "error": outcome.error,
        }
        try:
            record_status(worker.conn(), row)
        except (psycopg2.Error, DatabaseUnavailable) as exc:
            worker.drop_connection()
            log.error(
                "%s/%s: cannot record sync_status: %s",
                outcome.user_id,
                outcome.symbol,
                self.redact(_first_line(exc)),
            )

    def _log_outcome(self, o: Outcome) -> None:
        new = "new" if self.options.dry_run else "inserted"
        counts = (
            f"fetched={o.fetched} {new}={o.inserted} present={o.fetched - o.inserted} "
            f"requests={o.requests} duration_ms={o.duration_ms}"
        )
        fields = {
            "user": o.user_id,
            "symbol": o.symbol,
            "fetched": o.fetched,
            "inserted": o.inserted,
            "present": o.fetched - o.inserted,
            "requests": o.requests,
            "duration_ms": o.duration_ms,
        }
        if o.status == "success":
            log.info(
                "%s/%s: ok %s", o.user_id, o.symbol, counts, extra={"event": "synced", **fields}
            )
        elif o.status == "error":
            log.error(
                "%s/%s: error %s: %s",
                o.user_id,
                o.symbol,
                counts,
                o.error,
                extra={"event": "sync_error", "error": o.error, **fields},
            )

    def _log_summary(self, outcomes: list[Outcome], seconds: float) -> None:
        counts = {
            s: sum(o.status == s for o in outcomes)
            for s in ("success", "error", "skipped", "interrupted")
        }
        totals = {
            "fetched": sum(o.fetched for o in outcomes),
            "inserted": sum(o.inserted for o in outcomes),
            "requests": sum(o.requests for o in outcomes),
        }
        log.log(
            logging.ERROR if counts["error"] else logging.INFO,
            "pass %s finished in %.1fs: %d ok, %d failed, %d skipped, %d interrupted; "
            "fetched=%d %s=%d requests=%d%s",
            self.pass_id,
            seconds,
            counts["success"],
            counts["error"],
            counts["skipped"],
            counts["interrupted"],
            totals["fetched"],
            "new" if self.options.dry_run else "inserted",
            totals["inserted"],
            totals["requests"],
            " (dry run: nothing written)" if self.options.dry_run else "",
            extra={
                "event": "pass_done",
                "pass_id": self.pass_id,
                "duration_ms": int(seconds * 1000),
                **{f"{k}_count": v for k, v in counts.items()},
                **totals,
            },
        )


class Progress:
    """Logs a progress line every few seconds while a long walk is running."""

    EVERY_SECONDS = 5.0

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.started = time.monotonic()
        self.last = self.started

    def update(self, page: Page) -> None:
        now = time.monotonic()
        if now - self.last < self.EVERY_SECONDS or not page.fills:
            return
        self.last = now
        rate = self.outcome.fetched / max(now - self.started, 1e-9)
        log.info(
            "%s/%s: backfill reached %s, %d fills so far (%.0f fills/s)",
            self.outcome.user_id,
            self.outcome.symbol,
            format_ms(page.fills[-1].trade_time),
            self.outcome.fetched,
            rate,
            extra={
                "event": "progress",
                "user": self.outcome.user_id,
                "symbol": self.outcome.symbol,
                "fetched": self.outcome.fetched,
            },
        )


def exit_code(outcomes: list[Outcome]) -> int:
    return EXIT_SYNC_FAILED if any(o.status == "error" for o in outcomes) else EXIT_OK


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class RedactingFormatter(logging.Formatter):
    """UTC timestamps; secrets scrubbed from every line, tracebacks included."""

    converter = time.gmtime

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s")
        self.datefmt = "%Y-%m-%dT%H:%M:%S"
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(RedactingFormatter):
    """One JSON object per line: ts, level, event, message and the event's fields."""

    FIELDS = (
        "user",
        "symbol",
        "pass_id",
        "fetched",
        "inserted",
        "present",
        "requests",
        "duration_ms",
        "success_count",
        "error_count",
        "skipped_count",
        "interrupted_count",
        "error",
    )

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": format_ms(int(record.created * 1000)),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weex_sync.py",
        description="Copy WEEX futures trade fills into PostgreSQL: one sync pass, then exit.",
        epilog="Exit codes: 0 all synced, 1 some (user, symbol) failed, 2 configuration or "
        "usage error, 3 database unreachable.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run one pass and exit (default)")
    mode.add_argument(
        "--loop",
        nargs="?",
        type=int,
        const="interval",
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
        help="YAML config file (default: config.yaml if it exists, else environment only)",
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
    parser.add_argument("--json", action="store_true", help="with --status: print JSON")
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


def pass_options(args: argparse.Namespace) -> PassOptions:
    if args.until and not args.since:
        raise ConfigError("--until: needs --since")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    if since is not None and until is not None and until < since:
        raise ConfigError(f"--until {args.until}: is before --since {args.since}")
    if args.json and not args.status:
        raise ConfigError("--json: only with --status")
    return PassOptions(dry_run=args.dry_run, since=since, until=until)


def select_users(
    cfg: Config, user_ids: list[str] | None, symbols: list[str] | None
) -> list[UserConfig]:
    """The enabled users, restricted by --user / --symbol."""
    users = [u for u in cfg.sync.users if u.enabled]
    if user_ids:
        known = {u.user_id for u in cfg.sync.users}
        for user_id in user_ids:
            if user_id not in known:
                raise ConfigError(f"--user {user_id}: no such user in the configuration")
            if not any(u.user_id == user_id for u in users):
                raise ConfigError(f"--user {user_id}: the user is disabled (enabled: false)")
        users = [u for u in users if u.user_id in user_ids]
    if symbols:
        wanted = [s.strip().lower() for s in symbols]
        configured = {s for u in cfg.sync.users for s in u.symbols}
        for symbol in wanted:
            if symbol not in configured:
                raise ConfigError(f"--symbol {symbol}: not a configured symbol")
        users = [replace(u, symbols=tuple(s for s in u.symbols if s in wanted)) for u in users]
    return [u for u in users if u.symbols]


def install_stop_handlers(stop: threading.Event) -> dict[int, Any]:
    """SIGINT/SIGTERM set ``stop``: the current page commits, then the process exits.
    Returns the previous handlers so main() can put them back."""

    def handle(signum: int, _frame: Any) -> None:
        log.warning("%s received: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def prepare_database(cfg: Config, redact: Redactor) -> bool:
    """Create the database and schema when missing; False (logged) if unreachable."""
    try:
        conn = open_database(cfg.database)
        try:
            ensure_schema(conn)
        finally:
            conn.close()
    except (DatabaseUnavailable, psycopg2.Error) as exc:
        log.error(
            "database unreachable (%s:%s/%s): %s",
            cfg.database.host,
            cfg.database.port,
            cfg.database.dbname,
            redact(_first_line(exc)),
            extra={"event": "db_unreachable"},
        )
        return False
    return True


def run_passes(
    cfg: Config,
    users: list[UserConfig],
    loop_seconds: int | None,
    stop: threading.Event,
    redact: Redactor,
    options: PassOptions,
) -> int:
    clock = ServerClock()

    def one_pass() -> int:
        if not prepare_database(cfg, redact):
            return EXIT_DB_UNREACHABLE
        return exit_code(SyncPass(cfg, stop, redact, clock, options).run(users))

    if loop_seconds is None:
        return one_pass()
    while not stop.is_set():
        one_pass()
        stop.wait(loop_seconds)
    return EXIT_OK


# --- --check and --status ----------------------------------------------------------------------

LATEST_STATUS_SQL = """
SELECT DISTINCT ON (user_id, symbol)
       user_id, symbol, status, last_sync_time, now() - last_sync_time AS age,
       records_count, fetched_count, requests_count, last_trade_time, error_message
  FROM sync_status
 ORDER BY user_id, symbol, last_sync_time DESC, id DESC
"""


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


def latest_status(conn: psycopg2.extensions.connection) -> dict[tuple[str, str], dict]:
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(LATEST_STATUS_SQL)
        return {(r["user_id"], r["symbol"]): dict(r) for r in cur.fetchall()}


def newest_fill(conn: psycopg2.extensions.connection, user_id: str, symbol: str) -> int | None:
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT max(trade_time) FROM trade_fills WHERE user_id = %s AND symbol = %s",
            (user_id, symbol),
        )
        return cur.fetchone()[0]


def print_status(cfg: Config, as_json: bool) -> int:
    conn = open_database(cfg.database)
    try:
        ensure_schema(conn)
        rows = list(latest_status(conn).values())
    finally:
        conn.close()
    if as_json:
        for row in rows:
            row["last_sync_time"] = row["last_sync_time"].astimezone(dt.UTC).isoformat()
            row["age_seconds"] = int(row.pop("age").total_seconds())
            row["last_trade_time_utc"] = (
                format_ms(row["last_trade_time"]) if row["last_trade_time"] else None
            )
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no sync has run yet (sync_status is empty)")
        return EXIT_OK
    headers = ["USER", "SYMBOL", "STATUS", "LAST SYNC (UTC)", "AGE", "INSERTED", "FETCHED"]
    headers += ["REQUESTS", "LAST FILL (UTC)", "ERROR"]
    table = [
        [
            r["user_id"],
            r["symbol"],
            r["status"],
            r["last_sync_time"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            format_age(r["age"]),
            str(r["records_count"]),
            str(r["fetched_count"]),
            str(r["requests_count"]),
            format_ms(r["last_trade_time"]),
            (r["error_message"] or "")[:80],
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    return EXIT_OK


def check_credentials(cfg: Config, user: UserConfig, session: requests.Session) -> str | None:
    """None if one signed fills request for the user's first symbol succeeds, else why not."""
    rl = cfg.weex.rate_limit
    client = WeexClient(
        cfg.weex,
        user,
        session,
        ServerClock(),
        RollingWindowLimiter(rl.ip_weight, rl.window_seconds),
        RollingWindowLimiter(rl.uid_weight, rl.window_seconds),
    )
    try:
        client.get_fills(symbol=user.symbols[0], limit=1)
    except WeexError as exc:
        return str(exc)
    return None


def run_check(cfg: Config, users: list[UserConfig], redact: Redactor) -> int:
    if not prepare_database(cfg, redact):
        return EXIT_DB_UNREACHABLE
    print(f"database: ok ({cfg.database.host}:{cfg.database.port}/{cfg.database.dbname})")
    conn = connect(cfg.database)
    session = make_session(cfg.weex)
    table, usable = [], True
    try:
        latest = latest_status(conn)
        for user in users:
            problem = check_credentials(cfg, user, session)
            usable = usable and problem is None
            for symbol in user.symbols:
                status = latest.get((user.user_id, symbol))
                table.append(
                    [
                        user.user_id,
                        symbol,
                        "ok" if problem is None else redact(f"FAILED: {problem}")[:90],
                        format_ms(newest_fill(conn, user.user_id, symbol)),
                        status["status"] if status else "never synced",
                    ]
                )
    finally:
        conn.close()
        session.close()
    headers = ["USER", "SYMBOL", "CREDENTIALS", "LAST SYNCED FILL (UTC)", "LAST STATUS"]
    print(format_table(headers, table))
    return EXIT_OK if usable else EXIT_SYNC_FAILED


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_schema:
        sys.stdout.write(SCHEMA_SQL)
        return EXIT_OK
    environ = os.environ if environ is None else environ
    setup_logging(args.log_level, Redactor(), args.log_format, args.quiet)
    config_path = args.config or ("config.yaml" if os.path.exists("config.yaml") else None)
    try:
        cfg = load_config(config_path, environ)
        users = select_users(cfg, args.user, args.symbol)
        options = pass_options(args)
    except ConfigError as exc:
        log.error("configuration error: %s", exc, extra={"event": "config_error"})
        return EXIT_CONFIG
    redact = Redactor(cfg.secrets())
    setup_logging(args.log_level, redact, args.log_format, args.quiet)
    if args.status or args.check:
        try:
            return print_status(cfg, args.json) if args.status else run_check(cfg, users, redact)
        except (DatabaseUnavailable, psycopg2.Error) as exc:
            log.error("database unreachable: %s", redact(_first_line(exc)))
            return EXIT_DB_UNREACHABLE
    loop_seconds = None
    if args.loop is not None:
        if args.loop == "interval":
            loop_seconds = cfg.sync.interval_seconds
        elif args.loop < 1:
            log.error("configuration error: --loop %d: must be at least 1 second", args.loop)
            return EXIT_CONFIG
        else:
            loop_seconds = args.loop
    stop = threading.Event()
    previous_handlers = install_stop_handlers(stop)
    try:
        return run_passes(cfg, users, loop_seconds, stop, redact, options)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
