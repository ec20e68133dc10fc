"""Traffic: the workload's support queries sent through a `kolm capture` proxy with the official openai SDK.

    python -m kolm_ray.demo.simulate traffic --proxy http://127.0.0.1:8700 --calls 200
    # 200 calls to http://127.0.0.1:8700 in namespace support-router: 200 answered (0 local, 200 upstream)

What `make demo` does in its capture and local-answer phases, and the traffic step of the README's
by-hand session: each call is the demo's chat completion (the router system prompt + one query) under
`X-Kolm-Namespace`, and the answer's `x-kolm-served-by` header says who answered it.
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter

from kolm_ray.demo.simulate.workload import SYSTEM_PROMPT, WorkItem, generate_workload

DEMO_NAMESPACE = "support-router"  # the observation namespace (the task) `make demo` and the README use


def send_traffic(
    proxy_url: str,
    items: list[WorkItem],
    namespace: str = DEMO_NAMESPACE,
    threads: int = 16,
    progress: bool = False,
    key: str | None = None,
) -> list[str]:
    """Send each item through the proxy at `proxy_url` (its root, e.g. http://127.0.0.1:8700), `threads`
    calls at a time, with the team's capture key `key` as X-Kolm-Key; returns each call's `x-kolm-served-by`
    ("local", "upstream"), in order."""
    import openai

    client = openai.OpenAI(
        base_url=f"{proxy_url.rstrip('/')}/v1/capture/openai",
        api_key="sk-demo-not-a-real-key",  # forwarded to the stand-in upstream, which ignores it
        default_headers={"X-Kolm-Namespace": namespace, **({"X-Kolm-Key": key} if key else {})},
        max_retries=0,
    )

    def ask(item: WorkItem) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": item.query}],
        )
        if raw.parse().choices[0].message.content is None:
            raise RuntimeError("an answer without content")
        return raw.headers.get("x-kolm-served-by", "upstream")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        answers = pool.map(ask, items)
        if progress:  # a bar on a terminal only; callers print one line either way
            from tqdm import tqdm

            answers = tqdm(answers, total=len(items), desc="openai SDK -> proxy", unit="call")
        return list(answers)


def traffic_command(
    proxy: str, calls: int, namespace: str, seed: int, threads: int, key: str | None = None
) -> int:
    """`python -m kolm_ray.demo.simulate traffic`: one line, exit 0 when every call was answered."""
    import sys
    import time

    import httpx
    import openai

    from kolm_ray.placement import progress_bars

    deadline = time.monotonic() + 30  # typed right after `kolm capture ... &`: give it time to start
    while True:
        try:
            httpx.get(f"{proxy.rstrip('/')}/healthz", timeout=2.0)
            break
        except httpx.HTTPError as e:
            if time.monotonic() > deadline:
                print(f"error: no kolm capture answers at {proxy} ({type(e).__name__})", file=sys.stderr)
                return 2
            time.sleep(0.3)
    try:
        served = send_traffic(
            proxy, generate_workload(calls, seed=seed), namespace, threads, progress_bars(), key=key
        )
    except (openai.APIError, httpx.HTTPError) as e:
        print(f"error: {proxy} did not answer a call: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    by = Counter(served)
    print(
        f"{len(served)} calls to {proxy} in namespace {namespace}: {len(served)} answered "
        f"({by['local']} local, {by['upstream']} upstream)"
    )
    return 0
