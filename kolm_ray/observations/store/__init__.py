"""Where observations live: the `Store` interface and its backends, SQLite (WAL) and PostgreSQL.

    store = open_store("sqlite:////tmp/obs.db")     # or postgresql://user:pw@host:5432/db; None: $KOLM_STORE
    store.append_many([obs, ...])                   # one transaction: all rows or none
    store.append_many(replayed, ignore_existing=True)   # ids already stored are skipped
    page, cursor = store.list(namespace="support", limit=100)
    for batch in store.iter_observations("support"): ...

Callers only see `Store`; `open_store` picks the backend from the URL scheme (`BACKENDS`). The schema
is versioned per dialect in `migrations.py` and applied by one runner on open. `store.url` never
carries a password (`settings.redact_url`), so it is safe in logs, /healthz and errors.
"""

from __future__ import annotations

from collections.abc import Callable

from kolm_ray.errors import KolmError
from kolm_ray.observations.store.base import (
    MAX_PAGE,
    Store,
    decode_cursor,
    encode_cursor,
    store_scheme,
)
from kolm_ray.observations.store.migrations import MIGRATIONS, latest, migrate
from kolm_ray.observations.store.sqlite import SQLiteStore
from kolm_ray.settings import redact_url, store_url

__all__ = [
    "BACKENDS",
    "MAX_PAGE",
    "MIGRATIONS",
    "SQLiteStore",
    "Store",
    "decode_cursor",
    "encode_cursor",
    "latest",
    "migrate",
    "open_store",
    "store_scheme",
]


def _open_sqlite(url: str) -> Store:
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:":
        raise KolmError(
            "sqlite store needs a file path (sqlite:///path/to/observations.db); :memory: is not shared"
        )
    return SQLiteStore(path, url=url)


def _open_postgres(url: str) -> Store:
    from kolm_ray.observations.store.postgres import PostgresStore  # psycopg only when it is used

    return PostgresStore(url)


# scheme prefix -> opener. A new backend implements Store and adds its prefixes here.
BACKENDS: dict[str, Callable[[str], Store]] = {
    "sqlite:///": _open_sqlite,
    "postgresql://": _open_postgres,
    "postgres://": _open_postgres,
}


def open_store(url: str | None = None) -> Store:
    """Open the store at `url` (default: $KOLM_STORE, else SQLite at $KOLM_HOME/observations.db).

    Applies pending migrations. Raises KolmError (one line, no password) when it cannot be opened.
    """
    resolved = store_url(url)
    for prefix, opener in BACKENDS.items():
        if resolved.startswith(prefix):
            return opener(resolved)
    raise KolmError(
        f"store URL {redact_url(resolved)!r} is not supported; known schemes: {', '.join(BACKENDS)}"
    )
