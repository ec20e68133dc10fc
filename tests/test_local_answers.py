"""Local answers through the real capture proxy, driven by the official openai and anthropic SDKs.

A tiny signed tagger is promoted for namespace `support`; the stand-in upstream answers the same task, so a
right local answer is the upstream's answer. Threshold, shape and `X-Kolm-Local: off` paths go upstream;
shadow checks run at a known rate; promotion and rollback happen under load without a failed call.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from local_helpers import SIGNING_KEY, build_tagger, truth, upstream_answer

from kolm_ray import registry
from kolm_ray.capture.app import create_app
from kolm_ray.cli import main
from kolm_ray.demo.simulate import serve_in_thread, start_upstream_in_thread
from kolm_ray.observations.store import open_store

pytestmark = pytest.mark.slow  # starts the proxy and an upstream server (in-process threads)

NS = "support"
OPENAI_KEY = "sk-local-test-0123456789abcdef0123"
ANTHROPIC_KEY = "sk-ant-local-test-0123456789abcdef"
QUERIES = [
    "how do i check my balance",
    "help me with the flight please",
    "can you find a recipe for me",
    "tell me about the playlist",
    "where is my passport",
    "my oven is not working",
]


@pytest.fixture(scope="module")
def taggers(tmp_path_factory) -> tuple[Path, Path, Path]:
    mp = pytest.MonkeyPatch()
    mp.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    try:
        d = tmp_path_factory.mktemp("taggers")
        return (
            build_tagger(d / "a", seed=0, name="tagger"),
            build_tagger(d / "b", seed=1, name="tagger2"),
            # a strict threshold, so that some queries fall below it (the taggers are confident otherwise)
            build_tagger(d / "c", seed=2, epochs=4, name="strict", threshold=0.999),
        )
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def upstream():
    url, stop = start_upstream_in_thread(answer=upstream_answer)
    yield url
    stop()


@pytest.fixture
def proxy(tmp_path, upstream, taggers, monkeypatch):
    """(url, store) with taggers[0] promoted for NS and loaded by the proxy."""
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("KOLM_SHADOW_RATE", "0")
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    registry.promote(store, taggers[0], NS, force=True)  # before any traffic
    app = create_app(store, openai_upstream=upstream, anthropic_upstream=upstream)
    url, stop = serve_in_thread(app)
    try:
        wait_for_model(url, "tagger@1")
        yield url, store, app
    finally:
        stop()
        store.close()


def wait_for_model(url: str, label: str, timeout: float = 240.0) -> None:  # a loaded CI box is slow
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/healthz").json()
        if health.get("local", {}).get("models", {}).get(NS) == label:
            return
        time.sleep(0.1)
    raise AssertionError(f"proxy never served {label}: {health}")


def oai(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0,
                         default_headers={"X-Kolm-Namespace": NS, **kw.pop("headers", {})}, **kw)  # fmt: skip


def anth(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY, max_retries=0,
                               default_headers={"X-Kolm-Namespace": NS})  # fmt: skip


def user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def stored(app, store) -> list:
    assert app.state.writer.flush(10)
    return [o for batch in store.iter_observations(NS) for o in batch]


def test_openai_sdk_sync_async_and_streaming_answers_are_local_and_right(proxy):
    url, store, app = proxy
    client = oai(url)
    for q in QUERIES:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=user(q))
        assert raw.headers["x-kolm-served-by"] == "local"
        assert raw.headers["x-kolm-model"] == "tagger@1"
        done = raw.parse()
        assert json.loads(done.choices[0].message.content) == {"namespace": truth(q)}
        assert done.usage.prompt_tokens == 0 and done.usage.completion_tokens == 0
        assert done.model == "tagger@1" and done.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=user(QUERIES[1]), stream=True, stream_options={"include_usage": True}
    )
    assert stream.response.headers["x-kolm-served-by"] == "local"
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"namespace": "travel"}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0

    async def run_async() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1/capture/openai", api_key=OPENAI_KEY, max_retries=0,
                                     default_headers={"X-Kolm-Namespace": NS})  # fmt: skip
        done = await asyncio.gather(
            *(aclient.chat.completions.create(model="m", messages=user(q)) for q in QUERIES)
        )
        s = await aclient.chat.completions.create(model="m", messages=user(QUERIES[2]), stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        await aclient.close()
        return [d.choices[0].message.content for d in done] + [streamed]

    answers = asyncio.run(run_async())
    assert [json.loads(a)["namespace"] for a in answers] == [truth(q) for q in QUERIES] + ["kitchen"]

    observations = stored(app, store)
    local = [o for o in observations if o.provider == "local"]
    assert len(local) == len(QUERIES) * 2 + 2 and len(observations) == len(local)
    assert all(o.output == {"namespace": truth(o.input)} and o.model == "tagger@1" for o in local)
    assert not any(OPENAI_KEY in json.dumps(o.model_dump(mode="json")) for o in observations)


def test_anthropic_sdk_sync_async_and_streaming_answers_are_local_and_right(proxy):
    url, store, app = proxy
    client = anth(url)
    for q in QUERIES[:3]:
        raw = client.messages.with_raw_response.create(
            model="claude-3-5-haiku-latest", max_tokens=64, messages=user(q)
        )
        assert raw.headers["x-kolm-served-by"] == "local" and raw.headers["x-kolm-model"] == "tagger@1"
        msg = raw.parse()
        assert json.loads(msg.content[0].text) == {"namespace": truth(q)}
        assert msg.usage.input_tokens == 0 and msg.usage.output_tokens == 0 and msg.stop_reason == "end_turn"

    with client.messages.stream(model="c", max_tokens=64, messages=user(QUERIES[3])) as s:
        assert s.response.headers["x-kolm-served-by"] == "local"
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert json.loads(text) == {"namespace": "music"} and final.content[0].text == text

    async def run_async() -> list[str]:
        aclient = anthropic.AsyncAnthropic(base_url=f"{url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY,
                                           max_retries=0, default_headers={"X-Kolm-Namespace": NS})  # fmt: skip
        done = await asyncio.gather(
            *(aclient.messages.create(model="c", max_tokens=9, messages=user(q)) for q in QUERIES)
        )
        events = await aclient.messages.create(
            model="c", max_tokens=9, messages=user(QUERIES[4]), stream=True
        )
        streamed = "".join([e.delta.text async for e in events if e.type == "content_block_delta"])
        await aclient.close()
        return [d.content[0].text for d in done] + [streamed]

    answers = asyncio.run(run_async())
    assert [json.loads(a)["namespace"] for a in answers] == [truth(q) for q in QUERIES] + ["travel"]
    observations = stored(app, store)
    assert {o.provider for o in observations} == {"local"}
    assert not any(ANTHROPIC_KEY in json.dumps(o.model_dump(mode="json")) for o in observations)


def test_off_header_other_shape_and_low_confidence_go_upstream(proxy, taggers):
    url, store, app = proxy
    client = oai(url)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=user(QUERIES[0]), extra_headers={"X-Kolm-Local": "off"}
    )
    assert raw.headers["x-kolm-served-by"] == "upstream" and "x-kolm-model" not in raw.headers
    assert raw.headers["x-kolm-upstream-reason"] == "x-kolm-local off"

    system = [{"role": "system", "content": "You are a travel agent."}, *user(QUERIES[1])]
    raw = client.chat.completions.with_raw_response.create(model="m", messages=system)
    assert raw.headers["x-kolm-served-by"] == "upstream"
    assert raw.headers["x-kolm-upstream-reason"] == "another request shape"
    raw = anth(url).messages.with_raw_response.create(
        model="c", max_tokens=9, system="Be terse.", messages=user("hi")
    )
    assert raw.headers["x-kolm-served-by"] == "upstream"

    # The threshold: with `strict` live, each query goes local exactly when the same Predictor, offline,
    # is at least as confident as the model's threshold (0.999).
    from kolm_ray.inference.predictors import open_predictor

    assert app.state.writer.flush(10)  # the calls above are the namespace's traffic of the model's shape
    assert main(["models", "promote", str(taggers[2]), "--namespace", NS, "--store", store.url]) == 0
    wait_for_model(url, "strict@2")
    queries = QUERIES + ["weather on mars 42", "zzz qqq xxy", "the balance of the recipe", "bake the luggage",
                         "passport playlist oven", "a hotel with a guitar", "deposit the lyrics"]  # fmt: skip
    with open_predictor(registry.live_models(store)[NS].path) as p:
        expected = [a["confidence"] >= 0.999 and a["fallback"] == "narrow" for a in p.predict(queries)]
    served = [
        client.chat.completions.with_raw_response.create(model="m", messages=user(q)).headers[
            "x-kolm-served-by"
        ]
        for q in queries
    ]
    assert served == ["local" if e else "upstream" for e in expected]
    assert 0 < expected.count(True) < len(expected), "both paths must occur for the test to test them"

    observations = stored(app, store)
    upstream_obs = [o for o in observations if o.provider != "local"]
    assert len(upstream_obs) == 3 + expected.count(False)  # off, two other shapes, below threshold
    assert all(o.status == 200 and o.verified is None for o in upstream_obs)
    # the local model's CPU time, for net savings: on every local answer, and on each call it tried and sent
    # upstream below its threshold; never on a call it did not run for (off, another shape)
    local_obs = [o for o in observations if o.provider == "local"]
    assert local_obs and all(o.usage["kolm_local_cpu_ms"] > 0 for o in local_obs)
    tried = [o for o in upstream_obs if "kolm_local_cpu_ms" in (o.usage or {})]
    assert len(tried) == expected.count(False) and all(o.usage["kolm_local_cpu_ms"] > 0 for o in tried)


def test_shadow_rate_within_binomial_bounds_and_pairs_stored(proxy, monkeypatch):
    url, store, app = proxy
    rate, n = 0.25, 240
    app.state.local.rate = rate
    client = oai(url)
    for i in range(n):
        client.chat.completions.create(model="m", messages=user(QUERIES[i % len(QUERIES)]))
    deadline = time.monotonic() + 30
    while app.state.local._tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    pairs = registry.shadow_pairs(store, NS)
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(len(pairs) - n * rate) <= 4 * sd, (len(pairs), n * rate, sd)
    assert all(p["agree"] is True and p["version"] == 1 for p in pairs)  # the upstream answers the same task
    observations = {o.id: o for o in stored(app, store)}
    for p in pairs:
        local, up = observations[p["local_id"]], observations[p["upstream_id"]]
        assert local.provider == "local" and up.provider == "openai" and up.output == local.output
        assert up.request.get("stream") is None
    assert not any(OPENAI_KEY in json.dumps(o.model_dump(mode="json")) for o in observations.values())


def test_promotion_and_rollback_under_load_fail_no_call(proxy, taggers):
    """~50 calls/s for a few seconds while tagger2 is promoted and then rolled back: every call succeeds, and
    the serving model moves from tagger@1 to tagger2@2 and back without a restart."""
    url, store, app = proxy
    results: list[tuple[int, str | None, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as c:
            i = 0
            while not stop.is_set():
                t = time.monotonic()
                q = QUERIES[i % len(QUERIES)]
                try:
                    r = c.post(f"{url}/v1/capture/openai/chat/completions", json={"model": "m", "messages": user(q)},
                               headers={"Authorization": f"Bearer {OPENAI_KEY}", "X-Kolm-Namespace": NS})  # fmt: skip
                    ok = r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"])
                    results.append((r.status_code if ok else -1, r.headers.get("x-kolm-model"), q))
                except Exception as e:  # noqa: BLE001 - a failed call is what the test counts
                    results.append((-2, repr(e), q))
                i += 1
                time.sleep(max(0.0, 0.02 - (time.monotonic() - t)))

    threads = [threading.Thread(target=load) for _ in range(1)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        assert main(["models", "promote", str(taggers[1]), "--namespace", NS, "--store", store.url]) == 0
        wait_for_model(url, "tagger2@2")
        time.sleep(1.5)
        assert main(["models", "rollback", "--namespace", NS, "--store", store.url]) == 0
        wait_for_model(url, "tagger@1")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    models = [m for _, m, _ in results]
    assert "tagger2@2" in models and models[0] == "tagger@1" and models[-1] == "tagger@1"
    assert len(results) / 5.0 >= 30  # the load was real (~50/s target, >= 30/s achieved)


def test_broken_registry_file_goes_upstream_and_healthz_says_why(proxy):
    url, store, app = proxy
    row = registry.live_models(store)[NS]
    data = Path(row.path).read_bytes()
    Path(row.path).write_bytes(data[:-100] + bytes(100))  # corrupt the registry's copy
    deadline = time.monotonic() + 30
    while (
        NS not in httpx.get(f"{url}/healthz").json().get("local", {}).get("problems", {})
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    health = httpx.get(f"{url}/healthz").json()
    assert health["ok"] is True and "answering upstream" in health["local"]["problems"][NS]
    raw = oai(url).chat.completions.with_raw_response.create(model="m", messages=user(QUERIES[0]))
    assert raw.status_code == 200 and raw.headers["x-kolm-served-by"] == "upstream"
    Path(row.path).unlink()
    time.sleep(1.5)
    assert "missing" in httpx.get(f"{url}/healthz").json()["local"]["problems"][NS]
    assert oai(url).chat.completions.create(model="m", messages=user(QUERIES[1])).choices[0].message.content


def test_cli_tampered_unfit_and_nothing_to_roll_back(tmp_path, taggers, monkeypatch, capsys, store_url):
    """The registry on each backend (SQLite, PostgreSQL): the same rows, versions and exit codes."""
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("KOLM_HOME", str(tmp_path / "home"))
    url = store_url
    bad = tmp_path / "tampered.kolm"
    data = bytearray(taggers[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert main(["models", "promote", str(bad), "--namespace", NS, "--store", url]) == 4
    assert main(["models", "rollback", "--namespace", NS, "--store", url]) == 2
    assert "no live model" in capsys.readouterr().err

    # Recent outputs of the namespace are another task: the tagger's spec does not fit them.
    store = open_store(url)
    from kolm_ray.observations.model import Observation

    store.append_many([Observation(namespace=NS, provider="openai", input=f"q{i}", output={"sentiment": "up"})
                       for i in range(50)])  # fmt: skip
    store.close()
    assert main(["models", "promote", str(taggers[0]), "--namespace", NS, "--store", url]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["models", "list", "--json", "--store", url]) == 0
    assert json.loads(capsys.readouterr().out) == {"models": []}

    # Recent upstream outputs of the same task fit: promoted (local answers, misfits here, are not checked).
    store = open_store(url)
    rows = [("openai", {"namespace": "music"})] * 50 + [("local", {"sentiment": "up"})] * 50
    store.append_many([Observation(namespace="other", provider=p, input=f"q{i}", output=out)
                       for i, (p, out) in enumerate(rows)])  # fmt: skip
    store.close()
    assert main(["models", "promote", str(taggers[0]), "--namespace", "other", "--store", url]) == 0
    assert capsys.readouterr().out.strip() == "ok other -> tagger@1"
    assert main(["models", "promote", str(taggers[1]), "--namespace", "other", "--store", url]) == 0
    assert capsys.readouterr().out.strip() == "ok other -> tagger2@2"
    assert main(["models", "list", "--namespace", "other", "--json", "--store", url]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [(m["version"], m["name"], m["live"]) for m in models] == [
        (1, "tagger", False),
        (2, "tagger2", True),
    ]
    assert set(models[0]) == {"namespace", "version", "name", "sha256", "k_score", "k_floor", "live",
                              "created_at", "promoted_at", "threshold", "coverage", "answered_accuracy"}  # fmt: skip
    assert 0.2 <= models[0]["coverage"] <= 1 and models[0]["answered_accuracy"] >= models[0]["k_floor"]
    assert main(["models", "rollback", "--namespace", "other", "--store", url]) == 0
    assert capsys.readouterr().out.strip() == "ok other -> tagger@1"
    assert main(["models", "rollback", "--namespace", "other", "--store", url]) == 2

    # Shadow pairs round-trip on this backend.
    from kolm_ray import registry

    store = open_store(url)
    try:
        registry.record_shadow(store, "l1", "u1", "other", 1, True, {"namespace": True})
        registry.record_shadow(store, "l2", None, "other", 1, None, {"error": "upstream 502"})
        pairs = registry.shadow_pairs(store, "other")
        assert sorted((p["local_id"], p["agree"]) for p in pairs) == [("l1", True), ("l2", None)]
        assert registry.live_models(store)["other"].version == 1
    finally:
        store.close()


def test_serve_tagger_follows_the_registry_without_a_failed_call(taggers, monkeypatch):
    """`artifact: registry:NS`: the tagger replica class (called directly, as Serve would) serves NS's live
    model and moves to a promoted one, then back on rollback, while queries keep being answered."""
    from deployments.recall import NamespaceTagger, app_builder

    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    store = open_store()  # the default store of this test's KOLM_HOME: what a replica's environment names
    try:
        from kolm_ray.errors import KolmError

        with pytest.raises(KolmError, match="no live model"):
            app_builder({"artifact": f"registry:{NS}"})
        first = registry.promote(store, taggers[0], NS, force=True)  # an empty store
        app_builder({"artifact": f"registry:{NS}"})  # resolves and verifies at deploy time
        tagger = NamespaceTagger.func_or_class(first.path, follow=NS)
        results: list[dict] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                q = QUERIES[len(results) % len(QUERIES)]
                results.append(asyncio.run(tagger.score(q, ["banking", "travel", "kitchen", "music"])))
                time.sleep(0.02)

        def wait_for(path: str) -> None:
            deadline = time.monotonic() + 120
            while tagger.info()["artifact"] != path and time.monotonic() < deadline:
                time.sleep(0.1)
            assert tagger.info()["artifact"] == path, tagger.follower.problem

        thread = threading.Thread(target=load)
        thread.start()
        try:
            second = registry.promote(store, taggers[1], NS, force=True)
            wait_for(second.path)
            registry.rollback(store, NS)
            wait_for(first.path)
        finally:
            stop.set()
            thread.join()
            tagger.follower.stop()
        assert len(results) > 20
        assert all(r["namespace"] == truth(q) for r, q in zip(results, QUERIES * len(results), strict=False))
    finally:
        store.close()
