"""Where the capture proxy's time goes: py-spy samples by phase, per thread, plus CPU by process.

Used by benchmarks/capture.py. Method: while `hey` drives the proxy at a fixed rate, `py-spy record
--threads --idle --format raw` samples every thread of the proxy process (Python frames only); each
sample is put in one phase by its innermost frame that matches a rule below (so scrubbing called from
to_observation counts as scrubbing). At the same time psutil reads the CPU time of each proxy thread,
of `hey` (rusage of the reaped child), of the upstream and of the whole machine, so the shares can be
read against how much of the 2 cores each process takes. A sample whose innermost Python frame is the
event loop's `run_until_complete` is the loop in C (uvloop: epoll wait, socket reads/writes, httptools
parsing); the thread's CPU time says how much of that was work rather than waiting, and its schedstat
run-queue time how long it was ready to run but had no core (other processes on the machine). Samples
are wall time: a frame that is runnable but descheduled still counts. GC pauses are not
a phase of their own: the sampler sees them inside whichever frame allocated.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil

# (phase, path fragments): the first rule that matches the innermost matching frame wins.
MAIN_RULES = [
    (
        "aiohttp upstream client (request, pool, response read)",
        ("aiohttp/", "aiohappyeyeballs/", "yarl/", "multidict/"),
    ),
    ("request validation (exchange.check_request)", ("observations/exchange.py", "json/")),
    (
        "uvicorn HTTP protocol (httptools callbacks, send, timeouts)",
        ("uvicorn/protocols/", "observations/server.py"),
    ),
    ("response building (starlette Response, headers)", ("starlette/responses.py", "fastapi/responses.py")),
    ("Starlette/FastAPI routing + middleware", ("starlette/", "fastapi/", "uvicorn/middleware/", "anyio/")),
    (
        "proxy handler (capture.py, read_body, local-answer check)",
        (
            "observations/capture.py",
            "observations/upstream.py",
            "observations/bridge.py",
            "observations/local.py",
            "observations/writer.py",
            "observations/model.py",
        ),
    ),
    ("asyncio task scheduling (Python side)", ("asyncio/", "contextlib.py")),
]
WRITER_RULES = [
    ("SQLite insert (store)", ("observations/store/", "sqlite3/")),
    ("credential scrubbing (providers/scrub.py)", ("providers/scrub.py", "re2/", "/re/")),
    (
        "to_observation: decode + parse + build",
        ("observations/exchange.py", "json/", "pydantic/", "observations/model.py"),
    ),
    (
        "spool / bookkeeping (writer.py)",
        ("observations/writer.py", "observations/spool.py", "threading.py", "queue.py"),
    ),
]
LOOP_IN_C = "event loop in C (uvloop: epoll, socket I/O, httptools parse)"
WRITER_WAIT = "waiting for the next batch (queue.get)"


def _phase(frames: list[str], rules: list[tuple[str, tuple[str, ...]]]) -> str | None:
    for frame in reversed(frames):
        for name, parts in rules:
            if any(p in frame for p in parts):
                return name
    return None


def classify(raw: Path) -> dict[str, dict]:
    """py-spy raw output -> {thread name: {"tid", "samples", "phases": {phase: samples}}}."""
    threads: dict[str, dict] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        head = frames[0]  # "thread (TID): name"
        tid, _, name = head.partition("): ")
        t = threads.setdefault(
            name or head, {"tid": int(tid.split("(")[-1]), "samples": 0, "phases": Counter()}
        )
        n = int(count)
        t["samples"] += n
        leaf = frames[-1]
        if name == "MainThread":
            phase = LOOP_IN_C if leaf.startswith("Runner.run ") else _phase(frames[1:], MAIN_RULES)
        elif name == "kolm-capture-writer":
            phase = (
                WRITER_WAIT if leaf.startswith("BackgroundWriter._run ") else _phase(frames[1:], WRITER_RULES)
            )
        else:
            phase = "waiting" if "wait" in leaf.lower() else None
        t["phases"][phase or "other Python"] += n
    return threads


def _thread_cpu(proc: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


def _runqueue_wait(pid: int) -> dict[int, float]:
    """Seconds each thread has spent runnable but waiting for a core (/proc/.../schedstat, field 2)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            pass
    return out


