"""The capture proxy with the official SDKs as clients, all tests on one proxy in front of the stand-in upstream.

The proxy runs in a thread of this process on a free port (uvicorn, the same as `kolm capture` runs): what
the SDKs get back, what is stored (credentials never), upstream errors, cut and abandoned streams, bad
requests, concurrency. tests/test_capture_upstreams.py has the tests that need a proxy of their own.
"""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import openai
import pytest
from capture_helpers import ANTHROPIC_KEY, OPENAI_KEY, A, Q, check, msgs

from kolm_ray.capture.app import create_app
from kolm_ray.demo.simulate import SYSTEM_PROMPT, serve_in_thread
from kolm_ray.observations.store import open_store


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


NS = {"X-Kolm-Namespace": "sdk-openai", "X-Kolm-Tenant": "acme"}


def test_openai_sdk_sync_async_and_streaming(proxy):
    url = proxy[0]
    client = openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0)
    t0 = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(  # the upstream takes 2 s (x-sim-latency-ms)
        model="gpt-4o-mini", messages=msgs(Q), extra_headers={**NS, "x-sim-latency-ms": "2000"}
    )
    elapsed_ms = (time.perf_counter() - t0) * 1000
    # the proxy's own time: positive, under the client's wall time, and without the upstream's 2 s (a header
    # that counted them is >= 2000 whatever the load; the proxy's own work is far under 2 s even loaded)
    overhead = float(raw.headers["x-kolm-overhead-ms"])
    assert elapsed_ms >= 2000 and 0 < overhead < min(2000, elapsed_ms), (overhead, elapsed_ms)
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
