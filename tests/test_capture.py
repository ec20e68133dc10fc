"""The capture proxy with the official SDKs as clients, in front of the stand-in upstream.

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

from kolm_ray.observations.capture import create_app
from kolm_ray.observations.store import open_store
from kolm_ray.simulate import SYSTEM_PROMPT, frontier_answer, serve_in_thread, start_upstream_in_thread

OPENAI_KEY = "sk-test-" + "q" * 40
ANTHROPIC_KEY = "sk-ant-test-" + "z" * 40


@pytest.fixture(scope="module")
def upstream():
    url, stop = start_upstream_in_thread()
    yield url
    stop()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    """(base URL, store, app) of a proxy in front of the stand-in upstream."""
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('capture') / 'obs.db'}")
    app = create_app(store, openai_upstream=upstream, anthropic_upstream=upstream + "/v1")
    url, stop = serve_in_thread(app)
    yield url, store, app
    stop()
    store.close()


def stored(proxy, namespace: str) -> list:
    _, store, app = proxy
    assert app.state.writer.flush(10)
    return store.list(namespace=namespace, limit=1000)[0]


def msgs(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}]


Q = "hey team, how do I restart the ingest worker in prod?"
A = frontier_answer(Q)
NS = {"X-Kolm-Namespace": "sdk-openai", "X-Kolm-Tenant": "acme"}


def check(o, provider: str, stream: bool = False) -> None:
    assert o.provider == provider and o.input == Q and o.output == json.loads(A)
    assert o.status == 200 and o.verified is None and o.tenant == "acme" and o.latency_ms > 0
    assert o.request["messages"][-1]["content"] == Q and bool(o.request.get("stream")) is stream
    assert o.usage


def test_openai_sdk_sync_async_and_streaming(proxy):
    url = proxy[0]
    client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=msgs(Q), extra_headers=NS
    )
    assert float(raw.headers["x-kolm-overhead-ms"]) >= 0
    assert raw.parse().choices[0].message.content == A
    chunks = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=msgs(Q),
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=NS,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == A

    async def run_async() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
        r = await aclient.chat.completions.create(model="gpt-4o-mini", messages=msgs(Q), extra_headers=NS)
        s = await aclient.chat.completions.create(
            model="gpt-4o-mini",
            messages=msgs(Q),
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=NS,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        await aclient.close()
        return [r.choices[0].message.content, text]

    assert asyncio.run(run_async()) == [A, A]
    obs = stored(proxy, "sdk-openai")
    assert len(obs) == 4
    for o, stream in zip(obs, [False, True, False, True], strict=True):
        check(o, "openai", stream)
        assert o.model == "gpt-4o-mini"


def test_anthropic_sdk_sync_async_and_streaming(proxy):
    url = proxy[0]
    headers = {**NS, "X-Kolm-Namespace": "sdk-anthropic"}
    client = anthropic.Anthropic(base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY, max_retries=0)
    kw = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": SYSTEM_PROMPT,
        "messages": [{"role": "user", "content": Q}],
        "extra_headers": headers,
    }
    assert client.messages.create(**kw).content[0].text == A
    with client.messages.stream(**kw) as s:
        assert s.get_final_text() == A

    async def run_async() -> list[str]:
        aclient = anthropic.AsyncAnthropic(
            base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY, max_retries=0
        )
        r = await aclient.messages.create(**kw)
        async with aclient.messages.stream(**kw) as s:
            text = await s.get_final_text()
        await aclient.close()
        return [r.content[0].text, text]

    assert asyncio.run(run_async()) == [A, A]
    obs = stored(proxy, "sdk-anthropic")
    assert len(obs) == 4
    for o, stream in zip(obs, [False, True, False, True], strict=True):
        check(o, "anthropic", stream)
        assert o.request["system"] == SYSTEM_PROMPT and o.usage["output_tokens"] > 0


def test_credentials_are_forwarded_but_never_stored(proxy, upstream):
    url, store, app = proxy
    client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
    body_secret = "sk-bodysecret-" + "k" * 30
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=msgs(Q),
        extra_headers={"X-Kolm-Namespace": "creds", "x-api-key": "hdr-secret-123"},
        extra_body={"api_key": body_secret, "metadata": {"apiKey": "nested-secret-456", "note": "kept"}},
    )
    aclient = anthropic.Anthropic(
        base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY, max_retries=0
    )
    aclient.messages.create(
        model="m",
        max_tokens=5,
        messages=[{"role": "user", "content": Q}],
        extra_headers={"X-Kolm-Namespace": "creds"},
    )
    (o1, o2) = stored(proxy, "creds")
    assert o1.request["metadata"] == {"note": "kept"} and "api_key" not in o1.request
    # the store's files hold none of the secrets anywhere (WAL included)
    path = store.path
    blob = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, body_secret, "hdr-secret-123", "nested-secret-456"):
        assert secret.encode() not in blob


def test_upstream_sees_the_clients_own_key(tmp_path):
    from kolm_ray.simulate import make_upstream_app

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


def test_upstream_errors_pass_through_and_are_stored_unverified(proxy):
    url = proxy[0]
    client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(
            model="sim-error-429", messages=msgs(Q), extra_headers={"X-Kolm-Namespace": "errs"}
        )
    assert e.value.status_code == 429 and e.value.body["message"] == "simulated error 429"
    aclient = anthropic.Anthropic(
        base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY, max_retries=0
    )
    with pytest.raises(anthropic.APIStatusError) as e2:
        aclient.messages.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": Q}],
            extra_headers={"X-Kolm-Namespace": "errs", "x-sim-status": "529"},
        )
    assert e2.value.status_code == 529
    with pytest.raises(openai.BadRequestError):  # an error on a stream request comes back as JSON too
        client.chat.completions.create(
            model="sim-error-400", messages=msgs(Q), stream=True, extra_headers={"X-Kolm-Namespace": "errs"}
        )
    obs = stored(proxy, "errs")
    assert [(o.status, o.verified) for o in obs] == [(429, False), (529, False), (400, False)]
    assert obs[0].output["error"]["type"] == "rate_limit_exceeded"
    assert obs[1].output["error"]["type"] == "overloaded_error"


def test_stream_cut_by_the_upstream_is_stored_unverified(proxy):
    url = proxy[0]
    client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
    got = []
    try:
        for c in client.chat.completions.create(
            model="sim-stream-cut", messages=msgs(Q), stream=True, extra_headers={"X-Kolm-Namespace": "cut"}
        ):
            got.append(c.choices[0].delta.content or "")
    except openai.APIError:
        pass
    (o,) = stored(proxy, "cut")
    assert o.verified is False and o.status == 200
    assert isinstance(o.output, str) and A.startswith(o.output) and o.output == "".join(got)


def test_client_disconnect_mid_stream_stores_what_was_received(proxy):
    url = proxy[0]
    body = {"model": "gpt-4o-mini", "messages": msgs(Q), "stream": True}
    headers = {
        "Authorization": f"Bearer {OPENAI_KEY}",
        "X-Kolm-Namespace": "gone",
        "x-sim-chunk-delay-ms": "300",
    }
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", f"{url}/v1/capture/openai/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(r.iter_raw())
            assert b"chat.completion.chunk" in first
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 10
    while not (obs := stored(proxy, "gone")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (o,) = obs
    assert o.status == 499 and o.verified is False
    assert o.output != json.loads(A) and A.startswith(o.output or "")


def test_bad_requests_get_json_errors_and_no_observation(proxy):
    url, store, app = proxy
    before = store.count()
    post = f"{url}/v1/capture/openai/chat/completions"
    h = {"Authorization": f"Bearer {OPENAI_KEY}", "content-type": "application/json"}
    cases = [
        (httpx.post(post, content=b"{nope", headers=h), 400, "not valid JSON"),
        (httpx.post(post, content=b"[1, 2]", headers=h), 400, "JSON object"),
        (
            httpx.post(post, json={"messages": []}, headers={**h, "X-Kolm-Namespace": "bad ns!"}),
            400,
            "X-Kolm-Namespace",
        ),
        (httpx.get(post), 405, ""),
        (httpx.post(f"{url}/v1/capture/nope", json={}), 404, "no route"),
    ]
    for r, status, msg in cases:
        assert r.status_code == status and msg in r.json()["error"]
    app.state.writer.flush()
    assert store.count() == before


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

        r = httpx.post(
            f"{url}/v1/capture/openai/chat/completions", content=gen(), headers={"Authorization": "Bearer k"}
        )
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


def test_exactly_one_observation_per_request_under_concurrency(proxy):
    url = proxy[0]
    n = 60

    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:

            async def one(i: int) -> int:
                stream = i % 3 == 0
                if i % 2:
                    r = await c.post(
                        "/v1/capture/openai/chat/completions",
                        json={"model": "m", "messages": msgs(f"q{i} reset my password"), "stream": stream},
                        headers={"Authorization": "Bearer k", "X-Kolm-Namespace": "many"},
                    )
                else:
                    r = await c.post(
                        "/v1/capture/anthropic/v1/messages",
                        json={
                            "model": "m",
                            "max_tokens": 5,
                            "stream": stream,
                            "messages": [{"role": "user", "content": f"q{i} reset my password"}],
                        },
                        headers={"x-api-key": "k", "X-Kolm-Namespace": "many"},
                    )
                return r.status_code

            return await asyncio.gather(*(one(i) for i in range(n)))

    assert asyncio.run(fire()) == [200] * n
    obs = stored(proxy, "many")
    assert sorted(o.input for o in obs) == sorted(f"q{i} reset my password" for i in range(n))
    assert all(o.output == {"namespace": "accounts"} for o in obs)


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
    from kolm_ray.simulate import make_upstream_app

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
