#!/usr/bin/env python3
"""Scenario redaction: what scrubbing the secrets out of a log line costs as the fleet grows.
Every log line passes weex_sync's Redactor, which holds every user's secret_key and passphrase
(in every form they can take); a line's cost must not grow with the number of users. Times a
typical pass line and an error line with a secret in it, with 100, 1,000 and 10,000 users'
random secrets, in one run, and prints the per-line cost and its ratio to 100 users'.

usage: redaction.py [--lines 5000]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import weex_sync

LINE = (
    "2026-12-07T03:10:03.103Z INFO weex_sync: user1234/cmt_btcusdt: ok fetched=0 inserted=0 "
    "present=0 late=0 rejected=0 requests=1 duration_ms=41"
)


def per_line(redact: weex_sync.Redactor, line: str, lines: int) -> float:
    started = time.perf_counter()
    for _ in range(lines):
        redact(line)
    return (time.perf_counter() - started) / lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=5000)
    args = parser.parse_args(argv)
    rows, base = [], None
    for users in (100, 1_000, 10_000):
        keys = [secrets.token_urlsafe(24) for _ in range(users)]
        phrases = [secrets.token_hex(8) for _ in range(users)]
        started = time.perf_counter()
        redact = weex_sync.Redactor(keys + phrases)
        built = time.perf_counter() - started
        leak = f"{LINE} error: {keys[users // 2]!r} rejected"
        assert keys[users // 2] not in redact(leak)
        plain, with_secret = per_line(redact, LINE, args.lines), per_line(redact, leak, 200)
        base = base or plain
        rows.append((users, built, plain, with_secret, plain / base))
    print("| users | build s | µs per line | µs per line with a secret | per line / 100 users' |")
    print("|---|---|---|---|---|")
    for users, built, plain, with_secret, ratio in rows:
        print(
            f"| {users:,} | {built:.2f} | {plain * 1e6:.1f} | {with_secret * 1e6:.1f} "
            f"| {ratio:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
