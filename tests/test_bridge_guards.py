"""The bridge API's guards: a browser cannot write, the bind and Host guards, and hostile values are a 4xx
{"error"} that writes nothing, never a 500. Run on SQLite and PostgreSQL (conftest's store)."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from bridge_helpers import JSON_HEADERS, ROWS, post_rows
from fastapi.testclient import TestClient

from kolm_ray.capture.app import create_app


@pytest.fixture
def roomy(store):
    """A client of an app with the default body limit (16 MiB), for bodies larger than 4 KiB."""
    with TestClient(create_app(store), headers=JSON_HEADERS) as c:
        yield c


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
