"""A hostile multi-tenant suite against the real `kolm capture` subprocess, on SQLite and PostgreSQL, with
the official openai and anthropic SDKs as clients (CONTRACT.md "Capture keys", "Training data you can trust").

Two teams, acme (support) and globex (billing), and an intruder: no key, an unknown key, a revoked key
(401); another team's namespace and a forged tenant (403); oversized headers and the 257-character tenant
(400) among good calls, none of which loses its observation; a local answer refused to a key without the
namespace; 300 poison calls from a --no-train key that change nothing `kolm recipe` writes; a bridge key
that cannot read another tenant; revocation seen by both workers of `--workers 2` within 2 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from capture_helpers import ANTHROPIC_KEY, OPENAI_KEY, msgs

from kolm_ray.cli import main
from kolm_ray.demo.simulate import SYSTEM_PROMPT, frontier_answer, generate_workload, serve_in_thread
from kolm_ray.demo.simulate.upstream import make_upstream_app
from kolm_ray.observations.store import open_store

ADMIN = "hostile-suite-admin-token"
MANAGED = "sk-managed-provider-key-" + "m" * 24
Q = "hey team, how do I restart the ingest worker in prod?"


@pytest.fixture(scope="module")
def upstream():
    """The stand-in frontier API (its app kept: `app.state.seen` holds the credentials it received)."""
    app = make_upstream_app()
    url, stop = serve_in_thread(app)
    yield url, app
    stop()


def _keys(url: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kolm_ray.cli", "keys", *args, "--store", url],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if args[0] == "create" else {"out": proc.stdout}


class Proxy:
    def __init__(self, store_url: str, upstream: str, home: Path, workers: int = 1, **env: str) -> None:
        full_env = {**os.environ, "KOLM_HOME": str(home), "KOLM_STORE": store_url, "KOLM_ADMIN_TOKEN": ADMIN,
                    "KOLM_OPENAI_API_KEY": MANAGED, **env}  # fmt: skip
        cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--workers", str(workers),
               "--openai-upstream", upstream, "--anthropic-upstream", upstream]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
        )
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, "the proxy did not start"
            time.sleep(0.1)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=120)
        return out + err

    def oai(self, key: str | None = None, api_key: str = OPENAI_KEY, **headers: str) -> openai.OpenAI:
        h = {**headers, **({"X-Kolm-Key": key} if key else {})}
        return openai.OpenAI(base_url=f"{self.url}/v1/capture/openai", api_key=api_key, max_retries=0,
                             default_headers=h)  # fmt: skip

    def anth(self, key: str | None = None, **headers: str) -> anthropic.Anthropic:
        h = {**headers, **({"X-Kolm-Key": key} if key else {})}
        return anthropic.Anthropic(base_url=f"{self.url}/v1/capture/anthropic", api_key=ANTHROPIC_KEY,
                                   max_retries=0, default_headers=h)  # fmt: skip


def ask(client: openai.OpenAI | anthropic.Anthropic, q: str = Q) -> str:
    if isinstance(client, openai.OpenAI):
        r = client.chat.completions.create(model="gpt-4o-mini", messages=msgs(q))
        return r.choices[0].message.content
    r = client.messages.create(model="claude-3-5-haiku-latest", max_tokens=64, system=SYSTEM_PROMPT,
                               messages=[{"role": "user", "content": q}])  # fmt: skip
    return r.content[0].text


def status_of(fn) -> int:
    try:
        fn()
        return 200
    except openai.APIStatusError as e:
        return e.status_code
    except anthropic.APIStatusError as e:
        return e.status_code


def rows(store_url: str, namespace: str) -> list:
    with open_store(store_url) as s:
        return [o for b in s.iter_observations(namespace) for o in b]


def test_tenants_namespaces_and_oversized_headers(store_url, upstream, tmp_path):
    up_url, up_app = upstream
    acme = _keys(store_url, "create", "--tenant", "acme", "--namespace", "support")
    globex = _keys(store_url, "create", "--tenant", "globex", "--namespace", "billing")
    gone = _keys(store_url, "create", "--tenant", "acme", "--namespace", "support")
    _keys(store_url, "revoke", gone["id"])
    proxy = Proxy(store_url, up_url, tmp_path)
    try:
        # 401: no key, an unknown key, a revoked key (each SDK); 403: another team's namespace, a forged tenant
        for client in (proxy.oai(), proxy.anth()):
            assert status_of(lambda c=client: ask(c)) == 401
        assert status_of(lambda: ask(proxy.oai("kolm-sk-" + "A" * 43))) == 401
        assert status_of(lambda: ask(proxy.anth(gone["key"]))) == 401
        for client in (proxy.oai(acme["key"], **{"X-Kolm-Namespace": "billing"}),
                       proxy.anth(acme["key"], **{"X-Kolm-Namespace": "billing"})):  # fmt: skip
            try:
                ask(client)
                raise AssertionError("another team's namespace was accepted")
            except (openai.PermissionDeniedError, anthropic.PermissionDeniedError) as e:
                assert e.response.json() == {"error": f"key {acme['id']} may not use namespace billing"}
        assert status_of(lambda: ask(proxy.oai(acme["key"], **{"X-Kolm-Tenant": "globex"}))) == 403
        # a browser's "simple" request: text/plain is refused before anything else
        r = httpx.post(f"{proxy.url}/v1/capture/openai/chat/completions", content=json.dumps({"messages": []}),
                       headers={"Content-Type": "text/plain", "X-Kolm-Key": acme["key"]})  # fmt: skip
        assert r.status_code == 415 and "error" in r.json()

        # 200 good calls, with the 257-character tenant and other oversized headers among them: 400 each,
        # and no good call loses its observation
        good = proxy.oai(acme["key"], **{"X-Kolm-Namespace": "support"})
        hostile = [{"X-Kolm-Tenant": "t" * 257}, {"X-Kolm-Namespace": "n" * 200}, {"X-Padding": "p" * 9000},
                   {"X-Kolm-Key": "kolm-sk-" + "k" * 300}]  # fmt: skip
        answered = 0
        for i in range(200):
            answered += ask(good if i % 2 else proxy.anth(acme["key"]), f"{Q} #{i}") is not None
            if i % 50 == 0:
                for h in hostile:
                    bad = openai.OpenAI(base_url=f"{proxy.url}/v1/capture/openai", api_key=OPENAI_KEY,
                                        max_retries=0, default_headers={"X-Kolm-Key": acme["key"], **h})  # fmt: skip
                    assert status_of(lambda c=bad: ask(c)) == 400
        # the kolm key as the SDK's own api_key: the managed key goes upstream, never stored or echoed
        up_app.state.seen.clear()
        assert ask(proxy.oai(api_key=acme["key"])) is not None
        assert [k for _, k in up_app.state.seen] == [f"Bearer {MANAGED}"]
        # the globex key reads only globex's rows through the bridge
        h = {"Authorization": f"Bearer {globex['key']}"}
        r = httpx.get(f"{proxy.url}/v1/bridges/observations", params={"tenant": "acme"}, headers=h)
        assert r.status_code == 403
        r = httpx.get(f"{proxy.url}/v1/bridges/observations", params={"namespace": "support"}, headers=h)
        assert r.status_code == 403
        r = httpx.get(f"{proxy.url}/v1/bridges/observations", headers=h)
        assert r.status_code == 200 and r.json()["observations"] == []
        assert httpx.get(f"{proxy.url}/v1/bridges/namespaces", headers=h).status_code == 403
        assert (
            httpx.get(f"{proxy.url}/v1/bridges/observations").status_code == 401
        )  # keys exist: no open bridge
        # a key's import lands in its own tenant and namespace as provider "import", never "openai"
        claim = [
            {
                "namespace": "billing",
                "input": "x",
                "output": {"a": 1},
                "provider": "openai",
                "tenant": "globex",
            }
        ]
        r = httpx.post(f"{proxy.url}/v1/bridges/observations", json=claim, headers=h)
        assert r.status_code == 200 and r.json() == {"inserted": 1}
        for bad_rows in ([{**claim[0], "namespace": "support"}], [{**claim[0], "tenant": "acme"}],
                         [{**claim[0], "verified": True}]):  # fmt: skip
            assert (
                httpx.post(f"{proxy.url}/v1/bridges/observations", json=bad_rows, headers=h).status_code
                == 403
            )
        page = httpx.get(f"{proxy.url}/v1/bridges/observations", headers=h).json()["observations"]
        assert [(o["provider"], o["tenant"], o["key_id"]) for o in page] == [
            ("import", "globex", globex["id"])
        ]
        # /healthz: ok, store, pending only, unless the admin token is sent
        assert set(httpx.get(f"{proxy.url}/healthz").json()) == {"ok", "store", "pending"}
        admin = httpx.get(f"{proxy.url}/healthz", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert admin["ok"] is True
    finally:
        summary = proxy.stop()
    assert answered == 200
    stored = rows(store_url, "support")
    assert len(stored) == 201 and "0 lost" in summary, summary  # 200 + the managed-key call; none refused
    assert {(o.tenant, o.key_id) for o in stored} == {("acme", acme["id"])}
    assert all(MANAGED not in json.dumps(o.model_dump(mode="json")) for o in stored)
    assert MANAGED not in summary
    assert len(rows(store_url, "default")) == 0


def test_revocation_reaches_both_workers_within_2_s(store_url, upstream, tmp_path):
    up_url, _ = upstream
    k = _keys(store_url, "create", "--tenant", "acme", "--namespace", "support")
    proxy = Proxy(store_url, up_url, tmp_path, workers=2)
    try:
        pids = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2:  # both workers up (a new connection each time: the kernel spreads them)
            assert time.monotonic() < deadline
            h = httpx.get(
                f"{proxy.url}/healthz", headers={"Authorization": f"Bearer {ADMIN}", "Connection": "close"}
            )
            pids.add(h.json().get("pid"))
        body = {"model": "m", "messages": msgs(Q)}
        headers = {"Authorization": f"Bearer {OPENAI_KEY}", "X-Kolm-Key": k["key"], "Connection": "close"}
        call = f"{proxy.url}/v1/capture/openai/chat/completions"
        assert all(httpx.post(call, json=body, headers=headers).status_code == 200 for _ in range(6))
        assert main(["keys", "revoke", k["id"], "--store", store_url]) == 0
        t_revoked = time.monotonic()
        late = []
        while time.monotonic() - t_revoked < 4.0:  # calls from 2 s on: every one refused, on either worker
            status = httpx.post(call, json=body, headers=headers).status_code
            if time.monotonic() - t_revoked >= 2.0:
                late.append(status)
            time.sleep(0.02)
        assert len(late) >= 3 and set(late) == {401}, late
    finally:
        proxy.stop()


@pytest.mark.slow  # builds a tagger (as test_local_answers.py does)
def test_local_answer_refused_to_a_key_without_the_namespace(tmp_path, monkeypatch):
    """A live model for teamA-support answers acme's key; globex's key (billing only) is refused (403),
    and so is a text/plain call with no key at all (415), where before both got the model's answer."""
    from local_helpers import SIGNING_KEY, build_tagger, upstream_answer

    from kolm_ray import registry

    monkeypatch.setenv("KOLM_SIGNING_KEY", SIGNING_KEY)
    ns = "teamA-support"
    url = f"sqlite:///{tmp_path / 'obs.db'}"
    tagger = build_tagger(tmp_path / "tagger", seed=0, name="tagger")
    with open_store(url) as s:
        registry.promote(s, tagger, ns, force=True)  # no traffic yet: the test sends it
    acme = _keys(url, "create", "--tenant", "acme", "--namespace", ns)
    globex = _keys(url, "create", "--tenant", "globex", "--namespace", "billing")
    up_url, stop_up = serve_in_thread(make_upstream_app(answer=upstream_answer))
    proxy = Proxy(url, up_url, tmp_path / "home", KOLM_SIGNING_KEY=SIGNING_KEY, KOLM_SHADOW_RATE="0")
    try:
        deadline = time.monotonic() + 240
        admin = {"Authorization": f"Bearer {ADMIN}"}
        while (
            httpx.get(f"{proxy.url}/healthz", headers=admin).json().get("local", {}).get("models", {}).get(ns)
            is None
        ):
            assert time.monotonic() < deadline, "the proxy never loaded the model"
            time.sleep(0.2)
        assert "local" not in httpx.get(f"{proxy.url}/healthz").json()  # which models are live: admin only
        q = [{"role": "user", "content": "how do i check my balance"}]
        raw = proxy.oai(acme["key"], **{"X-Kolm-Namespace": ns}).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=q
        )
        assert raw.headers["x-kolm-served-by"] == "local"
        with pytest.raises(openai.PermissionDeniedError):
            proxy.oai(globex["key"], **{"X-Kolm-Namespace": ns}).chat.completions.create(
                model="m", messages=q
            )
        r = httpx.post(f"{proxy.url}/v1/capture/openai/chat/completions", content=json.dumps({"model": "m", "messages": q}),
                       headers={"Content-Type": "text/plain", "X-Kolm-Namespace": ns, "X-Kolm-Tenant": "mallory"})  # fmt: skip
        assert r.status_code == 415 and "x-kolm-served-by" not in r.headers
        r = httpx.post(f"{proxy.url}/v1/capture/openai/chat/completions", json={"model": "m", "messages": q},
                       headers={"X-Kolm-Namespace": ns, "X-Kolm-Tenant": "mallory"})  # fmt: skip
        assert r.status_code == 401 and "x-kolm-served-by" not in r.headers
    finally:
        proxy.stop()
        stop_up()
    stored = rows(url, ns)
    assert [(o.provider, o.tenant, o.key_id) for o in stored] == [("local", "acme", acme["id"])]


