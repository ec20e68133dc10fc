"""The recall route's load step and where its time goes (used by benchmarks/recall.py, inside a Serve session).

phase_step: one wrk run (benchmarks/wrk_load.run_schedule) that offers a low rate, then steps to a high one,
while a thread asks Serve's controller (serve.status()) twice a second how many tagger replicas are running
or starting; latency, outcomes and replicas are put side by side per second.

profile: py-spy samples the ingress and tagger replicas while wrk drives one rate; each sample goes to the
phase of its innermost frame that matches a rule below (so the student's tokenizer call counts as the
student, not as Serve). Only samples of running threads are kept (py-spy without --idle), so the shares read
as shares of each process's CPU time, which psutil measures over the same window.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import capture_profile  # py_spy(): the py-spy binary PyPI installed beside this Python
import psutil
import wrk_load

# (phase, path fragments), innermost matching frame first; the first rule that matches it wins.
INGRESS_RULES = [
    ("student (model2vec tokenize + mean + head)", ("kolm_ray/inference/student.py", "model2vec/", "tokenizers/")),
    ("kolm router (auth, parse, decide)", ("kolm_ray/serve/router.py", "kolm_ray/verifiers", "deployments/recall.py")),
    ("handle call to the tagger (Serve router, gRPC)",
     ("serve/_private/router.py", "serve/_private/request_router", "serve/handle.py", "grpc", "replica_result")),
    ("Serve replica request path (metrics, logging, context)",
     ("serve/_private/replica.py", "serve/_private/metrics", "serve/_private/logging", "serve/_private/utils",
      "serve/_private/http_util", "serve/_private/direct_ingress", "ray/util/metrics", "logging/")),
    ("HTTP (uvicorn, starlette, json)", ("uvicorn/", "starlette/", "h11/", "httptools", "json/")),
    ("asyncio", ("asyncio/", "uvloop/")),
    ("Ray core", ("ray/_private", "ray/_raylet", "ray/actor", "ray/remote_function")),
]  # fmt: skip
TAGGER_RULES = [
    ("ONNX Runtime forward", ("onnxruntime/",)),
    ("tokenize + mask + softmax (kolm_ray.inference.fastpath)", ("kolm_ray/inference/fastpath.py", "tokenizers/", "numpy/")),
    ("Serve replica request path (gRPC, metrics, logging)",
     ("serve/_private/replica.py", "serve/_private/metrics", "serve/_private/logging", "serve/_private/utils",
      "grpc", "ray/util/metrics", "logging/")),
    ("deployment code (deployments/recall.py)", ("deployments/recall.py",)),
    ("asyncio + threads", ("asyncio/", "uvloop/", "concurrent/futures", "threading.py")),
    ("Ray core", ("ray/_private", "ray/_raylet", "ray/actor")),
]  # fmt: skip


# --- the load step -----------------------------------------------------------------------------------------


def phase_step(url: str, key: str, queries: list[str], phases: list[tuple[float, float]], connections: int):
    """Offer phases [(seconds, rps), ...] in one wrk run; latency per second beside the tagger's replicas."""
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            states = tagger_replicas()  # None: a failed poll, a gap in the timeline
            samples.append(
                {"time": time.time(), "replicas": states} if states is not None else {"time": time.time()}
            )
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, name="replica-watch", daemon=True)
    print(f"[step] {phases} on {connections} connections", flush=True)
    watcher.start()
    try:
        start, requests = wrk_load.run_schedule(url, key, queries, phases, connections)
    finally:
        stop.set()
        watcher.join(timeout=5)
    seconds = sum(s for s, _ in phases)
    rows = wrk_load.per_second(requests, seconds)
    for s in samples:
        s["t"] = round(s.pop("time") - start, 2)
    for row in rows:  # the last replica count the controller reported during that second
        seen = [s for s in samples if "replicas" in s and s["t"] < row["t"] + 1]
        row["running_replicas"] = seen[-1]["replicas"].get("RUNNING", 0) if seen else None
        row["replicas"] = seen[-1]["replicas"] if seen else None
    out: dict[str, Any] = {
        "phases": phases,
        "connections": connections,
        "per_second": rows,
        "replicas": samples,
    }
    t0 = 0.0
    for i, (secs, rps) in enumerate(phases):
        inside = [r for r in requests if t0 <= r[0] < t0 + secs]
        out[f"phase_{i}"] = _summary(inside, secs, rps, t0)
        t0 += secs
    more = [s["t"] for s in samples if sum(s.get("replicas", {}).values()) > 1]  # starting or running
    running = [s["t"] for s in samples if s.get("replicas", {}).get("RUNNING", 0) > 1]
    out["second_replica_requested_s"] = more[0] if more else None  # a replica beyond the first exists
    out["second_replica_running_s"] = running[0] if running else None
    out["step_at_s"] = phases[0][0]
    print(
        f"  step: second replica requested at {out['second_replica_requested_s']} s, running at "
        f"{out['second_replica_running_s']} s; after the step: {out['phase_1']}"
        if len(phases) > 1
        else "",
        flush=True,
    )
    return out


