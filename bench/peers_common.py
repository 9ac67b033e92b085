"""What the bench's own clients share: the contract's signing and its paging rule.

The fetch-only loop, the naive baseline and the dlt peer all walk the fills the same way
weex_sync does (/work/shared/weex-api.md, "Paging"): newest page first, the next request's
``endTime`` is the oldest ``createdTime`` of the page (inclusive), fills already seen at that
boundary are dropped by ``tradeId``, stop when ``nextFlag`` is false. The one-millisecond burst
fallback is not implemented: the generated histories never fill a page within one millisecond,
and ``walk_pages`` raises rather than loop if one ever does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

FILLS_PATH = "/capi/v2/order/fills"


def signed_headers(creds: dict, path: str, query: str) -> dict[str, str]:
    """The contract's headers: ACCESS-SIGN = base64(HMAC_SHA256(secret, prehash))."""
    timestamp = str(int(time.time() * 1000))
    prehash = timestamp + "GET" + path + (f"?{query}" if query else "")
    digest = hmac.new(creds["secret_key"].encode(), prehash.encode(), hashlib.sha256).digest()
    return {
        "ACCESS-KEY": creds["api_key"],
        "ACCESS-SIGN": base64.b64encode(digest).decode(),
        "ACCESS-TIMESTAMP": timestamp,
        "ACCESS-PASSPHRASE": creds["passphrase"],
        "Content-Type": "application/json",
        "locale": "en-US",
    }


def walk_pages(
    get: Callable[..., Any],
    base_url: str,
    creds: dict,
    symbol: str,
    start: int,
    page_size: int = 100,
) -> Iterator[list[dict]]:
    """The new fills of each page (as parsed JSON objects), newest page first.

    ``get`` is ``requests.get`` or a session's ``get``; it must return a requests Response.
    """
    end: int | None = None
    boundary: set[str] = set()
    while True:
        params: dict[str, Any] = {"symbol": symbol, "startTime": start, "limit": page_size}
        if end is not None:
            params["endTime"] = end
        query = urlencode(params)
        response = get(
            f"{base_url}{FILLS_PATH}?{query}",
            headers=signed_headers(creds, FILLS_PATH, query),
            timeout=30,
        )
        response.raise_for_status()
        body = json.loads(response.content, parse_float=Decimal)
        fills = body["list"]
        yield [f for f in fills if str(f["tradeId"]) not in boundary]
        if not body["nextFlag"]:
            return
        times = [int(f["createdTime"]) for f in fills]
        oldest = min(times)
        if oldest == max(times):
            raise RuntimeError(f"a full page within millisecond {oldest}: not handled here")
        boundary = {str(f["tradeId"]) for f, t in zip(fills, times) if t == oldest}
        end = oldest
