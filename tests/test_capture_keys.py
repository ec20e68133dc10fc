"""Capture keys and trusted rows, in-process: `kolm keys` (only a hash stored, never listed), the writer
that no row can stop (the 257-character tenant that killed it), /healthz 503 when the writer thread is
gone, which rows training reads (both backends), and the proxy's identity rules on a TestClient.
The same rules against the real `kolm capture` subprocess and the official SDKs: test_capture_hostile.py."""

from __future__ import annotations

import json
import threading

import pytest
from capture_helpers import OPENAI_KEY, msgs
from fastapi.testclient import TestClient

from kolm_ray.capture.app import create_app
from kolm_ray.capture.exchange import Exchange
from kolm_ray.capture.writer import BackgroundWriter
from kolm_ray.cli import main
from kolm_ray.observations.keys import KEY_PREFIX, create_key, hash_key, revoke_key, untrusted_counts
from kolm_ray.observations.model import Observation
from kolm_ray.observations.store import open_store

CHAT = "/v1/capture/openai/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": msgs("how do I restart the ingest worker?")}


def test_keys_cli_create_list_revoke_store_only_a_hash(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'obs.db'}"
    argv = ["keys", "create", "--tenant", "acme", "--namespace", "support", "--namespace", "billing"]
    assert main([*argv, "--name", "ci", "--no-train", "--store", url]) == 0
    made = json.loads(capsys.readouterr().out)
    assert set(made) >= {"id", "key", "tenant", "namespaces", "train", "created_at"}
    assert (
        made["tenant"] == "acme" and made["namespaces"] == ["support", "billing"] and made["train"] is False
    )
    key = made["key"]
    assert key.startswith(KEY_PREFIX) and len(key) - len(KEY_PREFIX) >= 22  # >= 128 bits of url-safe base64
    # the store has the hash, never the key: not in any table, not in the file's bytes
    with open_store(url) as s:
        rows = s._read().execute("SELECT * FROM keys").fetchall()
    assert len(rows) == 1 and hash_key(key) in rows[0] and key not in json.dumps(rows)
    assert key.encode() not in (tmp_path / "obs.db").read_bytes()

    assert main(["keys", "list", "--store", url]) == 0
    listed = capsys.readouterr().out
    assert made["id"] in listed and "no-train" in listed and key not in listed and hash_key(key) not in listed
    assert main(["keys", "list", "--json", "--store", url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [k["id"] for k in doc["keys"]] == [made["id"]] and doc["keys"][0]["revoked_at"] is None
    assert "key_sha256" not in doc["keys"][0] and key not in json.dumps(doc)

    assert main(["keys", "revoke", made["id"], "--store", url]) == 0
    assert main(["keys", "list", "--json", "--store", url]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["keys"][0]["revoked_at"]
    # bad input: exit 2 and one line, nothing written
    assert main(["keys", "revoke", "key_nope", "--store", url]) == 2
    assert main(["keys", "create", "--tenant", "acme", "--namespace", "bad ns!", "--store", url]) == 2
    assert main(["keys", "create", "--tenant", "x" * 257, "--namespace", "a", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err
    with open_store(url) as s:
        assert len(s._read().execute("SELECT id FROM keys").fetchall()) == 1


def _exchange(tenant: str | None, i: int = 0) -> Exchange:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}).encode()
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "a"}}]}).encode()
    return Exchange("openai", "ns", tenant, body, 200, 1.0, body=answer, key_id="key_x")


def test_writer_survives_a_257_character_tenant_among_200_good_rows(tmp_path):
    """The reproduction: this tenant, raised outside the writer's try, killed its thread (nothing stored after)."""
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    w = BackgroundWriter(store, None, tmp_path / "dead.jsonl")
    try:
        for i in range(201):
            w.submit(_exchange("t" * 257 if i == 100 else "acme", i))
        assert w.flush(20), "the writer stopped handling rows"
        assert w.health() == (True, None) and w.lost == 0
        rows = [o for b in store.iter_observations("ns") for o in b]
        assert len(rows) == 201 and sum(o.tenant == "acme" for o in rows) == 200
        bad = next(o for o in rows if o.tenant != "acme")  # stored as a failure, its tenant cut to the bound
        assert bad.tenant == "t" * 256 and bad.verified is False and bad.key_id == "key_x"
    finally:
        w.close()
        store.close()


