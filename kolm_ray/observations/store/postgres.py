"""The PostgreSQL backend: psycopg 3 over a psycopg_pool connection pool, the same schema and answers as SQLite.

    store = open_store("postgresql://kolm:PASSWORD@db.internal:5432/kolm")

Several capture processes (and machines) write one database; each process holds one small pool, its
writer thread and the bridge's threads share it. Inserts are one transaction per batch, in order, so
`seq` (an identity column) is the insertion order and the keyset cursor, as in SQLite. Ids are unique:
`append_many(..., ignore_existing=True)` is `INSERT ... ON CONFLICT (id) DO NOTHING`, so a replayed
spool never duplicates.

Batched inserts: COPY for big batches (a busy writer's, a spool replay, an import), executemany
(psycopg 3 pipelines it: one round trip per batch) for small ones, where the two are even: measured
in benchmarks/store.py (`insert_methods` in its JSON) at the capture writer's batch sizes.

PostgreSQL text cannot hold NUL characters (SQLite can): a NUL in a text field (input, model, tenant)
is stored as U+FFFD. JSON fields are unaffected (json.dumps escapes NUL as \\u0000).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import TextLoader
from psycopg_pool import ConnectionPool

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store.base import (
    COLUMN_LIST,
    COLUMNS,
    TRAINABLE,
    TRUSTED_SQL,
    check_limit,
    decode_cursor,
    encode_cursor,
    filters,
    from_row,
    redact_url,
    scrub,
    to_row,
)
from kolm_ray.observations.store.migrations import migrate

# libpq's connect_timeout applies per address tried; 4 s keeps "unreachable" under 5 s for one address.
CONNECT_TIMEOUT_S = 4
POOL_MAX = 8  # the writer thread + the bridge's threadpool readers of one process
_SELECT = (
    "seq, id, namespace, tenant, provider, model, input, output::text, verified, status, latency_ms, "
    "usage::text, created_at, request::text, omitted, key_id"
)
_INSERT = f"INSERT INTO observations ({COLUMN_LIST}) VALUES ({','.join(['%s'] * len(COLUMNS))})"
_TEXT_FIELDS = (0, 1, 2, 3, 4, 5)  # id .. input: where a NUL must become U+FFFD


def _pg_row(obs: Observation) -> tuple:
    r = list(to_row(obs))
    for i in _TEXT_FIELDS:
        if isinstance(r[i], str) and "\x00" in r[i]:
            r[i] = r[i].replace("\x00", "\ufffd")
    r[7] = None if r[7] is None else bool(r[7])
    return tuple(r)


def _conninfo_kwargs(url: str) -> dict[str, Any]:
    given = conninfo_to_dict(url)
    kw: dict[str, Any] = {"application_name": given.get("application_name", "kolm")}
    if "connect_timeout" not in given:
        kw["connect_timeout"] = CONNECT_TIMEOUT_S
    return kw


def _read_only(url: str) -> psycopg.Connection:
    """Ray Data's connection factory: a read-only connection (picklable through functools.partial)."""
    return psycopg.connect(url, options="-c default_transaction_read_only=on", **_conninfo_kwargs(url))


def connect_error(e: BaseException, url: str) -> KolmError:
    """A one-line KolmError for a failed connect, with the URL redacted and no password anywhere."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return KolmError(f"cannot connect to the PostgreSQL store {redact_url(url)}: {scrub(text, url)}")


def _portable(value: Any) -> Any:
    """A value as SQLite hands it back: time as UTC ISO text (the form SQLite stores), booleans as 0/1."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    if isinstance(value, bool):
        return int(value)
    return value


class _Rows:
    def __init__(self, rows: list[tuple]) -> None:
        self._rows = rows

    def __iter__(self):
        return iter(self._rows)

    def fetchall(self) -> list[tuple]:
        return self._rows

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None


class _Reader:
    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def execute(self, sql: str, params: list[Any] | tuple = ()) -> _Rows:
        """The registry's, the report's and the loop's queries see the values SQLite would give them:
        json columns as their text, times as ISO text, booleans as 0/1."""
        with self._store._conn() as conn:
            cur = conn.cursor()
            cur.adapters.register_loader("json", TextLoader)
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description is not None else []
            return _Rows([tuple(_portable(v) for v in r) for r in rows])


