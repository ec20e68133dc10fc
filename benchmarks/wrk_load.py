"""HTTP load on the recall route with wrk (C, Debian package `wrk`): a different query per request, Poisson-paced.

    rows = run_rates("http://127.0.0.1:8000", "bench-all-key", queries, [50, 100, 400], duration=10)

Latency is measured from each request's scheduled arrival, not from when it was sent (coordinated omission
corrected, as wrk2 does): every connection (one per wrk thread) follows its own Poisson schedule at
`rate / connections`, and wrk's `delay()` holds it until its next arrival. When the answers are slower than
the schedule the connection falls behind; the schedule is never reset, so the next request goes at once and
its latency counts the time it waited behind the earlier ones (client-side queueing is in the figure, as a
user arriving on schedule would see it). `rate / PER_CONNECTION_RPS` connections leave room for 200 ms
answers (twice the route's budget) before a connection falls behind. Each answer's outcome is read from
its body: narrow, broad, over budget ("exceeded the ... budget"), tagger unavailable, non-200. Each request
also keeps its service time (send -> full answer, what plain wrk reports), and the share sent late.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PER_CONNECTION_RPS = 5.0
PERCENTILES = (50, 90, 95, 99, 99.9)

# One wrk run whose offered rate follows a schedule of (seconds, rps) phases (a single phase for run_rate),
# with every request's scheduled arrival, latency from it, service time and outcome kept. One connection per
# wrk thread, so each thread's response answers the request it sent last. The clock: LuaJIT FFI
# (CLOCK_REALTIME, so the driver's timeline, time.time(), lines up with it; wrk gives Lua no clock).
STEP_LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } kolm_timespec;
int clock_gettime(int clk_id, kolm_timespec *tp);
]]
local ts = ffi.new("kolm_timespec")
local function now_ms()
  ffi.C.clock_gettime(0, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local bodies, threads, counter = {}, {}, 0
local ends, rates, start_ms, auth = {}, {}, 0, ""

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  auth = args[2]
  start_ms = tonumber(args[3])
  for phase in string.gmatch(args[4], "[^,]+") do  -- "end_s:rps_per_connection,..."
    local e, r = string.match(phase, "([^:]+):([^:]+)")
    ends[#ends + 1] = tonumber(e) * 1000
    rates[#rates + 1] = tonumber(r)
  end
  math.randomseed(2000 + id)
  -- threads walk the query list from different places, so concurrent requests carry different queries
  offset = math.floor(#bodies * id / tonumber(args[5]))
  scheduled, sent_at, t, lat, svc, kind, n = 0, 0, {}, {}, {}, {}, 0
end

local next_at = nil

-- wrk's timers (ae) count whole milliseconds from a truncated clock and fire up to 1 ms before the time
-- asked for; a wait rounded up, plus 1 ms, never sends before the scheduled arrival (at most ~2 ms after).
local function wait_ms(ms)
  if ms <= 0 then return 0 end
  return math.ceil(ms) + 1
end

function delay()
  -- This connection's next Poisson arrival, drawn from its previous arrival (never from now: a connection
  -- behind its schedule sends at once and the wait counts in the latency), at a rate that changes at the
  -- phase ends: a gap drawn at one phase's rate that would cross into the next phase restarts there at the
  -- next rate (exact, since the exponential is memoryless).
  local now = now_ms() - start_ms
  local t = next_at or now
  for i = 1, #ends do
    if t < ends[i] then
      local next_t = t - math.log(1 - math.random()) * 1000 / rates[i]
      if next_t < ends[i] or i == #ends then
        next_at = next_t
        return wait_ms(next_t - now)
      end
      t = ends[i]
    end
  end
  next_at = t - math.log(1 - math.random()) * 1000 / rates[#rates]  -- past the schedule (wrk is stopping)
  return wait_ms(next_at - now)
end

function request()
  offset = offset + 1
  sent_at = now_ms() - start_ms
  -- the arrival it was scheduled for; a send before it (a timer that fired early anyway) counts from the send
  scheduled = math.min(next_at or sent_at, sent_at)
  return wrk.format("POST", "/v1/recall/route",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. auth},
    bodies[(offset % #bodies) + 1])
end

function response(status, headers, body)
  local k = "broad"
  if status ~= 200 then k = "non_200"
  elseif body:find('budget', 1, true) then k = "over_budget"
  elseif body:find('unavailable', 1, true) then k = "unavailable"
  elseif body:find('"narrow"', 1, true) then k = "narrow" end
  local now = now_ms() - start_ms
  n = n + 1
  t[n] = scheduled
  lat[n] = now - scheduled
  svc[n] = now - sent_at
  kind[n] = k
end

function done(summary, latency, requests)
  local f = io.open(OUT_PATH, "w")
  for _, th in ipairs(threads) do
    local tt, ll, ss, kk = th:get("t"), th:get("lat"), th:get("svc"), th:get("kind")
    for i = 1, #tt do f:write(string.format("%.3f %.3f %.3f %s\n", tt[i], ll[i], ss[i], kk[i])) end
  end
  f:close()
  io.write(string.format('KOLM-RESULT {"duration_s": %.3f, "socket_errors": %d}\n', summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def _wrk_schedule(
    url: str, key: str, queries: list[str], phases: list[tuple[float, float]], connections: int
) -> tuple[float, list[tuple[float, float, float, str]], dict[str, Any]]:
    """One wrk run through `phases` on `connections` connections (one per thread): (start as time.time(),
    sorted [(scheduled arrival s after start, latency ms from it, service ms, outcome)], wrk's summary)."""
    import time

    total = sum(s for s, _ in phases)
    ends, schedule = 0.0, []
    for seconds, rps in phases:
        ends += seconds
        schedule.append(f"{ends:g}:{rps / connections:.4f}")
    with tempfile.TemporaryDirectory(prefix="kolm-wrk-") as tmp:
        script, bodies, out = Path(tmp) / "step.lua", Path(tmp) / "bodies.jsonl", Path(tmp) / "requests.txt"
        script.write_text(STEP_LUA.replace("OUT_PATH", json.dumps(str(out))))
        bodies.write_text("".join(json.dumps({"query": q}) + "\n" for q in queries))
        start = time.time()  # the threads' shared clock origin: no request is scheduled before it
        cmd = [
            require_wrk(), f"-t{connections}", f"-c{connections}", f"-d{total:g}s", "--timeout", "5s",
            "-s", str(script), url, "--", str(bodies), key, f"{start * 1000:.3f}", ",".join(schedule),
            str(connections),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=total + 60, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("KOLM-RESULT ")), None)
        if proc.returncode != 0 or not out.exists() or line is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        rows = []
        for row in out.read_text().splitlines():
            t, lat, svc, kind = row.split()
            rows.append((float(t) / 1000, float(lat), float(svc), kind))
    return start, sorted(rows), json.loads(line.removeprefix("KOLM-RESULT "))


