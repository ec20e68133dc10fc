"""benchmarks/wrk_load.py's load step and benchmarks/recall_hotpath.py's verdicts, against a real tiny server.

The server answers like the recall route: narrow for most queries, "exceeded the budget" (after 30 ms) for
queries containing "slow", so the counts, the latencies and the per-second rates wrk reports can be checked
against what the server did.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import recall_hotpath  # noqa: E402
import wrk_load  # noqa: E402

SERVER = r"""
import asyncio, json
seen = []
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    if scope["path"] == "/count":
        out = json.dumps({"n": len(seen), "slow": sum("slow" in q for q in seen)}).encode()
    else:
        q = json.loads(body)["query"]
        seen.append(q)
        if "sleepy" in q:
            await asyncio.sleep(0.2)
            out = b'{"mode": "narrow", "namespace": "a", "confidence": 0.9}'
        elif "slow" in q:
            await asyncio.sleep(0.03)
            out = b'{"mode": "broad", "reason": "tagger exceeded the 100 ms budget"}'
        else:
            out = b'{"mode": "narrow", "namespace": "a", "confidence": 0.9}'
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})
"""


@pytest.fixture
def route_server(tmp_path, free_port):
    (tmp_path / "route_app.py").write_text(SERVER)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "route_app:app",
            "--port",
            str(free_port),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
    )
    try:
        url = f"http://127.0.0.1:{free_port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/count", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_load_step_offers_each_phase_and_reports_every_answer(route_server):
    queries = ["book a flight", "slow query", "pay my bill", "what time is it"]
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (sudo apt-get install -y wrk)"
    start, requests = wrk_load.run_schedule(route_server, "k", queries, [(2.0, 20.0), (2.0, 120.0)], 12)
    assert abs(start - time.time()) < 30
    served = httpx.get(route_server + "/count").json()
    # every answered request is in the list, with the outcome the server gave it (in-flight ones at the
    # end are the only ones the server saw and wrk did not report)
    assert served["n"] - 12 <= len(requests) <= served["n"]
    kinds = {k for _, _, k in requests}
    assert kinds == {"narrow", "over_budget"}
    slow = [lat for _, lat, k in requests if k == "over_budget"]
    fast = [lat for _, lat, k in requests if k == "narrow"]
    # the 30 ms sleep is in the latency (asyncio may wake up to a millisecond early)
    assert min(slow) >= 29.0 > max(sorted(fast)[: len(fast) // 2])
    assert abs(len(slow) / len(requests) - 0.25) < 0.12  # a quarter of the queries (threads walk the list)
    rows = wrk_load.per_second(requests, 4.0)
    assert [r["t"] for r in rows] == [0, 1, 2, 3]
    assert sum(r["sent"] for r in rows) == len([r for r in requests if r[0] < 4.0])
    low, high = rows[0]["sent"] + rows[1]["sent"], rows[2]["sent"] + rows[3]["sent"]
    assert 15 <= low <= 75 and 150 <= high <= 330, (
        low,
        high,
    )  # ~40 then ~240 (Poisson arrivals)
    assert all(0.0 <= r["over_budget_share"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_latency_counts_from_the_scheduled_arrival_and_the_schedule_never_resets(route_server):
    """One connection offered 20 rps of 200 ms answers (at most 5 rps served): it falls further behind every
    second. Measured from the send, every request takes ~200 ms; from its scheduled arrival the wait behind
    the earlier ones is in, and grows past 2 s by the end (a schedule that restarted from now when behind,
    as wrk_load once did, would hold every latency near 1.2 s)."""
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (sudo apt-get install -y wrk)"
    row = wrk_load.run_rate(route_server, "k", ["sleepy query"], rate=5.0 * 4, duration=4.0)
    assert row["connections"] == 4  # rate / PER_CONNECTION_RPS: 4 connections, each offered 5 rps
    assert row["service_ms"]["50"] >= 199.0 and row["latency_ms"]["50"] >= row["service_ms"]["50"]
    _, rows, _ = wrk_load._wrk_schedule(route_server, "k", ["sleepy query"], [(4.0, 20.0)], 1)
    assert rows and all(kind == "narrow" for *_, kind in rows)
    assert all(lat >= svc for _, lat, svc, _ in rows)  # from the arrival: never less than the service
    services = sorted(svc for _, _, svc, _ in rows)
    assert services[len(services) // 2] >= 190.0, services  # service: the 200 ms sleep
    assert max(lat for _, lat, _, _ in rows) > 2000.0, rows[-3:]
    # the schedule runs ahead of the answers: arrivals at 20 rps, so the k-th answered was scheduled early
    assert rows[-1][0] < 0.5 * 4.0
    waits = [lat - svc for _, lat, svc, _ in rows]  # time spent behind the schedule, growing
    assert waits[-1] > waits[0] + 1000.0


def _row(rps: float, p50: float, p99: float, over: float = 0.0, achieved: float | None = None) -> dict:
    return {
        "target_rps": rps, "achieved_rps": achieved if achieved is not None else rps, "p50": p50, "p99": p99,
        "latency_ms": {"50": p50, "99": p99}, "over_budget_share": over, "narrow_share": 0.9, "non_200": 0,
        "socket_errors": 0, "cpu_ms_per_request": {"ingress": 1.0, "tagger replicas": 2.0, "haproxy": 0.2, "other": 1.0},
    }  # fmt: skip


def test_summary_states_each_target_met_or_missed_and_where_the_time_goes():
    rows = [_row(50, 8, 25), _row(100, 9, 40), _row(200, 20, 90), _row(400, 60, 180, over=0.05)]
    step = {
        "phases": [[20, 50], [40, 400]], "step_at_s": 20, "second_replica_requested_s": 24.0,
        "second_replica_running_s": 31.5, "phase_1": {"p99": 95.0, "over_budget_share": 0.004},
    }  # fmt: skip
    cascade = {"rates": rows, "max_rps_p99_within_budget": wrk_load.max_rate_within(rows), "step": step}
    result = {"serve": {"haproxy+throughput/cascade": cascade}, "student": {"share": 0.7}}
    s = recall_hotpath.summarize(result)
    assert s["route_at_50rps"]["met"] is True
    assert s["max_rps_p99_within_budget"] == {
        "cascade": 200,
        "teacher_only": None,
        "cascade_unbatched": None,
        "in_process_no_serve": None,
        "met": False,
    }
    assert s["load_step"]["met"] is True
    assert s["missed"] == ["max_rps_p99_within_budget"]
    where = s["where_the_time_goes"]
    assert where["first_rate_missed"] == 400 and where["its_over_budget_share"] == 0.05
    assert where["cores_needed_at_400_rps_at_this_cost"] == pytest.approx(4.2 * 400 / 1000)
    assert s["route_cpu_ms_per_request"]["cascade"][50] == 3.2  # ingress + tagger + HAProxy, not "other"

    step["second_replica_running_s"] = None  # the autoscaler never brought the second one up
    rows[0] = _row(50, 12, 25)
    s = recall_hotpath.summarize(result)
    assert s["route_at_50rps"]["met"] is False and s["load_step"]["met"] is False
    assert s["missed"] == ["route_at_50rps", "max_rps_p99_within_budget", "load_step"]
