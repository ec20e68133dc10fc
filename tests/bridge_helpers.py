"""What the bridge API tests share: five rows to import, the JSON content type, and a poster of rows."""

from __future__ import annotations

import json

ROWS = [
    {"namespace": "support", "input": f"question {i}", "output": {"namespace": "billing"}} for i in range(5)
]
JSON_HEADERS = {"Content-Type": "application/json"}


def post_rows(client, rows, **kw):
    return client.post("/v1/bridges/observations", content=json.dumps(rows), **kw)
