"""`make demo`, the closing phases: the loop promotes a model, the proxy answers locally, the report.

6. loop     `kolm loop --once` (a subprocess, as a user or a Ray job runs it) on the captured store:
            recipe -> Ray Train compile -> held-out comparison -> promotion (one line per namespace).
7. local    `kolm capture` again on the same store; new support queries through the openai SDK: the
            promoted model answers them (`x-kolm-served-by: local`), a share is shadow-checked upstream.
8. report   `kolm report --html` on the store: spend, savings, live agreement; the page's path.

free_port and wait_http, which every phase that starts a proxy uses, live here (demo.py imports them).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEMO_SHADOW_RATE = "0.2"  # more shadow checks than the 0.05 default, so the demo's report has a window


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
    cmd = [sys.executable, "-m", "kolm_ray.cli", "loop", "--once", "--min-new", "500", "--store", store_url]
    print("$ kolm loop --once --min-new 500 --store", store_url, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
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
    import openai

    from kolm_ray.demo.simulate import SYSTEM_PROMPT, generate_workload, start_upstream_in_thread

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
        client = openai.OpenAI(base_url=f"{base}/v1/capture/openai", api_key="sk-demo-not-a-real-key",
                               default_headers={"X-Kolm-Namespace": namespace, **({"X-Kolm-Key": key} if key else {})},
                               max_retries=0)  # fmt: skip

        def ask(item) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": item.query},
                ],
            )
            return raw.headers.get("x-kolm-served-by", "?")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            served = list(pool.map(ask, generate_workload(calls, seed=777)))
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
    base = [sys.executable, "-m", "kolm_ray.cli", "report", "--store", store_url]
    proc = subprocess.run([*base, "--json", "--html", str(html)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kolm report failed with exit code {proc.returncode}")
    subprocess.run(base)  # the table
    return {"html": str(html), **json.loads(proc.stdout)}
