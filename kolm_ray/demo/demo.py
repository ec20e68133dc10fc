"""`make demo`: the whole loop on the embedded default, start to finish, in phases that read in order.

    python -m kolm_ray.demo.demo [--calls 1600] [--out demo-out] [--verbose]     (make demo [VERBOSE=1])

1. capture   a stand-in frontier API (kolm_ray.demo.simulate) behind `kolm capture` (a real subprocess);
             the official openai SDK sends support queries through the proxy, which records each
             (input, output) as an observation in SQLite.
2. recipe    the namespace's observations -> pairs, inferred schema, verifiers, K-floor (kolm recipe).
3. compile   `kolm compile --recipe` fine-tunes the minilm-l6 tagger on Ray Train, gates it on the
             K-score and signs demo-out/namespace-tagger.kolm.
4. serve     the recall router on Ray Serve (deployments/recall.py with the args of
             deployments/recall.yaml), routes held-out queries as a demo tenant.
5. loop      `kolm loop --once` recompiles the namespace and promotes the model (kolm_ray/demo/demo_loop.py).
6. local     `kolm capture` again: the promoted model answers new calls itself, some shadow-checked.
7. report    `kolm report --html`: spend, savings, live agreement; the page's path.
8. summary   observations captured, recipe, K-score, route accuracy, fallback share, latency, loop, report.

Sent to a file, each phase prints a few lines (no progress bars: those only on a terminal) and Ray's own
logs stay off unless --verbose. Everything runs on 127.0.0.1 and offline. Observations, recipe and artifact
live under --out; the artifact is signed with your usual key ($KOLM_SIGNING_KEY_FILE's Ed25519 key, else
$KOLM_SIGNING_KEY or $KOLM_HOME/signing.key), so that `serve run deployments/recall.yaml` afterwards verifies
and serves the artifact the demo wrote (docs/signing.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from kolm_ray.demo.demo_loop import free_port, run_kolm, wait_http
from kolm_ray.demo.simulate.traffic import DEMO_NAMESPACE  # the observation namespace (the task)
from kolm_ray.placement import progress_bars, quiet_output, verbose

DEMO_TENANT_KEY = "demo-all-key"  # the demo tenant in configs/tenants.yaml authorized for every namespace
REPO = Path(__file__).resolve().parents[2]


def _step(n: int, title: str) -> float:
    print(f"\n== {n}. {title}", flush=True)
    return time.perf_counter()


DEMO_TEAM = "demo-team"  # the simulated team's tenant: its capture key says so, not a header


def issue_key(store_url: str) -> str:
    """What a platform team does first: `kolm keys create --tenant demo-team --namespace support-router`.
    The key (shown once) is what the team's SDK sends as X-Kolm-Key; the store keeps only its hash."""
    from kolm_ray.observations.keys import create_key
    from kolm_ray.observations.store import open_store

    with open_store(store_url) as store:
        row, key = create_key(store, DEMO_TEAM, [DEMO_NAMESPACE], name="make demo")
    print(f"$ kolm keys create --tenant {DEMO_TEAM} --namespace {DEMO_NAMESPACE}  ->  {row.id} (kolm-sk-...)")
    return key


def capture(out: Path, calls: int, store_url: str, key: str | None = None) -> dict:
    """Phase 1: the stand-in upstream, the capture proxy as a subprocess, the openai SDK as the client
    (with the team's capture key, `key`, as X-Kolm-Key beside its own provider key)."""
    from kolm_ray.demo.simulate import generate_workload, send_traffic, start_upstream_in_thread

    upstream_url, stop_upstream = start_upstream_in_thread(latency_ms=5)
    port = free_port()
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kolm_ray.cli",
            "capture",
            "--port",
            str(port),
            "--store",
            store_url,
            "--openai-upstream",
            upstream_url,
            "--anthropic-upstream",
            upstream_url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(out / "capture.log", "w"),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/v1/bridges/namespaces", proxy)
        served = send_traffic(
            base, generate_workload(calls, seed=0), DEMO_NAMESPACE, 16, progress_bars(), key=key
        )
        answered = len(served)
    finally:
        proxy.send_signal(signal.SIGTERM)  # the proxy drains its write queue before it exits
        proxy.wait(timeout=60)
        stop_upstream()
    from kolm_ray.observations.store import open_store

    store = open_store(store_url)
    stored = store.count(DEMO_NAMESPACE)
    store.close()
    print(f"answered {answered} calls, stored {stored} observations in namespace {DEMO_NAMESPACE!r}")
    return {"answered": answered, "stored": stored}