class PostgresStore:
    """The Store protocol over one PostgreSQL database (see the module docstring)."""

    dialect = "postgresql"
    # "auto": COPY from COPY_MIN_ROWS rows on (from COPY_MIN_ROWS_IGNORE with ignore_existing, which
    # stages the batch in a temp table first), pipelined executemany below; "copy" / "executemany"
    # force one. benchmarks/store.py measures both at the writer's batch sizes.
    insert_method = "auto"
    COPY_MIN_ROWS = 50
    COPY_MIN_ROWS_IGNORE = 200

    def __init__(self, url: str, pool_max: int = POOL_MAX) -> None:
        self.url = redact_url(url)
        self._dsn = url
        kwargs = _conninfo_kwargs(url)
        try:
            # One direct connection first: a wrong password or an unreachable host is one clear error
            # within connect_timeout (a pool would retry in the background and only time out).
            with psycopg.connect(url, autocommit=True, **kwargs) as conn:
                migrate(conn, "postgresql", self.url)
        except psycopg.Error as e:
            raise connect_error(e, url) from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_max,
            kwargs=kwargs,
            check=ConnectionPool.check_connection,  # a connection broken by a server restart is replaced
            timeout=30.0,
            name="kolm-store",
            open=True,
        )
        self._closed = False

    # -- plumbing

    def _conn(self, timeout_s: float | None = None):
        if self._closed:
            raise RuntimeError("store is closed")
        return self._pool.connection(timeout=timeout_s)

    def _fetchall(self, sql: str, params: list[Any] | tuple = ()) -> list[tuple]:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        return self._fetchall("SELECT MAX(version) FROM schema_migrations")[0][0]

    # The registry (kolm_ray/registry.py) runs its portable SQL through these two, as on SQLite.
    def _write(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """fn(conn) inside one transaction on a pooled connection: committed whole or not at all."""
        with self._conn() as conn, conn.transaction():
            return fn(conn)

    def _read(self) -> _Reader:
        """`.execute(sql, params).fetchone()/.fetchall()` on a pooled connection, returned at once."""
        return _Reader(self)

    # -- writes

    def append(self, obs: Observation) -> int:
        return self.append_many([obs])

    def append_many(
        self, observations: list[Observation], ignore_existing: bool = False, timeout_s: float | None = None
    ) -> int:
        if not observations:
            return 0
        rows = [_pg_row(o) for o in observations]
        # one transaction: committed on leaving the block, else rolled back
        with self._conn(timeout_s) as conn:
            try:
                if timeout_s is not None:  # the whole insert, not only the wait for a pooled connection
                    conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")
                method = self.insert_method
                threshold = self.COPY_MIN_ROWS_IGNORE if ignore_existing else self.COPY_MIN_ROWS
                if method == "copy" or (method == "auto" and len(rows) >= threshold):
                    return self._copy(conn, rows, ignore_existing)
                with conn.cursor() as cur:
                    suffix = " ON CONFLICT (id) DO NOTHING" if ignore_existing else ""
                    cur.executemany(_INSERT + suffix, rows)
                    return cur.rowcount if ignore_existing else len(rows)
            except pg_errors.UniqueViolation as e:
                conn.rollback()
                ids = [r[0] for r in rows]
                dup = [i for (i,) in conn.execute("SELECT id FROM observations WHERE id = ANY(%s)", (ids,))]
                raise KeyError(f"observation id already exists: {', '.join(dup[:5]) or e}") from None

    def _copy(self, conn: psycopg.Connection, rows: list[tuple], ignore_existing: bool) -> int:
        with conn.cursor() as cur:
            if not ignore_existing:
                with cur.copy(f"COPY observations ({COLUMN_LIST}) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
                return len(rows)
            # COPY has no ON CONFLICT: stage the batch, then insert what is new, in the batch's order.
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS kolm_staged (LIKE observations INCLUDING IDENTITY) "
                "ON COMMIT DELETE ROWS"  # its own seq numbers the batch in COPY order
            )
            with cur.copy(f"COPY kolm_staged ({COLUMN_LIST}) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
            cur.execute(
                f"INSERT INTO observations ({COLUMN_LIST}) SELECT {COLUMN_LIST} FROM kolm_staged "
                "ORDER BY seq ON CONFLICT (id) DO NOTHING"
            )
            return cur.rowcount

    def verify(self, id: str, verified: bool, output: Any = None) -> Observation | None:
        if not isinstance(verified, bool):
            raise ValueError(f"verified must be a boolean, got {verified!r}")
        with self._conn() as conn:
            if output is None:
                cur = conn.execute("UPDATE observations SET verified = %s WHERE id = %s", (verified, id))
            else:
                text = json.dumps(output, ensure_ascii=False, separators=(",", ":"))
                cur = conn.execute(
                    "UPDATE observations SET verified = %s, output = %s WHERE id = %s", (verified, text, id)
                )
            if not cur.rowcount:
                return None
        return self.get(id)

    # -- reads

    def get(self, id: str) -> Observation | None:
        rows = self._fetchall(f"SELECT {_SELECT} FROM observations WHERE id = %s", (id,))
        return from_row(rows[0][1:]) if rows else None

    def list(
        self,
        namespace: str | None = None,
        tenant: str | None = None,
        verified: bool | str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Observation], str | None]:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor else 0
        where, params = filters("%s", namespace, tenant, verified, after, True, False)
        rows = self._fetchall(
            f"SELECT {_SELECT} FROM observations WHERE {where} ORDER BY seq LIMIT %s", [*params, limit + 1]
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1][0]) if more else None
        return [from_row(r[1:]) for r in rows], next_cursor

    def namespaces(self) -> list[dict[str, Any]]:
        # COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
        rows = self._fetchall(
            "SELECT namespace, COUNT(*), COUNT(*) FILTER (WHERE verified) FROM observations "
            'GROUP BY namespace ORDER BY namespace COLLATE "C"'
        )
        return [{"name": n, "count": c, "verified": v} for n, c, v in rows]

    def iter_observations(
        self, namespace: str, verified: bool | str | None = None, batch_size: int = 1000
    ) -> Iterator[list[Observation]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        after = 0
        while True:
            where, params = filters("%s", namespace, None, verified, after, True, False)
            rows = self._fetchall(
                f"SELECT {_SELECT} FROM observations WHERE {where} ORDER BY seq LIMIT %s",
                [*params, batch_size],
            )
            if not rows:
                return
            after = rows[-1][0]
            yield [from_row(r[1:]) for r in rows]
            if len(rows) < batch_size:
                return

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return self._fetchall("SELECT COUNT(*) FROM observations")[0][0]
        return self._fetchall("SELECT COUNT(*) FROM observations WHERE namespace = %s", (namespace,))[0][0]

    def delete(self, erasure: Any) -> int:
        where, params = erasure.where("postgresql")
        ids = f"SELECT id FROM observations WHERE {where}"

        def run(conn: psycopg.Connection) -> int:
            conn.execute(
                f"DELETE FROM shadow_pairs WHERE local_id IN ({ids}) OR upstream_id IN ({ids})", params * 2
            )
            return conn.execute(f"DELETE FROM observations WHERE {where}", params).rowcount

        return self._write(run)

    def dataset_source(
        self, namespaces: list[str], include_untrusted: bool = False
    ) -> tuple[str, list[Any], Callable[[], Any]]:
        trusted = "" if include_untrusted else f" AND {TRUSTED_SQL}"  # omitted text is never trained on
        sql = (
            "SELECT seq, id, namespace, input, output::text AS output, verified::int AS verified, "
            "request::text AS request FROM observations WHERE namespace = ANY(%s) AND provider <> 'local' AND "
            f"{TRAINABLE}{trusted} ORDER BY seq"
        )
        return sql, [list(namespaces)], functools.partial(_read_only, self._dsn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
