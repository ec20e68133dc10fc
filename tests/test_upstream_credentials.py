"""Credentials in an upstream URL (`http://user:pass@host`) are used, never shown: not in the start banner,
a 502/504 message, a stored row, /healthz or the logs. They travel as Basic auth only when the caller sends
no Authorization of its own (an OpenAI SDK's key is forwarded as it is)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from capture_helpers import OPENAI_KEY, Q, msgs

from kolm_ray.capture.app import _banner, create_app
from kolm_ray.demo.simulate import make_upstream_app, serve_in_thread
from kolm_ray.observations.store import open_store

SECRET = "s3cret"


def test_a_dead_upstream_with_credentials_is_a_502_that_never_names_them(tmp_path, free_port):
    dead = f"http://user:{SECRET}@127.0.0.1:{free_port}"
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    app = create_app(store, openai_upstream=dead, anthropic_upstream=dead)
    url, stop = serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:  # the SDK sends Authorization: a 502, not a 500
            client.chat.completions.create(model="m", messages=msgs(Q))
        assert e.value.status_code == 502
        body = e.value.response.text
        assert SECRET not in body and f"http://user:***@127.0.0.1:{free_port}/v1/chat/completions" in body
        r = httpx.post(
            f"{url}/v1/capture/anthropic/v1/messages", json={"model": "m", "messages": msgs(Q)[1:]}
        )
        assert r.status_code == 502 and SECRET not in r.text and "user:***@" in r.json()["error"]
        assert SECRET not in httpx.get(f"{url}/healthz").text
        assert app.state.writer.flush(10)
        rows = store.list(limit=10)[0]
        assert len(rows) == 2 and all(o.status == 502 for o in rows)
        assert not any(SECRET in json.dumps(o.model_dump(mode="json")) for o in rows)
    finally:
        stop()
        store.close()
    lines = _banner(
        {"openai": f"{dead}/v1/chat/completions", "anthropic": f"{dead}/v1/messages"}, None, "x", "http://h"
    )
    assert SECRET not in "\n".join(lines) and "user:***@" in lines[0]


def test_the_urls_credentials_are_basic_auth_unless_the_caller_sends_its_own(tmp_path):
    up_app = make_upstream_app()
    up_url, stop_up = serve_in_thread(up_app)
    with_creds = up_url.replace("http://", f"http://gateway:{SECRET}@")
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    url, stop = serve_in_thread(create_app(store, openai_upstream=with_creds, anthropic_upstream=with_creds))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
        assert client.chat.completions.create(model="m", messages=msgs(Q)).choices[0].message.content
        r = httpx.post(f"{url}/v1/capture/openai/chat/completions", json={"model": "m", "messages": msgs(Q)})
        assert r.status_code == 200
        basic = "Basic " + base64.b64encode(f"gateway:{SECRET}".encode()).decode()
        assert [k for _, k in up_app.state.seen] == [f"Bearer {OPENAI_KEY}", basic]
    finally:
        stop()
        stop_up()
        store.close()


def test_a_bad_upstream_url_is_refused_without_its_password(capsys):
    from kolm_ray.cli import main

    assert main(["capture", "--port", "0", "--openai-upstream", f"ftp://user:{SECRET}@127.0.0.1/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: openai upstream 'ftp://user:***@127.0.0.1' must be") and SECRET not in err


@pytest.mark.slow
def test_the_real_kolm_capture_never_prints_or_stores_the_upstreams_password(tmp_path, free_port):
    """`kolm capture --openai-upstream http://user:s3cret@127.0.0.1:<dead port>`: banner, 502 body, /healthz,
    logs, the stored row and the database file itself hold no `s3cret`."""
    db = tmp_path / "obs.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--store", f"sqlite:///{db}",
         "--openai-upstream", f"http://user:{SECRET}@127.0.0.1:{free_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "KOLM_HOME": str(tmp_path)},
    )  # fmt: skip
    try:
        banner = [proc.stdout.readline() for _ in range(5)]
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", banner[0]).group(1))
        url = f"http://127.0.0.1:{port}"
        assert f"-> http://user:***@127.0.0.1:{free_port}/v1/chat/completions" in banner[1]
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "proxy did not come up"
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="m", messages=msgs(Q))
        assert e.value.status_code == 502 and "unreachable" in e.value.response.json()["error"]
        shown = "".join(banner) + health.text + e.value.response.text + httpx.get(f"{url}/healthz").text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "1 observations stored, 0 lost" in out
    assert SECRET not in shown + out + err
    with open_store(f"sqlite:///{db}") as store:
        (row,) = store.list(limit=10)[0]
        assert row.status == 502 and "user:***@" in row.output["error"]
    for f in tmp_path.iterdir():  # the database, its WAL, the spool: no copy of the password anywhere
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
