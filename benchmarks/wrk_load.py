"""HTTP load on the recall route with wrk (C, Debian package `wrk`): a different query per request, Poisson-paced.

    rows = run_rates("http://127.0.0.1:8000", "bench-all-key", queries, [50, 100, 400], duration=10)

Each connection sends one request at a time; wrk's `delay()` holds a connection that has its answer until
the next arrival of a Poisson process at the offered rate (LuaJIT's ffi reads the clock), so the offered
load is `rate` requests per second, whatever the latency, while a connection is free: `rate /
PER_CONNECTION_RPS` connections leave room for 200 ms answers (twice the route's budget) before the
generator itself falls behind; the achieved rate is reported beside the target. The Lua script counts, from each answer's body, narrow,
broad, over budget ("exceeded the ... budget") and tagger unavailable; wrk itself measures latency (from
sending a request to its full response) and reports the percentiles below.
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

# Both scripts time requests with the same wall clock (LuaJIT FFI: wrk gives Lua no clock of its own).
CLOCK_LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } kolm_timespec;
int clock_gettime(int clk_id, kolm_timespec *tp);
]]
local ts = ffi.new("kolm_timespec")
local function now_ms()  -- CLOCK_REALTIME, so the driver's timeline (time.time()) lines up with it
  ffi.C.clock_gettime(0, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
"""

LUA = (
    CLOCK_LUA
    + r"""
local bodies, threads, counter = {}, {}, 0
local rate, stride, offset = 10, 1, 0
local auth = ""

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  rate = tonumber(args[2])
  auth = args[3]
  math.randomseed(1000 + id)
  -- threads walk the query list from different places, so concurrent requests carry different queries
  offset = math.floor(#bodies * id / tonumber(args[4]))
  narrow, broad, over, unavailable, bad = 0, 0, 0, 0, 0
end

function request()
  offset = offset + 1
  local body = bodies[(offset % #bodies) + 1]
  return wrk.format("POST", "/v1/recall/route",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. auth}, body)
end

local next_at = nil
function delay()
  -- The thread's Poisson arrivals: each connection that has its answer takes the next arrival time, so
  -- the offered rate does not fall by the latency while a connection is free; behind by more than a
  -- second (every connection busy), the schedule restarts from now rather than sending a burst.
  local now = now_ms()
  next_at = math.max(next_at or now, now - 1000) - math.log(1 - math.random()) * 1000 / rate
  return math.max(next_at - now, 0)
end

function response(status, headers, body)
  if status ~= 200 then bad = bad + 1
  elseif body:find('budget', 1, true) then over = over + 1
  elseif body:find('unavailable', 1, true) then unavailable = unavailable + 1
  elseif body:find('"narrow"', 1, true) then narrow = narrow + 1
  else broad = broad + 1 end
end

function done(summary, latency, requests)
  local c = {narrow = 0, broad = 0, over_budget = 0, unavailable = 0, non_200 = 0}
  for _, t in ipairs(threads) do
    c.narrow = c.narrow + t:get("narrow")
    c.broad = c.broad + t:get("broad")
    c.over_budget = c.over_budget + t:get("over")
    c.unavailable = c.unavailable + t:get("unavailable")
    c.non_200 = c.non_200 + t:get("bad")
  end
  local p = {}
  for _, q in ipairs(PERCENTILE_LIST) do p[#p + 1] = string.format('"%s": %.3f', q, latency:percentile(q) / 1000) end
  io.write(string.format(
    'KOLM-RESULT {"requests": %d, "duration_s": %.3f, "socket_errors": %d, "latency_ms": {%s}, ' ..
    '"mean_ms": %.3f, "max_ms": %.3f, "narrow": %d, "broad": %d, "over_budget": %d, "unavailable": %d, ' ..
    '"non_200": %d}\n',
    summary.requests, summary.duration / 1e6,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(p, ", "), latency.mean / 1000, latency.max / 1000,
    c.narrow, c.broad, c.over_budget, c.unavailable, c.non_200))
end
""".replace("PERCENTILE_LIST", "{" + ", ".join(str(p) for p in PERCENTILES) + "}")
)


