"""How fast the refusals are: the timings the unit tests used to assert, measured here instead (issue 28).

    .venv/bin/python benchmarks/failure_timings.py            # -> benchmarks/results/failure_timings.json

Each figure has its baseline from the same run, and the machine's load is recorded beside it (a 2-core
machine shared with other jobs: wall-clock figures move with the load):
- hostile .kolm files (tests/test_hostile_artifacts.py's set): `kolm verify` as a subprocess, seconds to
  the exit-4 line, against `kolm verify` of a good 8 MiB artifact (the baseline) and `python -c pass`;
- the recall router's budget: a tagger that takes 1 s behind a 50 ms budget, ms to the broad answer,
  against a tagger that answers at once;
- `kolm compile` with an uncached hub base: seconds to the exit-2 line (before Ray starts), against
  `kolm compile --dry-run` of a local base.
The unit tests keep what does not depend on load: the exit code, the one line, nothing left on disk, the
slow tagger's answer never awaited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "tests"))


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    return time.perf_counter() - t0, proc.returncode, proc.stderr


def hostile(repeat: int) -> dict:
    import test_hostile_artifacts as h

    from kolm_ray.artifact import pack

    os.environ["KOLM_SIGNING_KEY"] = h.KEY  # pack() signs the good artifact with it; verify checks with it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out: dict = {"cases": {}}
    with tempfile.TemporaryDirectory(prefix="kolm-hostile-") as tmp:
        good = Path(tmp) / "good"
        good.mkdir()
        (good / "w.safetensors").write_bytes(b"\1" * (8 << 20))
        pack(
            good, Path(tmp) / "good.kolm", {"name": "g", "kind": "encoder-tagger", "spec": {}, "metrics": {}}
        )
        cases = {"good (baseline)": (Path(tmp) / "good.kolm").read_bytes(), **h.HOSTILE}
        startup = [_run([sys.executable, "-c", "pass"], env)[0] for _ in range(repeat)]
        out["python_startup_s"] = round(statistics.median(startup), 3)
        for case, data in cases.items():
            path = Path(tmp) / "x.kolm"
            path.write_bytes(data)
            runs = [
                _run([sys.executable, "-m", "kolm_ray.cli", "verify", str(path)], env) for _ in range(repeat)
            ]
            out["cases"][case] = {
                "exit": runs[0][1],
                "median_s": round(statistics.median(r[0] for r in runs), 3),
                "max_s": round(max(r[0] for r in runs), 3),
            }
    assert out["cases"]["good (baseline)"]["exit"] == 0, "the good artifact must verify"
    hostile_s = [v["max_s"] for k, v in out["cases"].items() if k != "good (baseline)"]
    out["slowest_hostile_s"] = max(hostile_s)
    out["good_artifact_s"] = out["cases"]["good (baseline)"]["median_s"]
    return out


def budget(repeat: int) -> dict:
    from test_serving import tenants

    from kolm_ray.serve.router import Router

    async def slow(query, namespaces):
        await asyncio.sleep(1.0)
        return {"namespace": namespaces[0], "confidence": 0.99}

    async def fast(query, namespaces):
        return {"namespace": namespaces[0], "confidence": 0.99}

    async def once(tag) -> float:
        r = Router(tenants(acme=["a", "b"]), budget_ms=50)
        t0 = time.perf_counter()
        await r.route("Bearer key-acme", b'{"query": "q"}', tag)
        return (time.perf_counter() - t0) * 1000

    def median(tag) -> float:
        return round(statistics.median(asyncio.run(once(tag)) for _ in range(repeat)), 2)

    return {"budget_ms": 50, "slow_tagger_ms": median(slow), "fast_tagger_ms (baseline)": median(fast)}


def uncached_base(repeat: int) -> dict:
    from compile_helpers import compile_argv

    out = {}
    with tempfile.TemporaryDirectory(prefix="kolm-base-") as tmp:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": f"{tmp}/hf", "KOLM_HOME": f"{tmp}/k",
               "PYTHONPATH": str(REPO), "KOLM_SIGNING_KEY": "bench-key-0123456789"}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        for label, argv in (
            ("uncached hub base -> exit 2", compile_argv(Path(tmp), base="qwen2.5-coder-3b")),
            ("local base --dry-run (baseline)", compile_argv(Path(tmp), "--dry-run")),
        ):
            runs = [_run([sys.executable, "-m", "kolm_ray.cli", *argv], env) for _ in range(repeat)]
            out[label] = {"exit": runs[0][1], "median_s": round(statistics.median(r[0] for r in runs), 3)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    result: dict = {
        "command": "benchmarks/failure_timings.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
    }
    result["hostile_artifacts"] = hostile(a.repeat)
    result["router_budget"] = budget(a.repeat)
    result["uncached_base"] = uncached_base(a.repeat)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(a.out) / "failure_timings.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