def _recipe_files(store_url: str, out: Path, capsys) -> dict[str, object]:
    assert main(["recipe", "--namespace", "support", "--out", str(out), "--store", store_url]) == 0
    info = json.loads(capsys.readouterr().out)
    files = {name: (out / name).read_text() for name in ("pairs.jsonl", "spec.json", "recipe.yaml")}
    diagnostics = json.loads(Path(info["diagnostics"]).read_text())
    return {**files, "diagnostics": diagnostics}


@pytest.mark.slow
def test_300_poison_calls_from_a_no_train_key_change_nothing_recipe_writes(store_url, tmp_path, capsys):
    """A --no-train key sends 300 calls whose upstream answers say "billing" for everything: kept (spend,
    report) but the recipe's pairs, spec and settings are the same; its diagnostics count them."""

    def answer(q: str) -> str:
        return json.dumps({"namespace": "billing"}) if "POISON" in q else frontier_answer(q)

    up_url, stop_up = serve_in_thread(make_upstream_app(answer=answer, noise=0.0))
    team = _keys(store_url, "create", "--tenant", "acme", "--namespace", "support")
    poison = _keys(store_url, "create", "--tenant", "acme", "--namespace", "support", "--no-train")
    proxy = Proxy(store_url, up_url, tmp_path / "home")
    try:
        client = proxy.oai(team["key"])
        for item in generate_workload(240, seed=0):  # a recipe needs >= 200 pairs
            client.chat.completions.create(model="gpt-4o-mini", messages=msgs(item.query))
        deadline = time.monotonic() + 60
        while httpx.get(f"{proxy.url}/healthz").json()["pending"]:  # every answered call is in the store
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(rows(store_url, "support")) == 240
        before = _recipe_files(store_url, tmp_path / "before", capsys)
        bad = proxy.oai(poison["key"])
        for item in generate_workload(300, seed=1):
            bad.chat.completions.create(model="gpt-4o-mini", messages=msgs(f"POISON {item.query}"))
    finally:
        proxy.stop()
        stop_up()
    assert len(rows(store_url, "support")) == 240 + 300  # kept for spend and reports
    after = _recipe_files(store_url, tmp_path / "after", capsys)

    # The same pairs (as a set: the recipe's row order, train/eval split and purity estimate vary between
    # two runs on identical rows, poison or not, since Ray Data's blocks arrive in any order), the same spec,
    # and the same recipe.yaml but for its own directory and the k_floor line that purity sets.
    def pairs(text: str) -> list[tuple[str, str]]:
        return sorted(
            (p["input"], json.dumps(p["output"], sort_keys=True)) for p in map(json.loads, text.splitlines())
        )

    def settings(text: str, d: Path) -> list[str]:
        return [ln for ln in text.replace(str(d), "DIR").splitlines() if not ln.startswith("k_floor:")]

    assert (
        pairs(after["pairs.jsonl"]) == pairs(before["pairs.jsonl"])
        and len(pairs(before["pairs.jsonl"])) == 240
    )
    assert after["spec.json"] == before["spec.json"]
    assert settings(after["recipe.yaml"], tmp_path / "after") == settings(
        before["recipe.yaml"], tmp_path / "before"
    )
    assert "POISON" not in after["pairs.jsonl"]
    assert after["diagnostics"]["untrusted"] == {
        "left_out": True, "rows": 300, "by_reason": {"key created with --no-train": 300}
    }  # fmt: skip
    assert before["diagnostics"]["untrusted"]["rows"] == 0
