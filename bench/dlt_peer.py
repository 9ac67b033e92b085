"""The peer: the same backfill done by a dlt pipeline, written the way dlt's docs teach.

A ``@dlt.resource`` that pages the API with ``dlt.sources.helpers.requests`` (same signing and
paging rule as weex_sync, see peers_common), an incremental cursor on ``createdTime``
(``dlt.sources.incremental``), ``write_disposition="merge"`` on the fill key, and the
``postgres`` destination with credentials from dlt's configuration (the runner sets
``DESTINATION__POSTGRES__CREDENTIALS``). Ids and ``createdTime`` arrive as JSON numbers or
strings at random, so the resource types them (ids as text, time as int) before dlt sees them.
Prints ``{"fills": n, "load_ok": true}`` as JSON on stdout.

usage: dlt_peer.py BASE_URL SYMBOL START_MS PIPELINES_DIR  (credentials as JSON on stdin)
"""

from __future__ import annotations

import json
import sys

import dlt
from dlt.sources.helpers import requests
from peers_common import walk_pages


def typed(fill: dict) -> dict:
    fill["tradeId"] = str(fill["tradeId"])
    fill["orderId"] = str(fill["orderId"])
    fill["createdTime"] = int(fill["createdTime"])
    return fill


@dlt.source(name="weex")
def weex_source(base_url: str, creds: dict, symbol: str, start_ms: int) -> dlt.sources.DltResource:
    @dlt.resource(
        name="trade_fills",
        write_disposition="merge",
        primary_key=("orderId", "tradeId", "createdTime"),
    )
    def trade_fills(
        # The incremental cursor as a default argument: the form dlt's docs use.
        created_time: dlt.sources.incremental[int] = dlt.sources.incremental(  # noqa: B008
            "createdTime", initial_value=start_ms
        ),
    ):
        for page in walk_pages(requests.get, base_url, creds, symbol, created_time.last_value):
            yield [typed(fill) for fill in page]

    return trade_fills


def main() -> int:
    base_url, symbol, start, pipelines_dir = sys.argv[1:5]
    creds = json.loads(sys.stdin.read())
    pipeline = dlt.pipeline(
        pipeline_name="weex_fills",
        destination="postgres",
        dataset_name="weex",
        pipelines_dir=pipelines_dir,
    )
    info = pipeline.run(weex_source(base_url, creds, symbol, int(start)))
    with pipeline.sql_client() as client:
        fills = client.execute_sql("SELECT count(*) FROM trade_fills")[0][0]
    print(json.dumps({"fills": fills, "load_ok": not info.has_failed_jobs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