def py_spy() -> str | None:
    """The py-spy binary: the one PyPI installs beside this Python (the `test` extra, `make bench`), else
    the first on PATH; None when there is none (the profile is then skipped)."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _cpu(proc: psutil.Process) -> float:
    c = proc.cpu_times()
    return c.user + c.system


def profile(
    proxy_pid: int, upstream_pid: int, run_hey: Callable[[], dict], seconds: float, raw: Path, rate: int
) -> dict:
    """Sample the proxy with py-spy while run_hey() (a `seconds`-long hey run) drives it."""
    proxy, upstream = psutil.Process(proxy_pid), psutil.Process(upstream_pid)
    spy = subprocess.Popen(
        [py_spy() or "py-spy", "record", "--pid", str(proxy_pid), "--duration", str(int(seconds) + 2)]
        + ["--rate", str(rate), "--format", "raw", "--threads", "--idle", "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # py-spy attached before the load starts
        th0, p0, u0, m0 = _thread_cpu(proxy), _cpu(proxy), _cpu(upstream), psutil.cpu_times()
        rq0 = _runqueue_wait(proxy_pid)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        result = run_hey()
        wall = time.monotonic() - t0
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # only hey was reaped in between
        th1, p1, u1, m1 = _thread_cpu(proxy), _cpu(proxy), _cpu(upstream), psutil.cpu_times()
        rq1 = _runqueue_wait(proxy_pid)
        _, err = spy.communicate(timeout=60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.strip()[-300:]}")
    n = max(result["sent"], 1)
    hey_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    busy = sum(getattr(m1, f) - getattr(m0, f) for f in ("user", "system", "nice", "irq", "softirq"))
    procs = {"proxy": p1 - p0, "hey": hey_cpu, "upstream": u1 - u0}
    threads = classify(raw)
    by_thread = {}
    for name, t in threads.items():
        cpu = th1.get(t["tid"], 0.0) - th0.get(t["tid"], 0.0)
        total = max(t["samples"], 1)
        phases = t["phases"].most_common()
        active = {k: v for k, v in phases if k not in (LOOP_IN_C, WRITER_WAIT, "waiting")}
        wait = rq1.get(t["tid"], 0.0) - rq0.get(t["tid"], 0.0)
        by_thread[name] = {
            "samples": t["samples"],
            "cpu_share_of_one_core": round(cpu / wall, 3),
            "cpu_ms_per_request": round(1000 * cpu / n, 3),
            "runqueue_wait_ms_per_request": round(1000 * wait / n, 3),
            "share_of_samples": {k: round(v / total, 4) for k, v in phases},
            "share_of_python_busy_samples": {
                k: round(v / max(sum(active.values()), 1), 3) for k, v in active.items()
            },
        }
    return {
        "method": (
            f"py-spy {rate} Hz, --threads --idle, {seconds:g} s of hey at {result['offered_rps']} rps "
            "(16 connections) in a run of its own (the sampler costs CPU, so the latency figures above "
            "come from runs without it); each sample goes to the phase of its innermost matching "
            "frame (benchmarks/capture_profile.py has the rules); psutil per-thread and per-process "
            "CPU over the same window"
        ),
        "hey": {k: result[k] for k in ("offered_rps", "sent", "achieved_rps", "p50_ms", "p99_ms")},
        "wall_s": round(wall, 2),
        "threads": by_thread,
        "cpu_ms_per_request": {k: round(1000 * v / n, 3) for k, v in procs.items()},
        "cores_used": {
            **{k: round(v / wall, 3) for k, v in procs.items()},
            "rest_of_machine": round(max(busy - sum(procs.values()), 0.0) / wall, 3),
            "of": os.cpu_count(),
        },
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def probe(proxy_url: str, up_url: str, body: bytes, run_hey: Callable[[], dict], n: int = 150) -> dict:
    """Added latency for a request that arrives at a random moment, not with hey's bursts.

    hey's workers share one start time and each sends on its own ticker, so at 200 rps x 16
    connections all 16 requests leave together every 80 ms and queue on the proxy's one event loop.
    While that load runs, one more client alternates proxied and direct calls (one at a time, its own
    keep-alive connections) and reads x-kolm-overhead-ms, the proxy handler's own time.
    """
    import threading

    import httpx
    import numpy as np

    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
    load: dict = {}
    t = threading.Thread(target=lambda: load.update(run_hey()))
    t.start()
    proxied, direct, handler = [], [], []
    try:
        time.sleep(1.0)
        with httpx.Client(timeout=20) as client:
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.post(
                    f"{proxy_url}/v1/capture/openai/chat/completions", content=body, headers=headers
                )
                proxied.append((time.perf_counter() - t0) * 1000)
                handler.append(float(r.headers["x-kolm-overhead-ms"]))
                t0 = time.perf_counter()
                client.post(f"{up_url}/v1/chat/completions", content=body, headers=headers).raise_for_status()
                direct.append((time.perf_counter() - t0) * 1000)
    finally:
        t.join()

    def pct(a: list[float]) -> dict:
        return {f"p{q}_ms": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)}

    p, d = pct(proxied), pct(direct)
    return {
        "method": f"{n} sequential probe pairs (proxied, then direct) with httpx while hey ran as above",
        "proxied": p,
        "direct": d,
        "added_p50_ms": round(p["p50_ms"] - d["p50_ms"], 3),
        "added_p99_ms": round(p["p99_ms"] - d["p99_ms"], 3),
        "proxy_handler_ms": pct(handler),
        "hey_meanwhile": {k: load.get(k) for k in ("offered_rps", "achieved_rps", "p50_ms", "p99_ms")},
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
