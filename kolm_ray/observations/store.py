"""Where observations live: a `Store` interface and its SQLite (WAL) implementation.

    store = open_store("sqlite:////tmp/obs.db")     # or None: $KOLM_STORE, else $KOLM_HOME/observations.db
    store.append_many([obs, ...])                   # one transaction: all rows or none
    page, cursor = store.list(namespace="support", limit=100)
    for batch in store.iter_observations("support"): ...

Callers only see `Store`; `open_store` picks the backend from the URL scheme (`BACKENDS`), so a
PostgreSQL backend is one more class and one more table entry, no caller changes. The schema is
versioned: `MIGRATIONS` run in order inside a transaction and are recorded in `schema_migrations`.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import Observation
from kolm_ray.settings import store_url

MAX_PAGE = 1000  # the bridge's largest page; bigger exports go through iter_observations


@runtime_checkable
class Store(Protocol):
    """What every observation backend implements. Methods are thread-safe."""

    url: str

    def append(self, obs: Observation) -> int:
        """Insert one observation; returns 1."""

    def append_many(self, observations: list[Observation]) -> int:
        """Insert all in one transaction (all or none); returns how many. Raises KeyError on a duplicate id."""

    def get(self, id: str) -> Observation | None:
        """The observation with this id, or None."""

    def list(
        self,
        namespace: str | None = None,
        tenant: str | None = None,
        verified: bool | str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Observation], str | None]:
        """A page in insertion order and the cursor of the next page (None at the end).

        `verified`: True/False filter on that value, "null" on not-yet-judged, None = no filter.
        Raises ValueError on a bad cursor or limit.
        """

    def verify(self, id: str, verified: bool, output: Any = None) -> Observation | None:
        """Set `verified` (and replace `output` when given); the updated observation, or None if unknown."""

    def namespaces(self) -> list[dict[str, Any]]:
        """[{"name", "count", "verified"}] per namespace, by name; `verified` counts verified=true."""

    def iter_observations(
        self, namespace: str, verified: bool | str | None = None, batch_size: int = 1000
    ) -> Iterator[list[Observation]]:
        """Every observation of a namespace, in insertion order, in lists of up to batch_size."""

    def count(self, namespace: str | None = None) -> int:
        """How many observations (in a namespace, or in all)."""

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""


# Each entry: (version, statements). Never edit a released entry; append a new version instead.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE observations (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order; the keyset cursor
                id TEXT NOT NULL UNIQUE,
                namespace TEXT NOT NULL,
                tenant TEXT,
                provider TEXT NOT NULL,
                model TEXT,
                input TEXT NOT NULL,
                output TEXT,            -- JSON
                verified INTEGER,       -- NULL, 0, 1
                status INTEGER,
                latency_ms REAL,
                usage TEXT,             -- JSON
                created_at TEXT NOT NULL,
                request TEXT            -- JSON, credentials removed
            )""",
            # The bridge's queries: by namespace (+verified), by tenant, per-namespace counts.
            "CREATE INDEX ix_obs_ns_seq ON observations (namespace, seq)",
            "CREATE INDEX ix_obs_ns_verified_seq ON observations (namespace, verified, seq)",
            "CREATE INDEX ix_obs_tenant_seq ON observations (tenant, seq)",
        ],
    ),
    (
        2,
        [
            # The model registry (kolm_ray/registry.py): one row per promoted artifact version. Portable
            # SQL (TEXT/INTEGER/REAL, no AUTOINCREMENT): the same statements run on PostgreSQL.
            """CREATE TABLE models (
                namespace TEXT NOT NULL,
                version INTEGER NOT NULL,   -- 1, 2, ... per namespace
                name TEXT NOT NULL,
                sha256 TEXT NOT NULL,       -- of the .kolm file
                path TEXT NOT NULL,         -- the copy under $KOLM_HOME/models/
                k_score REAL,
                k_floor REAL,
                threshold REAL NOT NULL,    -- confidence below this: the proxy asks the upstream
                shape TEXT NOT NULL,        -- JSON: the request shape the model was compiled for
                live INTEGER NOT NULL,      -- 1 for exactly one row per namespace while it has a model
                created_at TEXT NOT NULL,   -- the artifact's manifest created_at
                promoted_at TEXT NOT NULL,  -- last time it was made live
                rolled_back_at TEXT,        -- set by rollback; cleared when promoted again
                PRIMARY KEY (namespace, version)
            )""",
            # Shadow checks: a local answer and the upstream's answer to the same request.
            """CREATE TABLE shadow_pairs (
                local_id TEXT PRIMARY KEY,  -- observation id of the local answer
                upstream_id TEXT,           -- observation id of the upstream's answer (null: it failed)
                namespace TEXT NOT NULL,
                version INTEGER NOT NULL,
                agree INTEGER,              -- 1/0 by the K-score's field rules; null when not comparable
                detail TEXT,                -- JSON: per-field agreement or the failure
                created_at TEXT NOT NULL
            )""",
            "CREATE INDEX ix_shadow_ns ON shadow_pairs (namespace, created_at)",
        ],
    ),
]

