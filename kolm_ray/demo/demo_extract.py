"""`make demo`'s second namespace: extraction traffic (order ids and a priority) becomes a local model.

    extract_phase(out, store_url)    # capture -> recipe -> compile (minilm-l6 extractor) -> promote -> local

The inputs are configs/examples/order-extractor's; a stand-in frontier answers each with
{"order_id": <the ORD id in the message>, "priority": "high" if it says URGENT else "low"}. `kolm recipe`
picks an encoder extractor for that (every field categorical or found verbatim in the input), `kolm
compile` trains it on Ray Train, `kolm models promote` makes it live, and the proxy answers new order
messages itself: each local answer's order_id is the exact substring of the message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kolm_ray.demo.demo_loop import free_port, wait_http

NAMESPACE = "orders"
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "examples" / "order-extractor"
TEMPLATES = (
    "status for {oid}?",
    "cancel {oid} right away please",
    "please look up order {oid}, it is late",
    "my package {oid} never arrived",
    "I want a refund for {oid}",
)


def truth(text: str) -> dict[str, Any]:
    """What the stand-in frontier answers for an order message."""
    m = re.search(r"ORD-\d+", text)
    return {"order_id": m.group() if m else None, "priority": "high" if "URGENT" in text else "low"}


def new_messages(n: int, seed: int = 27) -> list[str]:
    import random

    rng = random.Random(seed)
    return [
        ("URGENT!! " if rng.random() < 0.4 else "")
        + rng.choice(TEMPLATES).format(oid=f"ORD-{rng.randint(10000, 99999)}")
        for _ in range(n)
    ]


def _run(cmd: list[str], log: Path) -> str:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[3:5])} failed with exit code {proc.returncode} (see {log})")
    return proc.stdout


def extract_phase(out: Path, store_url: str, calls: int = 60) -> dict[str, Any]:
    """Capture the example's order messages, compile them into an extractor, promote it, answer new calls."""
    import httpx
    import openai

    from kolm_ray.demo.simulate import start_upstream_in_thread
    from kolm_ray.observations.keys import create_key
    from kolm_ray.observations.store import open_store

    inputs = [json.loads(line)["input"] for line in (EXAMPLE / "pairs.jsonl").read_text().splitlines()]
    with open_store(store_url) as store:  # the orders team's own capture key: its tenant, its namespace
        _, key = create_key(store, "demo-team", [NAMESPACE], name="make demo: orders")
    token = os.environ.get("KOLM_ADMIN_TOKEN")  # live models are shown to the admin only
    admin = {"Authorization": f"Bearer {token}"} if token else {}
    upstream_url, stop_upstream = start_upstream_in_thread(
        latency_ms=5, answer=lambda q: json.dumps(truth(q))
    )
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "kolm_ray.cli", "capture", "--port", str(port), "--store", store_url,
         "--openai-upstream", upstream_url, "--anthropic-upstream", upstream_url],
        stdout=subprocess.DEVNULL, stderr=open(out / "capture-orders.log", "w"), env={**os.environ},
    )  # fmt: skip
    kolm = [sys.executable, "-m", "kolm_ray.cli"]
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", proxy)
        client = openai.OpenAI(base_url=f"{base}/v1/capture/openai", api_key="sk-demo-not-a-real-key",
                               default_headers={"X-Kolm-Namespace": NAMESPACE, "X-Kolm-Key": key},
                               max_retries=0)  # fmt: skip
        for text in inputs:  # the team's traffic: plain user messages, answered upstream and captured
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
        while httpx.get(f"{base}/healthz").json().get("pending"):
            time.sleep(0.2)
        recipe = json.loads(
            _run(
                [
                    *kolm,
                    "recipe",
                    "--namespace",
                    NAMESPACE,
                    "--store",
                    store_url,
                    "--out",
                    str(out / "recipe-orders"),
                ],
                out / "recipe-orders.log",
            )  # fmt: skip
        )
        diag = json.loads(Path(recipe["diagnostics"]).read_text())
        artifact = out / "order-extractor.kolm"
        compiled = _run([*kolm, "compile", "--recipe", recipe["recipe_dir"], "--output", str(artifact)],
                        out / "compile-orders.log")  # fmt: skip
        k_score = float(compiled.split("k_score=")[1].split()[0])
        promoted = _run([*kolm, "models", "promote", str(artifact), "--namespace", NAMESPACE, "--store", store_url],
                        out / "promote-orders.log").strip()  # fmt: skip
        deadline, label = time.monotonic() + 120, None
        while label is None and time.monotonic() < deadline:
            health = httpx.get(f"{base}/healthz", headers=admin).json()
            label = health.get("local", {}).get("models", {}).get(NAMESPACE)
            time.sleep(0.2)
        local = right = exact = 0
        for text in new_messages(calls):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
            )
            answer = json.loads(raw.parse().choices[0].message.content)
            if raw.headers.get("x-kolm-served-by") == "local":
                local += 1
                right += answer == truth(text)
                exact += isinstance(answer.get("order_id"), str) and answer["order_id"] in text
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(timeout=90)
        stop_upstream()
    print(f"recipe chose {diag['base']['name']}: {diag['base']['why']}")
    print(f"{promoted}; {local} of {calls} new order messages answered locally, {right} right, "
          f"{exact} order ids exact substrings of the message")  # fmt: skip
    return {"base": diag["base"]["name"], "k_score": k_score, "model": label, "calls": calls, "local": local,
            "right": right, "exact_substrings": exact}  # fmt: skip
