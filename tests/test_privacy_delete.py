"""Deleting observations (observations/erase.py): the store's rows and shadow pairs on both backends, the
spool's segments and the dead-letter file, `kolm observations delete` and `DELETE /v1/bridges/observations`
with its hostile cases. The real `kolm capture` subprocess is in test_privacy_capture.py."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from kolm_ray import registry
from kolm_ray.capture.app import create_app
from kolm_ray.capture.spool import Spool
from kolm_ray.cli import main
from kolm_ray.observations.erase import Erasure, dead_letter_path, erase, spool_dir
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store

JANE = "jane.doe@example.com"


def _obs(id: str, ns: str = "support", tenant: str | None = "acme", day: int = 5, text: str = "hello", **kw):
    return Observation(
        id=id,
        namespace=ns,
        tenant=tenant,
        provider="openai",
        input=text,
        output=kw.pop("output", "ok"),
        created_at=datetime(2026, 12, day, 12, 0, tzinfo=timezone.utc),
        request=kw.pop("request", {"messages": [{"role": "user", "content": text}]}),
        **kw,
    )


ROWS = [
    _obs("a1", text=f"I am {JANE}"),
    _obs("a2", text="I am Jane", output={"reply": "noted JANE.DOE@EXAMPLE.COM"}),  # in the output, upper case
    _obs("a3", text="x", request={"messages": [], "metadata": {"email": JANE}}),  # only in the request
    _obs("a4", day=1),
    _obs("a5", tenant="globex", day=1),
    _obs("b1", ns="billing", text=f"I am {JANE}"),
    _obs("a6", text='she wrote "quoted\\path" and left', day=7),
]


def _ids(store) -> set[str]:
    return {o.id for o in store.list(limit=1000)[0]}


def _pairs(store) -> set[tuple]:
    return set(store._read().execute("SELECT local_id, upstream_id FROM shadow_pairs").fetchall())


def test_store_delete_filters_and_takes_shadow_pairs(store):
    store.append_many(ROWS)
    registry.record_shadow(store, "a1", "a4", "support", 1, True, {})  # pair: local a1, upstream a4
    registry.record_shadow(store, "b1", None, "billing", 1, None, {"error": "x"})
    assert store.delete(Erasure.parse("support", matching="Jane.Doe@Example.com")) == 3  # a1 a2 a3
    assert _ids(store) == {"a4", "a5", "b1", "a6"}
    assert _pairs(store) == {("b1", None)}  # a1's pair went with it; billing's stays
    assert store.delete(Erasure.parse("support", tenant="acme", before="2026-12-03")) == 1  # a4
    assert store.delete(Erasure.parse("support", matching='"quoted\\path"')) == 1  # quotes, backslash: a6
    assert store.delete(Erasure.parse("support", tenant="nobody")) == 0
    assert _ids(store) == {"a5", "b1"}
    assert store.delete(Erasure.parse("support")) == 1 and _ids(store) == {"b1"}


def test_delete_is_one_transaction(tmp_path, monkeypatch):
    """A failure after the shadow pairs went leaves the rows and the pairs both in place."""
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    store.append_many(ROWS)
    registry.record_shadow(store, "a1", "a4", "support", 1, True, {})
    bad = Erasure.parse("support", matching=JANE)
    real_write = store._write

    def failing_write(fn, timeout_s=None):
        def run(c):
            assert fn(c) == 3  # both DELETEs ran inside the transaction ...
            raise RuntimeError("disk gone")  # ... which then fails before its COMMIT

        return real_write(run, timeout_s)

    monkeypatch.setattr(store, "_write", failing_write)
    with pytest.raises(RuntimeError, match="disk gone"):
        store.delete(bad)
    assert _ids(store) == {o.id for o in ROWS} and ("a1", "a4") in _pairs(store)
    store.close()


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_erase_reaches_spool_segments_and_dead_letters(tmp_path, kolm_home):
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    spool = Spool(spool_dir(kolm_home, store.url))
    spool.append(ROWS[:3])
    spool.seal()
    spool.append(ROWS[3:])  # a second segment, left open (as a running writer leaves it)
    dead = dead_letter_path(kolm_home)
    dead.write_text(
        json.dumps({"at": "x", "error": "e", "observation": ROWS[0].model_dump(mode="json")})
        + "\n"
        + json.dumps({"error": "e", "id": "z9", "namespace": "billing"})
        + "\n"
        + json.dumps({"error": "e", "id": "z8", "namespace": "support"})  # no text kept: namespace decides
        + "\n"
    )
    store.append(_obs("s1", text=f"mail {JANE}"))
    result = erase(store, Erasure.parse("support", matching=JANE), kolm_home, spool=spool)
    assert result == {"deleted": 1 + 3 + 1}  # store s1; spool a1 a2 a3; dead letter a1
    left = [o.id for _, rows in spool.segments() for o in rows]
    assert sorted(left) == ["a4", "a5", "a6", "b1"]  # both segments rewritten, the rest replayable
    assert [x.get("id") or x["observation"]["id"] for x in _lines(dead)] == ["z9", "z8"]
    assert not list(spool.dir.glob(".*erase-tmp"))
    # The CLI's way (another process's spool: by the files' locks only), namespace only: z8 and a4-a6 go.
    assert erase(store, Erasure.parse("support"), kolm_home) == {"deleted": 0 + 3 + 1}
    assert [o.id for _, rows in spool.segments() for o in rows] == ["b1"]
    assert [x["id"] for x in _lines(dead)] == ["z9"]
    store.close()


def test_cli_delete(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'obs.db'}"
    store = open_store(url)
    store.append_many(ROWS)
    store.close()
    assert main(["observations", "delete", "--namespace", "support", "--matching", JANE, "--store", url]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": 3}
    for argv, msg in [
        (["--namespace", "support", "--before", "2026-13-01"], "--before: '2026-13-01' is not an ISO date"),
        (["--namespace", "support", "--before", "yesterday"], "is not an ISO date"),
        (["--namespace", "no/such", "--tenant", "acme"], "--namespace: namespace 'no/such' is not valid"),
        (["--namespace", "support", "--matching", "  "], "--matching: must not be empty"),
    ]:
        assert main(["observations", "delete", *argv, "--store", url]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert main(["observations", "delete", "--store", url]) == 2  # argparse: --namespace is required
    assert capsys.readouterr().err.startswith("error: kolm observations delete: ")
    store = open_store(url)
    assert len(_ids(store)) == len(ROWS) - 3  # the refused calls deleted nothing
    store.close()


TOKEN = "admin-" + "t" * 30


@pytest.fixture
def admin(store, monkeypatch):
    with TestClient(create_app(store, token=TOKEN)) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def test_delete_route(admin, store):
    store.append_many(ROWS)
    r = admin.delete("/v1/bridges/observations", params={"namespace": "support", "before": "2026-12-03"})
    assert r.status_code == 200 and r.json() == {"deleted": 2}  # a4, a5
    r = admin.delete(
        "/v1/bridges/observations", params={"namespace": "support", "tenant": "acme", "matching": JANE}
    )
    assert r.json() == {"deleted": 3} and _ids(store) == {"b1", "a6"}


@pytest.mark.parametrize(
    "query, status, msg",
    [
        ("", 400, "namespace is required"),
        ("?tenant=acme", 400, "namespace is required"),
        ("?namespace=support&tenat=acme", 400, "unknown parameter(s) 'tenat'"),
        ("?namespace=support&namespace=billing", 400, "'namespace' given more than once"),
        ("?namespace=support&before=2026-02-30", 400, "before: '2026-02-30' is not an ISO date"),
        ("?namespace=support&matching=", 400, "matching: must not be empty"),
        ("?namespace=bad%20ns", 400, "namespace: namespace 'bad ns' is not valid"),
        ("?namespace=support&matching=%00", 400, "matching: holds a character"),
    ],
)
def test_delete_route_refuses_bad_params_and_deletes_nothing(admin, store, query, status, msg):
    store.append_many(ROWS)
    r = admin.delete(f"/v1/bridges/observations{query}")
    assert r.status_code == status and msg in r.json()["error"], r.text
    assert len(_ids(store)) == len(ROWS)


def test_delete_route_needs_the_admin_token_and_no_body(store):
    store.append_many(ROWS)
    with TestClient(create_app(store)) as open_proxy:  # no KOLM_ADMIN_TOKEN: nobody may delete
        r = open_proxy.delete("/v1/bridges/observations?namespace=support")
        assert r.status_code == 403 and "KOLM_ADMIN_TOKEN" in r.json()["error"]
    with TestClient(create_app(store, token=TOKEN)) as c:
        assert c.delete("/v1/bridges/observations?namespace=support").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert c.delete("/v1/bridges/observations?namespace=support", headers=wrong).status_code == 401
        ok = {"Authorization": f"Bearer {TOKEN}"}
        r = c.request(
            "DELETE",
            "/v1/bridges/observations?namespace=support",
            headers={**ok, "Content-Type": "text/plain"},
            content=b"namespace=billing",
        )
        assert r.status_code == 400 and "send no body" in r.json()["error"]
    assert len(_ids(store)) == len(ROWS)


def test_delete_route_reaches_the_running_writers_spool(store, kolm_home):
    """Rows in the proxy's own spool (its in-process lock, its open segment) go too, wherever the writer's
    replay has moved them by then: nothing matching is left anywhere, the rest is still there."""
    with TestClient(create_app(store, token=TOKEN)) as c:
        writer = c.app.state.writer
        writer.spool.append(ROWS)
        with writer._cond:
            writer.spool_rows += len(ROWS)
        r = c.delete(
            "/v1/bridges/observations",
            params={"namespace": "support", "matching": JANE},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 200 and r.json() == {"deleted": 3}
    # The app has stopped (its writer drained: the spool replayed into the store, or still on disk).
    spooled = [o.id for _, batch in Spool(spool_dir(kolm_home, store.url)).segments() for o in batch]
    assert _ids(store) | set(spooled) == {"a4", "a5", "b1", "a6"}
