"""Capture proxy overhead: the same stand-in upstream called directly and through `kolm capture`.

    .venv/bin/python benchmarks/capture.py                      # rates 50,100,200,400 rps, 10 s each
    .venv/bin/python benchmarks/capture.py --rps 200 --duration 5 --upstream-latency-ms 20

Three processes on 127.0.0.1: the stand-in upstream (`python -m kolm_ray.simulate upstream`), the
proxy (`kolm capture`, one uvicorn worker, uvloop + httptools) and this open-loop load generator
(asyncio + httpx: request i is sent at t0 + i/rate whatever happened to earlier ones, and its latency
counts from that scheduled time, so a stall is not hidden). For each rate: direct, then through the
proxy. Added latency = proxy percentile - direct percentile. A rate is held when every request got a
200, completions kept up (>= 95% of the offered rate) and p99 stayed under 250 ms. After the run
the proxy gets SIGTERM and the store is counted: observations stored vs requests sent.
Writes benchmarks/results/capture.json and capture.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kolm_ray.simulate import SYSTEM_PROMPT, generate_workload  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
HELD_P99_MS = 250.0
TARGET = {"rate": 200, "added_p50_ms": 2.0, "added_p99_ms": 10.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start_processes(
    tmp: Path, latency_ms: float
) -> tuple[subprocess.Popen, subprocess.Popen, str, str, Path]:
    env = {**os.environ, "KOLM_HOME": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("KOLM_ADMIN_TOKEN", None)
    up_port = free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kolm_ray.simulate",
            "upstream",
            "--port",
            str(up_port),
            "--latency-ms",
            str(latency_ms),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    up_url = f"http://127.0.0.1:{up_port}"
    db = tmp / "observations.db"
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kolm_ray.cli",
            "capture",
            "--port",
            "0",
            "--store",
            f"sqlite:///{db}",
            "--openai-upstream",
            up_url,
            "--anthropic-upstream",
            up_url,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    line = proxy.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        raise RuntimeError(f"proxy did not start: {line}{proxy.stderr.read()}")
    proxy_url = f"http://127.0.0.1:{m.group(1)}"
    wait_healthy(up_url)
    wait_healthy(proxy_url)
    return upstream, proxy, up_url, proxy_url, db


async def open_loop(
    url: str, path: str, rate: float, duration: float, queries: list[str], headers: dict
) -> dict:
    """Send rate*duration requests at fixed times; latency from each request's scheduled time."""
    n = int(rate * duration)
    lat = np.full(n, np.nan)
    overhead = np.full(n, np.nan)
    status = np.zeros(n, dtype=int)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        # warm the connection pool so the first measured requests do not pay for TCP setup
        await asyncio.gather(*(client.get("/healthz") for _ in range(min(64, n))), return_exceptions=True)

        async def one(i: int, scheduled: float) -> None:
            body = {
                "model": "sim-frontier",
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": queries[i % len(queries)]},
                ],
            }
            try:
                r = await client.post(path, json=body, headers=headers)
                await r.aread()
                status[i] = r.status_code
                if "x-kolm-overhead-ms" in r.headers:
                    overhead[i] = float(r.headers["x-kolm-overhead-ms"])
            except httpx.HTTPError:
                status[i] = -1
            lat[i] = (time.perf_counter() - scheduled) * 1000

        tasks = []
        t0 = time.perf_counter() + 0.05
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    ok = status == 200
    done = lat[ok]
    pct = (lambda q: float(np.percentile(done, q))) if len(done) else (lambda q: float("nan"))
    oh = overhead[~np.isnan(overhead)]
    return {
        "sent": n,
        "ok": int(ok.sum()),
        "errors": int((~ok).sum()),
        "achieved_rps": round(float(ok.sum()) / elapsed, 1),
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "mean_ms": float(done.mean()) if len(done) else float("nan"),
        "overhead_header_p50_ms": float(np.percentile(oh, 50)) if len(oh) else None,
        "overhead_header_p99_ms": float(np.percentile(oh, 99)) if len(oh) else None,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), to price the proxy per request."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def held(r: dict, rate: float) -> bool:
    return r["errors"] == 0 and r["achieved_rps"] >= 0.95 * rate and r["p99_ms"] < HELD_P99_MS


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rates"]
    rates = [r["rate"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("direct", "--"), ("proxy", "-")):
        a.plot(rates, [r[key]["p50_ms"] for r in rows], style, marker="o", label=f"{key} p50")
        a.plot(rates, [r[key]["p99_ms"] for r in rows], style, marker="s", label=f"{key} p99")
    a.set(xlabel="offered load (rps)", ylabel="latency (ms)", xscale="log", title="end-to-end latency")
    a.set_xticks(rates, [str(r) for r in rates])
    a.legend()
    b.plot(rates, [r["added_p50_ms"] for r in rows], marker="o", label="added p50")
    b.plot(rates, [r["added_p99_ms"] for r in rows], marker="s", label="added p99")
    b.axhline(TARGET["added_p50_ms"], color="C0", ls=":", lw=1, label="target p50 (2 ms)")
    b.axhline(TARGET["added_p99_ms"], color="C1", ls=":", lw=1, label="target p99 (10 ms)")
    b.set(
        xlabel="offered load (rps)", ylabel="proxy - direct (ms)", xscale="log", title="added by kolm capture"
    )
    b.set_xticks(rates, [str(r) for r in rates])
    b.legend()
    fig.suptitle(
        f"kolm capture overhead ({results['machine']['cpus']} CPUs, upstream latency "
        f"{results['config']['upstream_latency_ms']} ms)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)


async def run(args: argparse.Namespace, up_url: str, proxy_url: str, proxy_pid: int) -> list[dict]:
    queries = [item.query for item in generate_workload(2000, seed=args.seed)]
    rows = []
    for rate in args.rates:
        if args.warmup > 0:
            await open_loop(
                proxy_url,
                "/v1/capture/openai/chat/completions",
                rate,
                args.warmup,
                queries,
                {"Authorization": "Bearer sk-bench", "X-Kolm-Namespace": "bench-warmup"},
            )
        direct = await open_loop(
            up_url, "/v1/chat/completions", rate, args.duration, queries, {"Authorization": "Bearer sk-bench"}
        )
        cpu0, load0 = cpu_seconds(proxy_pid), os.getloadavg()[0]
        proxied = await open_loop(
            proxy_url,
            "/v1/capture/openai/chat/completions",
            rate,
            args.duration,
            queries,
            {"Authorization": "Bearer sk-bench", "X-Kolm-Namespace": f"bench-{rate}"},
        )
        proxied["proxy_cpu_ms_per_request"] = round(
            (cpu_seconds(proxy_pid) - cpu0) * 1000 / proxied["sent"], 3
        )
        proxied["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        row = {
            "rate": rate,
            "direct": direct,
            "proxy": proxied,
            "added_p50_ms": round(proxied["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(proxied["p99_ms"] - direct["p99_ms"], 3),
            "direct_held": held(direct, rate),
            "proxy_held": held(proxied, rate),
        }
        rows.append(row)
        print(
            f"{rate:>4} rps  direct p50 {direct['p50_ms']:.2f} p99 {direct['p99_ms']:.2f}  |  proxy p50 "
            f"{proxied['p50_ms']:.2f} p99 {proxied['p99_ms']:.2f}  |  added p50 {row['added_p50_ms']:+.2f} "
            f"p99 {row['added_p99_ms']:+.2f} ms  (header p50 {proxied['overhead_header_p50_ms']:.3f} ms)  "
            f"cpu {proxied['proxy_cpu_ms_per_request']:.2f} ms/req  errors {proxied['errors']}  held {row['proxy_held']}  "
            f"load {proxied['loadavg_1m']}",
            flush=True,
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rps", default="50,100,200,400")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate and target")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds through the proxy before each rate")
    p.add_argument(
        "--upstream-latency-ms", type=float, default=20.0, help="the stand-in frontier's answer time"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    args.rates = [int(x) for x in args.rps.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="kolm-bench-capture-") as tmpdir:
        upstream, proxy, up_url, proxy_url, db = start_processes(Path(tmpdir), args.upstream_latency_ms)
        try:
            try:
                import uvloop

                rows = uvloop.run(run(args, up_url, proxy_url, proxy.pid))
            except ImportError:
                rows = asyncio.run(run(args, up_url, proxy_url, proxy.pid))
            proxy.send_signal(signal.SIGTERM)  # drain, then count what is on disk
            proxy.wait(timeout=120)
            conn = sqlite3.connect(db)
            counts = dict(
                conn.execute("SELECT namespace, COUNT(*) FROM observations GROUP BY namespace").fetchall()
            )
            conn.close()
        finally:
            for proc in (proxy, upstream):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    for row in rows:
        row["observations_sent"] = row["proxy"]["sent"]
        row["observations_answered_200"] = row["proxy"]["ok"]
        row["observations_stored"] = counts.get(f"bench-{row['rate']}", 0)
    held_rates = [r["rate"] for r in rows if r["proxy_held"]]
    at = next((r for r in rows if r["rate"] == TARGET["rate"]), None)
    import aiohttp
    import fastapi
    import uvicorn

    results = {
        "benchmark": "capture proxy overhead",
        "command": "python " + " ".join(sys.argv),
        "config": {
            "rates": args.rates,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "upstream_latency_ms": args.upstream_latency_ms,
            "request": "OpenAI chat.completions, non-stream",
            "proxy": "kolm capture: 1 uvicorn worker, uvloop + httptools, SQLite WAL store",
            "held_means": f"0 errors, >= 95% of offered rps completed, p99 < {HELD_P99_MS} ms",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "uvicorn": uvicorn.__version__,
            "fastapi": fastapi.__version__,
            "httpx": httpx.__version__,
            "aiohttp (the proxy's upstream client)": aiohttp.__version__,
            "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            "note": "shared machine: other jobs' load shows in loadavg_1m per rate",
        },
        "rates": rows,
        "highest_rate_held": max(held_rates) if held_rates else None,
        "observations": {
            "sent": sum(r["observations_sent"] for r in rows),
            "answered_200": sum(r["observations_answered_200"] for r in rows),
            "stored": sum(r["observations_stored"] for r in rows),
            "warmup_sent_and_stored": counts.get("bench-warmup", 0),
        },
        "target": {
            **TARGET,
            "met": bool(
                at
                and at["added_p50_ms"] <= TARGET["added_p50_ms"]
                and at["added_p99_ms"] <= TARGET["added_p99_ms"]
                and at["observations_stored"] == at["observations_sent"]
            ),
        },
    }
    (out / "capture.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "capture.png")
    print(json.dumps({k: results[k] for k in ("highest_rate_held", "observations", "target")}, indent=2))
    print(f"wrote {out / 'capture.json'} and {out / 'capture.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