def tagger_replicas() -> dict[str, int] | None:
    """The tagger's replicas by state, as Serve's controller reports them now."""
    from ray import serve

    try:
        dep = serve.status().applications["recall"].deployments["NamespaceTagger"]
    except Exception:
        return None
    return {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}


def with_replicas(meter):
    """A cpu_meter that also records the tagger's replicas at the start and the end of each rate."""

    def start():
        before, finish = tagger_replicas(), meter()

        def done(requests: float) -> dict[str, Any]:
            return {**finish(requests), "tagger_replicas": {"start": before, "end": tagger_replicas()}}

        return done

    return start


def _summary(requests: list[tuple[float, float, str]], seconds: float, rps: float, t0: float) -> dict:
    import numpy as np

    lats = np.array([r[1] for r in requests]) if requests else np.array([np.nan])
    kinds = Counter(r[2] for r in requests)
    n = max(len(requests), 1)
    return {
        "from_s": t0, "seconds": seconds, "target_rps": rps, "achieved_rps": round(len(requests) / seconds, 1),
        "p50": round(float(np.percentile(lats, 50)), 2), "p99": round(float(np.percentile(lats, 99)), 2),
        "over_budget_share": round(kinds["over_budget"] / n, 4), "narrow_share": round(kinds["narrow"] / n, 4),
        "unavailable_or_error_share": round((kinds["unavailable"] + kinds["non_200"]) / n, 4),
    }  # fmt: skip


