"""The cursor rule and the walk, against an in-memory exchange: properties over random histories.

No database, no HTTP (``pytest -m unit``). ``FakeExchange`` implements ``weex_sync.FillSource``
(the protocol the real client implements too) and behaves every way the docs leave open: it
selects the newest or the oldest fills of a range, lists a page in either order or shuffled,
and serves what the test makes visible, when it makes it visible. ``MemoryStore`` keeps one
pair's fills, quarantine and cursor with the rules of ``Store.save_batch`` (the database layer
itself is tested against PostgreSQL elsewhere), so a "pass" here is the real ``plan_walk`` and
the real ``Walk``, committing each batch.

Hypothesis runs a few dozen examples per property by default (seconds); HYPOTHESIS_PROFILE=ci
runs many more (see tests/harness.py).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import weex_sync
from weex_sync import V2, V3, Cursor, CursorRule

pytestmark = pytest.mark.unit

DAY = 86_400_000
HOUR = 3_600_000
T0 = 1_700_000_000_000
SCOPE = "cmt_btcusdt"
RULE = CursorRule(
    start_time=T0, lookback_ms=120_000, reconcile_every_ms=DAY, reconcile_window_ms=2 * DAY
)


# --- the in-memory exchange ----------------------------------------------------------------


def fill(n: int, ms: int, order: int | None = None, **fields) -> dict:
    """A v3 fill; ``_t`` (never served) is where the exchange files it."""
    obj = {
        "id": n,
        "orderId": order if order is not None else 10_000 + n // 3,
        "symbol": "BTCUSDT",
        "side": "BUY" if n % 2 else "SELL",
        "price": "100.5",
        "qty": "0.5",
        "commission": "0.01",
        "commissionAsset": "USDT",
        "time": ms,
        "_t": ms,
        "_n": n,  # the exchange's order among fills of one millisecond
    }
    obj.update(fields)
    return obj


def as_v2(f: dict) -> dict:
    return {
        "tradeId": f["id"],
        "orderId": f["orderId"],
        "symbol": "cmt_btcusdt",
        "orderSide": f["side"],
        "fillSize": f["qty"],
        "fillValue": str(Decimal(f["qty"]) * Decimal(f["price"]))
        if _is_decimal(f["qty"]) and _is_decimal(f["price"])
        else f["price"],
        "fillFee": f["commission"],
        "createdTime": f["time"],
    }


def _is_decimal(value) -> bool:
    return isinstance(value, str) and weex_sync.PLAIN_DECIMAL_RE.fullmatch(value) is not None


class FakeExchange:
    """One account's fills endpoint in memory (a weex_sync.FillSource)."""

    def __init__(self, api: weex_sync.Api, fills=(), selects="newest", listing="sorted", seed=0):
        self.api = api
        self.user_id = "u"
        self.selects = selects  # which end of a range a full page is taken from
        self.listing = listing  # "sorted" (as selected), "newest", "oldest" or "shuffled"
        self.rng = random.Random(seed)
        self.fills: list[dict] = []
        self.times: list[int] = []
        self.requests = 0
        self.later: list[tuple[int, list[dict]]] = []  # (after request N, fills shown then)
        self.show(fills)

    def show(self, fills) -> None:
        """Make fills visible (a late fill is shown after a pass has read its time)."""
        self.fills = sorted([*self.fills, *fills], key=lambda f: (f["_t"], f["_n"]))
        self.times = [f["_t"] for f in self.fills]

    def page(
        self, scope: str, start: int, end: int, limit: int, order_id: str | None = None
    ) -> weex_sync.Answer:
        body = self.body(scope, start, end, limit, order_id)
        return weex_sync.parse_answer(self.api, body, scope, start, end, limit)

    def body(self, scope, start, end, limit, order_id=None):
        """The answer as the exchange sends it (parsed JSON)."""
        self.requests += 1
        for n, fills in [entry for entry in self.later if entry[0] < self.requests]:
            self.later.remove((n, fills))
            self.show(fills)  # shown while a walk is running
        assert start <= end and 1 <= limit <= 100
        if self.api.max_span_ms is not None:
            assert end - start <= self.api.max_span_ms, "a request over more than 7 days"
        rows = self.fills[
            bisect.bisect_left(self.times, start) : bisect.bisect_right(self.times, end)
        ]
        if order_id is not None:
            rows = [f for f in rows if str(f.get("orderId")) == order_id]
        page = rows[-limit:] if self.selects == "newest" else rows[:limit]
        if self.listing == "newest" or (self.listing == "sorted" and self.selects == "newest"):
            page = page[::-1]
        elif self.listing == "shuffled":
            page = page[:]
            self.rng.shuffle(page)
        served = [self._served(f) for f in page]
        if self.api.version == 3:
            return served
        return {"list": served, "nextFlag": len(rows) > limit, "totals": len(rows)}

    def _served(self, f: dict):
        if "_serve" in f:
            return f["_serve"]
        obj = {k: v for k, v in f.items() if not k.startswith("_")}
        return obj if self.api.version == 3 else as_v2(obj)


