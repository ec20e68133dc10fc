"""The versioned schema of every backend and the one runner that applies it.

Each dialect has its list of (version, statements); the same version number means the same logical
schema in every dialect (a migration added for one is added for all). Never edit a released entry:
append a new version. `migrate` applies what is missing in ONE transaction under the dialect's write
lock, and records each version in `schema_migrations`, so N capture workers starting at once on an
empty database apply it exactly once and a failed migration leaves the previous schema intact.

Why not alembic or yoyo: alembic needs SQLAlchemy, which nothing else here uses, and yoyo would be a
dependency for ~60 lines; both backends have transactional DDL, so a list of statements per version
and one locked transaction are the whole of what is needed (PostgreSQL: an advisory lock, since
`CREATE TABLE IF NOT EXISTS schema_migrations` itself races between two first starts).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from kolm_ray.errors import KolmError

Migration = tuple[int, list[str]]

# Migrations 2 and 3 are the same on both dialects but for the name of an 8-byte float ({real}: SQLite's REAL
# is 8 bytes, PostgreSQL's REAL only 4, so there it is DOUBLE PRECISION).
_SHARED: list[Migration] = [
    (
        2,
        [
            # The model registry (kolm_ray/registry.py): one row per promoted artifact version.
            """CREATE TABLE models (
                namespace TEXT NOT NULL,
                version INTEGER NOT NULL,   -- 1, 2, ... per namespace
                name TEXT NOT NULL,
                sha256 TEXT NOT NULL,       -- of the .kolm file
                path TEXT NOT NULL,         -- the copy under $KOLM_HOME/models/
                k_score {real},
                k_floor {real},
                threshold {real} NOT NULL,  -- confidence below this: the proxy asks the upstream
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
    (
        3,
        [
            # kolm loop's per-namespace lease (kolm_ray/loop/loop.py): two loops on one store never both promote.
            """CREATE TABLE loop_leases (
                namespace TEXT PRIMARY KEY,
                owner TEXT NOT NULL,        -- host:pid:uuid of the loop holding it
                expires_at TEXT NOT NULL    -- UTC ISO time; an expired lease may be taken over
            )""",
        ],
    ),
    (
        4,
        [
            # X-Kolm-Omit (docs/privacy.md): "request", "response" or "all" when that side's text was not
            # stored; such rows count for spend and are never trained on (base.TRAINABLE).
            "ALTER TABLE observations ADD COLUMN omitted TEXT",
        ],
    ),
]


# Migration 5 (issue 25, part B; 6 is part A's keys table): the registry's history, one row per promote or
# rollback, written in the same transaction as the `models` change it records (kolm_ray/registry/history.py).
_EVENTS = """CREATE TABLE model_events (
                seq {seq},                  -- insertion order: the history's order
                namespace TEXT NOT NULL,
                version INTEGER NOT NULL,   -- the version that became live
                name TEXT NOT NULL,
                action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
                actor TEXT NOT NULL,        -- $KOLM_ACTOR, user@host, or "kolm loop"
                reason TEXT,
                at TEXT NOT NULL,           -- UTC ISO time
                k_score {real},
                sha256 TEXT NOT NULL        -- of the .kolm made live
            )"""


# Migration 6 (issue 25, part A): capture keys, and the key each observation came with.
_KEYS: list[Migration] = [
    (
        6,
        [
            # Capture keys (kolm_ray/observations/keys.py): who may write which tenant's namespaces.
            """CREATE TABLE keys (
                id TEXT PRIMARY KEY,        -- key_<16 hex>: shown in lists and errors, never secret
                key_sha256 TEXT NOT NULL UNIQUE,  -- sha256 hex of the key; the key itself is never stored
                name TEXT,                  -- a label (--name)
                tenant TEXT NOT NULL,
                namespaces TEXT NOT NULL,   -- JSON list of the namespaces it may write and read
                train INTEGER NOT NULL,     -- 1: its rows may train models; 0: --no-train (spend/report only)
                redact TEXT,                -- "pii": its rows are redacted before they are stored
                created_at TEXT NOT NULL,
                revoked_at TEXT             -- set by revoke: the key is refused from then on
            )""",
            # The key an observation came with (null: an open proxy, or an import with the admin token).
            "ALTER TABLE observations ADD COLUMN key_id TEXT",
        ],
    ),
]


def _dialect(migrations: list[Migration], real: str) -> list[Migration]:
    return [
        (version, [sql.replace("{real}", real) for sql in statements]) for version, statements in migrations
    ]


