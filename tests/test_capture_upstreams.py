"""The capture proxy, each test with one of its own: an upstream that checks keys, gzips, is unreachable
or too slow; a body limit; and the real `kolm capture` in a subprocess, under SIGTERM.

Servers run in threads of this process on free ports (uvicorn, the same as `kolm capture` runs); the
SIGTERM test runs the real `kolm capture` in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import anthropic
import httpx
import openai
import pytest
from capture_helpers import ANTHROPIC_KEY, OPENAI_KEY, A, Q, check, msgs

from kolm_ray.capture.app import create_app
from kolm_ray.demo.simulate import serve_in_thread, start_upstream_in_thread
from kolm_ray.observations.store import open_store


def test_upstream_sees_the_clients_own_key(tmp_path):
    from kolm_ray.demo.simulate import make_upstream_app

    up_app = make_upstream_app()
    up_url, stop_up = serve_in_thread(up_app)
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    url, stop = serve_in_thread(create_app(store, openai_upstream=up_url, anthropic_upstream=up_url))
    try:
        openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY).chat.completions.create(
            model="m", messages=msgs(Q)
        )
        anthropic.Anthropic(base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY).messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": Q}]
        )
        r = httpx.post(f"{url}/v1/capture/openai/chat/completions", json={"model": "m", "messages": msgs(Q)})
        assert r.status_code == 401 and r.json()["error"]["message"] == "missing API key"  # passed through
        keys = [k for _, k in up_app.state.seen]
        assert keys[0] == f"Bearer {OPENAI_KEY}" and ANTHROPIC_KEY in keys[1] and keys[2] is None
    finally:
        stop()
        stop_up()
        store.close()


def test_oversized_body_is_413(upstream, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    url, stop = serve_in_thread(create_app(store, openai_upstream=upstream, capture_max_body=1000))
    try:
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
        r = httpx.post(
            f"{url}/v1/capture/openai/chat/completions", json=big, headers={"Authorization": "Bearer k"}
        )
        assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"]

        def gen():  # no Content-Length: the limit holds while streaming the body in
            for _ in range(10):
                yield b"x" * 500

        json_type = {"Authorization": "Bearer k", "Content-Type": "application/json"}  # else a 415 first
        r = httpx.post(f"{url}/v1/capture/openai/chat/completions", content=gen(), headers=json_type)
        assert r.status_code == 413
        assert store.count() == 0
    finally:
        stop()
        store.close()


def test_unreachable_upstream_is_502_naming_it(tmp_path, free_port):
    dead = f"http://127.0.0.1:{free_port}"
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    app = create_app(store, openai_upstream=dead, anthropic_upstream=dead)
    url, stop = serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="m", messages=msgs(Q))
        assert e.value.status_code == 502
        r = httpx.post(
            f"{url}/v1/capture/anthropic/v1/messages", json={"model": "m", "messages": msgs(Q)[1:]}
        )
        assert r.status_code == 502 and f"{dead}/v1/messages" in r.json()["error"]
        app.state.writer.flush()
        obs = store.list(limit=10)[0]
        assert [(o.status, o.verified) for o in obs] == [
            (502, False),
            (502, False),
        ]  # one per answered request
        assert "unreachable" in obs[0].output["error"]
    finally:
        stop()
        store.close()


@pytest.mark.slow
def test_sigterm_under_load_stores_every_answered_request(tmp_path):
    """A real `kolm capture` subprocess, ~100 requests in flight, SIGTERM: answered == stored, exit 0."""
    up_url, stop_up = start_upstream_in_thread(latency_ms=150, chunk_delay_ms=20)
    db = tmp_path / "obs.db"
    env = {**os.environ, "KOLM_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kolm_ray.cli",
            "capture",
            "--port",
            "0",
            "--store",
            f"sqlite:///{db}",
            "--openai-upstream",
            up_url,
            "--anthropic-upstream",
            up_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "proxy did not come up"
            time.sleep(0.1)

        answered_so_far = 0
        in_flight_at_term = -1

        async def load() -> list[int | None]:
            nonlocal answered_so_far, in_flight_at_term
            limits = httpx.Limits(max_connections=300)
            started = finished = 0
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

                async def one(i: int) -> int | None:
                    nonlocal started, finished, answered_so_far
                    await asyncio.sleep(i * 0.006)  # open loop: ~170 rps for 2.4 s
                    started += 1
                    try:
                        if i % 4 == 3:  # some streams: answered only if the whole stream arrived
                            body = {
                                "model": "m",
                                "max_tokens": 5,
                                "stream": True,
                                "messages": [{"role": "user", "content": f"q{i}"}],
                            }
                            async with c.stream(
                                "POST",
                                "/v1/capture/anthropic/v1/messages",
                                json=body,
                                headers={"x-api-key": "k"},
                            ) as r:
                                data = await r.aread()
                                status = r.status_code if b"message_stop" in data else None
                        else:
                            r = await c.post(
                                "/v1/capture/openai/chat/completions",
                                json={"model": "m", "messages": msgs(f"q{i}")},
                                headers={"Authorization": "Bearer k"},
                            )
                            status = r.status_code
                    except httpx.HTTPError:
                        status = None
                    finished += 1
                    answered_so_far += status == 200
                    return status

                async def term() -> None:
                    nonlocal in_flight_at_term
                    while answered_so_far < 20:  # by progress, not wall time: the machine may be busy
                        await asyncio.sleep(0.01)
                    in_flight_at_term = started - finished
                    proc.send_signal(signal.SIGTERM)

                results, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(400))), term())
                return results

        results = asyncio.run(load())
        rc = proc.wait(timeout=90)
        out = proc.stdout.read()
        assert rc == 0, proc.stderr.read()
        answered = sum(1 for s in results if s == 200)
        refused = sum(1 for s in results if s is None)
        assert answered + refused == len(results)
        assert answered >= 20 and in_flight_at_term > 0, (answered, refused, in_flight_at_term)
        with open_store(f"sqlite:///{db}") as s:
            assert s.count() == answered
        assert f"{answered} observations stored, 0 lost" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_up()


def _gzipping(app):
    """The stand-in upstream behind a layer that gzips every answer, ignoring Accept-Encoding: identity
    (streams flushed per chunk, as a compressing server does)."""
    import zlib

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)

        async def gz_send(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
                message = {**message, "headers": [*headers, (b"content-encoding", b"gzip")]}
            elif message["type"] == "http.response.body":
                more = message.get("more_body", False)
                body = z.compress(message.get("body", b"")) + z.flush(
                    zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH
                )
                message = {**message, "body": body}
            await send(message)

        await app(scope, receive, gz_send)

    return wrapped


def test_compressed_upstream_is_passed_through_once_and_stored_decoded(tmp_path):
    from kolm_ray.demo.simulate import make_upstream_app

    up_url, stop_up = serve_in_thread(_gzipping(make_upstream_app()))
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    app = create_app(store, openai_upstream=up_url, anthropic_upstream=up_url)
    url, stop = serve_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
        h = {"X-Kolm-Namespace": "gz", "X-Kolm-Tenant": "acme"}
        assert (
            client.chat.completions.create(model="m", messages=msgs(Q), extra_headers=h)
            .choices[0]
            .message.content
            == A
        )
        s = client.chat.completions.create(
            model="m", messages=msgs(Q), stream=True, stream_options={"include_usage": True}, extra_headers=h
        )
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == A
        # On the wire: the upstream's gzip bytes and its header, not decoded by the proxy.
        with httpx.Client(timeout=10) as c:
            body = {"model": "m", "messages": msgs(Q), "stream": True}
            hdrs = {"Authorization": "Bearer k", **h}
            with c.stream("POST", f"{url}/v1/capture/openai/chat/completions", json=body, headers=hdrs) as r:
                assert r.headers["content-encoding"] == "gzip"
                raw = b"".join(r.iter_raw())
            assert raw[:2] == b"\x1f\x8b" and b"chat.completion.chunk" not in raw
        app.state.writer.flush()
        obs = store.list(namespace="gz", limit=10)[0]
        assert len(obs) == 3
        check(obs[0], "openai")
        check(obs[1], "openai", stream=True)
        assert obs[2].output == json.loads(A) and obs[2].verified is None  # the raw read above
    finally:
        stop()
        stop_up()
        store.close()


def test_upstream_timeout_is_504_naming_it(upstream, tmp_path):
    import aiohttp

    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=0.3)
    app = create_app(store, openai_upstream=upstream, upstream_timeout=timeout)
    url, stop = serve_in_thread(app)
    try:
        r = httpx.post(
            f"{url}/v1/capture/openai/chat/completions",
            json={"model": "m", "messages": msgs(Q)},
            headers={"Authorization": "Bearer k", "x-sim-latency-ms": "3000"},
            timeout=10,
        )
        assert (
            r.status_code == 504
            and f"{upstream}/v1/chat/completions did not answer in time" in r.json()["error"]
        )
        app.state.writer.flush()
        (o,) = store.list(limit=10)[0]
        assert (o.status, o.verified) == (504, False)
    finally:
        stop()
        store.close()
