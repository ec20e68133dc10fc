"""The observation store's contract, once per backend (SQLite and PostgreSQL): schema and migrations,
atomic and idempotent batches, keyset pages, filters, threads, lock timeouts, bad URLs. The CLI twins and
the PostgreSQL-only tests: tests/test_store_cli_postgres.py."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from store_helpers import obs

from kolm_ray.errors import KolmError
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import (
    MIGRATIONS,
    SQLiteStore,
    Store,
    latest,
    migrate,
    open_store,
    redact_url,
)


def raw(url: str):
    """A plain autocommit DB-API connection to the store's database (to set up or inspect it)."""
    if url.startswith("sqlite:///"):
        return sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
    import psycopg

    return psycopg.connect(url, autocommit=True)


def dialect(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgresql"


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def test_open_store_defaults_to_kolm_home_wal_and_schema(kolm_home):
    s = open_store()
    try:
        assert isinstance(s, Store) and isinstance(s, SQLiteStore)
        assert s.path == kolm_home / "observations.db"
        db = sqlite3.connect(s.path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [v for (v,) in db.execute("SELECT version FROM schema_migrations")] == [
            v for v, _ in MIGRATIONS["sqlite"]
        ]
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"ix_obs_ns_seq", "ix_obs_ns_verified_seq", "ix_obs_tenant_seq"} <= indexes
        plan = " ".join(
            str(r)
            for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM observations WHERE namespace=? AND verified=? AND seq>? ORDER BY seq LIMIT 5",
                ("a", 1, 0),
            )
        )
        assert "ix_obs_ns_verified_seq" in plan
        db.close()
    finally:
        s.close()


def test_reopen_is_idempotent_and_a_newer_schema_is_refused(store_url):
    with open_store(store_url) as s:
        s.append(obs(1))
    with open_store(store_url) as s:
        assert s.count() == 1 and s.schema_version() == latest(dialect(store_url))
        assert isinstance(s, Store) and s.url == redact_url(store_url)  # never the password
    with raw(store_url) as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 'future')")
    with pytest.raises(KolmError, match="newer than this kolm"):
        open_store(store_url)


def _schema(url: str) -> list[tuple]:
    with raw(url) as db:
        if dialect(url) == "sqlite":
            cols = db.execute(
                "SELECT name, type, \"notnull\" FROM pragma_table_info('observations')"
            ).fetchall()
            idx = db.execute(
                "SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
            ).fetchall()
        else:
            cols = db.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = 'observations' ORDER BY ordinal_position"
            ).fetchall()
            idx = db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'observations'").fetchall()
        versions = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    return [tuple(c) for c in cols] + sorted(tuple(i) for i in idx) + [tuple(v) for v in versions]


def test_migrations_from_empty_and_from_the_previous_version(store_url, tmp_path):
    d = dialect(store_url)
    versions = [v for v, _ in MIGRATIONS[d]]
    assert versions == sorted(versions) and versions == [v for v, _ in MIGRATIONS["sqlite"]]  # same numbering
    # from the previous version: the database as the last release left it, with a row in it
    with raw(store_url) as db:
        assert migrate(db, d, "test", target=latest(d) - 1) == versions[:-1]
        if latest(d) > 1:  # the observations table exists from version 1 on
            ph = "?" if d == "sqlite" else "%s"
            db.execute(
                "INSERT INTO observations (id, namespace, provider, input, output, created_at) "
                f"VALUES ({ph}, 'support', 'import', 'q', '1', '2026-01-01T00:00:00+00:00')",
                ("obs_old",),
            )
    with open_store(store_url) as s:
        assert s.schema_version() == latest(d)
        if latest(d) > 1:
            assert s.get("obs_old").input == "q"
        s.append(obs(1))
    upgraded = _schema(store_url)
    # from empty: a fresh database reaches the very same schema
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}" if d == "sqlite" else None
    if fresh is None:  # a second empty database on the same server
        import uuid

        base = store_url.rsplit("/", 1)[0]
        name = f"t_{uuid.uuid4().hex[:12]}"
        with raw(base + "/postgres") as db:
            db.execute(f'CREATE DATABASE "{name}"')
        fresh = f"{base}/{name}"
    open_store(fresh).close()
    assert _schema(fresh) == upgraded
    with raw(fresh) as db:  # the runner is idempotent: nothing left to apply
        assert migrate(db, d, "test") == []


def test_concurrent_first_opens_apply_each_migration_once(store_url):
    errors: list[BaseException] = []

    def open_close() -> None:
        try:
            open_store(store_url).close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with raw(store_url) as db:
        rows = db.execute("SELECT version FROM schema_migrations").fetchall()
    assert sorted(v for (v,) in rows) == [v for v, _ in MIGRATIONS[dialect(store_url)]]


@pytest.mark.parametrize(
    "url,msg",
    [
        ("mysql://x", "not supported"),
        ("sqlite:///:memory:", "file path"),
    ],
)
def test_open_store_rejects_unsupported_urls(url, msg):
    with pytest.raises(KolmError, match=msg):
        open_store(url)