def recipe(out: Path, store_url: str) -> dict:
    """Phase 2: observations -> recipe dir (what `kolm recipe --namespace support-router` does)."""
    from kolm_ray.observations.store import open_store
    from kolm_ray.recipe import recipe_from_observations

    store = open_store(store_url)
    observations = [o for batch in store.iter_observations(DEMO_NAMESPACE) for o in batch]
    store.close()
    result = recipe_from_observations(observations, out_dir=str(out / "recipe"))
    print(json.dumps({k: result[k] for k in ("recipe_dir", "pairs_jsonl", "spec_json", "k_floor")}, indent=2))
    return result


def compile_tagger(out: Path, recipe_dir: str) -> dict:
    """Phase 3: `kolm compile --recipe DIR` as a user runs it (Ray Train, K-score gate, signing)."""
    artifact = out / "namespace-tagger.kolm"
    print("$ kolm compile --recipe", recipe_dir, "--output", artifact, flush=True)
    proc = run_kolm(["compile", "--recipe", recipe_dir, "--output", str(artifact)])
    if proc.returncode != 0:
        raise SystemExit(f"compile failed with exit code {proc.returncode}")
    from kolm_ray.artifact import open_artifact

    manifest = open_artifact(artifact).manifest
    return {
        "artifact": str(artifact),
        "k_score": manifest["metrics"]["k_score"],
        "metrics": manifest["metrics"],
    }


