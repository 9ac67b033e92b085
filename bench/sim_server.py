"""Serve a weex_sim.Simulator in its own process, driven over stdin/stdout JSON lines.

The benchmark runs the simulator here, not in the measured process, so that serving HTTP does
not compete with the client for the GIL. Protocol (one JSON object per line):

* first line in: the spec, ``{"seed": 1, "symbols": [...], "accounts": [{"api_key": ...,
  "secret_key": ..., "passphrase": ..., "fills": {"<symbol>": <count>},
  "visible_delay_ms": 0 (optional)}], "start_ms": ..., "end_ms": ..., "latency": 0.0,
  "uid_limit": [500, 10] | null, "ip_limit": null}``, plus optionally any other settable
  attribute (see SETTABLE);
  first line out: ``{"base_url": ..., "setup_seconds": ...}`` once serving;
* then commands in, one answer out each: ``{"cmd": "set", <attribute>: value, ...}``,
  ``{"cmd": "reset_stats"}``, ``{"cmd": "stats"}`` (request counts, accepted fills requests'
  arrival times on both API versions, the simulator's clock and CPU time), ``{"cmd": "quit"}``.

Run by run_bench.py with PYTHONPATH pointing at the project, so ``weex_sim`` imports.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter

from weex_sim import FILLS_PATHS, Simulator

SETTABLE = {
    "latency",
    "uid_limit",
    "ip_limit",
    "order",
    "max_span_ms",
    "horizon_ms",
    "shuffle_pages",
}
FILLS = set(FILLS_PATHS.values())  # the fills endpoints of v2 and v3


def build(spec: dict) -> Simulator:
    sim = Simulator(symbols=spec["symbols"], seed=spec.get("seed", 1))
    for account in spec["accounts"]:
        sim.add_account(account["api_key"], account["secret_key"], account["passphrase"])
        for symbol, count in account.get("fills", {}).items():
            if count:
                sim.generate_fills(
                    account["api_key"],
                    symbol,
                    count,
                    start_ms=spec["start_ms"],
                    end_ms=spec["end_ms"],
                    visible_delay_ms=account.get("visible_delay_ms", 0),
                )
    apply_settings(sim, spec)
    return sim


def apply_settings(sim: Simulator, settings: dict) -> None:
    for name in SETTABLE & settings.keys():
        value = settings[name]
        setattr(sim, name, tuple(value) if isinstance(value, list) else value)


def stats(sim: Simulator) -> dict:
    records = list(sim.requests)  # one C-level copy: a consistent snapshot under the GIL
    by_status = Counter(f"{r['path']} {r['status']}" for r in records)
    return {
        "by_status": dict(by_status),
        "fills_requests": sum(r["path"] in FILLS for r in records),
        "fills_ok_times": [r["t"] for r in records if r["path"] in FILLS and r["status"] == 200],
        "status_429": sum(r["status"] == 429 for r in records),
        "monotonic": time.monotonic(),
        "cpu_seconds": cpu_seconds(),
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    started = time.monotonic()
    sim = build(json.loads(sys.stdin.readline()))
    base_url = sim.start("127.0.0.1", 0)
    reply({"base_url": base_url, "setup_seconds": round(time.monotonic() - started, 2)})
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            break
        if name == "set":
            try:
                apply_settings(sim, command)
            except ValueError as error:  # e.g. an order other than newest/oldest
                reply({"error": str(error)})
            else:
                reply({"ok": True})
        elif name == "reset_stats":
            sim.reset_stats()
            reply({"ok": True, "cpu_seconds": cpu_seconds()})
        elif name == "stats":
            reply(stats(sim))
        else:
            reply({"error": f"unknown command {name!r}"})
    sim.stop()
    return 0


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