class MemoryStore:
    """One pair's trade_fills, rejected_fills and cursor, with Store.save_batch's rules."""

    def __init__(self) -> None:
        self.fills: dict[tuple[str, str], weex_sync.Fill] = {}
        self.rejected: dict[str, weex_sync.Rejected] = {}
        self.cursor: Cursor | None = None
        self.inserted_twice = 0

    def newest(self) -> int | None:
        return max((f.trade_time for f in self.fills.values()), default=None)

    def save(self, batch: weex_sync.Batch) -> None:
        versions: dict[tuple[str, str], list[weex_sync.Fill]] = {}
        for f in batch.fills:
            served = versions.setdefault((f.order_id, f.trade_id), [])
            if not any(f.same_content(other) for other in served):
                served.append(f)
        for key, served in versions.items():
            stored = self.fills.get(key)
            if stored is None and len(served) > 1:  # which one is the fill cannot be told
                self._reject(*served)
            elif stored is None:
                self.fills[key] = served[0]
            else:
                self._reject(*(f for f in served if not stored.same_content(f)))
        for r in batch.rejected:
            self.rejected[r.fingerprint] = r
        self.cursor = batch.cursor

    def _reject(self, *fills: weex_sync.Fill) -> None:
        for f in fills:
            correction = weex_sync.fill_rejected(f, "correction")
            self.rejected[correction.fingerprint] = correction

    def ids(self) -> set[str]:
        return {f.trade_id for f in self.fills.values()}


@dataclass
class Pass:
    batches: int = 0
    requests: int = 0
    snapshots: list = field(default_factory=list)  # (fills, rejected, cursor) after each commit


def sync(exchange, store, now, rule=RULE, page_size=100, stop_after=None, snapshots=False) -> Pass:
    """One pass of one pair: the real cursor rule and walk, each batch committed to ``store``.
    ``stop_after``: killed after that many commits."""
    before = exchange.requests
    plan = weex_sync.plan_walk(store.cursor, store.newest(), rule, exchange.api, now)
    result = Pass()
    for batch in weex_sync.Walk(exchange, SCOPE, plan, page_size).batches():
        store.save(batch)
        result.batches += 1
        if snapshots:
            result.snapshots.append((dict(store.fills), dict(store.rejected), store.cursor))
        if stop_after is not None and result.batches >= stop_after:
            break
    result.requests = exchange.requests - before
    return result


def valid_ids(fills) -> set[str]:
    return {str(f["id"]) for f in fills if not f.get("_bad")}


def bad_count(fills) -> int:
    return sum(1 for f in fills if f.get("_bad"))


# --- random histories -------------------------------------------------------------------------

APIS = st.sampled_from([V3, V2])
SELECTS = st.sampled_from(["newest", "oldest"])
LISTINGS = st.sampled_from(["sorted", "newest", "oldest", "shuffled"])
PAGE_SIZES = st.one_of(st.sampled_from([1, 2, 3, 10, 100]), st.integers(1, 100))
BAD_KINDS = ("negative size", "bad id", "no time", "misdated", "not an object", "bad price")


