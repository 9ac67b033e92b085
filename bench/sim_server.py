"""Serve a weex_sim.Simulator in its own process, driven over stdin/stdout JSON lines.

The benchmark runs the simulator here, not in the measured process, so that serving HTTP does
not compete with the client for the GIL. Protocol (one JSON object per line):

* first line in: the spec, ``{"seed": 1, "symbols": [...], "accounts": [{"api_key": ...,
  "secret_key": ..., "passphrase": ..., "fills": {"<symbol>": <count>}, "start_ms": ...,
  "end_ms": ...}]}`` plus any settable attribute (SETTABLE: latency, uid_limit, penalty_box,
  ...; JSON lists become tuples);
  first line out: ``{"base_url": ..., "setup_seconds": ...}`` once serving;
* then commands in, one answer out each: ``{"cmd": "set", <attribute>: value, ...}``;
  ``{"cmd": "generate", "fills": [[api_key, symbol, count, start_ms, end_ms], ...]}``;
  ``{"cmd": "add_fills", "fills": [[api_key, symbol, created_ms, visible_after_ms], ...]}``
  (answers the new fills' trade ids); ``{"cmd": "window_counts", "api_key": ..., "start_ms":
  ..., "span_ms": ...}`` (fills per window up to now); ``{"cmd": "reset_stats"}``; ``{"cmd": "stats"}``
  (fills requests on either API version, 429s, requests the rate limits or the penalty box
  refused, penalty boxes entered, accepted requests' arrival times, the simulator's clock and
  CPU time); ``{"cmd": "quit"}``. Every answer carries ``now_ms``, the simulator's clock
  (which ``clock_offset_ms`` moves).

Run by run_bench.py with PYTHONPATH pointing at the project, so ``weex_sim`` imports.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from bisect import bisect_left, bisect_right
from collections import Counter

from weex_sim import FILLS_PATHS, Simulator

SETTABLE = {"latency", "uid_limit", "ip_limit", "order", "clock_offset_ms"}
SETTABLE |= {"max_span_ms", "horizon_ms", "listing", "v2_order"}
SETTABLE |= {"burst_limit", "limit_code", "limit_retry_after", "charge_refused"}
SETTABLE |= {"penalty_box", "penalty_status"}
FILLS = set(FILLS_PATHS.values())  # the fills endpoints of v2 and v3


def build(spec: dict) -> Simulator:
    sim = Simulator(symbols=spec["symbols"], seed=spec.get("seed", 1))
    for account in spec["accounts"]:
        sim.add_account(account["api_key"], account["secret_key"], account["passphrase"])
        for symbol, count in account.get("fills", {}).items():
            if count:
                span = {"start_ms": account["start_ms"], "end_ms": account["end_ms"]}
                sim.generate_fills(account["api_key"], symbol, count, **span)
    apply_settings(sim, spec)
    return sim


def apply_settings(sim: Simulator, settings: dict) -> None:
    for name in SETTABLE & settings.keys():
        value = settings[name]
        setattr(sim, name, tuple(value) if isinstance(value, list) else value)


def answer(sim: Simulator, command: dict) -> dict:
    name = command.pop("cmd")
    if name == "set":
        apply_settings(sim, command)
    elif name == "generate":
        for key, symbol, count, start, end in command["fills"]:
            sim.generate_fills(key, symbol, count, start_ms=start, end_ms=end)
    elif name == "add_fills":
        ids = [
            str(sim.add_fill(key, symbol, created_time=at, visible_after_ms=late)["tradeId"])
            for key, symbol, at, late in command["fills"]
        ]
        return {"trade_ids": ids}
    elif name == "window_counts":  # fills per window [start + k * span, ...] up to now
        times = sorted(int(f["time"]) for f in sim.fills(command["api_key"], version=3))
        lo, span, now = command["start_ms"], command["span_ms"], sim.server_time_ms()
        counts = []
        while lo <= now:
            counts.append(bisect_right(times, min(now, lo + span - 1)) - bisect_left(times, lo))
            lo += span
        return {"counts": counts}
    elif name == "reset_stats":
        sim.reset_stats()
    elif name == "stats":
        records = list(sim.requests)  # one C-level copy: a consistent snapshot under the GIL
        return {
            "by_status": dict(Counter(f"{r['path']} {r['status']}" for r in records)),
            "fills_requests": sum(r["path"] in FILLS for r in records),
            "fills_ok_times": [
                r["t"] for r in records if r["path"] in FILLS and r["status"] == 200
            ],
            "status_429": sum(r["status"] == 429 for r in records),
            "refused": sum(r["refused"] for r in records),
            "penalty_boxes": sim.penalty_boxes,
            "fills_by_client": dict(Counter(r["client"] for r in records if r["path"] in FILLS)),
        }
    else:
        raise ValueError(f"unknown command {name!r}")
    return {}


def main() -> int:
    started = time.monotonic()
    sim = build(json.loads(sys.stdin.readline()))
    base_url = sim.start("127.0.0.1", 0)
    reply(sim, {"base_url": base_url, "setup_seconds": round(time.monotonic() - started, 2)})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        try:
            reply(sim, {"ok": True, **answer(sim, command)})
        except ValueError as error:  # e.g. an unknown symbol, an order other than newest/oldest
            reply(sim, {"error": str(error)})
    sim.stop()
    return 0


def reply(sim: Simulator, obj: dict) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    obj |= {"now_ms": sim.server_time_ms(), "cpu_seconds": usage.ru_utime + usage.ru_stime}
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
