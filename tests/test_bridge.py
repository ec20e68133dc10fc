"""The bridge API: shapes, pagination, auth, and every bad input a 4xx {"error"} that writes nothing.

tests/test_bridge_guards.py: the browser, bind and Host guards, and hostile values.
"""

from __future__ import annotations

import json

import pytest
from bridge_helpers import JSON_HEADERS, ROWS, post_rows
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolm_ray.capture.app import create_app


def test_import_list_verify_namespaces(client):
    r = post_rows(client, ROWS)
    assert r.status_code == 200 and r.json() == {"inserted": 5}
    lines = "\n".join(
        json.dumps({**row, "namespace": "other", "verified": True, "tenant": "acme"}) for row in ROWS[:2]
    )
    assert client.post("/v1/bridges/observations", content=lines + "\n").json() == {"inserted": 2}

    page = client.get("/v1/bridges/observations", params={"namespace": "support", "limit": 2}).json()
    assert set(page) == {"observations", "next_cursor"} and len(page["observations"]) == 2
    o = page["observations"][0]
    assert set(o) == {
        "id",
        "namespace",
        "tenant",
        "provider",
        "model",
        "input",
        "output",
        "verified",
        "status",
        "latency_ms",
        "usage",
        "created_at",
        "request",
        "key_id",
    }
    assert o["provider"] == "import" and o["verified"] is None and o["output"] == {"namespace": "billing"}
    ids, cursor = [x["id"] for x in page["observations"]], page["next_cursor"]
    while cursor:
        page = client.get(
            "/v1/bridges/observations", params={"namespace": "support", "limit": 2, "cursor": cursor}
        ).json()
        ids += [x["id"] for x in page["observations"]]
        cursor = page["next_cursor"]
    assert len(ids) == len(set(ids)) == 5

    r = client.post(
        f"/v1/bridges/observations/{ids[0]}/verify",
        json={"verified": True, "output": {"namespace": "runbooks"}},
    )
    assert (
        r.status_code == 200
        and r.json()["verified"] is True
        and r.json()["output"] == {"namespace": "runbooks"}
    )
    r = client.post(f"/v1/bridges/observations/{ids[1]}/verify", json={"verified": False})
    assert r.json()["verified"] is False and r.json()["output"] == {"namespace": "billing"}

    q = client.get("/v1/bridges/observations", params={"verified": "true"}).json()["observations"]
    assert {x["namespace"] for x in q} == {"support", "other"} and len(q) == 3
    assert (
        len(client.get("/v1/bridges/observations", params={"verified": "null"}).json()["observations"]) == 3
    )
    assert len(client.get("/v1/bridges/observations", params={"tenant": "acme"}).json()["observations"]) == 2
    assert client.get("/v1/bridges/namespaces").json() == {
        "namespaces": [
            {"name": "other", "count": 2, "verified": 2},
            {"name": "support", "count": 5, "verified": 1},
        ]
    }


@pytest.mark.parametrize(
    "params,status,msg",
    [
        ({"limit": 0}, 422, "limit"),
        ({"limit": 5000}, 422, "limit"),
        ({"limit": "ten"}, 422, "limit"),
        ({"verified": "maybe"}, 422, "verified"),
        ({"cursor": "not-a-cursor"}, 400, "cursor"),
    ],
)
def test_list_bad_query_params(client, params, status, msg):
    r = client.get("/v1/bridges/observations", params=params)
    assert r.status_code == status and msg in r.json()["error"] and set(r.json()) == {"error"}