def serve_and_route(out: Path, artifact: str, queries: int) -> dict:
    """Phase 4: the recall router on Ray Serve, held-out queries routed as the demo tenant."""
    import httpx
    import numpy as np
    import ray
    from ray import serve

    from deployments.recall import app_builder
    from kolm_ray.demo.simulate import generate_workload
    from kolm_ray.serve.router import fast_serve_env

    port = free_port()
    if not os.environ.get("RAY_ADDRESS"):
        fast_serve_env()  # HAProxy + throughput-optimized Serve, as `kolm serve` starts it
    quiet = {} if verbose() else {"logging_config": ray.LoggingConfig(log_level="ERROR")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **quiet)
    if not verbose():  # Serve's own INFO lines (`Started Serve in namespace ...`) are a log, not the demo
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            app_builder({"artifact": artifact, "tenants": str(REPO / "configs/tenants.yaml")}),
            name="recall",
            route_prefix="/",
        )
        url = f"http://127.0.0.1:{port}/v1/recall/route"
        held_out = generate_workload(queries, seed=12345, noise=0.0)
        headers = {"Authorization": f"Bearer {DEMO_TENANT_KEY}"}
        latencies, narrow, right = [], 0, 0
        with httpx.Client(timeout=10) as client:
            for item in held_out[:20]:  # warm-up: first requests pay for connection set-up
                client.post(url, json={"query": item.query}, headers=headers)
            for item in held_out:
                t0 = time.perf_counter()
                r = client.post(url, json={"query": item.query}, headers=headers)
                latencies.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                body = r.json()
                if body["mode"] == "narrow":
                    narrow += 1
                    right += body["namespace"] == item.namespace
    finally:
        serve.shutdown()
        ray.shutdown()
    lat = np.array(latencies)
    return {
        "queries": len(held_out),
        "narrow_accuracy": right / max(narrow, 1),
        "fallback_share": 1 - narrow / len(held_out),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kolm_ray.demo.demo", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1600, help="support queries sent through the proxy")
    p.add_argument("--route-queries", type=int, default=400, help="held-out queries routed through Serve")
    p.add_argument("--local-calls", type=int, default=300, help="new calls sent once the loop promoted")
    p.add_argument("--out", default="demo-out", help="where the demo keeps everything (wiped first)")
    p.add_argument("--verbose", action="store_true", help="Ray's own logs too (KOLM_VERBOSE=1 does the same)")
    args = p.parse_args(argv)
    if args.verbose:
        os.environ["KOLM_VERBOSE"] = "1"
    quiet_output()  # progress bars only on a terminal, Ray's chatter off unless --verbose; children follow

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store_url = f"sqlite:///{out / 'observations.db'}"
    t_all = time.perf_counter()

    # The proxy, the loop and the report below run with an admin token, as in production (a capture key
    # exists, so /healthz's model list and the whole bridge need it).
    os.environ.setdefault("KOLM_ADMIN_TOKEN", secrets.token_urlsafe(24))
    t = _step(1, "capture: openai SDK -> kolm capture -> stand-in frontier API")
    key = issue_key(store_url)
    cap = capture(out, args.calls, store_url, key)
    cap["seconds"] = time.perf_counter() - t

    t = _step(2, "recipe: observations -> pairs, schema, verifiers, K-floor")
    rec = recipe(out, store_url)
    rec["seconds"] = time.perf_counter() - t

    t = _step(3, "compile: Ray Train fine-tune of minilm-l6, K-score gate, signed .kolm")
    comp = compile_tagger(out, rec["recipe_dir"])
    comp["seconds"] = time.perf_counter() - t

    t = _step(4, "serve: recall router on Ray Serve, held-out queries")
    route = serve_and_route(out, comp["artifact"], args.route_queries)
    route["seconds"] = time.perf_counter() - t

    from kolm_ray.demo import demo_loop

    t = _step(5, "loop: kolm loop --once -> recipe, Ray Train compile, held-out comparison, promotion")
    looped = demo_loop.loop_phase(store_url)
    looped["seconds"] = time.perf_counter() - t

    t = _step(6, "local answers: kolm capture answers new calls with the promoted model")
    local = demo_loop.local_phase(out, store_url, DEMO_NAMESPACE, args.local_calls, key=key)
    local["seconds"] = time.perf_counter() - t

    from kolm_ray.demo import demo_extract  # the second namespace: extraction traffic (issue 27)

    t = _step(6, "local answers, second namespace: orders -> recipe -> minilm-l6 extractor -> promote")
    orders = demo_extract.extract_phase(out, store_url)
    orders["seconds"] = time.perf_counter() - t

    t = _step(7, "report: spend, savings, live agreement")
    report = demo_loop.report_phase(out, store_url)
    report["seconds"] = time.perf_counter() - t

    summary = {
        "capture": cap,
        "recipe": {k: rec[k] for k in ("recipe_dir", "k_floor", "seconds")},
        "compile": {k: comp[k] for k in ("artifact", "k_score", "seconds")},
        "route": route,
        "loop": looped,
        "local": local,
        "orders_extractor": orders,
        "report": report,
        "total_seconds": time.perf_counter() - t_all,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print("\n== 8. summary")
    print(f"  observations captured  {cap['stored']} of {cap['answered']} answered calls")
    print(f"  recipe                 {rec['recipe_dir']}  (k_floor {rec['k_floor']:.2f})")
    print(
        f"  compiled               {comp['artifact']}  (k_score {comp['k_score']:.3f}, signature hmac-sha256)"
    )
    print(
        f"  route accuracy         {route['narrow_accuracy']:.3f} on narrow answers, "
        f"fallback (broad) {route['fallback_share']:.1%} of {route['queries']} held-out queries"
    )
    print(
        f"  route latency          p50 {route['p50_ms']:.1f} ms, p99 {route['p99_ms']:.1f} ms (sequential, via Serve)"
    )
    print(f"  loop                   {'; '.join(looped['lines'])}")
    print(f"  local answers          {local['local']} of {local['calls']} new calls, by {local['model']}")
    print(
        f"  extraction namespace   {orders['local']} of {orders['calls']} order messages answered locally by "
        f"{orders['model']} ({orders['right']} right, k_score {orders['k_score']:.2f})"
    )
    ns = next(n for n in report["namespaces"] if n["name"] == DEMO_NAMESPACE)
    print(
        f"  spend / saved          ${ns['spend_usd']:.4f} upstream, ${ns['saved_usd']:.4f} saved (gpt-4o-mini prices)"
    )
    print(f"  report                 {report['html']}")
    print(f"  total                  {summary['total_seconds']:.0f} s; summary in {out / 'summary.json'}")
    print(
        "\nnext: serve run deployments/recall.yaml   (then POST /v1/recall/route with 'Bearer demo-acme-key')"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