def test_roundtrip_keeps_every_field(store):
    o = Observation(
        namespace="support",
        tenant="acme",
        provider="openai",
        model="gpt",
        input="hi",
        output={"a": [1, "é"]},
        verified=True,
        status=200,
        latency_ms=12.5,
        usage={"total_tokens": 3},
        request={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert store.append(o) == 1
    got = store.get(o.id)
    assert got.model_dump() == o.model_dump()
    assert store.get("obs_missing") is None


def test_append_many_is_all_or_nothing(store):
    first = obs(0)
    store.append(first)
    batch = [obs(1), obs(2), Observation(**{**obs(3).model_dump(), "id": first.id})]
    with pytest.raises(KeyError, match=first.id):
        store.append_many(batch)
    assert store.count() == 1  # none of the three landed


def test_keyset_pages_cover_everything_once_and_filters(store):
    rows = [
        obs(
            i,
            ns="a" if i % 2 else "b",
            tenant="t1" if i % 3 == 0 else None,
            verified=[True, False, None][i % 3],
        )
        for i in range(53)
    ]
    store.append_many(rows)
    seen, cursor = [], None
    while True:
        page, cursor = store.list(namespace="a", limit=7, cursor=cursor)
        seen += [o.id for o in page]
        if cursor is None:
            break
    assert seen == [o.id for o in rows if o.namespace == "a"]
    page, cur = store.list(limit=1000)
    assert len(page) == 53 and cur is None
    assert [o.id for o in store.list(tenant="t1", limit=100)[0]] == [o.id for o in rows if o.tenant == "t1"]
    for flag, want in [(True, True), (False, False), ("null", None)]:
        got = store.list(namespace="b", verified=flag, limit=100)[0]
        assert got and all(o.verified is want and o.namespace == "b" for o in got)
    # rows inserted after a page do not shift the next page (keyset, not offset)
    page1, cur = store.list(namespace="a", limit=5)
    store.append(obs(100, ns="a"))
    page2, _ = store.list(namespace="a", limit=5, cursor=cur)
    assert page2[0].id == rows[11].id


@pytest.mark.parametrize(
    "kw", [{"cursor": "garbage!"}, {"cursor": "czEyYQ"}, {"limit": 0}, {"limit": 1001}, {"verified": "maybe"}]
)
def test_list_rejects_bad_arguments(store, kw):
    with pytest.raises(ValueError):
        store.list(**kw)


def test_verify_namespaces_iter_and_count(store):
    store.append_many([obs(i, ns="a") for i in range(5)] + [obs(i, ns="b") for i in range(3)])
    target = store.list(namespace="b", limit=1)[0][0]
    updated = store.verify(target.id, True, output={"namespace": "fixed"})
    assert updated.verified is True and updated.output == {"namespace": "fixed"}
    assert store.verify("obs_nope", False) is None
    assert store.namespaces() == [
        {"name": "a", "count": 5, "verified": 0},
        {"name": "b", "count": 3, "verified": 1},
    ]
    batches = list(store.iter_observations("a", batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [o.id for o in next(store.iter_observations("b", verified=True))] == [target.id]
    assert store.count("a") == 5 and store.count() == 8


def test_concurrent_writers_and_readers(store):
    errors = []

    def write(k: int) -> None:
        try:
            for j in range(20):
                store.append_many([obs(k * 1000 + j * 5 + m) for m in range(5)])
                store.list(limit=10)
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count() == 6 * 20 * 5


def test_idempotent_append_skips_stored_ids_and_keeps_order(store):
    first = [obs(i) for i in range(4)]
    assert store.append_many(first) == 4
    replay = first[2:] + [obs(10), obs(11)]  # a spool replaying a batch that partly landed
    assert store.append_many(replay, ignore_existing=True) == 2
    assert store.append_many(replay, ignore_existing=True) == 0
    assert [o.id for o in store.list(limit=100)[0]] == [o.id for o in first + replay[2:]]
    with pytest.raises(KeyError, match=first[0].id):
        store.append_many([obs(20), first[0]])  # without the flag a duplicate still refuses the batch
    assert store.count() == 6


def test_text_with_nul_and_unicode_round_trips(store_url, store):
    o = Observation(namespace="support", provider="import", input="a\x00b é 🙂", output={"k": "v\x00"})
    store.append(o)
    got = store.get(o.id)
    assert got.output == {"k": "v\x00"}  # JSON fields keep NUL on every backend
    # PostgreSQL text cannot hold NUL: it is stored as U+FFFD there, kept as-is by SQLite
    assert got.input == ("a\x00b é 🙂" if dialect(store_url) == "sqlite" else "a\ufffdb é 🙂")


@pytest.mark.parametrize(
    "url,shown",
    [
        ("postgresql://kolm:s3cr%40t@db:5432/kolm", "postgresql://kolm:***@db:5432/kolm"),
        (
            "postgresql://kolm@db/kolm?password=s3cret&sslmode=require",
            "postgresql://kolm@db/kolm?password=***&sslmode=require",
        ),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_append_gives_up_after_timeout_s_while_another_writer_holds_the_lock(store_url, store):
    blocker = raw(store_url)
    blocker.execute("BEGIN IMMEDIATE" if dialect(store_url) == "sqlite" else "BEGIN")
    if dialect(store_url) == "postgresql":
        blocker.execute("LOCK TABLE observations IN EXCLUSIVE MODE")
    try:
        # the driver's own lock-wait error, nothing else (a bug raising KeyError/TypeError would not pass)
        if dialect(store_url) == "sqlite":
            expected, match = sqlite3.OperationalError, "locked"
        else:
            import psycopg

            expected, match = psycopg.errors.QueryCanceled, "statement timeout"
        t0 = time.monotonic()
        with pytest.raises(expected, match=match):
            store.append_many([obs(1)], timeout_s=0.3)
        # timeout_s applied, not the default wait (SQLite 10 s, PostgreSQL none): a bound, not a timing figure
        assert time.monotonic() - t0 < 8
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.append_many([obs(2)], timeout_s=0.3) == 1  # the default wait is back, the store works
    assert [o.input for o in store.list(limit=10)[0]] == ["query 2"]