def test_healthz_is_503_when_the_writer_thread_is_gone(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 'obs.db'}") as store, TestClient(create_app(store)) as c:
        assert c.get("/healthz").status_code == 200
        writer = c.app.state.writer
        alive = writer._thread
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        writer._thread = dead
        try:
            r = c.get("/healthz")
            assert r.status_code == 503 and "writer thread is not running" in r.json()["reason"]
        finally:
            writer._thread = alive


def _row(i: int, **kw) -> Observation:
    return Observation(namespace="support", input=f"q{i}", output={"label": "a"}, **kw)


def test_training_reads_only_trusted_rows(store_url):
    """Trusted: verified true, a keyless import (admin), a train key's rows. Not: a --no-train key's, an
    open proxy's. `include_untrusted` reads them all; untrusted_counts says why each was left out."""
    with open_store(store_url) as s:
        train, _ = create_key(s, "acme", ["support"])
        no_train, _ = create_key(s, "acme", ["support"], train=False)
        s.append_many([
            _row(0, provider="openai", key_id=train.id),
            _row(1, provider="import"),
            _row(2, provider="openai"),  # open proxy
            _row(3, provider="openai", key_id=no_train.id),
            _row(4, provider="import", key_id=no_train.id),  # a no-train key's bridge import
            _row(5, provider="openai", key_id=no_train.id, verified=True),  # verified by the admin
            _row(6, provider="local", key_id=train.id),  # a local answer never trains
        ])  # fmt: skip
        revoke_key(s, train.id)  # what a key wrote while it was valid stays trusted

        def read(include: bool) -> list[str]:
            sql, params, connect = s.dataset_source(["support"], include_untrusted=include)
            conn = connect()
            try:
                return [r[3] for r in conn.execute(sql, params).fetchall()]
            finally:
                conn.close()

        assert read(False) == ["q0", "q1", "q5"]
        assert read(True) == ["q0", "q1", "q2", "q3", "q4", "q5"]
        assert untrusted_counts(s, "support") == {
            "open proxy (no capture key)": 1,
            "key created with --no-train": 2,
        }


@pytest.fixture
def keyed(tmp_path, upstream, monkeypatch):
    """A TestClient proxy with two keys in its store: (client, store, {"acme": (row, key), ...})."""
    monkeypatch.setenv("KOLM_OPENAI_API_KEY", "sk-managed-" + "m" * 30)
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    keys = {
        "acme": create_key(store, "acme", ["support"]),
        "multi": create_key(store, "acme", ["support", "billing"], redact="pii"),
    }
    app = create_app(store, openai_upstream=upstream, anthropic_upstream=upstream, keys_refresh_s=0.1)
    with TestClient(app, base_url="http://127.0.0.1:80") as c:
        yield c, store, keys
    store.close()


def _post(c, key: str | None = None, **headers: str):
    h = {"Authorization": f"Bearer {OPENAI_KEY}", **headers}
    if key is not None:
        h["X-Kolm-Key"] = key
    return c.post(CHAT, json=BODY, headers=h)


