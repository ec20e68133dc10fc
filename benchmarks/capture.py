"""Capture proxy overhead, driven by `hey` (compiled) at fixed rates: direct vs proxied, same run.

    flock /tmp/kolm-bench.lock .venv/bin/python benchmarks/capture.py                 # the full run
    .venv/bin/python benchmarks/capture.py --duration 10 --soak-s 120 --ramp 600,800,1000

Three processes on 127.0.0.1: the stand-in upstream (`python -m kolm_ray.demo.simulate upstream`, 20 ms
per answer), the proxy (`kolm capture`, one uvicorn worker) and `hey` (Go: the load generator is
never the bottleneck, unlike the Python one this replaces). For each rate in --rps: `hey` straight to
the upstream, then through the proxy, 16 connections, the same body; added latency = proxied
percentile - direct percentile. Then --ramp: proxied only, 64 connections, rising rates; a rate is
"all stored" when hey achieved >= 95% of it with only 200s and the store holds one row per 200 (each
phase has its own X-Kolm-Namespace; counted after /healthz shows nothing pending). Then a soak at
--soak-rps for --soak-s seconds, sampling the proxy's RSS. Every proxied run records CPU per request
of the proxy, hey and the upstream, and how long the proxy's event loop waited for a core; a py-spy
run at the target rate (benchmarks/capture_profile.py) splits the proxy's time into phases per thread:
"where_the_time_goes" in benchmarks/results/capture.json (+ .png).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import capture_profile  # benchmarks/, next to this script
import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TARGET = {"rate": 200, "added_p50_ms": 2.0, "added_p99_ms": 10.0, "all_stored_rps": 1000}
BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Route the request to a team. Answer JSON."},
        {
            "role": "user",
            "content": "the ingest worker is stuck again after the deploy, how do I restart it?",
        },
    ],
    "max_tokens": 20,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60, pending_zero: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=2)
            if r.status_code == 200 and (not pending_zero or r.json().get("pending", 0) == 0):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy")


def wait_live_model(url: str, namespace: str, headers: dict, timeout: float, log: Path | str) -> None:
    """Until the proxy serves a live model for `namespace` (its admin /healthz); SystemExit naming `log` if not."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/healthz", headers=headers).json()
        if namespace in health.get("local", {}).get("models", {}):
            return
        if time.monotonic() >= deadline:
            raise SystemExit(
                f"the proxy did not load the promoted model for {namespace} within {timeout:g} s: {log}"
            )
        time.sleep(0.2)