@st.composite
def histories(draw, span=20 * DAY, max_events=40, bad=False, start=T0):
    """Fills over [start, start + span]: single fills, dense stretches, and bursts (up to 150
    fills of up to three orders in one millisecond) anywhere, the first and last millisecond
    included; with ``bad``, a few malformed fills among them."""
    fills: list[dict] = []
    n = burst_id = 0
    used: set[int] = set()
    # the first and last millisecond, the middle, a v3 window's edges
    edges = [start, start + span, start + span // 2, start + 7 * DAY - 1, start + 7 * DAY]
    edge = st.sampled_from([t for t in edges if t <= start + span])
    for _ in range(draw(st.integers(1, max_events))):
        kind = draw(st.sampled_from(["single", "single", "dense", "burst"]))
        at = draw(st.one_of(st.integers(start, start + span), edge))
        if kind == "single":
            fills.append(fill(n, at))
            n += 1
        elif kind == "dense":
            for _ in range(draw(st.integers(2, 60))):
                fills.append(fill(n, at + draw(st.integers(0, 5_000))))
                n += 1
        elif at not in used:
            used.add(at)
            orders = draw(st.integers(1, 3))
            for i in range(draw(st.integers(2, 50 * orders))):
                fills.append(fill(n, at, order=900_000 + burst_id * 10 + i % orders))
                n += 1
            burst_id += 1
    # A millisecond of more than a page: the API can reach every fill of it only through the
    # orders of its first page, so the history keeps other fills out of a burst's millisecond.
    # Beyond a burst, a few fills may share a millisecond.
    burst_ms = {f["_t"] for f in fills if f["orderId"] >= 900_000}
    per_ms: dict[int, int] = {}
    kept = []
    for f in fills:
        if f["orderId"] < 900_000:
            per_ms[f["_t"]] = per_ms.get(f["_t"], 0) + 1
            if f["_t"] in burst_ms or f["_t"] > start + span or per_ms[f["_t"]] > 3:
                continue
        kept.append(f)
    fills = kept
    if bad:
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(start, start + span).filter(lambda t: t not in burst_ms))
            fills.append(bad_fill(n, at, draw(st.sampled_from(BAD_KINDS))))
            n += 1
    return fills


def bad_fill(n: int, at: int, kind: str) -> dict:
    f = fill(n, at, _bad=kind)
    if kind == "negative size":
        f["qty"] = "-0.5"
    elif kind == "bad id":
        f["id"] = f"bad id\n{n}"
    elif kind == "no time":
        f["time"] = "soon"
    elif kind == "misdated":
        f["time"] = at + 400 * DAY  # filed at _t, dated a year after it: outside any request
    elif kind == "not an object":
        f = {"_t": at, "_n": n, "_bad": kind, "id": n, "_serve": ["not", "an", "object", n]}
    elif kind == "bad price":
        f["price"] = "1e5"
    return f


