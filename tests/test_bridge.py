"""The bridge API: shapes, pagination, auth, and every bad input a 4xx {"error"} that writes nothing."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kolm_ray.observations.capture import create_app
from kolm_ray.observations.store import open_store

ROWS = [
    {"namespace": "support", "input": f"question {i}", "output": {"namespace": "billing"}} for i in range(5)
]


@pytest.fixture
def store(store_url):  # every bridge test runs on SQLite and on PostgreSQL (conftest's store_url)
    s = open_store(store_url)
    yield s
    s.close()


JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
def client(store):
    with TestClient(create_app(store, bridge_max_body=4096), headers=JSON_HEADERS) as c:
        yield c


@pytest.fixture
def roomy(store):
    """A client of an app with the default body limit (16 MiB), for bodies larger than 4 KiB."""
    with TestClient(create_app(store), headers=JSON_HEADERS) as c:
        yield c


def post_rows(client, rows, **kw):
    return client.post("/v1/bridges/observations", content=json.dumps(rows), **kw)


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
    r = client.delete("/v1/bridges/observations")
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


# --- a browser cannot write; the bind and Host guards; hostile values are 4xx, never 500 ---------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ],
)
def test_write_routes_take_json_bodies_only(store, content_type):
    """What a page may send across origins without a preflight (text/plain, forms) is refused: 415."""
    post_rows(TestClient(create_app(store)), ROWS[:1])  # a row to verify (no Content-Type: refused too)
    assert store.count() == 0
    with TestClient(create_app(store), headers=JSON_HEADERS) as c:
        post_rows(c, ROWS[:1])
    obs_id = store.list(limit=1)[0][0].id
    headers = {"Origin": "https://evil.example"} | ({"Content-Type": content_type} if content_type else {})
    with TestClient(create_app(store)) as c:
        r = c.post("/v1/bridges/observations", content=json.dumps(ROWS), headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
        r = c.post(
            f"/v1/bridges/observations/{obs_id}/verify", content=b'{"verified": true}', headers=headers
        )
        assert r.status_code == 415 and set(r.json()) == {"error"}
    assert store.count() == 1 and store.get(obs_id).verified is None


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/x-ndjson", "application/jsonl", "Application/JSON"],
)
def test_json_and_json_lines_types_are_accepted(store, content_type):
    lines = "\n".join(json.dumps(r) for r in ROWS)
    with TestClient(create_app(store)) as c:
        r = c.post("/v1/bridges/observations", content=lines, headers={"Content-Type": content_type})
    assert r.status_code == 200 and r.json() == {"inserted": 5}


@pytest.mark.parametrize(
    "host,status",
    [
        ("127.0.0.1:8700", 200),
        ("localhost:8700", 200),
        ("LOCALHOST:8700", 200),
        ("[::1]:8700", 200),
        ("evil.example:8700", 403),  # DNS rebinding: the attacker's name, resolved to 127.0.0.1
        ("localhost", 403),  # no port: not this server (it is not on 80)
        ("127.0.0.1:9999", 403),
        ("localhost.evil.example:8700", 403),
        ("", 403),
    ],
)
def test_host_header_is_checked_on_a_loopback_bind(store, host, status):
    # TestClient takes the server address from base_url, as uvicorn takes it from the accepted socket
    with TestClient(create_app(store), base_url="http://127.0.0.1:8700", headers=JSON_HEADERS) as c:
        r = c.post("/v1/bridges/observations", content=json.dumps(ROWS[:1]), headers={"Host": host})
        assert r.status_code == status, r.text
        if status == 403:
            assert "DNS rebinding" in r.json()["error"]
        r = c.get("/v1/bridges/namespaces", headers={"Host": host})
        assert r.status_code == status
    assert store.count() == (1 if status == 200 else 0)


def test_host_is_not_checked_on_a_public_bind(store):
    with TestClient(create_app(store), base_url="http://10.1.2.3:8700") as c:
        assert c.get("/v1/bridges/namespaces", headers={"Host": "kolm.internal:8700"}).status_code == 200


def test_non_loopback_bind_without_token_is_exit_2(monkeypatch, capsys, tmp_path):
    from kolm_ray.cli import main

    for host in ("0.0.0.0", "::", "192.168.1.5", "kolm.internal"):
        assert (
            main(["capture", "--host", host, "--port", "0", "--store", f"sqlite:///{tmp_path / 'o.db'}"]) == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "KOLM_ADMIN_TOKEN" in err and host in err
    assert not (tmp_path / "o.db").exists()  # refused before anything started


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    "body,status,msg",
    [
        (json.dumps([{**ROWS[0], "status": 10**20}]), 422, "status"),
        (json.dumps([{**ROWS[0], "status": -1}]), 422, "status"),
        ('[{"namespace": "s", "input": "q", "output": 1, "latency_ms": NaN}]', 400, "NaN is not JSON"),
        ('[{"namespace": "s", "input": "q", "output": 1e999}]', 400, "out of range"),
        ('[{"namespace": "s", "input": "q", "output": Infinity}]', 400, "Infinity"),
        ('[{"namespace": "s", "input": "q", "output": "\\ud800"}]', 400, "surrogate"),
        ('{"namespace": "s", "input": "\\udfff x", "output": 1}', 400, "surrogate"),
        ("[" + nested(5_000) + "]", 400, "nested"),
        (nested(5_000), 400, "nested"),
        (json.dumps([{**ROWS[0], "namespace": "support\n"}]), 422, "namespace"),
        (
            '[{"namespace": "s", "input": "q", "output": 1, "usage": {"n": 1' + "0" * 5000 + "}}]",
            400,
            "digits",
        ),
    ],
)
def test_hostile_values_are_4xx_not_500(roomy, store, body, status, msg):
    r = roomy.post("/v1/bridges/observations", content=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and msg in r.json()["error"], r.json()
    assert store.count() == 0


def test_deep_but_parseable_output_is_stored_or_refused_never_500(roomy, store):
    """Up to MAX_JSON_DEPTH levels is stored and listed back; deeper is 400 (pydantic could not serialize
    a row past ~255 levels: stored, it would break every page that holds it)."""
    from kolm_ray.observations.model import MAX_JSON_DEPTH

    for depth in (50, MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1, 300, 900, 990, 1200):
        body = f'[{{"namespace": "s", "input": "q", "output": {nested(depth)}}}]'
        r = roomy.post("/v1/bridges/observations", content=body)
        if depth <= MAX_JSON_DEPTH - 2:  # the list and the row object are two more levels
            assert r.json() == {"inserted": 1}, (depth, r.text)
        else:
            assert r.status_code == 400 and "nested" in r.json()["error"], (depth, r.text)
    listed = roomy.get("/v1/bridges/observations", params={"limit": 10})
    assert listed.status_code == 200 and len(listed.json()["observations"]) == 2


@pytest.mark.parametrize(
    "body,msg",
    [
        (b'{"verified": true, "output": ' + nested(5_000).encode() + b"}", "nested"),
        (b'{"verified": true, "output": NaN}', "NaN"),
        (b'{"verified": true, "output": "\\ud800"}', "surrogate"),
    ],
)
def test_verify_hostile_values_are_400(roomy, store, body, msg):
    post_rows(roomy, ROWS[:1])
    obs_id = store.list(limit=1)[0][0].id
    r = roomy.post(f"/v1/bridges/observations/{obs_id}/verify", content=body)
    assert r.status_code == 400 and msg in r.json()["error"]
    assert store.get(obs_id).verified is None


@pytest.mark.parametrize(
    "cursor",
    [
        base64.urlsafe_b64encode(b"s" + str(10**20).encode()).decode(),
        base64.urlsafe_b64encode(b"s" + b"9" * 5000).decode(),
        "A" * 4000,
        "%00",
    ],
)
def test_huge_or_garbled_cursor_is_400(client, cursor):
    post_rows(client, ROWS)
    r = client.get("/v1/bridges/observations", params={"cursor": cursor})
    assert r.status_code == 400 and "cursor" in r.json()["error"] and len(r.json()["error"]) < 200


@pytest.mark.slow
def test_real_capture_process_guards(tmp_path, free_port):
    """`kolm capture` itself: a public bind without a token is exit 2 (one line, nothing started); on the
    default loopback bind a rebound Host is 403 and a text/plain write from a foreign Origin is 415."""
    import subprocess
    import sys

    import httpx

    env = {k: v for k, v in os.environ.items() if k != "KOLM_ADMIN_TOKEN"}
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--store", f"sqlite:///{tmp_path / 'o.db'}"]
    refused = subprocess.run(
        cmd + ["--host", "0.0.0.0", "--port", str(free_port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        refused.returncode == 2 and refused.stderr.count("\n") == 1 and "KOLM_ADMIN_TOKEN" in refused.stderr
    )
    assert refused.stdout == "" and not (tmp_path / "o.db").exists()

    proc = subprocess.Popen(
        cmd + ["--port", str(free_port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{free_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "capture did not come up"
            time.sleep(0.1)
        body = json.dumps(ROWS)
        r = httpx.post(
            f"{url}/v1/bridges/observations",
            content=body,
            headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
        )
        assert r.status_code == 415 and "error" in r.json()
        r = httpx.post(
            f"{url}/v1/bridges/observations",
            content=body,
            headers={**JSON_HEADERS, "Host": f"evil.example:{free_port}"},
        )
        assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]
        assert httpx.get(f"{url}/v1/bridges/namespaces").json() == {"namespaces": []}  # nothing imported
        r = httpx.post(
            f"{url}/v1/bridges/observations",
            content=body,
            headers={**JSON_HEADERS, "Host": f"localhost:{free_port}"},
        )
        assert r.json() == {"inserted": 5}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
