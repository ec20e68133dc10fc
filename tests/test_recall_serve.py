"""The recall router on Ray Serve with a real signed tagger: in process (readiness, the contract's shapes,
a killed tagger replica) and `kolm serve` as a subprocess (signals and exit codes)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import recall_artifact
import yaml
from recall_helpers import REPO, TENANT_NAMESPACES

# --- Ray Serve, in process ---------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float, what: str, step: float = 0.25):
    """predicate() until truthy. Only a connection that fails (nothing listening yet, a proxy restarting) is
    retried: any other exception (a wrong answer's KeyError, a non-JSON body) is the test's failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _is_json(r: httpx.Response) -> bool:
    return r.headers.get("content-type", "").startswith("application/json")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_route_contract_readiness_and_a_killed_tagger_replica(
    tagger_artifact, tenants_file, free_port, monkeypatch
):
    """Real Serve: while no tagger replica can start, healthz is 503 "starting" and the route answers broad
    at once ("tagger unavailable"); once one is ready, healthz 200 and right answers in the contract's
    shapes (401/422/405 too); a tagger replica killed under load -> broad with a reason, never a 5xx, healthz
    503 "degraded" until Serve has replaced it."""
    import threading

    import ray
    from ray import serve

    from deployments.recall import Args, app_builder
    from kolm_ray.serve.bench import open_loop

    monkeypatch.setenv("KOLM_SIGNING_KEY", recall_artifact.SIGNING_KEY)
    monkeypatch.setenv("KOLM_SERVE_THREADS", "1")
    ray.init(address="local", num_cpus=2, include_dashboard=False)

    @ray.remote(num_cpus=2)
    class Hog:  # holds both CPUs, so the tagger replica (num_cpus=1) cannot be placed until it goes
        def ping(self) -> bool:
            return True

    try:
        hog = Hog.remote()
        ray.get(hog.ping.remote(), timeout=60)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port})
        app = app_builder(Args(artifact=str(tagger_artifact), tenants=str(tenants_file), budget_ms=100))
        # serve.run returns once every deployment is ready: run it aside and look at the route meanwhile.
        deploying = threading.Thread(
            target=serve.run, args=(app,), kwargs={"name": "recall", "route_prefix": "/"}
        )
        deploying.start()
        url = f"http://127.0.0.1:{free_port}/v1/recall/route"
        health = url.replace("/route", "/healthz")
        alpha = {"Authorization": "Bearer key-alpha"}
        with httpx.Client(timeout=10) as c:
            # the proxy answers 404 until the app's route is up; then the ingress answers for itself
            r = _wait_for(  # Serve's proxy answers plain text (404, 503) until the ingress is up
                lambda: (lambda r: r if _is_json(r) and "status" in r.json() else None)(c.get(health)),
                120,
                "the ingress to answer",
            )
            assert r.status_code == 503 and r.json() == {"status": "starting"}
            for query in ("how do i check my balance", "book a flight"):
                body = c.post(url, json={"query": query}, headers=alpha).json()
                # broad before the tagger is even asked: not after waiting out the budget
                assert body == {
                    "mode": "broad",
                    "namespaces": TENANT_NAMESPACES["alpha"],
                    "confidence": 0.0,
                    "fallback": "broad",
                    "reason": "tagger unavailable",
                }
            ray.kill(hog)
            deploying.join(timeout=300)
            assert not deploying.is_alive(), "serve.run did not finish"
            r = _wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(c.get(health)), 30, "ready")
            assert r.json() == {"status": "ok"}

            assert c.post(url, json={"query": "hi"}).status_code == 401
            assert (
                c.post(url, json={"query": "hi"}, headers={"Authorization": "Bearer nope"}).status_code == 401
            )
            r = c.post(url, content=b"{oops", headers=alpha)
            assert r.status_code == 422 and "not JSON" in r.json()["error"]
            r = c.post(url, json={"query": ""}, headers=alpha)
            assert r.status_code == 422 and "empty" in r.json()["error"]
            r = c.post(url, json={"query": "x" * 5000}, headers=alpha)
            assert r.status_code == 422 and "longer than" in r.json()["error"]
            assert c.get(url, headers=alpha).status_code == 405
            # Training phrases the tagger was compiled on: narrow, and the right namespace, for both tenants.
            for key, query, want in (
                ("key-alpha", "how do i check my balance", "banking"),
                ("key-alpha", "can you find a flight for me", "travel"),
                ("key-beta", "tell me about the song", "music"),
                ("key-beta", "what is the best recipe for this weekend", "kitchen"),
            ):
                body = c.post(url, json={"query": query}, headers={"Authorization": f"Bearer {key}"}).json()
                assert body["mode"] == "narrow" and body["namespace"] == want, (query, body)
            # Phrases it was never compiled on (other frames, same topics): never a wrong narrow answer, and
            # at least half narrow and right (a tagger that learned nothing, or a route that mixed up the
            # answers of concurrent queries, fails here; the training phrases alone could be memorised)
            beta = {"Authorization": "Bearer key-beta"}
            right = 0
            for query, want in recall_artifact.HELD_OUT:
                key = alpha if want in TENANT_NAMESPACES["alpha"] else beta
                body = c.post(url, json={"query": query}, headers=key).json()
                assert body["mode"] == "broad" or body["namespace"] == want, (query, body)
                right += body["mode"] == "narrow"
            assert right >= 2, right
            # A namespace outside the tenant is never answered: alpha asking about music gets its own.
            body = c.post(url, json={"query": "tell me about the song"}, headers=alpha).json()
            assert body.get("namespace", "banking") in TENANT_NAMESPACES["alpha"]
            if body["mode"] == "broad":
                assert body["namespaces"] == TENANT_NAMESPACES["alpha"]

        def kill_tagger() -> str:
            actors = [
                a for a in ray.util.list_named_actors(all_namespaces=True) if "NamespaceTagger" in a["name"]
            ]
            assert actors, "no NamespaceTagger replica found"
            for a in actors:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            return actors[0]["name"]

        async def load_with_kill():
            async with httpx.AsyncClient(timeout=10) as client:

                async def send(query):
                    r = await client.post(url, json={"query": query}, headers=alpha)
                    return r.status_code, r.json()

                async def watch_health():
                    while True:
                        seen_health.add((await client.get(health)).json()["status"])
                        await asyncio.sleep(0.1)

                loop = asyncio.get_running_loop()
                killer = loop.call_later(3.0, lambda: loop.run_in_executor(None, kill_tagger))
                watcher = asyncio.create_task(watch_health())
                try:
                    return await open_loop(
                        send, [r["input"] for r in recall_artifact.pairs()[:20]], 20, 10.0, 0.0
                    )
                finally:
                    killer.cancel()
                    watcher.cancel()

        seen_health: set[str] = set()

        summary = asyncio.run(load_with_kill())
        assert summary["errors"] == 0, summary["error_kinds"]  # no 5xx, no connection errors
        assert summary["sent"] > 100
        reasons = " ".join(summary["fallback_reasons"])
        assert "unavailable" in reasons or "budget" in reasons, summary  # broad while the tagger was down

        with httpx.Client(timeout=10) as c:  # recovery: Serve replaces the replica; tagger answers return
            _wait_for(
                lambda: "reason" not in c.post(url, json={"query": "book a flight"}, headers=alpha).json(),
                180,
                "the replacement tagger replica",
                step=0.5,
            )
            assert c.get(health).json() == {"status": "ok"}
        assert "degraded" in seen_health, seen_health  # healthz said so while no tagger was ready
    finally:
        serve.shutdown()
        ray.shutdown()