def test_identity_comes_from_the_key(keyed):
    c, store, keys = keyed
    (acme, akey), (multi, mkey) = keys["acme"], keys["multi"]
    assert _post(c).status_code == 401
    assert _post(c, "kolm-sk-" + "x" * 43).status_code == 401
    r = _post(c, akey, **{"X-Kolm-Namespace": "billing"})
    assert r.status_code == 403 and r.json() == {"error": f"key {acme.id} may not use namespace billing"}
    assert _post(c, akey, **{"X-Kolm-Tenant": "globex"}).status_code == 403
    assert _post(c, mkey).status_code == 403  # several namespaces and no header: "default" is not one
    assert _post(c, akey, **{"X-Kolm-Tenant": "t" * 257}).status_code == 400
    assert _post(c, akey, **{"X-Trace": "v" * 9000}).status_code == 400
    assert _post(c, "kolm-sk-" + "x" * 200).status_code == 400
    r = c.post(CHAT, content=json.dumps(BODY), headers={"X-Kolm-Key": akey, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert c.app.state.writer.flush(5) and store.count() == 0  # nothing refused was stored

    assert _post(c, akey).status_code == 200  # the only namespace, the key's tenant
    assert _post(c, mkey, **{"X-Kolm-Namespace": "billing", "X-Kolm-Tenant": "acme"}).status_code == 200
    # the kolm key as the SDK's api_key: the managed provider key goes upstream instead
    r = c.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {akey}"})
    assert r.status_code == 200
    assert c.app.state.writer.flush(5)
    rows = [o for ns in ("support", "billing") for b in store.iter_observations(ns) for o in b]
    assert [(o.namespace, o.tenant, o.key_id) for o in rows] == [
        ("support", "acme", acme.id), ("support", "acme", acme.id), ("billing", "acme", multi.id)
    ]  # fmt: skip
    assert "sk-managed" not in json.dumps([o.model_dump(mode="json") for o in rows])


def test_the_per_key_redact_flag_reaches_the_exchange(keyed, monkeypatch):
    c, _, keys = keyed
    seen: list[Exchange] = []
    writer = c.app.state.writer
    real = writer.submit
    monkeypatch.setattr(writer, "submit", lambda ex: (seen.append(ex), real(ex)))
    assert _post(c, keys["multi"][1], **{"X-Kolm-Namespace": "support"}).status_code == 200
    assert _post(c, keys["acme"][1]).status_code == 200
    assert [(e.key_id, e.redact_pii) for e in seen] == [
        (keys["multi"][0].id, True),
        (keys["acme"][0].id, False),
    ]


def test_revoked_key_is_refused_within_the_refresh(keyed):
    import time

    c, store, keys = keyed
    acme, akey = keys["acme"]
    assert _post(c, akey).status_code == 200
    revoke_key(store, acme.id)
    deadline = time.monotonic() + 2
    while _post(c, akey).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key was still accepted after 2 s"
        time.sleep(0.05)


def test_healthz_shows_models_and_problems_only_to_the_admin(keyed, monkeypatch):
    c, _, _ = keyed
    assert set(c.get("/healthz").json()) == {"ok", "store", "pending"}
    c.app.state.admin_token = "admin-token-for-the-test"
    assert set(c.get("/healthz").json()) == {"ok", "store", "pending"}
    ok = c.get("/healthz", headers={"Authorization": "Bearer admin-token-for-the-test"})
    assert ok.status_code == 200 and ok.json()["ok"] is True


def test_open_proxy_only_on_loopback_and_kolm_keys_never_go_upstream(tmp_path, upstream, monkeypatch):
    monkeypatch.delenv("KOLM_OPENAI_API_KEY", raising=False)
    with open_store(f"sqlite:///{tmp_path / 'obs.db'}") as store:
        app = create_app(store, openai_upstream=upstream, anthropic_upstream=upstream)
        with TestClient(app) as far:  # the server as "testserver": not a loopback bind
            r = _post(far)
            assert r.status_code == 401 and "loopback" in r.json()["error"]
        with TestClient(app, base_url="http://127.0.0.1:80") as c:
            assert _post(c).status_code == 200  # no key in the store: open on loopback
            # a kolm key as the provider key with no managed key set: refused, never forwarded
            r = c.post(CHAT, json=BODY, headers={"Authorization": "Bearer kolm-sk-" + "x" * 43})
            assert r.status_code == 401 and "KOLM_OPENAI_API_KEY" in r.json()["error"]
            assert c.app.state.writer.flush(5)
        rows = [o for b in store.iter_observations("default") for o in b]
        assert [(o.tenant, o.key_id) for o in rows] == [(None, None)]
