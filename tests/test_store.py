"""The observation store: schema and migrations, atomic batches, keyset pages, filters, threads, CLI."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from kolm_ray.cli import main
from kolm_ray.errors import KolmError
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import MIGRATIONS, SQLiteStore, Store, open_store


def obs(i: int, ns: str = "support", **kw) -> Observation:
    return Observation(
        namespace=ns, provider="import", input=f"query {i}", output={"namespace": f"n{i % 3}"}, **kw
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
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
            v for v, _ in MIGRATIONS
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


def test_reopen_is_idempotent_and_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'obs.db'}"
    with open_store(url) as s:
        s.append(obs(1))
    with open_store(url) as s:
        assert s.count() == 1 and s.schema_version() == MIGRATIONS[-1][0]
    db = sqlite3.connect(tmp_path / "obs.db")
    db.execute("INSERT INTO schema_migrations VALUES (999, 'future')")
    db.commit()
    db.close()
    with pytest.raises(KolmError, match="newer than this kolm"):
        open_store(url)


@pytest.mark.parametrize(
    "url,msg",
    [
        ("postgresql://u@h/db", "not implemented"),
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


def test_cli_import_list_export_roundtrip(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'obs.db'}"
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
def test_cli_import_bad_rows_exit_2_and_write_nothing(tmp_path, capsys, content, msg):
    url = f"sqlite:///{tmp_path / 'obs.db'}"
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
