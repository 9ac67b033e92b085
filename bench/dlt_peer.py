"""The peer: the same backfill done by a dlt pipeline, written the way dlt's docs teach.

A ``@dlt.resource`` that pages the API with ``dlt.sources.helpers.requests`` (the same signing,
windows and paging as weex_sync, see peers.py), an incremental cursor on the fill's time
(``dlt.sources.incremental``), ``write_disposition="merge"`` on the fill key, and the
``postgres`` destination with credentials from dlt's configuration (the runner sets
``DESTINATION__POSTGRES__CREDENTIALS``). Ids and times arrive as JSON numbers or strings at
random, so the resource types them (ids as text, time as int) before dlt sees them.
Prints ``{"fills": n, "load_ok": true}`` as JSON on stdout.

usage: dlt_peer.py BASE_URL API_VERSION START_MS PIPELINES_DIR  (credentials as JSON on stdin)
"""

from __future__ import annotations

import json
import sys

import dlt
from dlt.sources.helpers import requests
from peers import ID, TIME, walk_pages


@dlt.source(name="weex")
def weex_source(base_url: str, creds: dict, version: int, start_ms: int) -> dlt.sources.DltResource:
    id_, time_ = ID[version], TIME[version]

    @dlt.resource(
        name="trade_fills", write_disposition="merge", primary_key=("orderId", id_, time_)
    )
    def trade_fills(
        # The incremental cursor as a default argument: the form dlt's docs use.
        cursor: dlt.sources.incremental[int] = dlt.sources.incremental(  # noqa: B008
            time_, initial_value=start_ms
        ),
    ):
        start = cursor.last_value
        if start is None:  # never: the cursor starts at its initial_value
            raise RuntimeError(f"the incremental cursor on {time_!r} has no value")
        for page in walk_pages(requests.get, base_url, creds, version, start):
            for fill in page:
                fill[id_], fill["orderId"] = str(fill[id_]), str(fill["orderId"])
                fill[time_] = int(fill[time_])
            yield page

    return trade_fills


def main() -> int:
    base_url, version, start, pipelines_dir = sys.argv[1:5]
    creds = json.loads(sys.stdin.read())
    pipeline = dlt.pipeline(
        pipeline_name="weex_fills",
        destination="postgres",
        dataset_name="weex",
        pipelines_dir=pipelines_dir,
    )
    info = pipeline.run(weex_source(base_url, creds, int(version), int(start)))
    with pipeline.sql_client() as client:
        counted = client.execute_sql("SELECT count(*) FROM trade_fills")
        if counted is None:  # never: a SELECT answers rows
            raise RuntimeError("the count of trade_fills returned nothing")
        fills = counted[0][0]
    print(json.dumps({"fills": fills, "load_ok": not info.has_failed_jobs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