_COLUMNS = "id, namespace, tenant, provider, model, input, output, verified, status, latency_ms, usage, created_at, request"


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _row(obs: Observation) -> tuple:
    return (
        obs.id,
        obs.namespace,
        obs.tenant,
        obs.provider,
        obs.model,
        obs.input,
        json.dumps(obs.output, ensure_ascii=False, separators=(",", ":")),
        None if obs.verified is None else int(obs.verified),
        obs.status,
        obs.latency_ms,
        _dumps(obs.usage),
        obs.created_at.astimezone(timezone.utc).isoformat(),
        _dumps(obs.request),
    )


def _obs(r: tuple) -> Observation:
    # Rows were validated on the way in; model_construct skips re-validating 100k rows on export.
    return Observation.model_construct(
        id=r[0],
        namespace=r[1],
        tenant=r[2],
        provider=r[3],
        model=r[4],
        input=r[5],
        output=None if r[6] is None else json.loads(r[6]),
        verified=None if r[7] is None else bool(r[7]),
        status=r[8],
        latency_ms=r[9],
        usage=None if r[10] is None else json.loads(r[10]),
        created_at=datetime.fromisoformat(r[11]),
        request=None if r[12] is None else json.loads(r[12]),
    )


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor points after; ValueError when it is not one this store issued."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("s"):
            raise ValueError
        seq = int(raw[1:])
        if seq < 0:
            raise ValueError
        return seq
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"cursor {cursor!r} is not valid (use next_cursor from a previous page)") from None


def _verified_clause(verified: bool | str | None) -> tuple[str, list[Any]]:
    if verified is None:
        return "", []
    if verified == "null":
        return " AND verified IS NULL", []
    if isinstance(verified, bool):
        return " AND verified = ?", [int(verified)]
    raise ValueError(f"verified must be true, false or null, got {verified!r}")