def start(tmp: Path, latency_ms: float) -> tuple[subprocess.Popen, subprocess.Popen, str, str, Path]:
    env = {**os.environ, "KOLM_HOME": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("KOLM_ADMIN_TOKEN", None)
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.demo.simulate", "upstream", "--port", str(up_port)]
        + ["--latency-ms", str(latency_ms)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    up_url = f"http://127.0.0.1:{up_port}"
    db = tmp / "observations.db"
    try:
        proxy, proxy_url = start_proxy(tmp, up_url, db)
    except BaseException:
        upstream.kill()
        raise
    wait_healthy(up_url)
    wait_healthy(proxy_url)
    return upstream, proxy, up_url, proxy_url, db


def start_proxy(tmp: Path, up_url: str, db: Path) -> tuple[subprocess.Popen, str]:
    """`kolm capture` (one worker) on the SQLite store `db`, in front of `up_url`; (process, base URL)."""
    env = {**os.environ, "KOLM_HOME": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("KOLM_ADMIN_TOKEN", None)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--store", f"sqlite:///{db}"]
        + ["--openai-upstream", up_url, "--anthropic-upstream", up_url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    m = re.search(r"http://127\.0\.0\.1:(\d+)", proxy.stdout.readline())
    if not m:
        proxy.kill()
        raise RuntimeError("proxy did not start")
    return proxy, f"http://127.0.0.1:{m.group(1)}"


def identify_cost_us(n: int = 20000) -> dict:
    """The key check's own cost, in-process and without a network: auth.identify on one request, with a
    store of 100 keys (a valid one presented) against an empty one (open loopback). Microseconds of this
    thread's CPU per call (thread_time: time the thread waited for a core is not counted, so the shared
    machine's load inflates it far less than wall time), the least of 20 interleaved batches of n / 20."""
    import timeit
    from types import SimpleNamespace

    from starlette.requests import Request

    from kolm_ray.capture.auth import Identity, identify
    from kolm_ray.observations.keys import KeyTable, create_key
    from kolm_ray.observations.store import open_store

    out: dict[str, float] = {}
    timers = {}
    with tempfile.TemporaryDirectory(prefix="kolm-bench-keys-") as d:
        store = open_store(f"sqlite:///{d}/keys.db")
        try:
            key = [create_key(store, f"t{i}", ["bench"])[1] for i in range(100)][-1]
            for mode, headers in (("off", []), ("on", [(b"x-kolm-key", key.encode())])):
                table = KeyTable(store)
                if mode == "on":
                    table.refresh()
                state = SimpleNamespace(keys=table, managed_keys={}, admin_token=None)
                raw = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-bench"),
                       (b"x-kolm-namespace", b"bench"), *headers]  # fmt: skip
                scope = {"type": "http", "method": "POST", "path": "/", "headers": raw,
                         "server": ("127.0.0.1", 8700), "app": SimpleNamespace(state=state)}  # fmt: skip
                assert isinstance(identify(Request(scope), "openai"), Identity)
                timers[mode] = timeit.Timer(
                    lambda s=scope: identify(Request(s), "openai"), timer=time.thread_time
                )
            batch = max(1, n // 20)
            best = {mode: float("inf") for mode in timers}
            for _ in range(20):  # interleaved: a burst of load elsewhere hits both modes alike
                for mode, t in timers.items():
                    best[mode] = min(best[mode], t.timeit(number=batch) / batch)
            out = {mode: round(v * 1e6, 2) for mode, v in best.items()}
        finally:
            store.close()
    return {"identify_us_per_call": out, "added_us": round(out["on"] - out["off"], 2)}


def key_checks(tmp: Path, up_url: str, body: Path, rate: int, seconds: float, rounds: int) -> dict:
    """Key checks on against off, in one run, on one upstream: proxy "off" on a store with no key (an open
    loopback proxy), proxy "on" on a store holding 100 keys, called with one as X-Kolm-Key. hey runs
    alternate (off, on, off, on, ...) so the shared machine's load falls on both alike; added latency is
    on - off per percentile, the median over the rounds. hey reports times to 0.1 ms, and this machine's
    load moves p50 by more than the check costs, so identify_cost_us measures the check itself too."""
    from kolm_ray.observations.keys import create_key
    from kolm_ray.observations.store import open_store

    db_on = tmp / "keys-on.db"
    with open_store(f"sqlite:///{db_on}") as store:
        key = [create_key(store, f"tenant{i}", ["bench-keys"])[1] for i in range(100)][-1]
    proxies = {"off": start_proxy(tmp, up_url, tmp / "keys-off.db"), "on": start_proxy(tmp, up_url, db_on)}
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for _, url in proxies.values():
            wait_healthy(url)
        extra = {"off": [], "on": [f"X-Kolm-Key: {key}"]}
        for mode in ("off", "on"):  # warm-up, discarded
            hey(
                f"{proxies[mode][1]}/v1/capture/openai/chat/completions",
                body,
                50,
                8,
                2,
                "bench-keys",
                extra[mode],
            )
        for _ in range(rounds):
            for mode in ("off", "on"):
                url = f"{proxies[mode][1]}/v1/capture/openai/chat/completions"
                cpu0 = cpu_seconds(proxies[mode][0].pid)
                r = hey(url, body, rate, 16, seconds, "bench-keys", extra[mode])
                cpu = cpu_seconds(proxies[mode][0].pid) - cpu0
                r["proxy_cpu_ms_per_request"] = round(1000 * cpu / max(r["sent"], 1), 3)
                r["loadavg_1m"] = round(os.getloadavg()[0], 2)
                runs[mode].append(r)
                print(json.dumps({"key_checks": mode, **r}), flush=True)
    finally:
        for proc, _ in proxies.values():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    added = {
        q: round(float(np.median([b[q] - a[q] for a, b in zip(runs["off"], runs["on"], strict=True)])), 3)
        for q in ("p50_ms", "p90_ms", "p99_ms", "proxy_cpu_ms_per_request")
    }
    return {
        "rate": rate,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "runs": runs,
        "added_ms_median_of_rounds": added,
        "all_200": all(r["ok"] == r["sent"] for rs in runs.values() for r in rs),
        "identify_cost_us": identify_cost_us(),
        "bound_p50_ms": 0.2,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hey(
    url: str, body: Path, rate: int, conns: int, seconds: float, namespace: str, headers: list[str] = ()
) -> dict:
    """One fixed-rate hey run; latency percentiles (ms), achieved rps and status counts."""
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(conns), "-q", f"{rate / conns:.3f}", "-m", "POST"]
    cmd += ["-T", "application/json", "-D", str(body), "-H", "Authorization: Bearer sk-bench"]
    for h in headers:
        cmd += ["-H", h]
    cmd += ["-H", f"X-Kolm-Namespace: {namespace}", "-t", "20", "-o", "csv", url]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    wall = time.monotonic() - t0
    rows = list(csv.DictReader(io.StringIO(out)))
    lat = np.array([float(r["response-time"]) * 1000 for r in rows]) if rows else np.array([np.nan])
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status-code"]] = statuses.get(r["status-code"], 0) + 1
    return {
        "offered_rps": rate,
        "connections": conns,
        "sent": len(rows),
        "ok": statuses.get("200", 0),
        "statuses": statuses,
        "achieved_rps": round(len(rows) / min(wall, seconds), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p90_ms": round(float(np.percentile(lat, 90)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def stored(db: Path, namespace: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return c.execute("SELECT COUNT(*) FROM observations WHERE namespace = ?", (namespace,)).fetchone()[0]


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the event loop) was runnable but had no core."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # hey, once reaped (the servers run on)
    return r.ru_utime + r.ru_stime


def proxied(
    proxy_url: str, pids: tuple[int, int], db: Path, body: Path, rate: int, conns: int, secs: float, ns: str
) -> dict:
    """One proxied hey run; also CPU per request of the proxy, hey and the upstream, and cores used."""
    pid, up_pid = pids
    cpu0, up0, hey0, t0 = cpu_seconds(pid), cpu_seconds(up_pid), children_cpu(), time.monotonic()
    rq0 = runqueue_wait_s(pid)
    r = hey(f"{proxy_url}/v1/capture/openai/chat/completions", body, rate, conns, secs, ns)
    wall = time.monotonic() - t0
    rq = runqueue_wait_s(pid) - rq0
    cpu = cpu_seconds(pid) - cpu0
    by_process = {"proxy": cpu, "hey": children_cpu() - hey0, "upstream": cpu_seconds(up_pid) - up0}
    wait_healthy(proxy_url, timeout=120, pending_zero=True)
    r["stored"] = stored(db, ns)
    r["all_stored"] = r["stored"] == r["ok"]
    r["proxy_cpu_ms_per_request"] = round(1000 * cpu / max(r["sent"], 1), 3)
    r["cpu_ms_per_request"] = {k: round(1000 * v / max(r["sent"], 1), 3) for k, v in by_process.items()}
    r["cores_used"] = {k: round(v / wall, 3) for k, v in by_process.items()}
    r["proxy_loop_runqueue_wait_ms_per_request"] = round(1000 * rq / max(r["sent"], 1), 3)
    r["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return r


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = results["rates"]
    x = np.arange(len(rows))
    for i, (key, label) in enumerate((("direct", "direct"), ("proxy", "through kolm capture"))):
        a.bar(x + (i - 0.5) * 0.35, [r[key]["p50_ms"] for r in rows], 0.35, label=f"{label} p50")
        a.scatter(
            x + (i - 0.5) * 0.35, [r[key]["p99_ms"] for r in rows], marker="_", s=300, label=f"{label} p99"
        )
    a.set_xticks(x, [f"{r['rate']} rps" for r in rows])
    a.set(ylabel="latency (ms)", title="hey, 16 connections, upstream 20 ms")
    a.legend(fontsize=8)
    ramp = results["ramp"]
    b.plot([r["offered_rps"] for r in ramp], [r["achieved_rps"] for r in ramp], marker="o", label="achieved")
    for r in ramp:
        b.annotate(
            "all stored" if r["all_stored"] and r["held"] else "not held",
            (r["offered_rps"], r["achieved_rps"]),
        )
    lim = max(r["offered_rps"] for r in ramp)
    b.plot([0, lim], [0, lim], ":", color="grey", label="offered")
    b.set(xlabel="offered rps (64 connections)", ylabel="achieved rps", title="ramp, proxied")
    b.legend(fontsize=8)
    soak = results["soak"]
    c.plot([s[0] for s in soak["rss_mib"]], [s[1] for s in soak["rss_mib"]])
    c.set(xlabel="s", ylabel="proxy RSS (MiB)", title=f"soak at {soak['rps']} rps for {soak['seconds']:g} s")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rps", default="200,400", help="rates for direct vs proxied")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per hey run")
    p.add_argument("--ramp", default="600,800,1000,1200", help="proxied-only rates for the all-stored ramp")
    p.add_argument("--soak-rps", type=int, default=200)
    p.add_argument("--soak-s", type=float, default=600.0, help="soak length (the issue asks 600 s)")
    p.add_argument("--upstream-latency-ms", type=float, default=20.0)
    p.add_argument("--profile-s", type=float, default=10.0, help="py-spy run at the target rate (0: none)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--key-rate", type=int, default=100, help="rate of the key checks on/off comparison")
    p.add_argument("--key-rounds", type=int, default=3, help="alternating off/on hey runs of --duration each")
    p.add_argument(
        "--key-checks-only",
        action="store_true",
        help="only the key checks on/off comparison, into capture_keys.json (+ .png)",
    )
    args = p.parse_args()
    if shutil.which("hey") is None:
        print(
            "benchmarks/capture.py needs `hey` (apt-get install -y hey; `make bench` does it)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if args.key_checks_only:
        return key_checks_main(args, out, load_before)
    with tempfile.TemporaryDirectory(prefix="kolm-bench-") as d:
        tmp = Path(d)
        body = tmp / "body.json"
        body.write_text(json.dumps(BODY))
        upstream, proxy, up_url, proxy_url, db = start(tmp, args.upstream_latency_ms)
        try:
            direct_url = f"{up_url}/v1/chat/completions"
            pids = (proxy.pid, upstream.pid)
            hey(direct_url, body, 100, 16, 2, "warmup")  # warm both, results discarded
            proxied(proxy_url, pids, db, body, 100, 16, 2, "bench-warmup")
            rows = []
            for rate in [int(r) for r in args.rps.split(",")]:
                d_ = hey(direct_url, body, rate, 16, args.duration, "direct")
                p_ = proxied(proxy_url, pids, db, body, rate, 16, args.duration, f"bench-{rate}")
                rows.append(
                    {
                        "rate": rate,
                        "direct": d_,
                        "proxy": p_,
                        "added_p50_ms": round(p_["p50_ms"] - d_["p50_ms"], 3),
                        "added_p99_ms": round(p_["p99_ms"] - d_["p99_ms"], 3),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            profile = None
            if args.profile_s > 0 and capture_profile.py_spy():
                ns = f"profile-{TARGET['rate']}"
                url = f"{proxy_url}/v1/capture/openai/chat/completions"
                profile = capture_profile.profile(
                    proxy.pid,
                    upstream.pid,
                    lambda: hey(url, body, TARGET["rate"], 16, args.profile_s, ns),
                    args.profile_s,
                    tmp / "proxy.pyspy.txt",
                    rate=200,
                )
                wait_healthy(proxy_url, timeout=120, pending_zero=True)
                profile["probe_between_hey_bursts"] = capture_profile.probe(
                    proxy_url,
                    up_url,
                    body.read_bytes(),
                    lambda: hey(url, body, TARGET["rate"], 16, args.profile_s, f"probe-{TARGET['rate']}"),
                    n=int(args.profile_s * 14),
                )
                wait_healthy(proxy_url, timeout=120, pending_zero=True)
                loop = profile["threads"]["MainThread"]
                probe = profile["probe_between_hey_bursts"]
                profile["reading"] = (
                    f"the proxy's event loop thread spends {loop['cpu_ms_per_request']} ms of CPU per "
                    f"request, its writer thread {profile['threads']['kolm-capture-writer']['cpu_ms_per_request']}"
                    f" ms; hey starts its 16 workers together, each on its own {16000 / TARGET['rate']:g} ms "
                    "ticker, so their calls reach the one event loop 16 at a time and each waits behind part "
                    "of its burst on the way in and again when the 16 answers return together; a call sent "
                    f"between bursts adds {probe['added_p50_ms']} ms p50 / {probe['added_p99_ms']} ms p99"
                )
                print(json.dumps(profile), flush=True)
            ramp = []
            for rate in [int(r) for r in args.ramp.split(",")]:
                r = proxied(proxy_url, pids, db, body, rate, 64, args.duration, f"ramp-{rate}")
                r["held"] = r["achieved_rps"] >= 0.95 * rate and r["ok"] == r["sent"]
                ramp.append(r)
                print(json.dumps(r), flush=True)
                if not r["held"]:
                    break
            samples: list[tuple[float, float]] = []
            t0 = time.monotonic()
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    samples.append((round(time.monotonic() - t0, 1), round(rss_mib(proxy.pid), 1)))
                    done.wait(2.0)

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                soak = proxied(proxy_url, pids, db, body, args.soak_rps, 16, args.soak_s, "soak")
            finally:
                done.set()
                sampler.join()
            rss = [s[1] for s in samples]
            half = len(rss) // 2
            soak.update(
                rps=args.soak_rps,
                seconds=args.soak_s,
                rss_mib=samples,
                rss_start_mib=rss[0],
                rss_max_mib=max(rss),
                rss_end_mib=rss[-1],
                rss_second_half_growth_mib=round(rss[-1] - rss[half], 1),
            )
            keys = key_checks(tmp, up_url, body, args.key_rate, args.duration, args.key_rounds)
            t_stop = time.monotonic()
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(timeout=120)
            stop_s = round(time.monotonic() - t_stop, 2)
        finally:
            for proc in (proxy, upstream):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    at = next((r for r in rows if r["rate"] == TARGET["rate"]), None)
    all_stored = [r["offered_rps"] for r in ramp if r["held"] and r["all_stored"]]
    results = {
        "benchmark": "capture proxy overhead (hey, fixed rates)",
        "command": "python " + " ".join(sys.argv),
        "config": {
            "upstream_latency_ms": args.upstream_latency_ms,
            "duration_s": args.duration,
            "request": "OpenAI chat.completions, non-stream, the same body each time",
            "proxy": "kolm capture: 1 uvicorn worker (uvloop + httptools), SQLite WAL store",
            "held_means": ">= 95% of the offered rate achieved, every answer a 200",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "hey": "hey (Debian package)",
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine: other jobs' load shows in loadavg_1m per run",
        },
        "rates": rows,
        "ramp": ramp,
        "highest_rate_all_stored": max(all_stored) if all_stored else None,
        "soak": soak,
        "sigterm_exit_s": stop_s,
        "target": {
            **TARGET,
            "latency_met": bool(
                at
                and at["added_p50_ms"] <= TARGET["added_p50_ms"]
                and at["added_p99_ms"] <= TARGET["added_p99_ms"]
            ),
            "all_stored_met": bool(all_stored and max(all_stored) >= TARGET["all_stored_rps"]),
        },
        "where_the_time_goes": profile,
        "key_checks": keys,
    }
    (out / "capture.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "capture.png")
    print(json.dumps({k: results[k] for k in ("highest_rate_all_stored", "target")}, indent=2))
    return 0


def key_checks_main(args: argparse.Namespace, out: Path, load_before: tuple) -> int:
    """--key-checks-only: the upstream, then key_checks; capture_keys.json and capture_keys.png."""
    with tempfile.TemporaryDirectory(prefix="kolm-bench-") as d:
        tmp = Path(d)
        body = tmp / "body.json"
        body.write_text(json.dumps(BODY))
        upstream, proxy, up_url, _, _ = start(tmp, args.upstream_latency_ms)
        proxy.send_signal(signal.SIGTERM)  # key_checks starts its own two proxies
        proxy.wait(timeout=60)
        try:
            keys = key_checks(tmp, up_url, body, args.key_rate, args.duration, args.key_rounds)
        finally:
            upstream.send_signal(signal.SIGTERM)
            upstream.wait(timeout=30)
    results = {
        "benchmark": "capture key checks on vs off (hey, same run, alternating)",
        "command": "python " + " ".join(sys.argv),
        "config": {
            "upstream_latency_ms": args.upstream_latency_ms,
            "connections": 16,
            "proxy": "kolm capture: 1 uvicorn worker, SQLite store; on: 100 keys in the store",
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "note": "shared machine under other jobs' load (loadavg_1m per run): end-to-end deltas are noisy",
        },
        "key_checks": keys,
    }
    (out / "capture_keys.json").write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(("off", "on")):
        runs = keys["runs"][mode]
        a.scatter([i] * len(runs), [r["p50_ms"] for r in runs], label=f"p50, keys {mode}")
        a.scatter([i] * len(runs), [r["p99_ms"] for r in runs], marker="_", s=300, label=f"p99, keys {mode}")
    a.set_xticks([0, 1], ["keys off", "keys on"])
    a.set(ylabel="latency (ms)", title=f"hey {keys['rate']} rps, upstream {args.upstream_latency_ms:g} ms")
    a.legend(fontsize=7)
    cost = keys["identify_cost_us"]["identify_us_per_call"]
    b.bar(["off (open)", "on (100 keys)"], [cost["off"], cost["on"]])
    b.axhline(200, color="red", linestyle=":", label="bound 0.2 ms")
    b.set(ylabel="us per call", title="auth.identify, in-process")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "capture_keys.png", dpi=110)
    print(json.dumps({"added_ms": keys["added_ms_median_of_rounds"], **keys["identify_cost_us"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
