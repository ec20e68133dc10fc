"""Rent vs buy, switched: capture a CLINC150 intent task, compile it, promote it, replay unseen traffic.

    flock /tmp/kolm-bench.lock .venv/bin/python benchmarks/local.py                  # banking + credit_cards
    .venv/bin/python benchmarks/local.py --domains banking,travel --per-intent 60 --epochs 2

The loop, end to end on 127.0.0.1, each step the user's own command or call:
1. the stand-in upstream (kolm_ray.demo.simulate, 300 ms per call, a typical frontier latency) answers
   {"intent": ...} with the CLINC150 label, behind `kolm capture` (its own process);
2. capture: the OpenAI-format calls of the train split go through the proxy (one system prompt);
3. recipe (recipe_from_observations over the captured namespace) -> `kolm compile --recipe` (Ray Train,
   minilm-l6) -> `kolm models promote`;
4. replay the unseen test split through the same proxy, one call at a time: which calls were answered
   locally, whether each local answer equals the upstream's answer (the label it would have given),
   end-to-end latency; then a sample with `X-Kolm-Local: off` (the upstream path, the baseline);
   the proxy's CPU time (all its threads, /proc) over the local replay, per local answer.
Offline, the same test queries through the promoted artifact (the same Predictor) give the share local and
agreement at other thresholds (the plot's curve). Writes benchmarks/results/local.json and local.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from capture import cpu_seconds, free_port, wait_healthy, wait_live_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("KOLM_CLINC", REPO.parent / "shared" / "datasets" / "clinc150"))
NS = "intents"
SYSTEM = 'Classify the customer\'s message into one intent. Answer only JSON: {"intent": "<intent>"}.'
TARGET = {"local_share": 0.80, "agreement": 0.99, "local_p50_ms": 10.0}
KEY = "sk-bench-local-0123456789abcdef0123"


def load_task(domains: list[str], per_intent: int, seed: int) -> tuple[list, list, dict]:
    """(train [(text, intent)], test [(text, intent)], text -> intent for the upstream)."""
    data = json.loads((DATA / "data_full.json").read_text())
    doms = json.loads((DATA / "domains.json").read_text())
    intents = {i for d in domains for i in doms[d]}
    rng = random.Random(seed)
    train = [(t, i) for t, i in data["train"] + data["val"] if i in intents]
    rng.shuffle(train)
    counts: dict[str, int] = {}
    picked = []
    for t, i in train:
        if counts.get(i, 0) < per_intent:
            picked.append((t, i))
            counts[i] = counts.get(i, 0) + 1
    test = [(t, i) for t, i in data["test"] if i in intents]
    table = {t: i for t, i in data["train"] + data["val"] + data["test"] if i in intents}
    return picked, test, table


def body(text: str) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
    }


async def capture(url: str, texts: list[str], team_key: str, concurrency: int = 64) -> int:
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {KEY}", "X-Kolm-Key": team_key}
    # keepalive_expiry below uvicorn's 5 s idle timeout: a pooled connection is never reused as the server
    # closes it (both at 5 s race, and the client sees a ReadError).
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:

        async def one(t: str) -> int:
            async with sem:
                for attempt in range(3):  # a connection reset is retried, as an SDK would (max_retries)
                    try:
                        r = await c.post(
                            f"{url}/v1/capture/openai/chat/completions", json=body(t), headers=headers
                        )
                        return r.status_code
                    except httpx.TransportError:
                        if attempt == 2:
                            return -1
                        await asyncio.sleep(0.2)
                return -1

        codes = await asyncio.gather(*(one(t) for t in texts))
    return sum(1 for s in codes if s == 200)


def replay(url: str, rows: list[tuple[str, str]], team_key: str, off: bool = False) -> list[dict]:
    headers = {"Authorization": f"Bearer {KEY}", "X-Kolm-Key": team_key}
    if off:
        headers["X-Kolm-Local"] = "off"
    out = []
    with httpx.Client(timeout=60, limits=httpx.Limits(keepalive_expiry=2.0)) as c:
        for text, intent in rows:
            t = time.perf_counter()
            r = c.post(f"{url}/v1/capture/openai/chat/completions", json=body(text), headers=headers)
            ms = (time.perf_counter() - t) * 1000
            answer = (
                json.loads(r.json()["choices"][0]["message"]["content"]) if r.status_code == 200 else None
            )
            out.append({"status": r.status_code, "ms": ms, "served_by": r.headers.get("x-kolm-served-by"),
                        "right": answer == {"intent": intent}})  # fmt: skip
    return out


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 3) if xs else float("nan")


def run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="banking,credit_cards")
    ap.add_argument("--per-intent", type=int, default=120, help="captured calls per intent (train + eval)")
    # The recipe's floor follows label purity (0.95 for these clean labels) and 30 intents from ~100 pairs
    # each land near it; what this benchmark measures is the local share at >= 99% agreement, which the
    # model's confidence threshold sets, so the compile is gated at 0.90 (recorded in the JSON).
    ap.add_argument("--k-floor", type=float, default=0.90)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--upstream-latency-ms", type=float, default=300.0)
    ap.add_argument("--baseline", type=int, default=60, help="replayed calls with X-Kolm-Local: off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    domains = args.domains.split(",")
    train, test, table = load_task(domains, args.per_intent, args.seed)

    from kolm_ray.demo.simulate import start_upstream_in_thread

    up_url, stop_up = start_upstream_in_thread(
        latency_ms=args.upstream_latency_ms, answer=lambda q: json.dumps({"intent": table.get(q, "unknown")})
    )
    work = Path(tempfile.mkdtemp(prefix="kolm-bench-local-"))
    env = {
        **os.environ,
        "KOLM_HOME": str(work / "home"),
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        # /healthz shows the live models only to the admin once keys exist (capture/auth.py is_admin)
        "KOLM_ADMIN_TOKEN": secrets.token_hex(16),
    }
    admin = {"Authorization": f"Bearer {env['KOLM_ADMIN_TOKEN']}"}
    env.pop("KOLM_STORE", None)
    env.pop("RAY_ADDRESS", None)
    store_url = f"sqlite:///{work / 'obs.db'}"
    # the team's capture key, as `kolm keys create --tenant bench --namespace NS` makes it: its calls are
    # trusted training data, and the proxy answers them locally once a model is promoted for NS
    from kolm_ray.observations.keys import create_key
    from kolm_ray.observations.store import open_store

    store = open_store(store_url)
    team_key = create_key(store, "bench", [NS], name="local benchmark")[1]
    store.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", str(port), "--store", store_url,
         "--openai-upstream", up_url, "--anthropic-upstream", up_url],
        env=env, stdout=(work / "proxy.log").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    report: dict = {}
    try:
        wait_healthy(url)
        # 1-2. capture
        t = time.perf_counter()
        ok = asyncio.run(capture(url, [x for x, _ in train], team_key))
        while httpx.get(f"{url}/healthz", headers=admin).json()["pending"]:
            time.sleep(0.2)
        capture_s = time.perf_counter() - t

        # 3. recipe -> compile -> promote
        from kolm_ray.recipe import recipe_from_observations

        t = time.perf_counter()
        store = open_store(store_url)
        observations = [o for batch in store.iter_observations(NS) for o in batch]
        assert all(o.key_id for o in observations), "every captured row carries the team's key"
        store.close()
        os.environ["KOLM_HOME"] = env["KOLM_HOME"]
        info = recipe_from_observations(observations, out_dir=str(work / "recipe"), namespace=NS)
        recipe_s = time.perf_counter() - t
        artifact = work / "intents.kolm"
        t = time.perf_counter()
        run([sys.executable, "-m", "kolm_ray.cli", "compile", "--recipe", info["recipe_dir"], "--output",
             str(artifact), "--epochs", str(args.epochs), "--k-floor", str(args.k_floor)], env, 1800)  # fmt: skip
        compile_s = time.perf_counter() - t
        promoted = run([sys.executable, "-m", "kolm_ray.cli", "models", "promote", str(artifact), "--namespace", NS,
                        "--store", store_url], env, 300).stdout.strip()  # fmt: skip
        wait_live_model(url, NS, admin, 120, work / "proxy.log")

        # 4. replay unseen traffic; the proxy's CPU over the replay
        cpu0, tload = cpu_seconds(proxy.pid), os.getloadavg()
        t = time.perf_counter()
        replayed = replay(url, test, team_key)
        replay_s = time.perf_counter() - t
        cpu = cpu_seconds(proxy.pid) - cpu0
        baseline = replay(url, test[: args.baseline], team_key, off=True)
        time.sleep(1.0)  # shadow calls of the last answers finish
        health = httpx.get(f"{url}/healthz", headers=admin).json()
        local = [r for r in replayed if r["served_by"] == "local"]
        upstream = [r for r in replayed if r["served_by"] == "upstream"]

        # offline: the same queries through the artifact, share local and agreement per threshold
        from kolm_ray.inference.predictors import open_predictor

        with open_predictor(artifact) as p:
            answers = p.predict([x for x, _ in test])
            single = []  # the model alone, one query per call as the proxy runs it
            for x, _ in test[:200]:
                t1 = time.perf_counter()
                p.predict([x])
                single.append((time.perf_counter() - t1) * 1000)
        conf = np.array([a["confidence"] for a in answers])
        right = np.array([a.get("intent") == i for a, (_, i) in zip(answers, test, strict=True)])
        sweep = []
        for th in [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98]:
            m = conf >= th
            sweep.append({"threshold": th, "local_share": round(float(m.mean()), 4),
                          "agreement": round(float(right[m].mean()), 4) if m.any() else None})  # fmt: skip
        from kolm_ray import registry

        store = open_store(store_url)
        row = registry.live_models(store)[NS]
        store.close()
        registered = {**row.public(), "threshold": row.threshold, "request_shape": row.shape}
        local_share = len(local) / len(replayed)
        agreement = sum(r["right"] for r in local) / max(1, len(local))
        local_p50 = pct([r["ms"] for r in local], 50)
        report = {
            "command": "benchmarks/local.py " + " ".join(sys.argv[1:]),
            "task": {
                "dataset": "CLINC150",
                "domains": domains,
                "intents": len({i for _, i in train}),
                "captured": len(train),
                "captured_ok": ok,
                "replayed_unseen": len(test),
                "upstream_latency_ms": args.upstream_latency_ms,
            },  # fmt: skip
            "model": {
                "promoted": promoted,
                "base": "minilm-l6",
                "registry": registered,
                "recipe_k_floor": info["k_floor"],
                "compile_k_floor": args.k_floor,
            },
            "seconds": {
                "capture": round(capture_s, 1),
                "recipe": round(recipe_s, 1),
                "compile": round(compile_s, 1),
                "replay": round(replay_s, 1),
                "total": round(time.perf_counter() - t_start, 1),
            },  # fmt: skip
            "results": {
                "local_share": round(local_share, 4),
                "agreement_local_vs_upstream": round(agreement, 4),
                "local_answers": len(local),
                "upstream_answers": len(upstream),
                "upstream_share_right": round(sum(r["right"] for r in upstream) / max(1, len(upstream)), 4),
                "failed_calls": sum(r["status"] != 200 for r in replayed + baseline),
                "latency_ms": {
                    "local": {
                        "p50": local_p50,
                        "p95": pct([r["ms"] for r in local], 95),
                        "p99": pct([r["ms"] for r in local], 99),
                    },
                    "upstream_in_replay": {
                        "p50": pct([r["ms"] for r in upstream], 50),
                        "p95": pct([r["ms"] for r in upstream], 95),
                    },
                    "baseline_x_kolm_local_off": {
                        "p50": pct([r["ms"] for r in baseline], 50),
                        "p95": pct([r["ms"] for r in baseline], 95),
                    },
                },  # fmt: skip
                "speedup_p50": round(pct([r["ms"] for r in baseline], 50) / local_p50, 1) if local else None,
                "proxy_cpu_ms_per_local_answer": round(cpu * 1000 / max(1, len(local)), 3),
                "model_ms_per_call_offline": {"p50": pct(single, 50), "p95": pct(single, 95)},
                "proxy_cpu_note": "all proxy threads over the whole replay (local answers, the upstream calls "
                "below threshold, 5% shadow calls, the writer), divided by the local answers",
                "shadowed": health["local"]["served"]["shadowed"],
                "threshold_sweep_offline": sweep,
            },
            "targets": TARGET,
            "met": {
                "local_share": local_share >= TARGET["local_share"],
                "agreement": agreement >= TARGET["agreement"],
                "local_p50_ms": local_p50 <= TARGET["local_p50_ms"],
            },  # fmt: skip
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_start": [round(x, 2) for x in load0],
                "loadavg_replay_start": [round(x, 2) for x in tload],
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            },  # fmt: skip
        }
    finally:
        proxy.terminate()
        try:
            proxy.wait(90)
        except subprocess.TimeoutExpired:
            proxy.kill()
        stop_up()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "local.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "local.png")
    print(json.dumps({k: report[k] for k in ("results", "met")}, indent=2))
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report["results"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    sw = [s for s in r["threshold_sweep_offline"] if s["agreement"] is not None]
    a.plot([s["local_share"] for s in sw], [s["agreement"] for s in sw], "o-", label="offline, by threshold")
    for s in sw:
        a.annotate(f"{s['threshold']}", (s["local_share"], s["agreement"]), fontsize=7)
    a.plot(
        [r["local_share"]], [r["agreement_local_vs_upstream"]], "r*", ms=14, label="replay through the proxy"
    )
    a.axhline(TARGET["agreement"], ls="--", c="gray")
    a.axvline(TARGET["local_share"], ls="--", c="gray")
    a.set_xlabel("share of calls answered locally")
    a.set_ylabel("agreement with the upstream")
    a.set_title("CLINC150 intents: local share vs agreement")
    a.legend(fontsize=8)
    lat = r["latency_ms"]
    names = ["local", "upstream_in_replay", "baseline_x_kolm_local_off"]
    b.bar(names, [lat[n]["p50"] for n in names], color=["tab:green", "tab:orange", "tab:gray"])
    b.set_yscale("log")
    b.set_ylabel("end-to-end p50 (ms, log)")
    b.set_title(f"latency through the proxy (upstream {report['task']['upstream_latency_ms']:.0f} ms)")
    b.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