def run_schedule(
    url: str, key: str, queries: list[str], phases: list[tuple[float, float]], connections: int
) -> tuple[float, list[tuple[float, float, str]]]:
    """One wrk run through `phases` [(seconds, rps), ...] on `connections` connections (one per thread).

    Returns (start as time.time(), [(scheduled arrival s after start, latency ms from that arrival, outcome),
    ...]) for every answered request; outcome is narrow, broad, over_budget, unavailable or non_200 (as in
    run_rate's counts).
    """
    start, rows, _ = _wrk_schedule(url, key, queries, phases, connections)
    return start, [(t, lat, kind) for t, lat, _, kind in rows]


def per_second(
    requests: list[tuple[float, float, str]], seconds: float, budget_ms: float = 100.0
) -> list[dict[str, Any]]:
    """run_schedule's requests binned by the second they were scheduled in: rate, p50/p99 and outcome shares."""
    import numpy as np

    bins: list[list[tuple[float, str]]] = [[] for _ in range(int(seconds))]
    for t, lat, kind in requests:
        if 0 <= t < len(bins):
            bins[int(t)].append((lat, kind))
    out = []
    for second, rows in enumerate(bins):
        lats = np.array([lat for lat, _ in rows]) if rows else np.array([np.nan])
        n = max(len(rows), 1)
        out.append({
            "t": second, "sent": len(rows),
            "p50": round(float(np.percentile(lats, 50)), 2), "p99": round(float(np.percentile(lats, 99)), 2),
            "over_budget_share": round(sum(k == "over_budget" for _, k in rows) / n, 4),
            "narrow_share": round(sum(k == "narrow" for _, k in rows) / n, 4),
            "unavailable_or_error_share": round(sum(k in ("unavailable", "non_200") for _, k in rows) / n, 4),
            "p99_within_budget": bool(rows) and float(np.percentile(lats, 99)) <= budget_ms,
        })  # fmt: skip
    return out


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: `sudo apt-get install -y wrk` (make bench installs it)")
    return path