@pytest.mark.parametrize(
    "body,status,msg",
    [
        (b"", 400, "empty body"),
        (b"[{", 400, "malformed JSON"),
        (b'{"namespace": "a", "input": "x", "output": 1}\n{oops', 400, "line 2: malformed JSON"),
        (b'{"a": 1}', 422, "input"),
        (b'"just a string"', 422, "line 1: expected a JSON object"),
        (b"[1, 2]", 422, "row 0: expected a JSON object"),
        (json.dumps([ROWS[0], {**ROWS[1], "input": 7}]).encode(), 422, "row 1: input"),
        (json.dumps([{**ROWS[0], "verified": "yes"}]).encode(), 422, "row 0: verified"),
        (json.dumps([{**ROWS[0], "namespace": ""}]).encode(), 422, "namespace"),
        (json.dumps([{**ROWS[0], "input": ""}]).encode(), 422, "input"),
        (json.dumps([{**ROWS[0], "extra": 1}]).encode(), 422, "extra"),
        (json.dumps([{k: v for k, v in ROWS[0].items() if k != "namespace"}]).encode(), 422, "namespace"),
        (json.dumps([{**ROWS[0], "id": "dup"}, {**ROWS[1], "id": "dup"}]).encode(), 422, "duplicate id"),
        (b"\xff\xfe", 400, "UTF-8"),
        (json.dumps(ROWS * 40).encode(), 413, "over the limit"),
    ],
)
def test_import_bad_bodies_write_nothing(client, store, body, status, msg):
    r = client.post("/v1/bridges/observations", content=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and msg in r.json()["error"]
    assert store.count() == 0


def test_import_existing_id_is_409_and_atomic(client, store):
    assert post_rows(client, [{**ROWS[0], "id": "obs_fixed"}]).status_code == 200
    r = post_rows(client, [ROWS[1], {**ROWS[2], "id": "obs_fixed"}])
    assert r.status_code == 409 and "obs_fixed" in r.json()["error"]
    assert store.count() == 1


@pytest.mark.parametrize(
    "body,status,msg",
    [
        (b"{", 400, "malformed JSON"),
        (b"{}", 422, "verified"),
        (b'{"verified": "true"}', 422, "verified"),
        (b'{"verified": 1}', 422, "verified"),
        (b'{"verified": true, "colour": 1}', 422, "colour"),
        (b"[true]", 422, ""),
    ],
)
def test_verify_bad_bodies(client, store, body, status, msg):
    post_rows(client, ROWS[:1])
    obs_id = store.list(limit=1)[0][0].id
    r = client.post(f"/v1/bridges/observations/{obs_id}/verify", content=body)
    assert r.status_code == status and msg in r.json()["error"]
    assert store.get(obs_id).verified is None


def test_verify_unknown_id_is_404(client):
    r = client.post("/v1/bridges/observations/obs_nope/verify", json={"verified": True})
    assert r.status_code == 404 and "obs_nope" in r.json()["error"]


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/v1/bridges/nope").json()["error"].startswith("no route")
    r = client.put("/v1/bridges/observations")  # (DELETE is a route now: tests/test_privacy_delete.py)
    assert r.status_code == 405 and "error" in r.json()


def test_admin_token_guards_the_bridge_only(store):
    with TestClient(create_app(store, token="s3cret-admin"), headers=JSON_HEADERS) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-admin"}):
            r = c.get("/v1/bridges/namespaces", headers=headers)
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
        r = c.post("/v1/bridges/observations", content=json.dumps(ROWS))
        assert r.status_code == 401 and store.count() == 0
        ok = {"Authorization": "Bearer s3cret-admin"}
        assert c.post("/v1/bridges/observations", content=json.dumps(ROWS), headers=ok).json() == {
            "inserted": 5
        }
        assert c.get("/v1/bridges/namespaces", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_capture_command_reads_the_admin_token_and_refuses_placeholders(monkeypatch, tmp_path):
    from kolm_ray.cli import main

    monkeypatch.setenv("KOLM_ADMIN_TOKEN", "changeme")
    assert main(["capture", "--port", "0", "--store", f"sqlite:///{tmp_path / 'o.db'}"]) == 2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["namespace", "input", "output", "verified", "tenant", "id", "x"]),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_fuzzed_bodies_never_500(client, store, body):
    before = store.count()
    r = client.post("/v1/bridges/observations", content=json.dumps(body))
    assert r.status_code in (200, 400, 409, 413, 422), r.text
    if r.status_code != 200:
        assert "error" in r.json() and store.count() == before
    else:
        assert store.count() == before + r.json()["inserted"]
    r = client.post("/v1/bridges/observations/obs_x/verify", content=json.dumps(body))
    assert r.status_code in (400, 404, 422)


def test_imported_requests_are_stored_without_credentials(client, store):
    row = {
        **ROWS[0],
        "request": {"model": "m", "api_key": "sk-x", "headers": {"Authorization": "Bearer abc"}},
    }
    assert post_rows(client, [row]).json() == {"inserted": 1}
    (o,) = client.get("/v1/bridges/observations").json()["observations"]
    assert o["request"] == {"model": "m", "headers": {}}
