"""The bare fetch-only loop: the practical limit of a backfill against the simulator.

Same signed requests and the same paging as weex_sync (see peers_common), one keep-alive
session, JSON parsed exactly as the contract requires; no fill parsing, no database.
Prints ``{"fills": n, "requests": n}`` as JSON on stdout.

usage: fetch_only.py BASE_URL SYMBOL START_MS  (credentials as JSON on stdin)
"""

from __future__ import annotations

import json
import sys

import requests
from peers_common import walk_pages


def main() -> int:
    base_url, symbol, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    creds = json.loads(sys.stdin.read())
    fills = pages = 0
    with requests.Session() as session:
        for page in walk_pages(session.get, base_url, creds, symbol, start):
            fills += len(page)
            pages += 1
    print(json.dumps({"fills": fills, "requests": pages}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
