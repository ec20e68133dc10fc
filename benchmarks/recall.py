"""Recall router benchmark: what each inference form costs, what Serve costs, which Serve settings hold the budget.

    .venv/bin/python benchmarks/recall.py       # the CLINC150 tagger benchmarks/compile_tagger.py kept
    .venv/bin/python benchmarks/recall.py --artifact demo-out/namespace-tagger.kolm --rates 25,50,100 \\
        --duration 15 --serve-configs python-proxy,haproxy,haproxy+throughput,python-proxy+throughput

Phases, in one run (same machine, same artifact, same queries):
1. forms:        the tagger's inference forms side by side (kolm_ray.inference.fastpath), batch 1 and 8, 1 and 2 threads
2. in-process:   the router + served form called directly, no Serve, open-loop at each rate (the baseline)
3. calibration:  reliability diagram of the served form on held-out queries (CLINC150 test for a CLINC
                 tagger, fresh stand-in workload queries for the demo's), out-of-scope share routed broad
                 (benchmarks/recall_calibration.py, which also draws every phase's held-out queries)
4. serve:        `deployments/recall.py` on Ray Serve under each setting (each in a fresh process), loaded
                 by wrk (benchmarks/wrk_load.py: Poisson arrivals, a different held-out query per request):
                 the cascade (the artifact's student in the ingress, escalations batched to the tagger),
                 then, as baselines in the same run, the teacher-only ingress (every query to the tagger)
                 and the cascade with one tagger call per escalated query (KOLM_SERVE_BATCH=0)
5. load step:    first in the cascade's session, while one tagger replica runs: 20 s at 50 rps, then 400 rps,
                 latency per second beside the replicas Serve's controller reports (benchmarks/recall_hotpath.py)
6. py-spy:       last in the cascade's session: where each replica's CPU goes, by phase, at --profile-rate
Phases 2 and 4 also record each rate's CPU milliseconds per request by process role (psutil: tagger
replicas, ingress, HAProxy, the load generator, everything else) and how many cores were busy.
Writes OUT/recall.json (its "summary" says which target was met or missed, and where the time goes for a miss),
recall-latency.png, recall-step.png, recall-reliability.png; the committed run:
    benchmarks/recall.py --artifact ARTIFACT --skip-forms --rates 50,100,150,200,300,400 --duration 8 \
        --out benchmarks/results/hotpath
Targets (2 cores, minilm-l6 tagger, issue 18): p50 <= 10 ms and p99 <= 30 ms at 50 rps; the highest rate with
p99 <= 100 ms and <= 1% over budget >= 400 rps; the load step adds the second replica while the budget holds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "TOKENIZERS_PARALLELISM": "false"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)

import recall_hotpath  # noqa: E402  (benchmarks/recall_hotpath.py: the load step, py-spy by phase)
import wrk_load  # noqa: E402  (benchmarks/wrk_load.py, next to this file)
from recall_calibration import held_out_queries, phase_calibration, plot_reliability  # noqa: E402  (phase 3)

from kolm_ray.inference.fastpath import BACKENDS, PROBES, EncoderParts, build_fast_tagger, measure_backends  # noqa: E402
from kolm_ray.serve import bench  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
KEY = "bench-all-key"  # the one tenant of bench_tenants(): every namespace of the artifact

# Serve settings compared (environment of the Ray processes: proxy, controller, replicas).
# With HAProxy, a stopping ingress replica stays reachable for the draining period (Serve's default 30 s, so
# every node's HAProxy can reload without it): 2 s here, as `kolm serve` sets it for the one-node Ray it starts.
_DRAIN = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
SERVE_CONFIGS: dict[str, dict[str, str]] = {
    "python-proxy": {},  # Serve's defaults: Python HTTP proxy actor -> ingress replica -> tagger replica
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", **_DRAIN},  # HAProxy (C) straight to the ingress replica
    "haproxy+throughput": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", **_DRAIN},
    "python-proxy+throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_tenants(labels: list[str], directory: Path) -> Path:
    """A tenants file whose one tenant (bearer KEY) may see every namespace the artifact knows."""
    import hashlib

    import yaml

    path = directory / "bench-tenants.yaml"
    tenant = {"key_sha256": hashlib.sha256(KEY.encode()).hexdigest(), "namespaces": list(labels)}
    path.write_text(yaml.safe_dump({"tenants": {"bench": tenant}}))
    return path


# --- phases ------------------------------------------------------------------------------------------------


def phase_forms(parts: EncoderParts, with_compile: bool) -> list[dict[str, Any]]:
    """Each form at 1 and 2 threads; agreement with torch-eager judged on 300 held-out queries too."""
    backends = [b for b in BACKENDS if with_compile or b != "torch-compile"]
    held_out, _, _, _ = held_out_queries(parts.labels, 300, seed=3)
    probes = list(PROBES) + held_out
    rows = []
    for threads in (1, 2):
        print(
            f"[forms] {threads} thread(s): {', '.join(backends)}; agreement on {len(probes)} queries",
            flush=True,
        )
        for r in measure_backends(
            parts, backends, threads=threads, probes=probes, batch_sizes=(1, 8, 16), repeat=40
        ):
            rows.append(r)
            print(
                f"  {r['backend']:>16} agrees={r.get('agrees')} ms={r.get('ms')} {r.get('error', '')}",
                flush=True,
            )
    return rows


def phase_in_process(fast, rates, duration, queries, tenants_path) -> list[dict[str, Any]]:
    """The router and the served form in this process: no HTTP, no Serve, no batching."""
    from kolm_ray.serve.router import Router, load_tenants

    router = Router(load_tenants(tenants_path), budget_ms=100)

    async def tag(query, namespaces):
        return (await asyncio.to_thread(fast.score, [query], [namespaces]))[0]

    async def send(query):
        return await router.route(f"Bearer {KEY}", json.dumps({"query": query}).encode(), tag)

    print(f"[in-process] backend={fast.backend}", flush=True)
    return asyncio.run(bench.run_rates(send, rates, duration, queries, warmup=2.0, meter=cpu_meter({})))


def cpu_meter(roles: dict[str, str]):
    """A bench.Meter: CPU milliseconds per request of each process on this machine during a rate, by role.

    roles: substring of a process's command line -> role ("NamespaceTagger" -> "tagger replicas"); this
    process is "load generator", its parent "benchmark driver", everything else "other".
    """
    import psutil

    me, parent = os.getpid(), os.getppid()

    def role(p) -> str:
        if p.pid == me:
            return "load generator"
        if p.pid == parent:
            return "benchmark driver"
        cmd = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
        return next((r for key, r in roles.items() if key in cmd), "other")

    def snapshot() -> dict[int, tuple[str, float]]:
        out = {}
        for p in psutil.process_iter(["cmdline", "name"]):
            try:
                t = p.cpu_times()
                out[p.pid] = (role(p), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def start():
        before, t0 = snapshot(), time.perf_counter()

        def finish(requests: float) -> dict[str, Any]:
            after, wall = snapshot(), time.perf_counter() - t0
            per_role: dict[str, float] = {}
            for pid, (name, cpu) in after.items():
                per_role[name] = per_role.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
            n = max(requests, 1.0)
            return {
                "cpu_ms_per_request": {k: round(v * 1e3 / n, 2) for k, v in sorted(per_role.items())},
                "cpu_cores_busy": round(sum(per_role.values()) / wall, 2),
            }

        return finish

    return start


SERVE_ROLES = {"NamespaceTagger": "tagger replicas", "RecallIngress": "ingress", "haproxy": "haproxy"}


def phase_serve(
    name, env, artifact, tenants_path, rates, duration, queries, tagger_options, use_student=True,
    step=None, profile_rate=None,
) -> dict[str, Any]:  # fmt: skip
    """Start a local Ray with `env`, run the recall app, load it at each rate, tear everything down."""
    import ray
    from ray import serve

    from deployments.recall import Args, NamespaceTagger, RecallIngress, _resolve

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(free_port())  # never the shared default 8500
    port = free_port()
    print(f"[serve:{name}] env={env} port={port}", flush=True)
    t0 = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = Args(artifact=artifact, tenants=tenants_path)
        tagger = NamespaceTagger.options(**tagger_options).bind(_resolve(args.artifact)) if tagger_options else \
            NamespaceTagger.bind(_resolve(args.artifact))  # fmt: skip
        app = RecallIngress.bind(
            tagger,
            _resolve(args.tenants),
            args.threshold,
            args.budget_ms,
            _resolve(args.artifact),
            use_student,
        )
        serve.run(app, name="recall", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_until_tagger_answers(url))
        startup_s = round(time.time() - t0, 1)
        print(f"  ready in {startup_s} s", flush=True)
        out: dict[str, Any] = {"env": env, "tagger_options": tagger_options, "startup_s": startup_s,
                               "use_student": use_student, "load_generator": "wrk", "backend": _served_backend()}  # fmt: skip
        if step:  # first, while one tagger replica runs: the autoscaler's reaction is the point
            out["step"] = recall_hotpath.phase_step(url, KEY, queries, step["phases"], step["connections"])
        if rates:
            meter = recall_hotpath.with_replicas(cpu_meter(SERVE_ROLES))
            rows = wrk_load.run_rates(url, KEY, queries, rates, duration, warmup=3.0, meter=meter)
            out.update(rates=rows, max_rps_p99_within_budget=wrk_load.max_rate_within(rows))
        if profile_rate:
            out["where_the_time_goes"] = recall_hotpath.profile(url, KEY, queries, profile_rate, duration)
        return out
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve_in_subprocess(
    name: str, artifact: str, tenants: str, args, queries: list[str], use_student: bool = True,
    rates: str | None = None, step: dict | None = None, profile_rate: float | None = None, env: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    import subprocess

    with tempfile.TemporaryDirectory(prefix="kolm-bench-serve-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"name": name, "artifact": artifact, "tenants": tenants,
                                    "rates": args.rates if rates is None else rates,
                                    "duration": args.duration, "queries": queries,
                                    "tagger_options": json.loads(args.tagger_options),
                                    "use_student": use_student, "step": step,
                                    "profile_rate": profile_rate,
                                    "env": {**dict(x.split("=", 1) for x in args.serve_env.split(",") if x),
                                            **(env or {})}}))  # fmt: skip
        done = subprocess.run([sys.executable, __file__, "--serve-phase", str(spec)], check=False)
        out = spec.with_suffix(".out.json")
        if (
            done.returncode != 0 or not out.exists()
        ):  # one setting failing is a result, not the end of the run
            print(f"[serve:{name}] failed (exit {done.returncode})", flush=True)
            return {"error": f"the serve phase exited {done.returncode}"}
        return json.loads(out.read_text())


def _serve_phase_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    res = phase_serve(spec["name"], {**SERVE_CONFIGS[spec["name"]], **spec["env"]}, spec["artifact"], spec["tenants"],
                      bench.parse_rates(spec["rates"]) if spec["rates"] else [], spec["duration"], spec["queries"],
                      spec["tagger_options"], spec["use_student"], spec["step"], spec["profile_rate"])  # fmt: skip
    Path(spec_path).with_suffix(".out.json").write_text(json.dumps(res, default=str))
    return 0


def _served_backend() -> str | None:
    from ray import serve

    try:
        handle = serve.get_deployment_handle("NamespaceTagger", app_name="recall")
        return handle.info.remote().result(timeout_s=10)["backend"]
    except Exception:
        return None


async def _until_tagger_answers(url: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as c:
        while time.monotonic() < deadline:
            try:
                r = await c.post(
                    url + bench.ROUTE, json={"query": "warm up"}, headers={"Authorization": f"Bearer {KEY}"}
                )
                if r.status_code == 200 and "reason" not in r.json():
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the router never answered from the tagger")


def _parse_step(text: str) -> dict[str, Any] | None:
    """--step "20:50,40:400" -> {"phases": [(20, 50), (40, 400)], "connections": enough for the top rate}."""
    if not text:
        return None
    phases = [(float(a), float(b)) for a, b in (x.split(":") for x in text.split(",") if x)]
    return {
        "phases": phases,
        "connections": max(1, round(max(r for _, r in phases) / wrk_load.PER_CONNECTION_RPS)),
    }


def student_share(predictor, queries: list[str], gold: list[str]) -> dict[str, Any]:
    """What the ingress's first stage does on these queries (the bench tenant may see every namespace):
    the share it answers, how often those answers are right, and its CPU time per query."""
    student = getattr(predictor, "student", None)
    if student is None:
        return {"used": False, "manifest": predictor.manifest.get("metrics", {}).get("student")}
    t0 = time.perf_counter()
    answers = [student.sure(q, student.labels) for q in queries]
    ms = (time.perf_counter() - t0) * 1000 / max(len(queries), 1)
    taken = [(a, g) for a, g in zip(answers, gold or [None] * len(answers), strict=True) if a is not None]
    out: dict[str, Any] = {
        "used": True,
        "threshold": student.threshold,
        "share": len(taken) / max(len(queries), 1),
        "ms_per_query": round(ms, 4),
    }
    if gold:
        out["right_when_answered"] = sum(a["namespace"] == g for a, g in taken) / max(len(taken), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="bench-out/clinc-domains.kolm")
    ap.add_argument("--rates", default="50,100,200,300,400,500,600")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate")
    ap.add_argument("--serve-configs", default="haproxy+throughput")
    ap.add_argument(
        "--ingress",
        default="cascade,teacher-only,cascade-unbatched",
        help="cascade: the student in the ingress, escalations batched to the tagger; teacher-only: every query "
        "to the tagger; cascade-unbatched: one tagger call per escalated query",
    )
    ap.add_argument("--baseline-rates", default="50,100,150,200", help="the comparisons' rates")
    ap.add_argument("--step", default="20:50,40:400", help="the load step, SECONDS:RPS,... ('' for none)")
    ap.add_argument("--profile-rate", type=float, default=200.0, help="py-spy run at this rate (0: none)")
    ap.add_argument("--in-process-rates", default="50,100,200", help="the no-Serve baseline's rates")
    ap.add_argument("--tagger-options", default="{}", help="JSON overrides for NamespaceTagger.options()")
    ap.add_argument("--serve-env", default="", help="KEY=VALUE,... added to the Ray processes' environment")
    ap.add_argument("--calibration-n", type=int, default=1500)
    ap.add_argument("--with-compile", action="store_true", help="also time torch.compile (about a minute)")
    ap.add_argument("--skip-forms", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    from kolm_ray.inference.predictors import open_predictor

    artifact = str(Path(args.artifact).resolve())
    rates = bench.parse_rates(args.rates)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_start": os.getloadavg(),
        },
        "artifact": artifact,
        # which student code read the artifact's student (it changes with the student's format)
        "student_py_sha256": hashlib.sha256((REPO / "kolm_ray" / "student.py").read_bytes()).hexdigest(),
        "rates": rates,
        "duration_s": args.duration,
        "targets": recall_hotpath.TARGETS,
    }
    predictor = open_predictor(artifact, device="cpu")
    result["manifest"] = {k: predictor.manifest.get(k) for k in ("name", "base", "kind", "metrics")}
    parts = EncoderParts.from_predictor(predictor)
    queries, gold, _, source = held_out_queries(parts.labels, 4500, seed=1)
    queries = queries or list(bench.DEFAULT_QUERIES)
    result["queries"] = {"source": source, "n": len(queries)}
    result["student"] = student_share(predictor, queries, gold)
    tenants = str(bench_tenants(parts.labels, Path(tempfile.mkdtemp(prefix="kolm-bench-recall-"))))
    if not args.skip_forms:
        result["forms"] = phase_forms(parts, args.with_compile)
    fast, served_report = build_fast_tagger(parts, threads=1)
    result["served_form"] = {"backend": fast.backend, "threads": 1, "report": served_report}
    result["cascade_cost"] = recall_hotpath.cascade_cost(
        fast, getattr(predictor, "student", None), queries[:400]
    )
    result["in_process"] = phase_in_process(
        fast, bench.parse_rates(args.in_process_rates), args.duration, queries, tenants
    )
    result["summary_in_process_max_rps"] = bench.max_rate_within(result["in_process"])
    result["calibration"] = phase_calibration(fast, args.calibration_n)
    if "bins" in result["calibration"]:
        plot_reliability(result["calibration"], out / "recall-reliability.png")
    (out / "recall.json").write_text(json.dumps(result, indent=2, default=str))  # kept if a later phase dies
    predictor.close()
    del fast

    result["serve"] = {}
    step = _parse_step(args.step)
    for name in [c for c in args.serve_configs.split(",") if c]:
        for ingress in [c for c in args.ingress.split(",") if c]:
            cascade = ingress == "cascade"
            # Each setting in a fresh process: nothing left by the phases above (torch and ONNX Runtime
            # thread pools) runs beside it. Measured: the same Serve setting in the process that had just run
            # the forms phase gave p50 62-71 ms at 50 rps, in a fresh one 22-24 ms. The cascade's session
            # starts with the load step (one tagger replica, as deployed), then the rates, then py-spy.
            # cascade-unbatched: the same cascade, one tagger call per escalated query (KOLM_SERVE_BATCH=0).
            result["serve"][f"{name}/{ingress}"] = _serve_in_subprocess(
                name, artifact, tenants, args, queries, use_student=ingress.startswith("cascade"),
                rates=args.rates if cascade else args.baseline_rates,
                step=step if cascade else None, profile_rate=args.profile_rate if cascade else None,
                env={"KOLM_SERVE_BATCH": "0"} if ingress == "cascade-unbatched" else None,
            )  # fmt: skip
            (out / "recall.json").write_text(json.dumps(result, indent=2, default=str))

    result["machine"]["load_average_end"] = os.getloadavg()
    result["summary"] = recall_hotpath.summarize(result)
    (out / "recall.json").write_text(json.dumps(result, indent=2, default=str))
    ok = {k: v for k, v in result["serve"].items() if "rates" in v}
    series = {f"serve {k}": v["rates"] for k, v in ok.items()}
    series["in-process (no Serve)"] = result["in_process"]
    bench.plot_latency(series, out / "recall-latency.png", "recall route: latency vs offered load (2 cores)")
    for k, v in result["serve"].items():
        if "step" in v:
            recall_hotpath.plot_step(v["step"], out / "recall-step.png", f"recall route, {k}: load step")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out / 'recall.json'}, recall-latency.png, recall-step.png, recall-reliability.png")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-phase":
        sys.exit(_serve_phase_main(sys.argv[2]))
    sys.exit(main())
