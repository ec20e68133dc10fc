"""The SQLite (WAL) backend: one file, one writer connection, one read connection per thread."""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    to_row,
)
from kolm_ray.observations.store.migrations import migrate
from kolm_ray.settings import private_file

BUSY_TIMEOUT_MS = 10_000  # how long a writer waits for another process's write lock
_INSERT = f"INSERT INTO observations ({COLUMN_LIST}) VALUES ({','.join('?' * len(COLUMNS))})"


def _read_only(path: str) -> sqlite3.Connection:
    """Ray Data's connection factory: a read-only connection (picklable through functools.partial)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch a fresh database to WAL. The switch takes an exclusive lock and SQLite answers SQLITE_BUSY at
    once, without its busy handler, when another connection opens the same new file at that moment (one in
    ~200 tries with four threads opening it together), so retry within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class SQLiteStore:
    """SQLite in WAL mode: one write connection behind a lock, one read connection per thread.

    WAL lets readers (bridge queries, exports) run while the capture writer commits; busy_timeout lets a
    second process (a CLI import while the proxy runs, another capture worker) wait for the write lock
    instead of failing.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path, url: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.url = url or f"sqlite:///{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KolmError(f"cannot create the store's directory {self.path.parent}: {e}") from None
        try:
            private_file(self.path)  # 0600 before SQLite opens it: its -wal and -shm files take its mode
        except OSError as e:
            raise KolmError(f"cannot create the store {self.path}: {e.strerror or e}") from None
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            self._writer = self._connect()
            _enable_wal(self._writer)
            with self._write_lock:
                migrate(self._writer, "sqlite", str(self.path))
        except sqlite3.DatabaseError as e:
            raise KolmError(f"cannot open observation store {self.path}: {e}") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes, fast commits
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def schema_version(self) -> int:
        return self._read().execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    def _read(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _write(self, fn: Callable[[sqlite3.Connection], Any], timeout_s: float | None = None) -> Any:
        """Run fn inside one IMMEDIATE transaction on the write connection: committed whole or not at all.

        timeout_s: how long to wait for another process's write lock (default BUSY_TIMEOUT_MS)."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            c = self._writer
            if timeout_s is not None:
                c.execute(f"PRAGMA busy_timeout={max(1, int(timeout_s * 1000))}")
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(c)
                    c.execute("COMMIT")
                    return result
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
            finally:
                if timeout_s is not None:
                    c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def append(self, obs: Observation) -> int:
        return self.append_many([obs])

    def append_many(
        self, observations: list[Observation], ignore_existing: bool = False, timeout_s: float | None = None
    ) -> int:
        if not observations:
            return 0
        rows = [to_row(o, iso_time=True) for o in observations]

        def insert(c: sqlite3.Connection) -> int:
            if ignore_existing:
                before = c.total_changes
                c.executemany(_INSERT + " ON CONFLICT (id) DO NOTHING", rows)
                return c.total_changes - before
            try:
                c.executemany(_INSERT, rows)
            except sqlite3.IntegrityError as e:
                ids = [r[0] for r in rows]
                q = f"SELECT id FROM observations WHERE id IN ({','.join('?' * len(ids))})"
                dup = [i for (i,) in c.execute(q, ids)] if len(ids) < 900 else []
                raise KeyError(f"observation id already exists: {', '.join(dup[:5]) or e}") from None
            return len(rows)

        return self._write(insert, timeout_s)

    def get(self, id: str) -> Observation | None:
        r = self._read().execute(f"SELECT {COLUMN_LIST} FROM observations WHERE id = ?", (id,)).fetchone()
        return None if r is None else from_row(r)

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
        where, params = filters("?", namespace, tenant, verified, after)
        rows = (
            self._read()
            .execute(
                f"SELECT seq, {COLUMN_LIST} FROM observations WHERE {where} ORDER BY seq LIMIT ?",
                [*params, limit + 1],
            )
            .fetchall()
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1][0]) if more else None
        return [from_row(r[1:]) for r in rows], next_cursor

    def verify(self, id: str, verified: bool, output: Any = None) -> Observation | None:
        if not isinstance(verified, bool):
            raise ValueError(f"verified must be a boolean, got {verified!r}")

        def update(c: sqlite3.Connection) -> int:
            if output is None:
                cur = c.execute("UPDATE observations SET verified = ? WHERE id = ?", (int(verified), id))
            else:
                cur = c.execute(
                    "UPDATE observations SET verified = ?, output = ? WHERE id = ?",
                    (int(verified), json.dumps(output, ensure_ascii=False, separators=(",", ":")), id),
                )
            return cur.rowcount

        if not self._write(update):
            return None
        return self.get(id)

    def namespaces(self) -> list[dict[str, Any]]:
        rows = self._read().execute(
            "SELECT namespace, COUNT(*), COALESCE(SUM(verified = 1), 0) FROM observations GROUP BY namespace ORDER BY namespace"
        )
        return [{"name": n, "count": c, "verified": v} for n, c, v in rows]

    def iter_observations(
        self, namespace: str, verified: bool | str | None = None, batch_size: int = 1000
    ) -> Iterator[list[Observation]]:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        after = 0
        while True:
            where, params = filters("?", namespace, None, verified, after)
            rows = (
                self._read()
                .execute(
                    f"SELECT seq, {COLUMN_LIST} FROM observations WHERE {where} ORDER BY seq LIMIT ?",
                    [*params, batch_size],
                )
                .fetchall()
            )
            if not rows:
                return
            after = rows[-1][0]
            yield [from_row(r[1:]) for r in rows]
            if len(rows) < batch_size:
                return

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return self._read().execute("SELECT COUNT(*) FROM observations").fetchone()[0]
        return (
            self._read()
            .execute("SELECT COUNT(*) FROM observations WHERE namespace = ?", (namespace,))
            .fetchone()[0]
        )

    def delete(self, erasure: Any) -> int:
        where, params = erasure.where("sqlite")
        ids = f"SELECT id FROM observations WHERE {where}"

        def run(c: sqlite3.Connection) -> int:
            c.execute(
                f"DELETE FROM shadow_pairs WHERE local_id IN ({ids}) OR upstream_id IN ({ids})", params * 2
            )
            return c.execute(f"DELETE FROM observations WHERE {where}", params).rowcount

        return self._write(run)

    def dataset_source(
        self, namespaces: list[str], include_untrusted: bool = False
    ) -> tuple[str, list[Any], Callable[[], Any]]:
        marks = ",".join("?" * len(namespaces))
        trusted = "" if include_untrusted else f" AND {TRUSTED_SQL}"  # omitted text is never trained on
        sql = f"SELECT seq, id, namespace, input, output, verified, request FROM observations WHERE namespace IN ({marks}) AND provider <> 'local' AND {TRAINABLE}{trusted} ORDER BY seq"
        return sql, list(namespaces), functools.partial(_read_only, str(self.path))

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
