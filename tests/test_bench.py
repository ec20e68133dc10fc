"""kolm bench recall: the open-loop generator, its summary, the plot, and its CLI errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from kolm_ray.cli import main
from kolm_ray.errors import KolmError
from kolm_ray.serve import bench


def test_open_loop_offers_the_rate_without_waiting_for_answers():
    """A server that takes 200 ms per request must not slow the offered rate (open loop)."""
    in_flight = 0
    peak = 0

    async def slow(query):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return 200, ({"mode": "broad", "reason": "test"} if query == "b" else {"mode": "narrow"})

    row = asyncio.run(bench.open_loop(slow, ["a", "b"], rps=100, duration=2.0, warmup=0.5, seed=1))
    assert 150 <= row["sent"] <= 250  # ~100/s for 2 s measured (Poisson)
    assert peak >= 10  # ~100/s x 0.2 s in flight at once: requests did not wait for each other
    # latency counts the 200 ms answer (a lower bound, whatever the load; timing: benchmarks/recall.py)
    assert row["errors"] == 0 and row["p50"] >= 199
    assert 0.3 < row["fallback_share"] < 0.7 and row["fallback_reasons"] == {
        "test": row["fallback_reasons"]["test"]
    }
    assert row["within_budget_share"] == 0.0  # 200 ms > the 100 ms budget


def test_open_loop_counts_errors_and_non_200():
    async def flaky(query):
        if query == "boom":
            raise ConnectionError("refused")
        return (503, {}) if query == "busy" else (200, {"mode": "narrow"})

    row = asyncio.run(bench.open_loop(flaky, ["ok", "boom", "busy"], rps=60, duration=1.0, warmup=0.0))
    assert row["errors"] > 0 and set(row["error_kinds"]) == {"ConnectionError", "http 503"}
    assert row["ok"] + row["errors"] == row["sent"]


def test_run_rates_meters_each_rate_and_the_cpu_meter_attributes_this_process(capsys):
    """The meter brackets each rate and sees its requests (warm-up included); benchmarks/recall.py's psutil
    meter charges this process's own work to the load generator."""
    import importlib.util
    import time
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "recall_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "recall.py"
    )
    recall = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recall)

    async def busy(query):
        end = time.process_time() + 0.002  # 2 ms of this process's CPU per request
        while time.process_time() < end:
            pass
        return 200, {"mode": "narrow"}

    calls = []
    cpu = recall.cpu_meter({})

    def meter():
        finish = cpu()

        def done(requests):
            calls.append(requests)
            return finish(requests)

        return done

    rows = asyncio.run(bench.run_rates(busy, [40, 80], duration=1.0, queries=["q"], warmup=0.5, meter=meter))
    assert len(calls) == 2 and all(c > r["sent"] for c, r in zip(calls, rows, strict=True))
    for row in rows:
        assert 1.5 <= row["cpu_ms_per_request"]["load generator"] <= 20  # the 2 ms spin, plus the loop
        assert row["cpu_cores_busy"] > 0
    assert "CPU ms/request: " in capsys.readouterr().out


def test_max_rate_within_budget_and_plot(tmp_path):
    rows = [
        {"offered_rps": 50, "p50": 5, "p95": 9, "p99": 12, "errors": 0},
        {"offered_rps": 100, "p50": 8, "p95": 40, "p99": 90, "errors": 0},
        {"offered_rps": 200, "p50": 60, "p95": 300, "p99": 900, "errors": 0},
    ]
    assert bench.max_rate_within(rows) == 100
    assert bench.max_rate_within(rows[2:]) is None
    out = tmp_path / "lat.png"
    bench.plot_latency({"serve": rows, "in-process": rows[:2]}, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("rates", ["", "a,b", "0", "-5,10"])
def test_bad_rates_are_refused(rates):
    with pytest.raises(KolmError):
        bench.parse_rates(rates)


def test_bench_cli_says_when_nothing_answers(tmp_path, free_port, capsys):
    rc = main(["bench", "recall", "--url", f"http://127.0.0.1:{free_port}", "--rps", "5", "--duration", "1",
               "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 2 and "not answering" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_cli_reads_queries_file(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"input": "a"}) + "\n" + json.dumps("b") + "\n")
    assert bench._read_queries(str(good)) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": 3}\n')
    with pytest.raises(KolmError, match="line 1"):
        bench._read_queries(str(bad))