def plot_step(step: dict[str, Any], path: Path, title: str) -> None:
    """Per-second p50/p99 and over-budget share, with running tagger replicas on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = step["per_second"]
    ts = [r["t"] for r in rows]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax.plot(ts, [r["p50"] for r in rows], "-", label="p50")
    ax.plot(ts, [r["p99"] for r in rows], "-", label="p99")
    ax.axhline(100, color="red", linewidth=1, alpha=0.6, label="budget 100 ms")
    ax.axvline(step["step_at_s"], color="k", linewidth=1, alpha=0.4)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms), by send second")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    bx.step(
        ts,
        [r["running_replicas"] or 0 for r in rows],
        where="post",
        color="C2",
        label="tagger replicas running",
    )
    bx.set_ylabel("replicas")
    bx.set_ylim(0, 3)
    bx.set_xlabel("seconds")
    cx = bx.twinx()
    cx.plot(ts, [r["sent"] for r in rows], ":", color="C4", label="requests sent")
    cx.plot(
        ts, [1000 * r["over_budget_share"] for r in rows], "-", color="C3", label="over budget (per mille)"
    )
    cx.set_ylabel("per second")
    handles = bx.get_legend_handles_labels()[0] + cx.get_legend_handles_labels()[0]
    bx.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- where the time goes -----------------------------------------------------------------------------------


def _phase(frames: list[str], rules) -> str:
    for frame in reversed(frames):
        for name, parts in rules:
            if any(p in frame for p in parts):
                return name
    return "other Python (or C with no Python frame)"


def _classify(raw: Path, rules) -> Counter:
    phases: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            phases[_phase(stack.split(";")[1:], rules)] += int(count)
    return phases


def _replicas(role: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica" in cmd and role in cmd:
            out.append(p)
    return out


def profile(url: str, key: str, queries: list[str], rate: float, seconds: float, hz: int = 200) -> dict:
    """py-spy on every ingress and tagger replica while wrk offers `rate` for `seconds`."""
    procs = {"ingress": _replicas("RecallIngress"), "tagger": _replicas("NamespaceTagger")}
    rules = {"ingress": INGRESS_RULES, "tagger": TAGGER_RULES}
    with tempfile.TemporaryDirectory(prefix="kolm-spy-") as tmp:
        spies = []
        for role, ps in procs.items():
            for p in ps:
                raw = Path(tmp) / f"{role}-{p.pid}.txt"
                cmd = [capture_profile.py_spy() or "py-spy", "record", "--pid", str(p.pid), "--duration", str(int(seconds) + 2), "--rate",
                       str(hz), "--format", "raw", "--nonblocking", "-o", str(raw)]  # fmt: skip
                spies.append(
                    (role, p, raw, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                )
        time.sleep(1.0)  # attached before the load starts
        cpu0 = {p.pid: sum(p.cpu_times()[:2]) for _, p, _, _ in spies}
        t0 = time.monotonic()
        row = wrk_load.run_rate(url, key, queries, rate, seconds)
        wall = time.monotonic() - t0
        cpu1 = {p.pid: sum(p.cpu_times()[:2]) for _, p, _, _ in spies}
        out: dict[str, Any] = {
            "method": f"py-spy {hz} Hz (running threads only) on each replica during {seconds:g} s of "
            f"wrk at {rate:g} rps, in a run of its own (the sampler costs CPU: its latencies are not the route's)",
            "wrk": {k: row[k] for k in ("target_rps", "achieved_rps", "p50", "p99", "over_budget_share", "narrow_share")},
        }  # fmt: skip
        n = max(row["requests"], 1)
        for role, p, raw, spy in spies:
            try:
                spy.wait(timeout=60)
            finally:
                if spy.poll() is None:
                    spy.kill()
            if spy.returncode != 0 or not raw.exists():
                out.setdefault("errors", []).append(f"py-spy on {role} {p.pid}: {spy.stderr.read()[-300:]!r}")
                continue
            if os.environ.get("KOLM_BENCH_SPY_DIR"):  # keep the raw stacks to read them (folded format)
                shutil.copy(raw, Path(os.environ["KOLM_BENCH_SPY_DIR"]) / raw.name)
            phases = _classify(raw, rules[role])
            total = max(sum(phases.values()), 1)
            cpu_ms = 1000 * (cpu1[p.pid] - cpu0[p.pid]) / n
            entry = out.setdefault(
                role, {"cpu_ms_per_request": 0.0, "cores": 0.0, "phases_ms_per_request": Counter()}
            )
            entry["cpu_ms_per_request"] = round(entry["cpu_ms_per_request"] + cpu_ms, 3)
            entry["cores"] = round(entry["cores"] + (cpu1[p.pid] - cpu0[p.pid]) / wall, 3)
            for k, v in phases.items():  # the process's measured CPU, split by the sampled shares
                entry["phases_ms_per_request"][k] = round(
                    entry["phases_ms_per_request"][k] + cpu_ms * v / total, 3
                )
    for role in procs:
        if role in out:
            out[role]["phases_ms_per_request"] = dict(out[role]["phases_ms_per_request"].most_common())
    return out


# --- the targets -------------------------------------------------------------------------------------------

# Issue 18 (2 cores, the load generator on the same cores).
TARGETS = {
    "p50_ms_at_50rps": 10.0,
    "p99_ms_at_50rps": 30.0,
    "max_rps_p99_within_budget": 400.0,  # p99 <= 100 ms and <= 1% of answers over budget
    "budget_ms": 100.0,
    "over_budget_share": 0.01,
}
ROLES_OF_THE_ROUTE = ("ingress", "tagger replicas", "haproxy")


def cascade_cost(fast, student, queries: list[str]) -> dict[str, Any]:
    """The cascade's CPU cost per query in this process, one query at a time on one thread: the student on
    every query, the teacher (the served form) on those it is not sure of; and the teacher alone on all."""
    import statistics

    if student is None:
        return {"used": False}
    labels = list(fast.labels)
    fast.score(queries[:8], [labels] * 8)  # warm
    student_ms, teacher_ms, escalated = [], [], []
    for q in queries:
        t0 = time.perf_counter()
        sure = student.sure(q, labels)
        t1 = time.perf_counter()
        fast.score([q], [labels])
        t2 = time.perf_counter()
        student_ms.append((t1 - t0) * 1e3)
        teacher_ms.append((t2 - t1) * 1e3)
        escalated.append(sure is None)
    n = len(queries)
    cascade = [s + (t if e else 0.0) for s, t, e in zip(student_ms, teacher_ms, escalated, strict=True)]
    return {
        "n": n,
        "student_share": round(1 - sum(escalated) / n, 4),
        "student_ms_mean": round(statistics.fmean(student_ms), 4),
        "teacher_ms_mean": round(statistics.fmean(teacher_ms), 3),
        "teacher_ms_mean_on_escalated": round(
            statistics.fmean([t for t, e in zip(teacher_ms, escalated, strict=True) if e] or [0.0]), 3
        ),
        "cascade_ms_mean": round(statistics.fmean(cascade), 3),
        "ratio_teacher_over_cascade": round(
            statistics.fmean(teacher_ms) / max(statistics.fmean(cascade), 1e-9), 2
        ),
    }


def _at(rows: list[dict], rps: float) -> dict | None:
    return next((r for r in rows if r["target_rps"] == rps), None)


def _route_cpu(row: dict | None) -> float | None:
    if not row or "cpu_ms_per_request" not in row:
        return None
    return round(sum(row["cpu_ms_per_request"].get(k, 0.0) for k in ROLES_OF_THE_ROUTE), 2)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Each target met or missed, from the figures of this run; where the time goes for a miss."""
    t = TARGETS
    serve = result.get("serve", {})
    cascade = next((v for k, v in serve.items() if k.endswith("/cascade") and "rates" in v), None)
    teacher = next((v for k, v in serve.items() if k.endswith("/teacher-only") and "rates" in v), None)
    unbatched = next((v for k, v in serve.items() if k.endswith("/cascade-unbatched") and "rates" in v), None)
    out: dict[str, Any] = {
        "targets": t,
        "student": result.get("student"),
        "cascade_cost": result.get("cascade_cost"),
    }
    if cascade is None:
        out["error"] = "no cascade serve run finished"
        return out
    r50 = _at(cascade["rates"], 50.0)
    if r50:
        out["route_at_50rps"] = {
            "p50_ms": r50["p50"], "p99_ms": r50["p99"], "over_budget_share": r50["over_budget_share"],
            "narrow_share": r50["narrow_share"], "achieved_rps": r50["achieved_rps"],
            "met": r50["p50"] <= t["p50_ms_at_50rps"] and r50["p99"] <= t["p99_ms_at_50rps"],
        }  # fmt: skip
    best = cascade.get("max_rps_p99_within_budget")
    out["max_rps_p99_within_budget"] = {
        "cascade": best,
        "teacher_only": teacher.get("max_rps_p99_within_budget") if teacher else None,
        "cascade_unbatched": unbatched.get("max_rps_p99_within_budget") if unbatched else None,
        "in_process_no_serve": result.get("summary_in_process_max_rps"),
        "met": best is not None and best >= t["max_rps_p99_within_budget"],
    }
    out["route_cpu_ms_per_request"] = {  # ingress + tagger replicas + HAProxy, per rate
        "cascade": {r["target_rps"]: _route_cpu(r) for r in cascade["rates"]},
        "teacher_only": {r["target_rps"]: _route_cpu(r) for r in teacher["rates"]} if teacher else None,
        "cascade_unbatched": {r["target_rps"]: _route_cpu(r) for r in unbatched["rates"]}
        if unbatched
        else None,
    }
    out["comparisons_at_50rps"] = {  # the same rate through the other ingresses of this run
        name: {q: r[q] for q in ("p50", "p99", "over_budget_share", "achieved_rps")}
        for name, v in (("teacher_only", teacher), ("cascade_unbatched", unbatched))
        if v and (r := _at(v["rates"], 50.0))
    }
    step = cascade.get("step")
    if step and "phase_1" in step:
        high = step["phase_1"]
        out["load_step"] = {
            "phases": step["phases"], "after_step": high,
            "second_replica_requested_s": step["second_replica_requested_s"],
            "second_replica_running_s": step["second_replica_running_s"], "step_at_s": step["step_at_s"],
            "met": step["second_replica_running_s"] is not None
            and high["over_budget_share"] <= t["over_budget_share"] and high["p99"] <= t["budget_ms"],
        }  # fmt: skip
    missed = [
        k
        for k in ("route_at_50rps", "max_rps_p99_within_budget", "load_step")
        if not out.get(k, {}).get("met")
    ]
    out["missed"] = missed
    if missed:
        out["where_the_time_goes"] = _where(cascade, t["max_rps_p99_within_budget"])
    return out


def _where(cascade: dict[str, Any], rate: float) -> dict[str, Any]:
    """CPU per request by process at the first rate that missed, and how many cores that costs at `rate`."""
    rows = sorted(cascade["rates"], key=lambda r: r["target_rps"])
    best = cascade.get("max_rps_p99_within_budget")
    first_miss = next((r for r in rows if best is None or r["target_rps"] > best), rows[-1])
    cpu = first_miss.get("cpu_ms_per_request", {})
    per_request = sum(cpu.values())
    out = {
        "first_rate_missed": first_miss["target_rps"],
        "its_p99_ms": first_miss["p99"], "its_over_budget_share": first_miss["over_budget_share"],
        "its_achieved_rps": first_miss["achieved_rps"],
        "cpu_ms_per_request_by_process": cpu,
        "cores_busy": first_miss.get("cpu_cores_busy"),
        f"cores_needed_at_{rate:g}_rps_at_this_cost": round(per_request * rate / 1000, 2),
    }  # fmt: skip
    if "where_the_time_goes" in cascade:
        prof = cascade["where_the_time_goes"]
        out["py_spy"] = {k: prof[k] for k in ("wrk", "ingress", "tagger") if k in prof}
    return out
