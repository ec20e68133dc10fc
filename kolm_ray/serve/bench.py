"""kolm bench recall: open-loop load on POST /v1/recall/route, one rate after another.

    kolm bench recall --url http://127.0.0.1:8000 --rps 50,100,200 --duration 20 --out bench-out

Open loop: request i is sent at its scheduled time (Poisson arrivals at the offered rate) whether or not
earlier ones have answered, and its latency counts from that scheduled time, so a slow server cannot
slow the client down and hide its own queueing (no coordinated omission). Each rate starts with a
warm-up whose requests are not counted. Writes DIR/recall-bench.json (p50/p95/p99, errors, fallback
share per rate) and DIR/recall-latency.png (latency vs offered load).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kolm_ray.errors import KolmError

ROUTE = "/v1/recall/route"
DEMO_KEY = "demo-acme-key"  # the documented demo tenant (configs/tenants.yaml); never a real secret
SATURATED_MS = 1000  # a rate whose median waits this long is past saturation: stop offering more
BUDGET_MS = 100.0
Send = Callable[[str], Awaitable[tuple[int, dict[str, Any]]]]

DEFAULT_QUERIES = (
    "how do I freeze my account",
    "what's the interest rate on my savings",
    "transfer 200 dollars from checking to savings",
    "my card was declined at the store",
    "what is my credit limit",
    "when is my electricity bill due",
    "schedule a meeting with the design team next tuesday",
    "how many vacation days do i have left",
    "what can you do",
    "who made you",
    "book a flight to denver",
    "tell me a joke",
    "i lost my credit card while traveling, can you send a replacement?",
    "set a reminder to pay rent on the first",
    "what's the exchange rate for euros",
    "how long should i boil an egg",
)


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(latencies_ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "mean": round(float(a.mean()), 2),
    }


async def open_loop(
    send: Send, queries: Sequence[str], rps: float, duration: float, warmup: float = 3.0, seed: int = 0
) -> dict[str, Any]:
    """Offer `rps` requests/s (Poisson) for warmup + duration seconds; summarize the measured part."""
    rng = random.Random(seed)
    results: list[tuple[float, int, dict[str, Any] | None, str | None]] = []
    tasks: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    total = warmup + duration

    async def one(scheduled: float, query: str, measured: bool) -> None:
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            status, body = await send(query)
            err = None
        except Exception as e:  # connection refused, timeout...: an error for this rate, not a crash
            status, body, err = 0, None, f"{type(e).__name__}"
        if measured:
            results.append(((loop.time() - scheduled) * 1e3, status, body, err))

    t = 0.0
    while True:
        t += rng.expovariate(rps)
        if t >= total:
            break
        tasks.append(asyncio.create_task(one(t0 + t, queries[len(tasks) % len(queries)], t >= warmup)))
    await asyncio.gather(*tasks)
    ok = [r for r in results if r[1] == 200]
    latencies = [r[0] for r in ok]
    broad = [r for r in ok if isinstance(r[2], dict) and r[2].get("mode") == "broad"]
    errors = Counter(r[3] or f"http {r[1]}" for r in results if r[1] != 200)
    reasons = Counter((r[2] or {}).get("reason", "low confidence") for r in broad)
    return {
        "offered_rps": rps,
        "sent": len(results),
        "ok": len(ok),
        "achieved_rps": round(len(results) / duration, 1),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "fallback_share": round(len(broad) / len(ok), 4) if ok else None,
        "fallback_reasons": dict(reasons),
        "within_budget_share": round(sum(x <= BUDGET_MS for x in latencies) / len(latencies), 4)
        if latencies
        else None,
        **percentiles(latencies),
    }


def http_sender(client: Any, url: str, key: str) -> Send:
    """A Send that POSTs {"query": q} to URL/v1/recall/route with the tenant's bearer key."""
    endpoint = url.rstrip("/") + ROUTE
    headers = {"Authorization": f"Bearer {key}"}

    async def send(query: str) -> tuple[int, dict[str, Any]]:
        r = await client.post(endpoint, json={"query": query}, headers=headers)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {}

    return send


Meter = Callable[[], Callable[[float], dict[str, Any]]]
"""meter() starts measuring a rate; what it returns, called with the requests sent, says what the rate cost."""