class SQLiteStore:
    """SQLite in WAL mode: one write connection behind a lock, one read connection per thread.

    WAL lets readers (bridge queries, exports) run while the capture writer commits; busy_timeout lets a
    second process (a CLI import while the proxy runs) wait for the write lock instead of failing.
    """

    def __init__(self, path: str | Path, url: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.url = url or f"sqlite:///{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KolmError(f"cannot create the store's directory {self.path.parent}: {e}") from None
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        try:
            self._writer = self._connect()
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise KolmError(f"cannot open observation store {self.path}: {e}") from None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes, fast commits
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _migrate(self) -> None:
        with self._write_lock:
            c = self._writer
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                done = {v for (v,) in c.execute("SELECT version FROM schema_migrations")}
                known = max(v for v, _ in MIGRATIONS)
                if done and max(done) > known:
                    raise KolmError(
                        f"store {self.path} has schema version {max(done)}, newer than this kolm ({known}); upgrade kolm"
                    )
                for version, statements in MIGRATIONS:
                    if version in done:
                        continue
                    for sql in statements:
                        c.execute(sql)
                    c.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, datetime.now(timezone.utc).isoformat()),
                    )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        """The highest migration applied."""
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

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run fn inside one IMMEDIATE transaction on the write connection: committed whole or not at all."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("store is closed")
            c = self._writer
            c.execute("BEGIN IMMEDIATE")
            try:
                result = fn(c)
                c.execute("COMMIT")
                return result
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def append(self, obs: Observation) -> int:
        return self.append_many([obs])

    def append_many(self, observations: list[Observation]) -> int:
        if not observations:
            return 0
        rows = [_row(o) for o in observations]

        def insert(c: sqlite3.Connection) -> int:
            try:
                c.executemany(f"INSERT INTO observations ({_COLUMNS}) VALUES ({','.join('?' * 13)})", rows)
            except sqlite3.IntegrityError as e:
                ids = [r[0] for r in rows]
                q = f"SELECT id FROM observations WHERE id IN ({','.join('?' * len(ids))})"
                dup = [i for (i,) in c.execute(q, ids)] if len(ids) < 900 else []
                raise KeyError(f"observation id already exists: {', '.join(dup[:5]) or e}") from None
            return len(rows)

        return self._write(insert)

    def get(self, id: str) -> Observation | None:
        r = self._read().execute(f"SELECT {_COLUMNS} FROM observations WHERE id = ?", (id,)).fetchone()
        return None if r is None else _obs(r)

    def list(
        self,
        namespace: str | None = None,
        tenant: str | None = None,
        verified: bool | str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[Observation], str | None]:
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be an integer in [1, {MAX_PAGE}], got {limit!r}")
        where, params = "seq > ?", [decode_cursor(cursor) if cursor else 0]
        if namespace is not None:
            where += " AND namespace = ?"
            params.append(namespace)
        if tenant is not None:
            where += " AND tenant = ?"
            params.append(tenant)
        clause, extra = _verified_clause(verified)
        where += clause
        params.extend(extra)
        rows = (
            self._read()
            .execute(
                f"SELECT seq, {_COLUMNS} FROM observations WHERE {where} ORDER BY seq LIMIT ?",
                [*params, limit + 1],
            )
            .fetchall()
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1][0]) if more else None
        return [_obs(r[1:]) for r in rows], next_cursor

    def verify(self, id: str, verified: bool, output: Any = None) -> Observation | None:
        if not isinstance(verified, bool):
            raise ValueError(f"verified must be a boolean, got {verified!r}")

        def update(c: sqlite3.Connection) -> int:
            if output is None:
                cur = c.execute("UPDATE observations SET verified = ? WHERE id = ?", (int(verified), id))
            else:
                cur = c.execute(
                    "UPDATE observations SET verified = ?, output = ? WHERE id = ?",
                    (int(verified), json.dumps(output, ensure_ascii=False), id),
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
        clause, extra = _verified_clause(verified)
        after = 0
        while True:
            rows = (
                self._read()
                .execute(
                    f"SELECT seq, {_COLUMNS} FROM observations WHERE namespace = ? AND seq > ?{clause} ORDER BY seq LIMIT ?",
                    [namespace, after, *extra, batch_size],
                )
                .fetchall()
            )
            if not rows:
                return
            after = rows[-1][0]
            yield [_obs(r[1:]) for r in rows]
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


def _open_sqlite(url: str) -> Store:
    path = url[len("sqlite:///") :]
    if not path or path == ":memory:":
        raise KolmError(
            "sqlite store needs a file path (sqlite:///path/to/observations.db); :memory: is not shared"
        )
    return SQLiteStore(path, url=url)


def _open_postgres(url: str) -> Store:
    raise KolmError(f"store URL {url!r}: the PostgreSQL backend is not implemented yet; use sqlite:///path")


# scheme prefix -> opener. A PostgreSQL backend implements Store and replaces _open_postgres.
BACKENDS: dict[str, Callable[[str], Store]] = {
    "sqlite:///": _open_sqlite,
    "postgresql://": _open_postgres,
    "postgres://": _open_postgres,
}


def open_store(url: str | None = None) -> Store:
    """Open the store at `url` (default: $KOLM_STORE, else SQLite at $KOLM_HOME/observations.db)."""
    resolved = store_url(url)
    for prefix, opener in BACKENDS.items():
        if resolved.startswith(prefix):
            return opener(resolved)
    raise KolmError(f"store URL {resolved!r} is not supported; known schemes: {', '.join(BACKENDS)}")
