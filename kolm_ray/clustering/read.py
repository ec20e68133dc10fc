"""Read: a namespace's observations as rows (a Ray Dataset over the store, or a list held in memory).

The read phase of kolm_ray.clustering: the columns every later phase sees are id, namespace, input, output
(JSON), verified and request (JSON); the driver never holds the raw text.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError


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

_COLUMNS = "id, namespace, input, output, verified, request"


def _sqlite_connect(path: str):
    import sqlite3

    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def read_observations(store_url: str, namespaces: str | list[str], num_blocks: int):
    """A Ray Dataset of the namespaces' rows (id, namespace, input, output JSON, verified, request JSON).

    ray.data.read_sql shards by MOD(seq, num_blocks): each read task pulls its own rows from the store.
    """
    import ray.data

    if not store_url.startswith("sqlite:///"):
        raise KolmError(
            f"kolm cluster reads SQLite stores (sqlite:///path); {store_url!r} is not supported yet"
        )
    path = store_url[len("sqlite:///") :]
    if not Path(path).exists():
        raise KolmError(f"observation store {path} does not exist")
    from kolm_ray.observations.store import open_store

    open_store(store_url).close()  # applies the store's migrations, so the table below exists
    names = [namespaces] if isinstance(namespaces, str) else list(namespaces)
    quoted = ", ".join(f"'{_sql_str(n)}'" for n in names)
    sql = f"SELECT seq, {_COLUMNS} FROM observations WHERE namespace IN ({quoted})"
    return ray.data.read_sql(
        sql,
        functools.partial(_sqlite_connect, path),
        shard_keys=["seq"],
        shard_hash_fn="ABS",  # MOD(ABS(ABS(seq)), n): round-robin over the insertion order
        override_num_blocks=max(1, num_blocks),
        # Reads are light; at 0 CPUs they run beside the featurize actors, which hold one CPU each
        # (otherwise workers == CPUs starves the reads and the pipeline waits forever).
        num_cpus=0,
    )


def _sql_str(value: str) -> str:
    from kolm_ray.observations.model import check_namespace

    try:
        return check_namespace(value)  # letters, digits and _.:- only: safe inside quotes
    except ValueError as e:
        raise KolmError(str(e)) from None


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


def read(source: str | list[Any], namespaces: list[str], num_blocks: int):
    """The read phase: a store URL's namespaces, or an in-memory list of observations (one group "")."""
    import ray.data

    if isinstance(source, str):
        return read_observations(source, namespaces, num_blocks=num_blocks)
    return ray.data.from_items(rows_from_observations(source), override_num_blocks=max(1, num_blocks))