# A load step (run_schedule): one wrk run whose offered rate follows a schedule of (seconds, rps) phases, with
# every request's send time, latency and outcome kept, so latency can be read per second while the autoscaler
# acts. One connection per wrk thread, so each thread's response answers the request it sent last.
STEP_LUA = (
    CLOCK_LUA
    + r"""
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
  offset = math.floor(#bodies * id / tonumber(args[5]))
  sent_at, t, lat, kind, n = 0, {}, {}, {}, 0
end

function request()
  offset = offset + 1
  sent_at = now_ms()
  return wrk.format("POST", "/v1/recall/route",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. auth},
    bodies[(offset % #bodies) + 1])
end

local next_at = nil
function delay()
  -- This connection's Poisson arrivals, from its last arrival time (so latency does not lower the rate;
  -- more than a second behind, from now), at a rate that changes at the phase ends: a gap drawn at one
  -- phase's rate that would cross into the next phase restarts there at the next rate (exact, since the
  -- exponential is memoryless).
  local now = now_ms() - start_ms
  local t = math.max(next_at or now, now - 1000)
  for i = 1, #ends do
    if t < ends[i] then
      local next_t = t - math.log(1 - math.random()) * 1000 / rates[i]
      if next_t < ends[i] or i == #ends then
        next_at = next_t
        return math.max(next_t - now, 0)
      end
      t = ends[i]
    end
  end
  return -math.log(1 - math.random()) * 1000 / rates[#rates]  -- past the schedule (wrk is stopping)
end

function response(status, headers, body)
  local k = "broad"
  if status ~= 200 then k = "non_200"
  elseif body:find('budget', 1, true) then k = "over_budget"
  elseif body:find('unavailable', 1, true) then k = "unavailable"
  elseif body:find('"narrow"', 1, true) then k = "narrow" end
  n = n + 1
  t[n] = sent_at - start_ms
  lat[n] = now_ms() - sent_at
  kind[n] = k
end

function done(summary, latency, requests)
  local f = io.open(OUT_PATH, "w")
  for _, th in ipairs(threads) do
    local tt, ll, kk = th:get("t"), th:get("lat"), th:get("kind")
    for i = 1, #tt do f:write(string.format("%.3f %.3f %s\n", tt[i], ll[i], kk[i])) end
  end
  f:close()
end
"""
)


def run_schedule(
    url: str, key: str, queries: list[str], phases: list[tuple[float, float]], connections: int
) -> tuple[float, list[tuple[float, float, str]]]:
    """One wrk run through `phases` [(seconds, rps), ...] on `connections` connections (one per thread).

    Returns (start as time.time(), [(send time s after start, latency ms, outcome), ...]) for every answered
    request; outcome is narrow, broad, over_budget, unavailable or non_200 (as in run_rate's counts).
    """
    import time

    total = sum(s for s, _ in phases)
    ends, schedule = 0.0, []
    for seconds, rps in phases:
        ends += seconds
        schedule.append(f"{ends:g}:{rps / connections:.4f}")
    with tempfile.TemporaryDirectory(prefix="kolm-wrk-step-") as tmp:
        script, bodies, out = Path(tmp) / "step.lua", Path(tmp) / "bodies.jsonl", Path(tmp) / "requests.txt"
        script.write_text(STEP_LUA.replace("OUT_PATH", json.dumps(str(out))))
        bodies.write_text("".join(json.dumps({"query": q}) + "\n" for q in queries))
        start = time.time()  # the threads' shared clock origin: no request is sent before it
        cmd = [
            require_wrk(), f"-t{connections}", f"-c{connections}", f"-d{total:g}s", "--timeout", "5s",
            "-s", str(script), url, "--", str(bodies), key, f"{start * 1000:.3f}", ",".join(schedule),
            str(connections),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=total + 60, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        rows = []
        for line in out.read_text().splitlines():
            t, lat, kind = line.split()
            rows.append((float(t) / 1000, float(lat), kind))
    return start, sorted(rows)


def per_second(
    requests: list[tuple[float, float, str]], seconds: float, budget_ms: float = 100.0
) -> list[dict[str, Any]]:
    """run_schedule's requests binned by the second they were sent in: rate, p50/p99 and outcome shares."""
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


def run_rate(url: str, key: str, queries: list[str], rate: float, duration: float, threads: int = 1) -> dict:
    """One wrk run at about `rate` requests per second for `duration` seconds; its counts and latencies."""
    connections = max(threads, round(rate / PER_CONNECTION_RPS))
    with tempfile.TemporaryDirectory(prefix="kolm-wrk-") as tmp:
        script, bodies = Path(tmp) / "route.lua", Path(tmp) / "bodies.jsonl"
        script.write_text(LUA)
        bodies.write_text("".join(json.dumps({"query": q}) + "\n" for q in queries))
        per_thread = rate / threads  # the Lua script's arrival rate, shared by the thread's connections
        cmd = [
            require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(script), url, "--", str(bodies), f"{per_thread:.4f}", key, str(threads),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("KOLM-RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(line.removeprefix("KOLM-RESULT "))
    n = max(out["requests"], 1)
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