def run_rate(url: str, key: str, queries: list[str], rate: float, duration: float) -> dict:
    """One wrk run at `rate` requests per second (Poisson) for `duration` seconds: its counts, latencies from
    the scheduled arrivals (latency_ms) and service times (service_ms, send -> answer, what plain wrk shows)."""
    import numpy as np

    connections = max(1, round(rate / PER_CONNECTION_RPS))
    _, rows, summary = _wrk_schedule(url, key, queries, [(duration, rate)], connections)
    lat = np.array([r[1] for r in rows] or [np.nan])
    svc = np.array([r[2] for r in rows] or [np.nan])
    kinds = [r[3] for r in rows]
    n = max(len(rows), 1)
    out: dict[str, Any] = {
        "requests": len(rows),
        **summary,
        "latency_ms": {f"{p:g}": round(float(np.percentile(lat, p)), 3) for p in PERCENTILES},
        "service_ms": {f"{p:g}": round(float(np.percentile(svc, p)), 3) for p in PERCENTILES},
        "mean_ms": round(float(lat.mean()), 3),
        "max_ms": round(float(lat.max()), 3),
        # sent more than 3 ms after its scheduled arrival (the timer's rounding is at most ~2): the connection
        # was behind, its answers too slow for its schedule
        "late_share": round(sum(r[1] - r[2] > 3.0 for r in rows) / n, 4),
        **{k: kinds.count(k) for k in ("narrow", "broad", "over_budget", "unavailable", "non_200")},
    }
    out.update(
        target_rps=rate,
        achieved_rps=round(out["requests"] / out["duration_s"], 1),
        connections=connections,
        over_budget_share=out["over_budget"] / n,
        narrow_share=out["narrow"] / n,
        # the keys kolm_ray.serve.bench.plot_latency reads
        offered_rps=rate,
        p50=out["latency_ms"]["50"],
        p95=out["latency_ms"]["95"],
        p99=out["latency_ms"]["99"],
    )
    return out


def run_rates(
    url: str,
    key: str,
    queries: list[str],
    rates: list[float],
    duration: float,
    warmup: float = 3.0,
    meter=None,
    stop_after_over_budget: float = 0.2,
) -> list[dict[str, Any]]:
    """Each rate after a short warm-up at that rate; `meter` (benchmarks/recall.py cpu_meter) adds CPU per
    request by process. Rates after one with more than `stop_after_over_budget` of its answers over budget
    (20 times the 1% the targets allow) are not offered: past saturation, a higher rate only queues more."""
    rows = []
    for rate in rates:
        if rows and rows[-1]["over_budget_share"] > stop_after_over_budget:
            print(
                f"  {rate:>5g} rps: not offered (over {stop_after_over_budget:.0%} over budget below it)",
                flush=True,
            )
            break
        run_rate(url, key, queries, rate, warmup)
        finish = meter() if meter is not None else None
        row = run_rate(url, key, queries, rate, duration)
        if finish is not None:
            row.update(finish(row["requests"]))
        p = row["latency_ms"]
        print(
            f"  {rate:>5g} rps (achieved {row['achieved_rps']}): p50 {p['50']:.1f} ms  p99 {p['99']:.1f} ms  "
            f"over budget {row['over_budget_share']:.2%}  narrow {row['narrow_share']:.1%}",
            flush=True,
        )
        rows.append(row)
    return rows


def max_rate_within(
    rows: list[dict[str, Any]], p99_ms: float = 100.0, over_budget: float = 0.01
) -> float | None:
    """The highest target rate whose p99 <= p99_ms and over-budget share <= over_budget (all lower rates too)."""
    best = None
    for row in sorted(rows, key=lambda r: r["target_rps"]):
        ok = (
            row["latency_ms"]["99"] <= p99_ms
            and row["over_budget_share"] <= over_budget
            and row["non_200"] == 0
            and row["socket_errors"] == 0
            and row["achieved_rps"] >= 0.9 * row["target_rps"]
        )
        if not ok:
            break
        best = row["target_rps"]
    return best
