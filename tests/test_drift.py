"""Drift in the real capture proxy: shadow pairs that disagree raise the namespace's flag and its shadow rate,
then stop its local answers until another version is promoted.

The stand-in upstream answers every query with a namespace the tagger never gives for it, so every shadow
check the proxy makes disagrees. The store starts with 40 pairs at 0.45 agreement for the live version
(the tagger's k_floor is 0.5: drifting, above the 0.35 stop bound).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from local_helpers import SIGNING_KEY, build_tagger, truth

from kolm_ray import registry
from kolm_ray.capture.app import create_app
from kolm_ray.cli import main
from kolm_ray.demo.simulate import serve_in_thread, start_upstream_in_thread
from kolm_ray.observations.store import open_store
from kolm_ray.registry import drift

pytestmark = pytest.mark.slow  # starts the proxy and an upstream server (in-process threads)

NS = "support"
QUERIES = ["how do i check my balance", "help me with the flight please", "can you find a recipe for me",
           "tell me about the playlist", "where is my passport", "my oven is not working"]  # fmt: skip
WRONG = {"banking": "music", "travel": "kitchen", "kitchen": "banking", "music": "travel", "none": "music"}


@pytest.fixture(scope="module")
def taggers(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    try:
        d = tmp_path_factory.mktemp("taggers")
        return build_tagger(d / "a", seed=0, name="tagger"), build_tagger(d / "b", seed=1, name="tagger2")
    finally:
        mp.undo()


@pytest.fixture
def proxy(tmp_path, taggers, monkeypatch):
    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("KOLM_SHADOW_RATE", "0")  # no shadow checks unless drift raises the rate
    up_url, stop_up = start_upstream_in_thread(answer=lambda q: json.dumps({"namespace": WRONG[truth(q)]}))
    store = open_store(f"sqlite:///{tmp_path / 'obs.db'}")
    row = registry.promote(store, taggers[0], NS, force=True)  # before any traffic
    for i in range(40):
        registry.record_shadow(store, f"seed-{i}", None, NS, row.version, i < 18, {})
    app = create_app(store, openai_upstream=up_url, anthropic_upstream=up_url)
    url, stop = serve_in_thread(app)
    try:
        yield url, store, app
    finally:
        stop()
        stop_up()
        store.close()


def health(url: str) -> dict:
    return httpx.get(f"{url}/healthz").json().get("local", {"models": {}, "drift": {}, "problems": {}})


def ask(url: str, q: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/capture/openai/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": q}]},
        headers={"Authorization": "Bearer sk-drift-test-0123456789abcdef", "X-Kolm-Namespace": NS},
        timeout=30,
    )


def wait(pred, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_disagreeing_shadow_pairs_raise_the_rate_then_stop_local_answers(proxy, taggers, capsys):
    url, store, app = proxy
    d = wait(lambda: health(url)["drift"].get(NS))
    assert d == {
        "state": "drifting",
        "live_agreement": 0.45,
        "pairs": 40,
        "shadow_rate": drift.DRIFT_SHADOW_RATE,
    }
    before = len(registry.shadow_pairs(store, NS))
    served = []
    for i in range(200):  # until the proxy stops answering locally (bounded)
        r = ask(url, QUERIES[i % len(QUERIES)])
        assert r.status_code == 200
        served.append(r.headers["x-kolm-served-by"])
        if served[-1] == "upstream":
            assert r.headers["x-kolm-upstream-reason"].startswith("drift: live agreement")
            break
    local = served.count("local")
    # at rate 0 no local answer is re-asked; at the raised 0.5 about half are, every one disagreeing
    pairs = wait(lambda: (p := registry.shadow_pairs(store, NS)[before:]) and len(p) >= 12 and p)
    assert all(p["agree"] is False for p in pairs)
    assert 0.25 * local <= len(pairs) <= 0.75 * local + 3, (local, len(pairs))
    assert served[-1] == "upstream"  # 18 / (40 + 12) < 0.35: stopped
    assert health(url)["drift"][NS]["state"] == "stopped"
    r = ask(url, QUERIES[0])
    assert r.headers["x-kolm-served-by"] == "upstream"

    # the report says so too: the namespace drifts, at the agreement the store holds
    capsys.readouterr()
    assert main(["report", "--json", "--namespace", NS, "--store", store.url]) == 0
    (row,) = json.loads(capsys.readouterr().out)["namespaces"]
    assert row["name"] == NS and row["drift"] is True and row["k_floor"] == 0.5
    assert 18 / (40 + local) - 1e-4 <= row["live_agreement"] <= 18 / (40 + len(pairs)) + 1e-4 < 0.35, (
        row,
        local,
    )  # the report rounds to 4 places
    assert row["upstream_calls"] >= len(pairs) + 2  # the shadow re-asks (billed) and the two upstream answers

    # a new version is promoted: a fresh window, local answers again
    registry.promote(store, taggers[1], NS)
    wait(lambda: health(url)["models"].get(NS) == "tagger2@2")
    wait(lambda: NS not in health(url)["drift"])
    r = ask(url, QUERIES[1])
    assert r.headers["x-kolm-served-by"] == "local" and r.headers["x-kolm-model"] == "tagger2@2"
