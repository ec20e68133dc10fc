"""kolm bench recall: the open-loop generator, its summary, the plot, and its CLI errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from kolm_ray import bench
from kolm_ray.cli import main
from kolm_ray.errors import KolmError


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
    assert row["errors"] == 0 and 190 <= row["p50"] <= 300
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
