"""Read: a namespace's observations as rows (a Ray Dataset over the store, or a list held in memory).

The read phase of kolm_ray.clustering: the columns every later phase sees are id, namespace, input, output
(JSON), verified and request (JSON); the driver never holds the raw text.
"""

from __future__ import annotations

import functools
import json
from typing import Any


def _missing(v: Any) -> bool:
    """A null `verified`: None or NaN of any float type (Ray Data reads an all-null column as float32 NaN)."""
    return v is None or v != v


def _loads(x: Any) -> Any:
    if x is None or (isinstance(x, float) and x != x):
        return None
    try:
        return json.loads(x)
    except (TypeError, ValueError):
        return x


# ---- reading ------------------------------------------------------------------------------------------------


def read_observations(
    store_url: str, namespaces: str | list[str], num_blocks: int, include_untrusted: bool = False
):
    """A Ray Dataset of the namespaces' rows (seq, id, namespace, input, output JSON, verified, request JSON),
    read through the store (SQLite or PostgreSQL) in `num_blocks` shards: see observations/dataset.py.
    Local answers (provider "local") are left out there: they never shape the next model."""
    from kolm_ray.observations.dataset import read_observations as read

    return read(store_url, namespaces, parallelism=num_blocks, include_untrusted=include_untrusted)


def rows_from_observations(observations: list[Any]) -> list[dict[str, Any]]:
    """Observation objects or dicts -> the rows read_observations yields (for in-memory clustering)."""
    rows = []
    for i, o in enumerate(observations):
        get = o.get if isinstance(o, dict) else functools.partial(getattr, o)
        rows.append(
            {
                "seq": i,
                "id": str(get("id", None) or f"row-{i}"),
                "namespace": "",  # an in-memory list is clustered as one group
                "input": get("input", None) or "",
                "output": json.dumps(get("output", None), ensure_ascii=False),
                "verified": None if get("verified", None) is None else int(get("verified", None)),
                "request": json.dumps(get("request", None), ensure_ascii=False),
            }
        )
    return rows


def read(source: str | list[Any], namespaces: list[str], num_blocks: int, include_untrusted: bool = False):
    """The read phase: a store URL's namespaces (trusted rows only, unless `include_untrusted`), or an
    in-memory list of observations (one group "", taken as given)."""
    import ray.data

    if isinstance(source, str):
        return read_observations(
            source, namespaces, num_blocks=num_blocks, include_untrusted=include_untrusted
        )
    return ray.data.from_items(rows_from_observations(source), override_num_blocks=max(1, num_blocks))