def minimal_requests(fills, start, end, api, page_size) -> int:
    """The fewest requests any walk needs: one per window, one per page of new fills in it. A
    page continues at the millisecond of its edge (inclusive: other fills may share it), so it
    holds up to ``page_size`` fills less those of that millisecond already read."""
    times = sorted(f["_t"] for f in fills)
    shared = max((times.count(t) for t in set(times) if times.count(t) < page_size), default=1)
    per_page = max(1, page_size - shared)
    count = 0
    for lo, hi in weex_sync.windows(start, end, api.max_span_ms):
        n = bisect.bisect_right(times, hi) - bisect.bisect_left(times, lo)
        count += max(1, -(-n // per_page))
    return count


def bursts(fills, page_size) -> int:
    """Requests a walk may spend on milliseconds holding a page or more: the millisecond with
    the largest page, then one per order (v2: one more, for the count)."""
    per_ms: dict[int, set] = {}
    counts: dict[int, int] = {}
    for f in fills:
        per_ms.setdefault(f["_t"], set()).add(str(f.get("orderId")))
        counts[f["_t"]] = counts.get(f["_t"], 0) + 1
    return sum(len(orders) + 2 for ms, orders in per_ms.items() if counts[ms] >= page_size)


def request_bound(fills, start, end, api, page_size) -> int:
    """What a walk may spend: the minimum, one request per window to learn which end of a range
    the exchange selects (and 10 % more for the checks of it), and the bursts."""
    minimum = minimal_requests(fills, start, end, api, page_size)
    windows = len(list(weex_sync.windows(start, end, api.max_span_ms)))
    return minimum + windows + minimum // 10 + bursts(fills, page_size) + 2


PROPERTY = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None
)


# --- properties ---------------------------------------------------------------------------------


@PROPERTY
@given(
    history=histories(),
    api=APIS,
    selects=SELECTS,
    listing=LISTINGS,
    page_size=PAGE_SIZES,
    seed=st.integers(0, 9),
)
def test_any_history_is_walked_exactly_in_near_minimal_requests(
    history, api, selects, listing, page_size, seed
):
    exchange = FakeExchange(api, history, selects, listing, seed)
    store = MemoryStore()
    end = T0 + 20 * DAY
    done = sync(exchange, store, end, page_size=page_size)

    assert store.ids() == valid_ids(history)
    assert len(store.fills) == len(history)  # none twice (keys are distinct in the history)
    assert store.cursor == Cursor(end + 1, last_end=end, reconciled_at=end)
    assert done.requests <= request_bound(history, T0, end, api, page_size)


@PROPERTY
@given(
    history=histories(bad=True),
    api=APIS,
    selects=SELECTS,
    listing=LISTINGS,
    page_size=st.integers(10, 100),
)
def test_a_bad_fill_is_quarantined_and_every_other_fill_stored(
    history, api, selects, listing, page_size
):
    exchange = FakeExchange(api, history, selects, listing)
    store = MemoryStore()
    sync(exchange, store, T0 + 20 * DAY, page_size=page_size)

    assert store.ids() == valid_ids(history)
    assert len(store.rejected) == bad_count(history)
    assert all(r.reason for r in store.rejected.values())
    assert not {r.trade_id for r in store.rejected.values()} & store.ids()


@PROPERTY
@given(
    history=histories(span=10 * DAY, max_events=15, bad=True),
    api=APIS,
    selects=SELECTS,
    listing=LISTINGS,
    page_size=st.sampled_from([10, 50, 100]),
)
def test_resuming_from_every_committed_cursor_gives_the_same_set(
    history, api, selects, listing, page_size
):
    """Killed after any commit of a backfill, the next pass (a minute later) ends with exactly
    the fills a pass that was never killed stores."""
    end = T0 + 10 * DAY
    first = MemoryStore()
    done = sync(
        FakeExchange(api, history, selects, listing),
        first,
        end,
        page_size=page_size,
        snapshots=True,
    )
    assert first.ids() == valid_ids(history)
    for fills, rejected, cursor in done.snapshots:
        resumed = MemoryStore()
        resumed.fills, resumed.rejected, resumed.cursor = dict(fills), dict(rejected), cursor
        sync(
            FakeExchange(api, history, selects, listing), resumed, end + 60_000, page_size=page_size
        )
        assert resumed.ids() == valid_ids(history)
        assert resumed.rejected.keys() == first.rejected.keys()


@PROPERTY
@given(
    history=histories(span=5 * DAY),
    api=APIS,
    selects=SELECTS,
    listing=LISTINGS,
    lateness=st.lists(st.integers(0, 6 * DAY), min_size=1, max_size=20),
    gap=st.integers(1_000, DAY),
    kill=st.integers(0, 5),
)
def test_a_fill_newer_than_the_newest_stored_is_stored_however_late_it_is_shown(
    history, api, selects, listing, lateness, gap, kill
):
    """Shown after the pass that read its time, up to 6 days late: the next pass stores it
    (killed passes in between or not), and an idle pass costs no extra request."""
    end = T0 + 5 * DAY
    exchange = FakeExchange(api, history, selects, listing)
    store = MemoryStore()
    sync(exchange, store, end)
    newest = store.newest() or T0
    late = [fill(10**6 + i, max(newest + 1, end - lag)) for i, lag in enumerate(lateness)]
    exchange.show(late)
    now = max(f["_t"] for f in late) + gap
    assume(now - newest < 7 * DAY - 1)  # within one request span of the newest stored fill
    if kill:
        sync(exchange, store, now - 1, stop_after=kill)
    sync(exchange, store, now)

    assert store.ids() == valid_ids(history + late)


@PROPERTY
@given(
    history=histories(span=5 * DAY),
    api=APIS,
    selects=SELECTS,
    listing=LISTINGS,
    page_size=st.sampled_from([10, 100]),
    shown=st.lists(
        # shown after request N, dated up to a day (reconcile window - every) before the end
        st.tuples(st.integers(1, 20), st.lists(st.integers(-DAY, 0), min_size=1, max_size=120)),
        min_size=1,
        max_size=3,
    ),
)
def test_fills_shown_while_a_walk_runs_never_cost_one_that_was_visible(
    history, api, selects, listing, page_size, shown
):
    """Fills that become visible in the middle of a walk (history lagging, then catching up)
    may mislead what the walk learns of the exchange's selection: every fill visible when the
    walk started is still stored by that walk, and the late ones by the next pass or the
    reconcile."""
    end = T0 + 5 * DAY
    exchange = FakeExchange(api, history, selects, listing)
    late = []
    crowded = {f["_t"] for f in history if f["orderId"] >= 900_000}  # the API limit: see histories
    for i, (after, offsets) in enumerate(shown):
        times = [end + off for off in offsets if end + off not in crowded]
        batch = [fill(10**6 + 1000 * i + j, t) for j, t in enumerate(times)]
        exchange.later.append((after, batch))
        late += batch
    store = MemoryStore()
    sync(exchange, store, end, page_size=page_size)
    assert valid_ids(history) <= store.ids()

    exchange.later.clear()
    exchange.show([f for f in late if str(f["id"]) not in {str(g["id"]) for g in exchange.fills}])
    sync(exchange, store, end + 60_000, page_size=page_size)
    sync(exchange, store, end + RULE.reconcile_every_ms, page_size=page_size)
    assert store.ids() == valid_ids(history + late)


@PROPERTY
@given(history=histories(span=3 * DAY, max_events=10), api=APIS, gap=st.integers(1_000, 6 * DAY))
def test_an_idle_pass_costs_one_request(history, api, gap):
    end = T0 + 3 * DAY
    exchange = FakeExchange(api, [f for f in history if f["_t"] < end - 60 * 60_000])
    store = MemoryStore()
    sync(exchange, store, end)
    assume(store.newest() is None or end + gap - store.newest() < 7 * DAY - 1)
    done = sync(
        exchange,
        store,
        end + gap,
        rule=CursorRule(T0, RULE.lookback_ms, 0, RULE.reconcile_window_ms),
    )
    at_newest = sum(f["_t"] == store.newest() for f in exchange.fills)
    assert done.requests == 1 or at_newest >= 100


@PROPERTY
@given(
    history=histories(span=4 * DAY),
    api=APIS,
    selects=SELECTS,
    lateness=st.lists(st.integers(3 * 60_000, 24 * HOUR), min_size=1, max_size=10),
    passes=st.integers(1, 4),
)
def test_a_fill_older_than_the_newest_stored_is_stored_by_the_next_reconcile(
    history, api, selects, lateness, passes
):
    """Shown up to window - every (here 24 h) late, in the past of stored fills: stored by the
    first pass after the reconcile is due."""
    end = T0 + 4 * DAY
    exchange = FakeExchange(api, history, selects)
    store = MemoryStore()
    sync(exchange, store, end)
    late = [fill(10**6 + i, end - lag) for i, lag in enumerate(lateness)]
    exchange.show(late)
    now = end
    for _ in range(passes):  # a pass a minute: nothing to reconcile yet
        now += 60_000
        sync(exchange, store, now)
    sync(exchange, store, end + RULE.reconcile_every_ms)

    assert store.ids() == valid_ids(history + late)


@PROPERTY
@given(
    history=histories(span=8 * DAY),
    api=APIS,
    selects=SELECTS,
    listing=LISTINGS,
    skew=st.integers(-6 * DAY, 6 * DAY),
    at=st.integers(T0 + DAY, T0 + 7 * DAY),
)
def test_a_clock_wrong_by_less_than_a_span_loses_nothing(history, api, selects, listing, skew, at):
    """A pass whose "now" is off by up to 6 days (a stale or skewed time server, a stepped
    clock) sees the fills up to the real now; the next pass with the right clock stores the
    rest exactly."""
    exchange = FakeExchange(api, [f for f in history if f["_t"] <= at], selects, listing)
    store = MemoryStore()
    sync(exchange, store, at + skew)
    exchange.show([f for f in history if f["_t"] > at])
    sync(exchange, store, T0 + 8 * DAY)

    assert store.ids() == valid_ids(history)


# --- the cursor rule, unit by unit ------------------------------------------------------------


def test_the_first_walk_starts_at_start_time_and_reconciles():
    plan = weex_sync.plan_walk(None, None, RULE, V2, T0 + DAY)
    assert plan.ranges == ((T0, T0 + DAY),) and plan.reconcile and plan.late_before is None


def test_a_walk_starts_at_the_newest_stored_fill_within_one_span():
    cursor = Cursor(T0 + 10 * DAY + 1, last_end=T0 + 10 * DAY, reconciled_at=T0 + 10 * DAY)
    now = T0 + 10 * DAY + 60_000
    # quiet: the newest fill is an hour old -> start there (one request covers it)
    plan = weex_sync.plan_walk(cursor, now - HOUR, RULE, V3, now)
    assert plan.ranges == ((now - HOUR, now),) and plan.late_before == T0 + 10 * DAY
    # busy: the newest fill is newer than the lookback -> the lookback decides
    plan = weex_sync.plan_walk(cursor, now - 1000, RULE, V3, now)
    assert plan.ranges == ((T0 + 10 * DAY - 120_000, now),)
    # idle for weeks: no further back than one request span on v3, any on v2
    span = V3.max_span_ms
    assert span is not None
    assert weex_sync.plan_walk(cursor, T0, RULE, V3, now).ranges == ((now - span, now),)
    assert weex_sync.plan_walk(cursor, T0, RULE, V2, now).ranges == ((T0, now),)


def test_a_walk_after_a_long_outage_starts_where_the_last_one_ended():
    cursor = Cursor(T0 + DAY + 1, last_end=T0 + DAY, reconciled_at=T0 + DAY)
    now = T0 + 30 * DAY
    plan = weex_sync.plan_walk(cursor, T0 + DAY - 5, RULE, V3, now)
    assert plan.ranges == ((T0 + DAY - 120_000, now),)


def test_the_reconcile_is_due_once_per_period_and_reads_the_window():
    now = T0 + 10 * DAY
    fresh = Cursor(now - 59_999, last_end=now - 60_000, reconciled_at=now - HOUR)
    assert not weex_sync.plan_walk(fresh, now - 1000, RULE, V3, now).reconcile
    due = Cursor(now - 59_999, last_end=now - 60_000, reconciled_at=now - DAY)
    plan = weex_sync.plan_walk(due, now - 1000, RULE, V3, now)
    assert plan.reconcile and plan.reconcile_due and plan.ranges == ((now - 2 * DAY, now),)
    off = CursorRule(T0, 120_000, 0, 2 * DAY)
    assert not weex_sync.plan_walk(due, now - 1000, off, V3, now).reconcile


def test_an_owed_range_is_read_first_then_the_rest():
    now = T0 + 30 * DAY
    cursor = Cursor(T0 + DAY, T0 + 2 * DAY, T0 + 3 * DAY, last_end=T0 + 2 * DAY)
    plan = weex_sync.plan_walk(cursor, T0 + 2 * DAY, RULE, V3, now)
    assert plan.ranges == ((T0 + DAY, T0 + 2 * DAY), (T0 + 3 * DAY, now))
    near = Cursor(
        now - 60_000, now - 30_000, now - 29_999, last_end=now - 90_000, reconciled_at=now
    )
    assert weex_sync.plan_walk(near, now - 70_000, RULE, V3, now).ranges == ((now - 70_000, now),)


def test_nothing_is_asked_beyond_the_v3_horizon():
    now = T0 + 400 * DAY
    plan = weex_sync.plan_walk(None, None, CursorRule(start_time=0), V3, now)
    horizon = V3.horizon_ms
    assert horizon is not None
    floor = now - horizon + weex_sync.HORIZON_MARGIN_MS
    assert plan.ranges == ((floor, now),) and plan.horizon == floor
    owed = Cursor(T0, T0 + DAY, T0 + 2 * DAY)  # all of it beyond the horizon
    assert weex_sync.plan_walk(owed, None, RULE, V3, now).ranges[0][0] >= floor


def test_a_clock_further_off_than_a_span_is_an_error_for_the_pass():
    clock = weex_sync.ServerClock()
    clock.offset_ms = 8 * DAY
    with pytest.raises(weex_sync.ExchangeError, match="differ by 8.0 days"):
        clock.walk_end()
    clock.offset_ms = -3 * DAY
    assert abs(clock.walk_end() - clock.now_ms()) < 1000


# --- the walk, by example ---------------------------------------------------------------------


@pytest.mark.parametrize("api", [V3, V2], ids=["v3", "v2"])
@pytest.mark.parametrize("selects", ["newest", "oldest"])
@pytest.mark.parametrize("listing", ["newest", "oldest"])
def test_a_first_page_of_one_millisecond_is_resolved_by_order(api, selects, listing):
    """130 fills of 2 orders in one millisecond, nothing newer in the window: the first full
    page is that millisecond (issue: 'FillsClient' object has no attribute 'newest_first')."""
    burst = [fill(i, T0 + 5 * DAY, order=7 + i % 2) for i in range(130)]
    older = [fill(1000 + i, T0 + i * 60_000) for i in range(50)]
    exchange = FakeExchange(api, burst + older, selects, listing)
    store = MemoryStore()
    sync(exchange, store, T0 + 5 * DAY + 10)
    assert store.ids() == valid_ids(burst + older)


@pytest.mark.parametrize("api", [V3, V2], ids=["v3", "v2"])
def test_selection_and_listing_that_differ_lose_nothing(api):
    """An exchange that selects the newest 100 of a range but lists them oldest first (and the
    reverse): a walk that read the selection off the page order lost 90 % of 1,000 fills."""
    history = [fill(i, T0 + i * 60_000) for i in range(1000)]
    for selects, listing in (("newest", "oldest"), ("oldest", "newest")):
        exchange = FakeExchange(api, history, selects, listing)
        store = MemoryStore()
        done = sync(exchange, store, T0 + 2 * DAY)
        assert store.ids() == valid_ids(history)
        assert done.requests <= 10 + 3  # pages, learning the selection, the last check


def test_the_served_order_is_only_a_hint():
    assert weex_sync.served_newest_first([5, 4, 4, 1]) is True
    assert weex_sync.served_newest_first([1, 4, 4, 5]) is False
    assert weex_sync.served_newest_first([1, 5, 4]) is None


def test_windows_cover_the_range_once_in_spans():
    assert list(weex_sync.windows(0, 25, 9)) == [(0, 9), (10, 19), (20, 25)]
    assert list(weex_sync.windows(5, 5, 9)) == [(5, 5)]
    assert list(weex_sync.windows(6, 5, 9)) == []
    assert list(weex_sync.windows(0, 10**12, None)) == [(0, 10**12)]


def test_a_full_page_without_a_readable_time_stops_the_walk_where_it_is():
    history = [fill(i, T0 + i, time="soon", _bad="no time") for i in range(10)]
    exchange = FakeExchange(V3, history)
    store = MemoryStore()
    with pytest.raises(weex_sync.ExchangeError, match="no fill with a readable time"):
        sync(exchange, store, T0 + DAY, page_size=10)
    assert store.cursor is None or store.cursor.synced_through <= T0


@pytest.mark.parametrize("kind", ["no time", "not an object", "misdated", "bad id"])
def test_a_bad_fill_in_a_v2_burst_is_counted_against_totals(kind):
    """150 fills of 2 orders in one millisecond and a bad fill served there: the burst is
    complete (the bad one quarantined), not 'N fills share a millisecond but only N-1 ...'."""
    ms = T0 + DAY
    history = [fill(i, ms, order=900_000 + i % 2) for i in range(150)] + [bad_fill(500, ms, kind)]
    for selects in ("newest", "oldest"):
        history[-1]["_n"] = 10**9 if selects == "newest" else -1  # in the first page of that ms
        exchange = FakeExchange(V2, history, selects)
        store = MemoryStore()
        sync(exchange, store, T0 + 2 * DAY)
        assert store.ids() == valid_ids(history) and len(store.rejected) == 1