async def run_rates(
    send: Send,
    rates: Sequence[float],
    duration: float,
    queries: Sequence[str],
    warmup: float = 3.0,
    meter: Meter | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for rps in rates:
        finish = meter() if meter is not None else None
        row = await open_loop(send, queries, rps, duration, warmup)
        if finish is not None:
            row.update(finish(row["sent"] * (warmup + duration) / duration))  # warm-up requests cost CPU too
        rows.append(row)
        print(
            f"  {rps:>6.0f} rps: p50 {row['p50']} ms  p95 {row['p95']} ms  p99 {row['p99']} ms  "
            f"errors {row['errors']}  fallback {row['fallback_share']}",
            flush=True,
        )
        if "cpu_ms_per_request" in row:
            parts = ", ".join(f"{k} {v}" for k, v in row["cpu_ms_per_request"].items())
            print(f"          CPU ms/request: {parts} ({row['cpu_cores_busy']} cores busy)", flush=True)
        if row["p50"] is None or row["p50"] > SATURATED_MS:
            print(
                f"  saturated at {rps:.0f} rps (p50 over {SATURATED_MS} ms): higher rates skipped", flush=True
            )
            break
    return rows


async def bench_http(
    url: str,
    key: str,
    rates: Sequence[float],
    duration: float,
    queries: Sequence[str],
    warmup: float = 3.0,
    meter: Meter | None = None,
) -> list[dict[str, Any]]:
    """Open-loop load on a running router at each rate in turn."""
    import httpx

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0)) as client:
        send = http_sender(client, url, key)
        for attempt in range(3):  # the router must answer before the rates start
            try:
                status, body = await send(queries[0])
                break
            except httpx.HTTPError as e:
                if attempt == 2:
                    raise KolmError(
                        f"{url}{ROUTE} is not answering ({type(e).__name__}); is the router running?"
                    ) from None
                await asyncio.sleep(1.0)
        if status == 401:
            raise KolmError(f"{url}{ROUTE} refused the key (401): pass --key or set KOLM_TENANT_KEY")
        if status != 200:
            raise KolmError(f"{url}{ROUTE} answered {status}: {body}")
        return await run_rates(send, rates, duration, queries, warmup, meter)


def max_rate_within(rows: Sequence[dict[str, Any]], p99_ms: float = BUDGET_MS) -> float | None:
    """The highest offered rate whose p99 stayed within p99_ms with no errors."""
    good = [
        r["offered_rps"] for r in rows if r["p99"] is not None and r["p99"] <= p99_ms and r["errors"] == 0
    ]
    return max(good) if good else None


def plot_latency(series: dict[str, Sequence[dict[str, Any]]], path: str | Path, title: str) -> None:
    """Latency percentiles vs offered load, one colour per series, the 100 ms budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"p50": "-o", "p95": "--s", "p99": ":^"}
    for i, (name, rows) in enumerate(series.items()):
        color = f"C{i}"
        xs = [r["offered_rps"] for r in rows]
        for q, st in styles.items():
            ys = [r[q] if r[q] is not None else np.nan for r in rows]
            ax.plot(xs, ys, st, color=color, label=f"{name} {q}", markersize=4)
    ax.axhline(BUDGET_MS, color="red", linewidth=1, alpha=0.6, label="budget 100 ms")
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_queries(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_QUERIES)
    p = Path(path)
    if not p.is_file():
        raise KolmError(f"--queries {path}: no such file")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise KolmError(f"--queries {path}: line {n} is not JSON") from None
        q = row.get("input") if isinstance(row, dict) else row
        if not isinstance(q, str) or not q.strip():
            raise KolmError(f'--queries {path}: line {n}: expected {{"input": "..."}}')
        out.append(q)
    if not out:
        raise KolmError(f"--queries {path}: no queries")
    return out


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KolmError(f"--rps {text!r}: expected comma-separated numbers, e.g. 50,100,200") from None
    if not rates or any(r <= 0 for r in rates):
        raise KolmError(f"--rps {text!r}: rates must be positive")
    return rates


def bench_command(args) -> int:
    """kolm bench recall: open-loop load at each --rps for --duration s; JSON + latency-vs-load PNG in --out."""
    rates = parse_rates(args.rps)
    if args.duration <= 0:
        raise KolmError("--duration must be positive")
    queries = _read_queries(args.queries)
    key = args.key or os.environ.get("KOLM_TENANT_KEY") or DEMO_KEY
    out = Path(args.out)
    print(
        f"open-loop load on {args.url}{ROUTE}: rates {rates}, {args.duration:g} s each (+3 s warm-up)",
        flush=True,
    )
    started = time.time()
    rows = asyncio.run(bench_http(args.url, key, rates, args.duration, queries))
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "url": args.url,
        "duration_s": args.duration,
        "warmup_s": 3.0,
        "queries": len(queries),
        "started_at": started,
        "load_average": os.getloadavg(),
        "rates": rows,
        "max_rps_p99_within_budget": max_rate_within(rows),
    }
    (out / "recall-bench.json").write_text(json.dumps(result, indent=2))
    plot_latency({"serve": rows}, out / "recall-latency.png", f"recall route latency vs load ({args.url})")
    print(f"wrote {out / 'recall-bench.json'} and {out / 'recall-latency.png'}")
    return 0
