"""The store as a Ray Dataset: each read task pulls its own shard of rows, the driver never gathers them.

    ds = read_observations("postgresql://...", ["support"], parallelism=4)

Works for every backend: the store says what to select and hands a picklable connection factory
(`Store.dataset_source`), and Ray Data's `read_sql` shards it by MOD(seq, parallelism), one query per
read task on its own connection. Columns: seq, id, namespace, input, output (JSON text), verified
(0/1/null), request (JSON text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import check_namespace


def check_readable(store_url: str, namespaces: list[str], include_untrusted: bool = False) -> None:
    """Fail as one KolmError line, before Ray starts, when `kolm cluster`/`kolm recipe` would read nothing:
    a SQLite file that does not exist, a malformed namespace, or a namespace with no rows to read.

    Counts with the same query Ray Data's read_sql runs (`Store.dataset_source`), on one connection, so
    "no rows" here means exactly what the pipeline would have found.
    """
    from kolm_ray.observations.store import open_store
    from kolm_ray.settings import redact_url

    if store_url.startswith("sqlite:///") and not Path(store_url[len("sqlite:///") :]).exists():
        raise KolmError(f"observation store {store_url[len('sqlite:///') :]} does not exist")
    for n in namespaces:
        try:
            check_namespace(n)
        except ValueError as e:
            raise KolmError(str(e)) from None
    store = open_store(store_url)
    try:
        sql, params, connect = store.dataset_source(list(namespaces), include_untrusted)
    finally:
        store.close()
    conn = connect()
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT namespace, COUNT(*) FROM ({sql}) AS q GROUP BY namespace", params)
        counts = dict(cur.fetchall())
    finally:
        conn.close()
    empty = [n for n in namespaces if not counts.get(n)]
    if empty:
        why = (
            "" if include_untrusted else " that may train (trusted rows only; --include-untrusted reads all)"
        )
        raise KolmError(f"namespace {empty[0]!r} has no observations in {redact_url(store_url)}{why}")


def read_observations(
    store_url: str, namespaces: str | list[str], parallelism: int, include_untrusted: bool = False
) -> Any:
    """A ray.data.Dataset of the namespaces' trusted observations (all of them with `include_untrusted`;
    keys.py says which rows are trusted), read in `parallelism` shards.

    Opens the store first (applying migrations, and failing as one KolmError line on a bad URL).
    A SQLite file that does not exist is an error here, not a new empty store.
    """
    import ray.data

    from kolm_ray.observations.store import open_store
    from kolm_ray.settings import redact_url

    if store_url.startswith("sqlite:///") and not Path(store_url[len("sqlite:///") :]).exists():
        raise KolmError(f"observation store {store_url[len('sqlite:///') :]} does not exist")
    names = [namespaces] if isinstance(namespaces, str) else list(namespaces)
    for n in names:
        try:
            check_namespace(n)
        except ValueError as e:
            raise KolmError(str(e)) from None
    store = open_store(store_url)
    try:
        sql, params, connect = store.dataset_source(names, include_untrusted=include_untrusted)
    finally:
        store.close()
    try:
        return ray.data.read_sql(
            sql,
            connect,
            sql_params=params,
            shard_keys=["seq"],
            shard_hash_fn="ABS",  # MOD(ABS(ABS(seq)), n): round-robin over the insertion order
            override_num_blocks=max(1, parallelism),
            # Reads are light; at 0 CPUs they run beside the featurize actors, which hold one CPU each
            # (otherwise workers == CPUs starves the reads and the pipeline waits forever).
            num_cpus=0,
        )
    except Exception as e:  # read_sql counts rows on the driver: a store gone since open_store
        raise KolmError(
            f"cannot read observations from {redact_url(store_url)}: {type(e).__name__}"
        ) from None
