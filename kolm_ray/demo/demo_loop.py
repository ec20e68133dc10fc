"""`make demo`, the closing phases: the loop promotes a model, the proxy answers locally, the report.

6. loop     `kolm loop --once` (a subprocess, as a user or a Ray job runs it) on the captured store:
            recipe -> Ray Train compile -> held-out comparison -> promotion (one line per namespace).
7. local    `kolm capture` again on the same store; new support queries through the openai SDK: the
            promoted model answers them (`x-kolm-served-by: local`), a share is shadow-checked upstream.
8. report   `kolm report --html` on the store: spend, savings, live agreement; the page's path.

free_port, wait_http and run_kolm, which every phase that starts a proxy or a `kolm` command uses, live
here (demo.py imports them).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEMO_SHADOW_RATE = "0.2"  # more shadow checks than the 0.05 default, so the demo's report has a window
# A line of Ray's C++ core (`[2026-12-06 21:25:04,757 E 10341 10571] core_worker.cc:2465: ...`): Ray writes
# these to the driver's stderr itself, past Python's logging, and its session logs keep them anyway.
_RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+: ")


def run_kolm(argv: list[str], capture: bool = False, env: dict[str, str] | None = None):
    """`kolm ARGV` as a subprocess, as a user runs it; its stderr passes through minus Ray's C++ core lines
    (unless KOLM_VERBOSE). capture=True: stdout is returned in `.stdout` instead of printed."""
    from kolm_ray.placement import verbose

    cmd = [sys.executable, "-m", "kolm_ray.cli", *argv]
    if verbose():
        return subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True, env=env)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True, env=env
    )

    def relay() -> None:
        for line in proc.stderr:
            if not _RAY_CORE_LINE.match(line):
                sys.stderr.write(line)
                sys.stderr.flush()

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    out = proc.stdout.read() if capture else None
    proc.wait()
    relay_thread.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for the proxies the demo starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until `url` answers at all; RuntimeError when `proc` exits first or `timeout` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def loop_phase(store_url: str) -> dict[str, Any]:
    """`kolm loop --once --min-new 500`: its line for the demo namespace."""
    print("$ kolm loop --once --min-new 500 --store", store_url, flush=True)
    proc = run_kolm(["loop", "--once", "--min-new", "500", "--store", store_url], capture=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"kolm loop failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ": " in ln]
    if not any(": promoted " in ln for ln in lines):
        raise SystemExit(f"the loop promoted nothing: {lines}")
    return {"lines": lines}


def local_phase(
    out: Path, store_url: str, namespace: str, calls: int, key: str | None = None
) -> dict[str, Any]:
    """The proxy on the same store answers new queries with the promoted model (`key`: the team's capture key)."""
    import httpx

    from kolm_ray.demo.simulate import generate_workload, send_traffic, start_upstream_in_thread

    upstream_url, stop_upstream = start_upstream_in_thread(latency_ms=5)
    port = free_port()
    env = {**os.environ, "KOLM_SHADOW_RATE": DEMO_SHADOW_RATE}
    proxy = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", str(port), "--store", store_url,
         "--openai-upstream", upstream_url, "--anthropic-upstream", upstream_url],
        stdout=subprocess.DEVNULL, stderr=open(out / "capture-local.log", "w"), env=env,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", proxy)
        deadline = time.monotonic() + 120
        label = None
        while label is None and time.monotonic() < deadline:  # the poller loads the promoted model
            token = os.environ.get("KOLM_ADMIN_TOKEN")  # live models are shown to the admin only
            admin = {"Authorization": f"Bearer {token}"} if token else {}
            label = (
                httpx.get(f"{base}/healthz", headers=admin)
                .json()
                .get("local", {})
                .get("models", {})
                .get(namespace)
            )
            time.sleep(0.2)
        if label is None:
            raise SystemExit(f"the proxy never loaded {namespace}'s promoted model (see capture-local.log)")
        served = send_traffic(base, generate_workload(calls, seed=777), namespace, threads=4, key=key)
    finally:
        proxy.send_signal(signal.SIGTERM)  # drains its writes and in-flight shadow checks
        proxy.wait(timeout=90)
        stop_upstream()
    local = served.count("local")
    print(f"{local} of {len(served)} new calls answered locally by {label}")
    return {"model": label, "calls": len(served), "local": local}


def report_phase(out: Path, store_url: str) -> dict[str, Any]:
    """`kolm report --html`, and its JSON for the summary."""
    import json

    html = out / "report.html"
    base = ["report", "--store", store_url]
    proc = run_kolm([*base, "--json", "--html", str(html)], capture=True)
    if proc.returncode != 0:
        raise SystemExit(f"kolm report failed with exit code {proc.returncode}")
    run_kolm(base)  # the table
    return {"html": str(html), **json.loads(proc.stdout)}