# --- kolm serve, as a subprocess (what only a subprocess shows: signals and exit codes) ---------------------


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kolm_serve_runs_the_yaml_and_stops_cleanly_on_sigterm(
    tagger_artifact, tenants_file, tmp_path, free_port
):
    config = yaml.safe_load((REPO / "deployments" / "recall.yaml").read_text())
    config["http_options"]["port"] = free_port
    config["applications"][0]["args"].update(artifact=str(tagger_artifact), tenants=str(tenants_file))
    path = tmp_path / "recall.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "KOLM_SIGNING_KEY": recall_artifact.SIGNING_KEY, "KOLM_SERVE_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.cli", "serve", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{free_port}/v1/recall/route"
        _wait_for(  # Serve's proxy answers plain text (404, 503) until the app's route is up
            lambda: (
                _is_json(r := httpx.get(url.replace("/route", "/healthz"), timeout=5))
                and r.json() == {"status": "ok"}
            ),
            240,
            "kolm serve to report a ready tagger",
            step=1.0,
        )
        body = httpx.post(
            url,
            json={"query": "tell me about the song"},
            headers={"Authorization": "Bearer key-beta"},
            timeout=5,
        ).json()
        assert body["mode"] == "narrow" and body["namespace"] == "music", body
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        assert rc == 0, proc.stderr.read().decode()[-3000:]
        assert not _port_open(free_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