SQLITE: list[Migration] = [
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
    *_dialect(_SHARED, real="REAL"),
    (
        5,
        [
            _EVENTS.format(seq="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL"),
            # Append-only: no code path updates or deletes an event, and the database refuses it too.
            "CREATE TRIGGER model_events_no_update BEFORE UPDATE ON model_events"
            " BEGIN SELECT RAISE(ABORT, 'model_events is append-only'); END",
            "CREATE TRIGGER model_events_no_delete BEFORE DELETE ON model_events"
            " BEGIN SELECT RAISE(ABORT, 'model_events is append-only'); END",
        ],
    ),
    *_dialect(_KEYS, real="REAL"),
]

POSTGRESQL: list[Migration] = [
    (
        1,
        [
            # json, not jsonb: json keeps the text as written (key order, spacing), so an observation reads
            # back byte-for-byte as it does from SQLite; nothing queries inside these documents.
            """CREATE TABLE observations (
                seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                namespace TEXT NOT NULL,
                tenant TEXT,
                provider TEXT NOT NULL,
                model TEXT,
                input TEXT NOT NULL,
                output JSON,
                verified BOOLEAN,
                status INTEGER,
                latency_ms DOUBLE PRECISION,
                usage JSON,
                created_at TIMESTAMPTZ NOT NULL,
                request JSON
            )""",
            "CREATE INDEX ix_obs_ns_seq ON observations (namespace, seq)",
            "CREATE INDEX ix_obs_ns_verified_seq ON observations (namespace, verified, seq)",
            "CREATE INDEX ix_obs_tenant_seq ON observations (tenant, seq)",
        ],
    ),
    *_dialect(_SHARED, real="DOUBLE PRECISION"),
    (
        5,
        [
            _EVENTS.format(seq="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", real="DOUBLE PRECISION"),
            """CREATE FUNCTION kolm_model_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'model_events is append-only'; END $$""",
            "CREATE TRIGGER model_events_no_change BEFORE UPDATE OR DELETE ON model_events"
            " FOR EACH ROW EXECUTE FUNCTION kolm_model_events_append_only()",
            "CREATE TRIGGER model_events_no_truncate BEFORE TRUNCATE ON model_events"
            " FOR EACH STATEMENT EXECUTE FUNCTION kolm_model_events_append_only()",
        ],
    ),
    *_dialect(_KEYS, real="DOUBLE PRECISION"),
]

MIGRATIONS: dict[str, list[Migration]] = {"sqlite": SQLITE, "postgresql": POSTGRESQL}

# Per dialect: how a write transaction starts, its placeholder, and what serialises concurrent runners.
_BEGIN = {"sqlite": "BEGIN IMMEDIATE", "postgresql": "BEGIN"}
_PH = {"sqlite": "?", "postgresql": "%s"}
_LOCK = {"postgresql": "SELECT pg_advisory_xact_lock(4242000015)"}  # any constant: kolm's schema lock


def latest(dialect: str) -> int:
    return max(v for v, _ in MIGRATIONS[dialect])


def migrate(conn: Any, dialect: str, where: str, target: int | None = None) -> list[int]:
    """Apply the dialect's pending migrations (up to `target`, default all) on `conn`; the versions applied.

    `conn`: a DB-API connection in autocommit mode (sqlite3 with isolation_level=None, psycopg with
    autocommit=True), so the explicit BEGIN here is the only transaction. `where` names the store in errors.
    Raises KolmError when the database's schema is newer than this kolm knows.
    """
    known = latest(dialect)
    target = known if target is None else target
    ph = _PH[dialect]
    conn.execute(_BEGIN[dialect])
    try:
        if dialect in _LOCK:
            conn.execute(_LOCK[dialect])
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        if done and max(done) > known:
            raise KolmError(
                f"store {where} has schema version {max(done)}, newer than this kolm ({known}); upgrade kolm"
            )
        applied = []
        for version, statements in MIGRATIONS[dialect]:
            if version in done or version > target:
                continue
            for sql in statements:
                conn.execute(sql)
            conn.execute(
                f"INSERT INTO schema_migrations (version, applied_at) VALUES ({ph}, {ph})",
                (version, datetime.now(timezone.utc).isoformat()),
            )
            applied.append(version)
        conn.execute("COMMIT")
        return applied
    except BaseException:
        conn.execute("ROLLBACK")
        raise
